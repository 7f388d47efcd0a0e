"""The routed experts of an MoE layer on a device mesh: dispatch, exchange, compute, combine.

Each device holds its own dispatch groups (whole sequences; logical axis `moe_batch`) and
the experts of its place in the expert-parallel group (logical `expert`: mesh axis
`expert`, or `expert x tensor` in the folded recipe). Weights arrive sharded: experts over
the EP group, their model width over FSDP (gathered here, per use), their hidden width
over expert-tensor axes (partial sums added). Tokens move between devices in one of three
ways, all inside one `shard_map` so every kernel sees local arrays:

  capacity, all_to_all (GShard): each group fills fixed `[E, C, d]` buffers; an all-to-all
      sends every expert's slots to its owner, experts compute, a second all-to-all brings
      them home. Each moves E*C*d*(ep-1)/ep values per device: at capacity factor 1 the
      pair is 2*k*(ep-1)/ep*T*d for T local tokens (`comm_bytes` below).
  dropless, all_gather ("ring of experts"): the EP group's tokens are gathered, each device
      computes the rows of its own experts (`gmm(..., group_offset=first local expert)`),
      and a reduce-scatter sums every token's expert outputs back on its home device.
      Needs no ragged collective, so it runs on CPU; it moves (ep-1)*T*d each way.
  dropless, ragged_all_to_all: each token row travels only to its expert's device, is
      sorted by local expert, computed, and sent back (GPU/TPU; XLA:CPU lacks the op, so on
      CPU it is emulated by a padded all-to-all: same result, for tests, not for speed).

With `overlap_chunks=n`, each exchange is split into n independent pieces (capacity slots,
or tokens) so that one piece's communication can overlap another's compute; the result is
the same. Zero-computation experts never get here: `MoELayer` computes them in place.

    y_gtd, group_sizes_ge, kept_gtk, zero_share = routed_ffn(h_gtd, routing_g, experts,
                                                             cfg.moe, cfg.parallel)
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from toolkit.moe.dispatch import capacity_plan, combine, dispatch, dropless_plan
from toolkit.moe.router import Routing
from toolkit.sharding.rules import mesh_axes_of


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Static: how one MoE layer sits on the mesh, and how it exchanges tokens."""
    batch: tuple = ()        # mesh axes splitting the dispatch groups
    ep: tuple = ()           # the expert-parallel group
    fsdp: tuple = ()         # axes sharding the experts' model width
    etp: tuple = ()          # axes sharding the experts' hidden width
    ep_size: int = 1
    exchange: str = "all_to_all"
    chunks: int = 1


def _spec(axes):
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def layout(mesh, parallel=None) -> _Layout:
    """The current rules' layout on `mesh` (axes of size 1 dropped)."""
    def axes(name):
        return tuple(a for a in mesh_axes_of(name) if mesh.shape.get(a, 1) > 1)
    ep = axes("expert")
    exchange = getattr(parallel, "dropless_exchange", "auto")
    if exchange == "auto":
        exchange = "all_gather" if jax.default_backend() == "cpu" else "ragged_all_to_all"
    return _Layout(batch=axes("moe_batch"), ep=ep, fsdp=axes("expert_embed"), etp=axes("expert_mlp"),
                   ep_size=math.prod(mesh.shape[a] for a in ep), exchange=exchange,
                   chunks=getattr(parallel, "overlap_chunks", 1))


def _routing(weights, expert_ids, valid) -> Routing:
    return Routing(weights=weights, expert_ids=expert_ids, valid=valid, probs=None, logits=None)


def _bounds(n: int, chunks: int) -> list:
    """Static (start, stop) of `chunks` near-equal pieces of range(n)."""
    cuts = [round(i * n / chunks) for i in range(chunks + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _exclusive_cumsum(x, axis=0):
    return jnp.cumsum(x, axis=axis) - x


# The token exchange runs under one named scope, which XLA keeps in each collective's
# metadata: `communication_check` finds exactly these ops in the compiled HLO.
SCOPE = "expert_exchange"


def _all_to_all(x, axes):
    with jax.named_scope(SCOPE):
        return jax.lax.all_to_all(x, axes, 1, 1)


def _all_gather(x, axes):
    with jax.named_scope(SCOPE):
        return jax.lax.all_gather(x, axes, axis=0, tiled=True)


def _reduce_scatter(x, axes):
    with jax.named_scope(SCOPE):
        return jax.lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True)


def _ragged_all_to_all(*args, axis_name):
    """XLA's ragged all-to-all; on CPU, which lacks it, the padded emulation below."""
    fn = (_ragged_all_to_all_emulated if jax.default_backend() == "cpu"
          else jax.lax.ragged_all_to_all)
    with jax.named_scope(SCOPE):
        return fn(*args, axis_name=axis_name)


def routed_ffn(h_gtd, routing_g: Routing, experts, moe, parallel=None):
    """Routed experts for dispatch groups `h_gtd` `[G, T, d]` with their routing `[G, T, k]`.

    Returns `(y_gtd, group_sizes_ge, kept_gtk, zero_share)`: the combined expert outputs,
    rows computed per group and expert, which assignments were computed, and the share of
    hidden activations that are exactly zero. Runs in place without a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    lay = _Layout() if mesh.empty or mesh.size == 1 else layout(mesh, parallel)
    local = functools.partial(_local_moe, lay=lay, experts=experts, num_experts=moe.num_ffn_experts,
                              dispatch_mode=moe.dispatch, capacity_factor=moe.capacity_factor)
    weights = experts.weights(h_gtd.dtype)
    args = (h_gtd, routing_g.weights, routing_g.expert_ids, routing_g.valid)
    if mesh.empty or mesh.size == 1:
        y, gs, kept, zeros, total = local(*args, weights)
    else:
        shards = math.prod(mesh.shape[a] for a in lay.batch)
        if h_gtd.shape[0] % shards:
            raise ValueError(f"{h_gtd.shape[0]} dispatch groups do not split over mesh axes "
                             f"{'*'.join(lay.batch)}={shards}; use a batch (or moe.dispatch_groups) "
                             f"divisible by {shards}")
        b, e, f, t = (_spec(a) for a in (lay.batch, lay.ep, lay.fsdp, lay.etp))
        w_spec = (P(e, f, t), P(e, f, t), P(e, t, f))
        # local shapes: h [G/B, T, d]; routing [G/B, T, k]; w_gate, w_up [E/ep, d/fsdp, d_e/etp]
        y, gs, kept, zeros, total = jax.shard_map(
            local, in_specs=(P(b),) * 4 + ([w_spec] * len(weights),),
            out_specs=(P(b),) * 5, check_vma=False)(*args, weights)
    return y, gs, kept, jnp.sum(zeros) / jnp.maximum(jnp.sum(total), 1.0)


def _local_moe(h_gtd, weights_gtk, ids_gtk, valid_gtk, expert_weights, *, lay, experts,
               num_experts, dispatch_mode, capacity_factor):
    """One device's part: returns y [G, T, d], group sizes [G, E], kept [G, T, k], and the
    zero / total hidden activation counts it computed (shape [1])."""
    if lay.fsdp:   # gather the experts' model width: w_gate, w_up [E_l, d, f]; w_down [E_l, f, d]
        expert_weights = [tuple(jax.lax.all_gather(w, lay.fsdp, axis=ax, tiled=True)
                                for w, ax in zip(kind, (1, 1, 2), strict=True))
                          for kind in expert_weights]
    routing = _routing(weights_gtk, ids_gtk, valid_gtk)
    if dispatch_mode == "capacity":
        plan = jax.vmap(lambda r: capacity_plan(r, num_experts, capacity_factor))(routing)
    else:
        plan = jax.vmap(lambda r: dropless_plan(r, num_experts))(routing)
    compute = functools.partial(experts.compute, weights=expert_weights, tensor_axis=lay.etp or None)
    if lay.ep_size == 1:
        xs = jax.vmap(dispatch)(h_gtd, plan)
        ys, zeros, total = compute(xs, plan.group_sizes)
        y = jax.vmap(combine)(ys, plan, routing)
    elif dispatch_mode == "capacity":
        y, zeros, total = _capacity_all_to_all(h_gtd, plan, routing, compute, lay)
    elif lay.exchange == "all_gather":
        y, zeros, total = _ring_of_experts(h_gtd, routing, compute, lay, num_experts)
    else:
        y, zeros, total = _ragged_exchange(h_gtd, routing, compute, lay, num_experts)
    count = lambda a: jnp.sum(a).reshape(1).astype(jnp.float32)
    return y, plan.group_sizes, plan.kept, count(zeros), count(total)


def _capacity_all_to_all(h_gtd, plan, routing, compute, lay):
    xs_gecd = jax.vmap(dispatch)(h_gtd, plan)                   # [G_l, E, C, d]
    g, e, c, d = xs_gecd.shape
    ep, e_l = lay.ep_size, e // lay.ep_size
    ys, zeros, total = [], 0.0, 0.0
    for c0, c1 in _bounds(c, lay.chunks):                       # slots [c0, c1) of every expert
        x = xs_gecd[:, :, c0:c1].reshape(g, ep, e_l, c1 - c0, d)
        sizes = jnp.clip(plan.group_sizes - c0, 0, c1 - c0).reshape(g, ep, e_l)
        x = _all_to_all(x, lay.ep)                              # [G_l, ep (source), E_l, c, d]
        sizes = _all_to_all(sizes, lay.ep)
        y, z, t = compute(x.reshape(g * ep, e_l, c1 - c0, d), sizes.reshape(g * ep, e_l))
        y = _all_to_all(y.reshape(g, ep, e_l, c1 - c0, d), lay.ep)
        ys.append(y.reshape(g, e, c1 - c0, d))
        zeros, total = zeros + jnp.sum(z), total + jnp.sum(t)
    ys_gecd = jnp.concatenate(ys, axis=2) if len(ys) > 1 else ys[0]
    return jax.vmap(combine)(ys_gecd, plan, routing), zeros, total


def _ring_of_experts(h_gtd, routing, compute, lay, num_experts):
    e_l = num_experts // lay.ep_size
    first = jax.lax.axis_index(lay.ep) * e_l                    # my experts: [first, first + E_l)
    ys, zeros, total = [], 0.0, 0.0
    for t0, t1 in _bounds(h_gtd.shape[1], lay.chunks):          # tokens [t0, t1) of every group
        piece = lambda a, t0=t0, t1=t1: _all_gather(a[:, t0:t1], lay.ep)
        h_all = piece(h_gtd)                                    # [ep * G_l, t, d]
        r_all = jax.tree.map(piece, routing)
        plan = jax.vmap(lambda r: dropless_plan(r, num_experts))(r_all)
        xs = jax.vmap(dispatch)(h_all, plan)                    # [ep * G_l, t * k, d]
        y, z, t = compute(xs, plan.group_sizes, group_offset=first)
        y = jax.vmap(combine)(y, plan, r_all)                   # my experts' terms only
        ys.append(_reduce_scatter(y, lay.ep))
        zeros, total = zeros + jnp.sum(z), total + jnp.sum(t)
    return (jnp.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]), zeros, total


def _ragged_exchange(h_gtd, routing, compute, lay, num_experts):
    g, t, d = h_gtd.shape
    ep, e_l = lay.ep_size, num_experts // lay.ep_size
    me = jax.lax.axis_index(lay.ep)
    ys, zeros, total = [], 0.0, 0.0
    for t0, t1 in _bounds(t, lay.chunks):
        r = jax.tree.map(lambda a, t0=t0, t1=t1: a[:, t0:t1].reshape(g * (t1 - t0), -1), routing)
        plan = dropless_plan(r, num_experts)                    # rows sorted by expert
        xs_rd = dispatch(h_gtd[:, t0:t1].reshape(-1, d), plan)  # [R, d]
        rows = xs_rd.shape[0]
        sizes_pe = plan.group_sizes.reshape(ep, e_l)            # rows for each device's experts
        with jax.named_scope(SCOPE):                            # [ep (source), ep (dest), E_l]
            all_sizes = jax.lax.all_gather(sizes_pe, lay.ep)
        sent = jnp.sum(all_sizes, axis=-1)                      # [source, dest] rows
        send, recv = sent[me], sent[:, me]
        in_off = _exclusive_cumsum(send)
        out_off = _exclusive_cumsum(sent, axis=0)[me]           # where my rows land at each dest
        recv_off = _exclusive_cumsum(recv)
        # The receive buffer holds the worst case (every peer sends all its rows here), so
        # nothing is ever dropped; that is ep x the local rows of memory.
        xr = _ragged_all_to_all(xs_rd, jnp.zeros((ep * rows, d), xs_rd.dtype), in_off, send,
                               out_off, recv, axis_name=lay.ep)  # [ep * R, d], by source
        # Each received row's local expert: sources in order, each sorted by expert.
        r_idx = jnp.arange(ep * rows)
        src = jnp.clip(jnp.searchsorted(jnp.cumsum(recv), r_idx, side="right"), 0, ep - 1)
        ends = jnp.cumsum(all_sizes[:, me, :], axis=-1)         # [source, E_l]
        pos = r_idx - recv_off[src]
        local_e = jax.vmap(lambda e_, p: jnp.searchsorted(e_, p, side="right"))(ends[src], pos)
        local_e = jnp.where(r_idx < jnp.sum(recv), local_e, e_l)
        order = jnp.argsort(local_e, stable=True)
        y, z, tt = compute(xr[order][None], jnp.sum(all_sizes[:, me, :], axis=0)[None])
        y_r = jnp.zeros_like(y[0]).at[order].set(y[0])
        back_off = _exclusive_cumsum(sent, axis=1)[:, me]       # where each source keeps them
        ys_rd = _ragged_all_to_all(y_r, jnp.zeros((rows, d), y_r.dtype), recv_off, recv, back_off,
                                  send, axis_name=lay.ep)
        ys.append(combine(ys_rd, plan, r).reshape(g, t1 - t0, d))
        zeros, total = zeros + jnp.sum(z), total + jnp.sum(tt)
    return (jnp.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]), zeros, total


def _ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` from a padded all-to-all: the same result on any backend
    (each chunk padded to the operand's length), so CPU tests check the ragged path."""
    n, d = operand.shape
    r = jnp.arange(n)
    idx = jnp.clip(input_offsets[:, None] + r[None, :], 0, n - 1)          # [ep, n]
    chunks = jnp.where((r[None, :] < send_sizes[:, None])[..., None], operand[idx], 0)
    chunks = jax.lax.all_to_all(chunks, axis_name, 0, 0)                    # [ep (source), n, d]
    dest_off = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dest = jnp.where(r[None, :] < recv_sizes[:, None], dest_off[:, None] + r[None, :],
                     output.shape[0])
    return output.at[dest.reshape(-1)].set(chunks.reshape(-1, d), mode="drop")


def comm_bytes(moe, tokens: int, d: int, ep: int, itemsize: int = 4,
               exchange: str = "all_gather") -> dict:
    """Analytic bytes one device sends per MoE layer forward through the expert exchange.

    `tokens`: the device's tokens T; `d`: the dispatched width (r*d for BigMac);
    `exchange`: the dropless exchange (`parallel.dropless_exchange` resolved).
      capacity: two all-to-alls of E*C*d*(ep-1)/ep, C = ceil(cf*T*k/E)
        (2*k*(ep-1)/ep*T*d at cf = 1);
      dropless all_gather: an all-gather of (ep-1)*T*d and of the float32 routing weights
        (ep-1)*T*k (ids and masks travel too, as integers), a reduce-scatter of (ep-1)*T*d;
      dropless ragged_all_to_all: data-dependent; at uniform load 2*k*(ep-1)/ep*T*d, the
        rows that leave the device (the CPU emulation pads, so it sends ep times more).
    """
    from toolkit.moe.dispatch import capacity
    out = {"all-to-all": 0, "all-gather": 0, "reduce-scatter": 0}
    if ep == 1:
        return out
    if moe.dispatch == "capacity":
        c = capacity(tokens, moe.top_k, moe.num_ffn_experts, moe.capacity_factor)
        out["all-to-all"] = 2 * moe.num_ffn_experts * c * d * (ep - 1) // ep * itemsize
    elif exchange == "ragged_all_to_all":
        out["all-to-all"] = 2 * moe.top_k * tokens * d * (ep - 1) // ep * itemsize
    else:
        out["reduce-scatter"] = (ep - 1) * tokens * d * itemsize
        out["all-gather"] = out["reduce-scatter"] + (ep - 1) * tokens * moe.top_k * 4
    return out

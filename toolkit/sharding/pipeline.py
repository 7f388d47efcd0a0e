"""Pipeline parallelism: a schedule's timeline, executed tick by tick in `shard_map`.

The model's blocks are stacked `[v, p, ...]` (`Transformer.stages`); device `s` of the
`pipeline` axis holds chunks `s, s+p, ...`. A schedule (`toolkit.sharding.schedules`) says
what every device does at every tick: `F(i, r)` runs micro-batch i through local chunk r,
`B(i, r)` its backward. `plan()` turns the timeline into static tables, and the executor
scans over ticks, each device reading its row (`axis_index("pipeline")`):

    F: input = x[i] (first chunk) or a received activation; y = chunk(input); stash input
    B: dy = a received gradient (or the loss gradient); vjp of chunk at the stashed input
       (recomputed: GPipe's re-materialisation; or stashed residuals); accumulate dparams
    then ppermute forward messages to s+1 and backward messages to s-1 (cyclically: with
    v > 1 chunk r*p + p-1 on device p-1 feeds chunk (r+1)*p on device 0).

Buffers hold only what a device has in flight: their slots are assigned statically from
the timeline, so GPipe stashes m micro-batches and 1F1B at most p (its lower activation
memory shows in the compiled program's memory analysis).

The output layer runs at the tick the last chunk finishes a micro-batch, on every device
at once (vocabulary parallelism): the final hidden state is broadcast over `pipeline`,
each device computes logits for its `V/p` ids (`vocab_parallel_cross_entropy`), and the
loss gradient comes back to the last stage for its backward. The weights are stored split
over `pipeline x tensor`; the executor gathers the tensor part (XLA's partitioner does
not split one dimension over a manual and an automatic axis). The embedding, split the
same way, runs before the ticks (and its gradient after), by the compiler.

Devices of different stages take different branches at a tick (F, B or idle), so the
collectives inside a stage (tensor, expert, sequence axes) must only involve devices of
the same stage. XLA:CPU's collective-permute waits for every device regardless, so ring
attention (`parallel.context="ring"`) is rejected with a pipeline; all-gather context
parallelism, tensor and expert parallelism work.

    (loss, metrics), grads = pipeline_value_and_grad(model, batch, cfg, aux_loss_of)

equals `nnx.value_and_grad` of the mean micro-batch loss on one device
(`toolkit.training.step.value_and_grad`, which also accumulates micro-batches without a
pipeline). Axes other than `pipeline` stay automatic inside the stages, so data, FSDP,
tensor, expert and sequence parallelism compose with it unchanged.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from toolkit.models.layers import rms_norm
from toolkit.moe.layer import aux_metrics
from toolkit.precision.fake_quant import linear, quantize_weight, use_precision
from toolkit.sharding.mesh import rules_for
from toolkit.sharding.rules import use_rules
from toolkit.sharding.schedules import Timeline, timeline
from toolkit.sharding.vocab_parallel import vocab_parallel_cross_entropy

AXIS = "pipeline"
# Columns of the per-tick table: op kind (0 idle, 1 F, 2 B), local chunk, micro-batch,
# forward-buffer slot to read (-1: the embedded input), stash slot, backward-buffer slot
# to read, and the slots where this tick's received forward/backward messages go (-1: none).
KIND, CHUNK, MB, F_SRC, STASH, B_SRC, RECV_F, RECV_B = range(8)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static tables of one timeline: `table [T, p, 8]`, and per tick the micro-batch whose
    last chunk ends there (`head [T]`, -1: none) with the backward slot its loss gradient
    goes to on device p-1 (`head_slot [T]`); buffer sizes per kind."""
    ticks: int
    table: np.ndarray
    head: np.ndarray
    head_slot: np.ndarray
    stash: int
    fbuf: int
    bbuf: int


def _allocate(intervals) -> tuple:
    """Greedy slots for `(key, write_tick, read_tick)`: a slot is reused once read."""
    free_at, out = [], {}
    for key, w, r in sorted(intervals, key=lambda x: x[1]):
        k = next((j for j, f in enumerate(free_at) if f <= w), None)
        if k is None:
            k = len(free_at)
            free_at.append(0)
        free_at[k], out[key] = r, k
    return out, len(free_at)


def plan(tl: Timeline) -> Plan:
    """Executor tables for a unit-time timeline."""
    p, v, T = tl.stages, tl.virtual, int(tl.length)
    last = p * v - 1
    at = {(op.kind, op.microbatch, op.chunk * p + op.stage): int(op.start) for op in tl.ops}
    table = np.full((T, p, 8), -1, np.int32)
    table[:, :, KIND] = 0
    head, head_slot = np.full(T, -1, np.int32), np.full(T, -1, np.int32)
    stash, fmsg, bmsg = {s: [] for s in range(p)}, {s: [] for s in range(p)}, {s: [] for s in range(p)}
    for (kind, i, c), t in at.items():
        s = c % p
        if kind == "F":
            stash[s].append(((i, c), t, at[("B", i, c)]))
            if c < last:
                fmsg[(s + 1) % p].append(((i, c + 1), t, at[("F", i, c + 1)]))
        else:
            if c > 0:
                bmsg[(s - 1) % p].append(((i, c - 1), t, at[("B", i, c - 1)]))
        if kind == "F" and c == last:
            bmsg[s].append(((i, c), t, at[("B", i, c)]))          # the loss gradient
    alloc = {name: {s: _allocate(q[s]) for s in range(p)}
             for name, q in (("stash", stash), ("f", fmsg), ("b", bmsg))}
    for (kind, i, c), t in at.items():
        s, r = c % p, c // p
        row = table[t, s]
        row[KIND], row[CHUNK], row[MB] = (1 if kind == "F" else 2), r, i
        row[STASH] = alloc["stash"][s][0][(i, c)]
        if kind == "F":
            row[F_SRC] = alloc["f"][s][0][(i, c)] if c else -1
            if c < last:
                table[t, (s + 1) % p, RECV_F] = alloc["f"][(s + 1) % p][0][(i, c + 1)]
            else:
                head[t], head_slot[t] = i, alloc["b"][s][0][(i, c)]
        else:
            row[B_SRC] = alloc["b"][s][0][(i, c)]
            if c > 0:
                table[t, (s - 1) % p, RECV_B] = alloc["b"][(s - 1) % p][0][(i, c - 1)]
    size = {name: max(1, max(n for _, n in alloc[name].values())) for name in alloc}
    return Plan(T, table, head, head_slot, size["stash"], size["f"], size["b"])


def split_microbatches(x, m: int):
    """`[B, ...] -> [m, B/m, ...]`, micro-batch i = rows i, i+m, i+2m, ... (a strided split
    keeps each micro-batch spread over the data-parallel shards of the batch)."""
    return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def _psum32(x):
    """`psum` over the pipeline in float32 (XLA:CPU fails to compile bf16 all-reduces here)."""
    return jax.lax.psum(x.astype(jnp.float32), AXIS).astype(x.dtype)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _execute(stage_fn, pl: Plan, v: int, m: int, remat: bool, eps: float,
             params, rest, x_m, scale, w_dv, targets_m):
    """Inside `shard_map` (manual over `pipeline`): returns loss, metrics and gradients.
    Local shapes: params/rest `[v, 1, ...]`, x_m `[m, b, S, d]`, w_dv `[d, V/p]`."""
    p = pl.table.shape[1]
    s_idx = jax.lax.axis_index(AXIS)
    params = jax.tree.map(lambda a: a[:, 0], params)            # [v, ...] this device's chunks
    rest = jax.tree.map(lambda a: a[:, 0], rest)
    table, head, head_slot = (jnp.asarray(a) for a in (pl.table, pl.head, pl.head_slot))
    act = jax.ShapeDtypeStruct(x_m.shape[1:], x_m.dtype)

    def pick(tree, r):
        return jax.tree.map(lambda a: a[r], tree)

    def chunk_fn(p_r, x, r):
        """`((y, aux_loss), metrics)` of local chunk r."""
        return stage_fn(p_r, pick(rest, r), x)

    out_meta = jax.eval_shape(lambda pr, x: chunk_fn(pr, x, 0), pick(params, 0), act)
    stash_like, keep = act, None
    if not remat:
        # Stash the VJP's residuals (the leaves of the function `jax.vjp` returns), except
        # those that are parameters, already at hand: keep[i] = j >= 0 when residual i is
        # parameter leaf j, -1 when it is stashed.
        found = {}

        def residuals(pr, x):
            leaves = jax.tree.leaves(jax.vjp(lambda q, y: chunk_fn(q, y, 0), pr, x, has_aux=True)[1])
            pr_leaves = jax.tree.leaves(pr)
            found["keep"] = [next((j for j, q in enumerate(pr_leaves) if q is leaf), -1)
                             for leaf in leaves]
            return leaves
        shapes = jax.eval_shape(residuals, pick(params, 0), act)
        keep = found["keep"]
        stash_like = [s for s, k in zip(shapes, keep, strict=True) if k < 0]

    def buf(n, like):
        return jax.tree.map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), like)

    metrics0 = jax.tree.map(lambda a: jnp.zeros((v,) + a.shape, a.dtype), out_meta[1])
    carry0 = dict(stash=buf(pl.stash, stash_like), fbuf=buf(pl.fbuf, act), bbuf=buf(pl.bbuf, act),
                  grads=_zeros(params), metrics=metrics0, aux=jnp.zeros((), jnp.float32),
                  ce=jnp.zeros((), jnp.float32), dscale=jnp.zeros_like(scale),
                  dw=jnp.zeros_like(w_dv), dx=jnp.zeros_like(x_m))
    treedef = {}

    def forward(c, row):
        r, i = row[CHUNK], row[MB]
        x = jnp.where(row[F_SRC] < 0, x_m[i], c["fbuf"][jnp.maximum(row[F_SRC], 0)])
        p_r = pick(params, r)
        if remat:
            (y, aux_loss), met = chunk_fn(p_r, x, r)
            entry = x
        else:
            (y, aux_loss), vjp, met = jax.vjp(lambda q, z: chunk_fn(q, z, r), p_r, x, has_aux=True)
            leaves, treedef["vjp"] = jax.tree.flatten(vjp)
            entry = [leaf for leaf, k in zip(leaves, keep, strict=True) if k < 0]
        c = dict(c, stash=jax.tree.map(lambda b, e: b.at[row[STASH]].set(e), c["stash"], entry),
                 metrics=jax.tree.map(lambda a, e: a.at[r].add(e), c["metrics"], met),
                 aux=c["aux"] + aux_loss)
        return c, y, jnp.zeros_like(y)

    def backward(c, row):
        r, i = row[CHUNK], row[MB]
        dy = c["bbuf"][row[B_SRC]]
        entry = jax.tree.map(lambda b: b[row[STASH]], c["stash"])
        p_r = pick(params, r)
        if remat:
            _, vjp, _ = jax.vjp(lambda q, z: chunk_fn(q, z, r), p_r, entry, has_aux=True)
        else:
            p_leaves, it = jax.tree.leaves(p_r), iter(entry)
            leaves = [next(it) if k < 0 else p_leaves[k] for k in keep]
            vjp = jax.tree.unflatten(treedef["vjp"], leaves)
        dp, dx = vjp((dy, jnp.float32(1.0 / m)))
        first = (s_idx == 0) & (r == 0)
        c = dict(c, grads=jax.tree.map(lambda g, d: g.at[r].add(d), c["grads"], dp),
                 dx=c["dx"].at[i].add(jnp.where(first, dx, 0)))
        return c, jnp.zeros_like(dx), dx

    def idle(c, row):
        z = jnp.zeros(act.shape, act.dtype)
        return c, z, z

    def head_pass(c, y, t):
        """Loss of the micro-batch whose last chunk ended now, on every device's vocab."""
        h = _psum32(jnp.where(s_idx == p - 1, y, 0))
        i = jnp.maximum(head[t], 0)

        def loss(sc, w, h):
            z = linear(rms_norm(h, sc, eps), w.astype(h.dtype), "head").astype(jnp.float32)
            return jnp.mean(vocab_parallel_cross_entropy(z, targets_m[i], AXIS)) / m
        ce, vjp = jax.vjp(loss, scale, w_dv, h)
        dsc, dw, dh = vjp(jnp.float32(1.0))
        dh = _psum32(dh)
        slot = jnp.maximum(head_slot[t], 0)
        bbuf = c["bbuf"].at[slot].set(jnp.where(s_idx == p - 1, dh, c["bbuf"][slot]))
        return dict(c, ce=c["ce"] + ce, dscale=c["dscale"] + jax.lax.psum(dsc, AXIS),
                    dw=c["dw"] + dw, bbuf=bbuf)

    def tick(c, t):
        row = table[t, s_idx]
        c, send_f, send_b = jax.lax.switch(row[KIND], [idle, forward, backward], c, row)
        recv_f = jax.lax.ppermute(send_f, AXIS, [(k, (k + 1) % p) for k in range(p)])
        recv_b = jax.lax.ppermute(send_b, AXIS, [(k, (k - 1) % p) for k in range(p)])
        c = jax.lax.cond(head[t] >= 0, head_pass, lambda c, y, t: c, c, send_f, t)
        for name, slot, msg in (("fbuf", row[RECV_F], recv_f), ("bbuf", row[RECV_B], recv_b)):
            k = jnp.maximum(slot, 0)
            c[name] = c[name].at[k].set(jnp.where(slot >= 0, msg, c[name][k]))
        return c, None

    c, _ = jax.lax.scan(tick, carry0, jnp.arange(pl.ticks))
    aux = jax.lax.psum(c["aux"], AXIS) / m
    expand = functools.partial(jax.tree.map, lambda a: a[:, None])
    return (c["ce"], aux, expand(c["metrics"]), expand(c["grads"]), _psum32(c["dx"]),
            c["dscale"], c["dw"])


def pipeline_loss(stage_fn, cfg, params, rest, x_m, scale, w_dv, targets_m):
    """`(ce, aux, metrics_vp, grads)`: mean micro-batch CE and router loss of the pipeline,
    per-chunk metric sums `[v, p, ...]`, and the gradients of `ce + aux` with respect to
    `(params, x_m, scale, w_dv)` (the caller chains them into the embedding and head)."""
    par, m = cfg.parallel, cfg.train.microbatches
    pl = plan(timeline(par.schedule, par.pipeline, m, par.virtual_stages))
    run = functools.partial(_execute, stage_fn, pl, par.virtual_stages, m, par.pipeline_remat,
                            cfg.model.norm_eps)
    stacked = P(None, AXIS)
    fn = jax.shard_map(run, axis_names={AXIS}, check_vma=False,
                       in_specs=(stacked, stacked, P(), P(), P(None, AXIS), P()),
                       out_specs=(P(), P(), stacked, stacked, P(), P(), P(None, AXIS)))
    ce, aux, metrics, g_params, g_x, g_scale, g_w = fn(params, rest, x_m, scale, w_dv, targets_m)
    return ce, aux, metrics, (g_params, g_x, g_scale, g_w)


def pipeline_value_and_grad(model, batch, cfg, aux_loss_of):
    """`((loss, metrics), grads)` of the pipelined model: what `nnx.value_and_grad(loss_fn)`
    gives without a pipeline. `aux_loss_of(aux)` weighs a chunk's stacked `MoEAux` into
    the scalar router loss; metrics come back per layer `[L, ...]`, summed over
    micro-batches (counts) or averaged (everything else)."""
    from toolkit.models.transformer import pipeline_chunks
    m = cfg.train.microbatches
    dtype = jnp.dtype(cfg.model.dtype)
    stage_graphdef, _, _ = nnx.split(model.stages, nnx.Param, ...)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    v, p, _ = pipeline_chunks(cfg)

    def stage_fn(p_r, rest_r, x):
        stage = nnx.merge(stage_graphdef, p_r, rest_r)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        y, aux = stage(x, positions)
        if aux is None:
            return (y, jnp.zeros((), jnp.float32)), {}
        return (y, aux_loss_of(aux)), aux_metrics(aux)

    stage_rest = nnx.split(model.stages, nnx.Param, ...)[2]
    targets_m = split_microbatches(batch["targets"], m)

    # The executor computes the loss and its gradients together; a custom VJP hands those
    # gradients to autodiff, which chains them through the embedding and output weights.
    @jax.custom_vjp
    def loss_parts(stage_params, x_m, scale, w_dv):
        return fwd(stage_params, x_m, scale, w_dv)[0]

    def fwd(stage_params, x_m, scale, w_dv):
        ce, aux, metrics, grads = pipeline_loss(stage_fn, cfg, stage_params, stage_rest, x_m,
                                                scale, w_dv, targets_m)
        return (ce, aux, metrics), grads

    def bwd(grads, cts):        # the loss is ce + aux: both cotangents are the same scalar
        return jax.tree.map(lambda g: g * cts[0], grads)

    loss_parts.defvjp(fwd, bwd)

    def full(params):
        mdl = nnx.merge(graphdef, params, rest)
        x_m = split_microbatches(mdl.embed(batch["tokens"], dtype), m)
        w_dv = mdl.head_weight()
        # The executor splits the vocabulary over `pipeline` only (XLA's partitioner rejects
        # a dimension split over a manual and an automatic axis at once).
        w_dv = jax.lax.with_sharding_constraint(quantize_weight(w_dv, "head"), P(None, AXIS))
        stage_params = nnx.state(mdl.stages, nnx.Param)
        ce, aux, metrics = loss_parts(stage_params, x_m, mdl.final_norm.scale[...], w_dv)
        return ce + aux, (ce, metrics)

    with use_rules(rules_for(cfg.parallel)), use_precision(cfg.precision):
        (loss, (ce, metrics)), grads = jax.value_and_grad(full, has_aux=True)(params)
    metrics = jax.tree.map(lambda a: a.reshape((v * p * a.shape[2],) + a.shape[3:]), metrics)
    metrics = {k: (a if k.endswith("_counts") else a / m) for k, a in metrics.items()}
    return (loss, dict(metrics, ce=ce, loss=loss)), grads

"""Megatron tensor parallelism in `shard_map`: column- then row-parallel, one all-reduce.

A dense MLP splits its hidden width over the `tensor` axis: `W_gate, W_up` by columns,
`W_down` by rows, so each device computes `act(x W_gate[:, f_t]) * x W_up[:, f_t]` for its
slice `f_t` of the hidden units and a partial `h_t W_down[f_t, :]`; one `psum` over `tensor`
adds the partials. Attention splits the same way by heads: each device projects, rotates
and attends for its query heads (and their kv heads) and a `psum` adds the output
projections. That is two all-reduces per layer forward (after attention, after the MLP)
and two backward (of the input gradients), each of `b*s*d` values: per layer and device
`8 * b*s*d * (t-1)/t` values sent on a ring (`tensor_parallel_bytes`).

    y_btd = tensor_parallel(local_mlp, x_btd, [(w_gate, ("embed", "mlp")), ...])

`local_mlp(x, w_gate, w_up, w_down, tensor_axis=...)` sees the device's arrays: x
`[B/batch, S, d]` and weights split on their tensor-parallel dimension; dimensions sharded
for FSDP are gathered first (per use, as ZeRO-3 does). Without a mesh it runs as is. The
local function thus always sees whole heads, so a Pallas flash-attention kernel runs
unchanged on every device.
"""

import math

import jax
from jax.sharding import PartitionSpec as P

from toolkit.sharding.rules import logical_to_spec, mesh_axes_of


def _axes(entry) -> tuple:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _live(axes, mesh) -> tuple:
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def tensor_parallel(local_fn, x_btd, weights, *, split="mlp", extra=(), chunks: int = 1,
                    sequence_axis: bool = False):
    """Run `local_fn(x, *extra, *weights, tensor_axis=...)` on each device's shards.

    Args:
      local_fn: computes on local arrays and adds its partial sums with
        `jax.lax.psum(..., tensor_axis)` when `tensor_axis` is not None.
      x_btd: activations, split over the batch axes and replicated over `tensor`.
      weights: [(array, logical names)]; a dimension named `split` (e.g. "mlp", "heads",
        "kv_heads") stays split, any other sharded dimension is gathered.
      split: the logical names whose mesh axes are the tensor-parallel ones (str or tuple).
      extra: further arrays laid out like `x_btd` on their leading dimension (positions).
      chunks: split each device's sequences into this many pieces, each with its own
        all-reduce, so one piece's all-reduce can overlap the next one's compute (the
        TokenWeave-style token split; `parallel.overlap_chunks`). Same result.
      sequence_axis: pass `sequence_axis=` (the context-parallel mesh axes, or None) to
        `local_fn`, which then sees `[B, S/n, ...]` pieces of the sequences (attention).

    Positions split over the `seq` rule's axes stay split (context parallelism). Under
    Megatron sequence parallelism (`seq` also mapped to the tensor axes) the input is
    all-gathered along the sequence first and the partial sums are reduce-scattered
    along it instead of all-reduced, so the output leaves split like the input came.
    """
    mesh = jax.sharding.get_abstract_mesh()
    ctx = {"sequence_axis": None} if sequence_axis else {}
    if mesh.empty or mesh.size == 1:
        return local_fn(x_btd, *extra, *(w for w, _ in weights), tensor_axis=None, **ctx)
    splits = (split,) if isinstance(split, str) else tuple(split)
    tensor = _live(sum((mesh_axes_of(s) for s in splits), ()), mesh)
    tensor = tuple(dict.fromkeys(tensor))
    batch = _live(mesh_axes_of("batch"), mesh)
    if x_btd.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = ()                       # a batch that does not split (e.g. one sequence)
    specs, gathers = [], []
    for _, names in weights:
        spec = logical_to_spec(names)
        specs.append(P(*(_live(_axes(e), mesh) or None for e in spec)))
        gathers.append(tuple((dim, _live(_axes(e), mesh)) for dim, e in enumerate(spec)
                             if _live(_axes(e), mesh) and not set(_axes(e)) <= set(tensor)))
    b = None if not batch else (batch[0] if len(batch) == 1 else batch)
    seq_all = _live(mesh_axes_of("seq"), mesh)
    seq = tuple(a for a in seq_all if a not in tensor)              # context parallel
    scatter = tuple(a for a in seq_all if a in tensor)              # Megatron sequence parallel
    if sequence_axis:
        ctx = {"sequence_axis": seq or None}
    reduce_axis = None if scatter else (tensor or None)

    def finish(y):
        if not scatter:
            return y
        return jax.lax.psum_scatter(y, tensor, scatter_dimension=1, tiled=True)

    def local(x, *args):
        ex, ws = args[:len(extra)], list(args[len(extra):])
        for i, dims in enumerate(gathers):
            for dim, axes in dims:       # FSDP: gather the sharded model width per use
                ws[i] = jax.lax.all_gather(ws[i], axes, axis=dim, tiled=True)
        n = x.shape[0]
        if chunks == 1 or n < 2:
            return finish(local_fn(x, *ex, *ws, tensor_axis=reduce_axis, **ctx))
        cuts = [round(i * n / min(chunks, n)) for i in range(min(chunks, n) + 1)]
        return jax.numpy.concatenate(
            [finish(local_fn(x[a:b], *(e[a:b] for e in ex), *ws, tensor_axis=reduce_axis, **ctx))
             for a, b in zip(cuts, cuts[1:], strict=False)], axis=0)

    s_in = None if not seq else (seq[0] if len(seq) == 1 else seq)
    s_out = None if not seq_all else (seq_all[0] if len(seq_all) == 1 else seq_all)
    fn = jax.shard_map(local, in_specs=(P(b, s_in),) + (P(b, s_in),) * len(extra) + tuple(specs),
                       out_specs=P(b, s_out), check_vma=False)
    return fn(x_btd, *extra, *(w for w, _ in weights))


def psum_if(x, tensor_axis):
    """`psum` over `tensor_axis`, or `x` itself when there is none."""
    return jax.lax.psum(x, tensor_axis) if tensor_axis else x


def tensor_parallel_bytes(batch: int, seq: int, d_model: int, t: int, itemsize: int = 4) -> float:
    """Analytic bytes one device sends per transformer layer, forward and backward, for
    Megatron tensor parallelism of width `t`: four all-reduces of `b*s*d` on a ring,
    2*(t-1)/t each, i.e. `8 * b*s*d * (t-1)/t` values (`batch` = the device's sequences)."""
    return 8 * batch * seq * d_model * (t - 1) / t * itemsize


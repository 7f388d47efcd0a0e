"""Flash attention as Pallas Mosaic TPU kernels: forward, and a two-kernel backward.

Flash attention never builds the [T, S] score matrix. A grid step holds one tile of
queries and one tile of keys in VMEM; the forward pass walks the key tiles of a query
tile in order (the innermost, "arbitrary" grid axis) and keeps an online softmax in
VMEM scratch: the running row max `m`, the running denominator `l` and an fp32
accumulator `acc`, rescaled by `exp(m_old - m_new)` whenever the max grows:

    s = q k^T * sm_scale;  m' = max(m, rowmax(s));  p = exp(s - m')
    l = exp(m - m') l + rowsum(p);  acc = exp(m - m') acc + p v;  ...  o = acc / l

It also writes `lse = m + log(l)` per query row, so the backward pass can rebuild
`p = exp(s - lse)` tile by tile without a second softmax. The backward runs two kernels:
one owns a key tile and sums dk, dv over every query tile and every query head of its
GQA group; the other owns a query tile and sums dq over the key tiles. Both use
`delta = rowsum(o * do)`, computed beforehand in XLA.

    from pallas_kernels.flash_attention import mosaic_tpu
    from pallas_kernels.tuning import AttentionBlockSizes
    bs = AttentionBlockSizes(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256)
    o_bthd, lse_bht = mosaic_tpu.flash_attention_fwd(
        q_bthd, k_bskd, v_bskd, None, None, causal=True, sm_scale=D ** -0.5,
        block_sizes=bs, interpret=False)      # interpret=True runs the same kernel on CPU

Layouts, chosen for Mosaic's rule that a block's last two dims divide (8, 128) or equal
the array's (a squeezed head axis in [B, L, N, D] breaks it):
  * q, k, v, o: when D % 128 == 0, [B, L, N, D] is viewed for free as [B, L, N*D] and a
    head is a D-wide column block; otherwise the wrapper transposes to [B, N, L, D].
  * A tile's per-key vectors (kv segment ids; in the dk/dv kernel, which works on s^T,
    the per-query lse, delta and q segment ids) broadcast along sublanes, so they come as
    lane-dense rows: blocks [1, block] of [B, 1, L] / [B, H, 1, L] arrays.
  * Per-query columns: q segment ids (kv ids in the dk/dv kernel) come lane-broadcast,
    i32[B, L, 128], so a [block, 128] tile sliced to [block, 1] broadcasts along lanes;
    the dq kernel turns its lse/delta rows into columns in VMEM (`row[0][:, None]`);
    the forward keeps m and l lane-broadcast in [block_q, 128] scratch and writes lse as
    a row [B, H, 1, T] (one aligned transpose per query tile) instead of a 128x larger
    lane-broadcast array.
Masked logits take a finite `_MASK` value and masked probabilities are zeroed with
`where`. A query row with no allowed key (e.g. padding) gets o = 0 and lse = +inf, so
`exp(s - lse) == 0` there, and zero gradients; no NaN appears forward or backward.

Causal tiles wholly above the diagonal are skipped with `pl.when`, and their index maps
re-point at the last (forward, dq) or first (dk/dv) useful tile: an unchanged block index
means Pallas issues no new DMA for the skipped steps.

On CPU, `interpret=True` passes `pltpu.InterpretParams()` to `pallas_call`: Pallas'
TPU interpreter runs the same grid, BlockSpecs, VMEM scratch and dimension semantics
(uninitialised scratch reads as NaN, so a missed init shows up in tests). The real
kernels need a TPU; `jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))` runs the
Pallas -> Mosaic lowering on any machine (Mosaic's layout passes run only on a TPU).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tuning import AttentionBlockSizes

_MASK = -1e30  # a finite "minus infinity" for masked logits: no inf - inf = NaN
_NT = (((1,), (1,)), ((), ()))  # dot_general dims for a @ b^T (contract the last dims)
_LANES = 128


def _dot_nt(a, b):
    return jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


class _Heads:
    """How a [B, L, N, D] array reaches the kernels, and how a result comes back.

    `spec(block, index_map)` takes an index map returning (batch, head, row block) and
    gives the BlockSpec whose kernel ref is [block, D] in either layout.
    """

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self.flat = head_dim % _LANES == 0  # [B, L, N*D]: a free reshape, no transpose

    def to_kernel(self, x_blnd):
        b, length, n, d = x_blnd.shape
        return x_blnd.reshape(b, length, n * d) if self.flat else x_blnd.transpose(0, 2, 1, 3)

    def from_kernel(self, y, num_heads):
        if self.flat:
            b, length, _ = y.shape
            return y.reshape(b, length, num_heads, self.head_dim)
        return y.transpose(0, 2, 1, 3)

    def spec(self, block, index_map):
        if self.flat:
            return pl.BlockSpec((None, block, self.head_dim),
                                lambda *g: (lambda b, n, r: (b, r, n))(*index_map(*g)))
        return pl.BlockSpec((None, None, block, self.head_dim),
                            lambda *g: (*index_map(*g), 0))


def _mask(seg_refs, q_start, k_start, shape, causal, transposed):
    """Which (query, key) pairs of a tile may attend, or None when all may.

    Rows are queries and columns keys; with `transposed` rows are keys and columns
    queries (the dk/dv kernel works on s^T). `seg_refs` is () or the segment ids of the
    rows, lane-broadcast i32[rows, 128], and of the columns, a row i32[1, cols].
    """
    mask = None
    if seg_refs:
        col_ref, row_ref = seg_refs
        mask = col_ref[...][:, :1] == row_ref[...]
    if causal:
        q_axis, k_axis = (1, 0) if transposed else (0, 1)
        q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_idx = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, k_axis)
        mask = k_idx <= q_idx if mask is None else mask & (k_idx <= q_idx)
    return mask


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, causal, sm_scale, has_seg):
    # q_ref: [bq, D]; k_ref, v_ref: [bk, D]; segment ids: i32[bq, 128] (q), i32[1, bk] (kv);
    # out: o_ref [bq, D], lse_ref f32[1, bq]; scratch m, l: f32[bq, 128] (lane-broadcast)
    seg_refs, refs = (refs[:2], refs[2:]) if has_seg else ((), refs)
    o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    i, j, num_kv = pl.program_id(2), pl.program_id(3), pl.num_programs(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, _MASK, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def _step():
        s = _dot_nt(q_ref[...], k_ref[...]) * sm_scale  # [bq, bk]
        mask = _mask(seg_refs, i * block_q, j * block_k, s.shape, causal, transposed=False)
        if mask is not None:
            s = jnp.where(mask, s, _MASK)
        m_prev = m_scr[...][:, :1]  # [bq, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)  # a row masked so far has s == m_new, not p == 0
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_scr[...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
        m_scr[...] = jnp.broadcast_to(m_new, m_scr.shape)
        l_scr[...] = jnp.broadcast_to(l_new, l_scr.shape)

    if causal:  # key tiles wholly right of the diagonal add nothing
        pl.when(j * block_k <= (i + 1) * block_q - 1)(_step)
    else:
        _step()

    @pl.when(j == num_kv - 1)
    def _finalize():
        l_sum = l_scr[...]  # [bq, 128]
        empty = l_sum == 0.0  # no allowed key in the row
        l_safe = jnp.where(empty, 1.0, l_sum)
        o_ref[...] = (acc_scr[...] / l_safe[:, :1]).astype(o_ref.dtype)
        lse = jnp.where(empty, jnp.inf, m_scr[...] + jnp.log(l_safe))  # [bq, 128]
        lse_ref[...] = lse.T[:1]  # an aligned 2-D transpose turns the column into a row


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, causal, sm_scale, has_seg):
    # Works on transposed tiles, keys along rows: s_t = k q^T is [bk, bq], so the
    # per-query rows lse, delta: f32[1, bq] and q segment ids i32[1, bq] broadcast as they
    # come; kv segment ids: i32[bk, 128] (lane-broadcast). dk, dv, scratch: [bk, D].
    seg_refs, refs = (refs[:2], refs[2:]) if has_seg else ((), refs)
    dk_ref, dv_ref, dk_scr, dv_scr = refs
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    first = (g == 0) & (i == 0)
    last = (g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def _step():
        q, do = q_ref[...], do_ref[...]
        s_t = _dot_nt(k_ref[...], q) * sm_scale  # [bk, bq]
        mask_t = _mask(seg_refs, i * block_q, j * block_k, s_t.shape, causal, transposed=True)
        p_t = jnp.exp(s_t - lse_ref[...])
        if mask_t is not None:
            p_t = jnp.where(mask_t, p_t, 0.0)
        dv_scr[...] += _dot(p_t.astype(do.dtype), do)  # [bk, D]
        ds_t = p_t * (_dot_nt(v_ref[...], do) - delta_ref[...])  # [bk, bq]
        dk_scr[...] += _dot(ds_t.astype(q.dtype), q)

    if causal:  # query tiles wholly above the diagonal see none of these keys
        pl.when((i + 1) * block_q - 1 >= j * block_k)(_step)
    else:
        _step()

    @pl.when(last)
    def _finalize():
        dk_ref[...] = (dk_scr[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, causal, sm_scale, has_seg):
    # q_ref, do_ref, dq_ref, scratch: [bq, D]; k_ref, v_ref: [bk, D]; lse, delta: f32[1, bq]
    # (rows); segment ids as in the forward kernel.
    seg_refs, refs = (refs[:2], refs[2:]) if has_seg else ((), refs)
    dq_ref, dq_scr = refs
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def _step():
        k = k_ref[...]
        s = _dot_nt(q_ref[...], k) * sm_scale  # [bq, bk]
        mask = _mask(seg_refs, i * block_q, j * block_k, s.shape, causal, transposed=False)
        p = jnp.exp(s - lse_ref[0][:, None])  # row [1, bq] -> column [bq, 1]
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (_dot_nt(do_ref[...], v_ref[...]) - delta_ref[0][:, None])  # [bq, bk]
        dq_scr[...] += _dot(ds.astype(k.dtype), k)

    if causal:
        pl.when(j * block_k <= (i + 1) * block_q - 1)(_step)
    else:
        _step()

    @pl.when(j == pl.num_programs(3) - 1)
    def _finalize():
        dq_ref[...] = (dq_scr[...] * sm_scale).astype(dq_ref.dtype)


def _q_major_specs(heads, block_q, block_k, group, causal, has_seg):
    """BlockSpecs for a grid (B, H, query tile i, key tile j), as the forward and dq use:
    (q-like [bq, D], k-like [bk, D], per-query row [1, bq], segment ids (or [])).

    Causal: key tiles right of the diagonal are skipped, so their index re-points at the
    last useful tile; an unchanged block index means Pallas issues no new DMA. Index maps
    use lax.div, not `//`: jnp's floor division of int32 adds sign fix-ups whose TPU
    lowering asks for the TPU generation, so it fails when lowering without a TPU.
    """
    def kv_block(i, j):
        return jnp.minimum(j, jax.lax.div((i + 1) * block_q - 1, block_k)) if causal else j

    q_spec = heads.spec(block_q, lambda b, h, i, j: (b, h, i))
    kv_spec = heads.spec(block_k, lambda b, h, i, j: (b, jax.lax.div(h, group), kv_block(i, j)))
    row_spec = pl.BlockSpec((None, None, 1, block_q), lambda b, h, i, j: (b, h, 0, i))
    seg_specs = [pl.BlockSpec((None, block_q, _LANES), lambda b, h, i, j: (b, i, 0)),
                 pl.BlockSpec((None, 1, block_k), lambda b, h, i, j: (b, 0, kv_block(i, j)))]
    return q_spec, kv_spec, row_spec, seg_specs if has_seg else []


def _check(q, k, v, q_seg, kv_seg, block_q, block_k, interpret):
    """Validate shapes; return the block sizes clipped to the sequence lengths."""
    b, t, h, d = q.shape
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != d or v.shape != k.shape:
        raise ValueError(f"flash_attention: k {k.shape} and v {v.shape} must be [B={b}, S, KV, D={d}] "
                         f"to match q {q.shape}")
    s, kv = k.shape[1], k.shape[2]
    if h % kv:
        raise ValueError(f"flash_attention: {h} query heads are not a multiple of {kv} kv heads; "
                         f"use a kv head count dividing {h}")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("flash_attention: pass both q_seg and kv_seg or neither")
    if q_seg is not None and (q_seg.shape != (b, t) or kv_seg.shape != (b, s)):
        raise ValueError(f"flash_attention: q_seg {q_seg.shape} and kv_seg {kv_seg.shape} must be "
                         f"({b}, {t}) and ({b}, {s})")
    block_q, block_k = min(block_q, t), min(block_k, s)
    for name, block, length in (("q", block_q, t), ("k", block_k, s)):
        if length % block:
            raise ValueError(f"flash_attention: block_{name}={block} does not divide the sequence "
                             f"length {length}; pad to a multiple of {block}")
        if not interpret and block % _LANES and block != length:
            raise ValueError(f"flash_attention: block_{name}={block} must be a multiple of {_LANES} "
                             f"(or the whole length {length}) on TPU")
    return block_q, block_k


def _segs(col_seg, row_seg):
    """Segment ids for a kernel: the tile rows' lane-broadcast, i32[B, L, 128], and the
    tile columns' as rows, i32[B, 1, L']; () when absent."""
    if col_seg is None:
        return ()
    col = jnp.broadcast_to(col_seg.astype(jnp.int32)[:, :, None], (*col_seg.shape, _LANES))
    return col, row_seg.astype(jnp.int32)[:, None, :]


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret"))
def flash_attention_fwd(q, k, v, q_seg, kv_seg, *, causal: bool, sm_scale: float,
                        block_sizes: AttentionBlockSizes, interpret: bool):
    """Attention output o: [B, T, H, D] (q.dtype) and lse: f32[B, H, T].

    q: [B, T, H, D]; k, v: [B, S, KV, D] with H % KV == 0 (head h reads kv head
    h // (H // KV)); q_seg: i32[B, T] and kv_seg: i32[B, S], or both None. Lengths must
    be multiples of the (clipped) blocks.
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    bq, bk = _check(q, k, v, q_seg, kv_seg, block_sizes.block_q, block_sizes.block_k, interpret)
    heads, has_seg = _Heads(d), q_seg is not None
    q_spec, kv_spec, lse_spec, seg_specs = _q_major_specs(heads, bq, bk, h // kv, causal, has_seg)
    kernel = functools.partial(_fwd_kernel, causal=causal, sm_scale=sm_scale, has_seg=has_seg)
    q_k = heads.to_kernel(q)
    o_k, lse = pl.pallas_call(
        kernel, grid=(b, h, t // bq, s // bk),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
        out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(q_k.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(q_k, heads.to_kernel(k), heads.to_kernel(v), *_segs(q_seg, kv_seg))
    return heads.from_kernel(o_k, h), lse[:, :, 0, :]


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret"))
def flash_attention_bwd(q, k, v, q_seg, kv_seg, o, lse, do, *, causal: bool, sm_scale: float,
                        block_sizes: AttentionBlockSizes, interpret: bool):
    """Gradients (dq, dk, dv) of `flash_attention_fwd` for the cotangent `do` of o.

    o, do: [B, T, H, D]; lse: f32[B, H, T] from the forward pass. dk, dv: [B, S, KV, D]
    in k.dtype, summed over the query heads that share each kv head.
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    bq, bk = _check(q, k, v, q_seg, kv_seg, block_sizes.block_q_bwd, block_sizes.block_k_bwd,
                    interpret)
    group, nq, nk = h // kv, t // bq, s // bk
    heads, has_seg = _Heads(d), q_seg is not None
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    rows = (lse.astype(jnp.float32)[:, :, None, :], delta[:, :, None, :])  # f32[B, H, 1, T]
    q_k, k_k, v_k, do_k = map(heads.to_kernel, (q, k, v, do))
    params = pltpu.InterpretParams() if interpret else False
    static = dict(causal=causal, sm_scale=sm_scale, has_seg=has_seg)

    # dk, dv: grid (B, KV, key tile j, head of group g, query tile i); g and i accumulate.
    def q_block(j, i):  # causal: above the diagonal, re-point at the first useful tile (no DMA)
        return jnp.minimum(jnp.maximum(i, jax.lax.div(j * bk, bq)), nq - 1) if causal else i

    q_spec = heads.spec(bq, lambda bi, ki, j, g, i: (bi, ki * group + g, q_block(j, i)))
    kv_spec = heads.spec(bk, lambda bi, ki, j, g, i: (bi, ki, j))
    row_spec = pl.BlockSpec((None, None, 1, bq),
                            lambda bi, ki, j, g, i: (bi, ki * group + g, 0, q_block(j, i)))
    seg_specs = [pl.BlockSpec((None, bk, _LANES), lambda bi, ki, j, g, i: (bi, j, 0)),
                 pl.BlockSpec((None, 1, bq), lambda bi, ki, j, g, i: (bi, 0, q_block(j, i)))
                 ] if has_seg else []
    dk_k, dv_k = pl.pallas_call(
        functools.partial(_dkv_kernel, **static), grid=(b, kv, nk, group, nq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k_k.shape, k.dtype), jax.ShapeDtypeStruct(v_k.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=params,
    )(q_k, k_k, v_k, do_k, *rows, *_segs(kv_seg, q_seg))

    # dq: grid (B, H, query tile i, key tile j); j accumulates.
    q_spec, kv_spec, row_spec, seg_specs = _q_major_specs(heads, bq, bk, group, causal, has_seg)
    dq_k = pl.pallas_call(
        functools.partial(_dq_kernel, **static), grid=(b, h, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_k.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=params,
    )(q_k, k_k, v_k, do_k, *rows, *_segs(q_seg, kv_seg))
    return heads.from_kernel(dq_k, h), heads.from_kernel(dk_k, kv), heads.from_kernel(dv_k, kv)

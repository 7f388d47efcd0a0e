"""Flash attention for NVIDIA GPUs: Pallas kernels lowered through Triton.

FlashAttention never writes the `[T, S]` score matrix to memory. A program owns a block
of queries and streams the keys past it block by block, keeping a running maximum `m`,
a running softmax denominator `l` and an unnormalized output `acc` (the "online
softmax"): when a new block raises the maximum, the old sums are rescaled by
`exp(m_old - m_new)`. The backward pass (FlashAttention-2) recomputes the probabilities
from the saved log-sum-exp `lse` instead of storing them:

    p = exp(s - lse)                  s = sm_scale * q k^T, masked
    dv = p^T do      dp = do v^T      ds = p * (dp - delta)     delta = rowsum(o * do)
    dq = sm_scale * ds k              dk = sm_scale * ds^T q

Three kernels follow that split: `_delta_kernel` (one row sum per query), `_dkdv_kernel`
(a program per key block, looping over query blocks and over the query heads that share
the key's kv head, so dk/dv come out per kv head with no extra reduction) and
`_dq_kernel` (a program per query block, looping over key blocks). Causal kernels skip
the key blocks above the diagonal by shortening their loops.

Scores live in base 2 (`exp2`, with `log2(e)` folded into the scale) as Triton's fast
path prefers; `lse` is stored in natural log so every backend shares one convention.
Triton needs power-of-two tiles of at least 16 rows for its dots; `ops.py` pads the
sequences and picks the tiles, so this file assumes `T % block_q == 0` etc.

    from pallas_kernels.flash_attention import triton
    o, lse = triton.flash_attention_fwd(q, k, v, None, None, causal=True, sm_scale=0.125,
                                        block_sizes=bs, interpret=True)
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tuning import AttentionBlockSizes

_LOG2E = math.log2(math.e)
_MASKED = -1e30  # a finite "minus infinity": rows with no allowed key stay NaN-free


def _allowed(q_pos, k_pos, q_seg, k_seg, causal):
    """bool [bq, bk]: which (query, key) pairs may attend, or None when all may."""
    mask = None
    if q_seg is not None:
        mask = q_seg[:, None] == k_seg[None, :]
    if causal:
        causal_qk = q_pos[:, None] >= k_pos[None, :]
        mask = causal_qk if mask is None else mask & causal_qk
    return mask


def _dot(a, b, trans_b=False):
    """fp32-accumulated `a @ b` (or `a @ b.T`) on tiles."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, causal, scale2,
                block_k):
    """One block of queries against every allowed key block, with an online softmax.

    Refs (batch and head squeezed by the BlockSpecs): q_ref/o_ref [bq, D], k_ref/v_ref
    [S, D] of the kv head this query head reads, qseg_ref [bq], kseg_ref [S], lse_ref [bq].
    """
    block_q, _ = q_ref.shape
    i = pl.program_id(0)
    q_qd = q_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, carry):
        acc_qd, m_q, l_q = carry
        keys = pl.ds(j * block_k, block_k)
        k_kd, v_kd = k_ref[keys, :], v_ref[keys, :]
        s_qk = _dot(q_qd, k_kd, trans_b=True) * scale2  # base-2 logits
        k_seg = None if kseg_ref is None else kseg_ref[keys]
        mask = _allowed(q_pos, j * block_k + jnp.arange(block_k), q_seg, k_seg, causal)
        if mask is not None:
            s_qk = jnp.where(mask, s_qk, _MASKED)
        m_new = jnp.maximum(m_q, jnp.max(s_qk, axis=1))
        p_qk = jnp.exp2(s_qk - m_new[:, None])
        if mask is not None:  # a row masked so far has m_new == _MASKED and exp2(0) == 1
            p_qk = jnp.where(mask, p_qk, 0.0)
        alpha = jnp.exp2(m_q - m_new)
        acc_qd = acc_qd * alpha[:, None] + _dot(p_qk.astype(v_kd.dtype), v_kd)
        return acc_qd, m_new, l_q * alpha + jnp.sum(p_qk, axis=1)

    num_k = k_ref.shape[0] // block_k
    upper = jnp.minimum(pl.cdiv((i + 1) * block_q, block_k), num_k) if causal else num_k
    init = (jnp.zeros(q_qd.shape, jnp.float32), jnp.full((block_q,), _MASKED, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc_qd, m_q, l_q = jax.lax.fori_loop(0, upper, body, init)
    empty = l_q == 0.0  # no allowed key: output zeros, lse = +inf (so exp(s - lse) == 0)
    o_ref[...] = (acc_qd / jnp.where(empty, 1.0, l_q)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, (m_q + jnp.log2(jnp.where(empty, 1.0, l_q))) / _LOG2E)


_STAGE_BUDGET = 160 * 1024  # bytes of pipelined tiles per program (H100: 227 KiB in all)


def _params(bs, q):
    """Triton options; stages capped so the two streamed tiles per stage fit shared memory
    (float32 or D=256 at the table's tiles would otherwise overflow it)."""
    stages = bs.num_stages
    if stages is not None:
        block = max(bs.block_k, bs.block_q_bwd, bs.block_k_bwd)
        stage_bytes = 2 * block * q.shape[-1] * q.dtype.itemsize
        stages = max(1, min(stages, _STAGE_BUDGET // stage_bytes))
    return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=stages)


def _seg_spec(block, index_map):
    return pl.BlockSpec((None, block), index_map)


def flash_attention_fwd(q, k, v, q_seg, kv_seg, *, causal: bool, sm_scale: float,
                        block_sizes: AttentionBlockSizes, interpret: bool):
    """o [B, T, H, D] in q.dtype and lse [B, H, T] float32; see the package contract."""
    b, t, h, d = q.shape
    _, s, kv, _ = k.shape
    group, bq, bk = h // kv, block_sizes.block_q, block_sizes.block_k
    kernel = functools.partial(_fwd_kernel, causal=causal, scale2=sm_scale * _LOG2E, block_k=bk)
    with_seg = q_seg is not None
    # Program (i, j): query block i of flat (batch, query head) j = b * H + h; its kv head
    # is h // G, so GQA costs no copies of k and v.
    kv_rows = pl.BlockSpec((None, s, None, d), lambda i, j: (j // h, 0, (j % h) // group, 0))
    return pl.pallas_call(
        kernel,
        grid=(t // bq, b * h),
        in_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, j: (j // h, i, j % h, 0)),
            kv_rows, kv_rows,
            _seg_spec(bq, lambda i, j: (j // h, i)) if with_seg else None,
            _seg_spec(s, lambda i, j: (j // h, 0)) if with_seg else None,
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, j: (j // h, i, j % h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, j: (j // h, j % h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=_params(block_sizes, q),
        interpret=interpret,
        name="flash_attention_fwd",
    )(q, k, v, q_seg, kv_seg)


def _delta_kernel(o_ref, do_ref, delta_ref):
    """delta [bq] = rowsum(o * do): the softmax Jacobian's correction term, in fp32."""
    o_qd = o_ref[...].astype(jnp.float32)
    delta_ref[...] = jnp.sum(o_qd * do_ref[...].astype(jnp.float32), axis=1)


def _probs(q_qd, k_kd, lse_q, mask, scale2):
    """Recomputed softmax probabilities p [bq, bk] from the saved natural-log lse."""
    p_qk = jnp.exp2(_dot(q_qd, k_kd, trans_b=True) * scale2 - (lse_q * _LOG2E)[:, None])
    return p_qk if mask is None else jnp.where(mask, p_qk, 0.0)


def _dkdv_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, causal, sm_scale, block_q):
    """dk, dv for one key block of one kv head, summed over its query heads.

    Refs: q_ref/do_ref [T, G, D] (the G query heads sharing this kv head), k_ref/v_ref
    and dk_ref/dv_ref [bk, D], lse_ref/delta_ref [G, T], qseg_ref [T], kseg_ref [bk].
    Causal: query blocks that end before this key block starts are skipped.
    """
    block_k, _ = k_ref.shape
    num_q, group = q_ref.shape[0] // block_q, q_ref.shape[1]
    i = pl.program_id(0)
    k_kd, v_kd = k_ref[...], v_ref[...]
    k_pos = i * block_k + jnp.arange(block_k)
    k_seg = None if kseg_ref is None else kseg_ref[...]
    scale2 = sm_scale * _LOG2E

    def over_queries(g, j, carry):
        dk_kd, dv_kd = carry
        rows = pl.ds(j * block_q, block_q)
        q_qd, do_qd = q_ref[rows, g, :], do_ref[rows, g, :]
        q_seg = None if qseg_ref is None else qseg_ref[rows]
        mask = _allowed(j * block_q + jnp.arange(block_q), k_pos, q_seg, k_seg, causal)
        p_qk = _probs(q_qd, k_kd, lse_ref[g, rows], mask, scale2)
        dv_kd = dv_kd + _dot(p_qk.astype(do_qd.dtype).T, do_qd)
        ds_qk = p_qk * (_dot(do_qd, v_kd, trans_b=True) - delta_ref[g, rows][:, None])
        return dk_kd + _dot(ds_qk.astype(q_qd.dtype).T, q_qd), dv_kd

    lower = (i * block_k) // block_q if causal else 0
    over_heads = lambda g, carry: jax.lax.fori_loop(
        lower, num_q, functools.partial(over_queries, g), carry)
    zeros = jnp.zeros(k_kd.shape, jnp.float32)
    dk_kd, dv_kd = jax.lax.fori_loop(0, group, over_heads, (zeros, zeros))
    dk_ref[...] = (dk_kd * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_kd.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               causal, sm_scale, block_k):
    """dq for one query block of one query head, looping over the allowed key blocks.

    Refs: q_ref/do_ref/dq_ref [bq, D], k_ref/v_ref [S, D] of the shared kv head,
    lse_ref/delta_ref/qseg_ref [bq], kseg_ref [S].
    """
    block_q, _ = q_ref.shape
    i = pl.program_id(0)
    q_qd, do_qd, lse_q, delta_q = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq_qd):
        keys = pl.ds(j * block_k, block_k)
        k_kd, v_kd = k_ref[keys, :], v_ref[keys, :]
        k_seg = None if kseg_ref is None else kseg_ref[keys]
        mask = _allowed(q_pos, j * block_k + jnp.arange(block_k), q_seg, k_seg, causal)
        p_qk = _probs(q_qd, k_kd, lse_q, mask, sm_scale * _LOG2E)
        ds_qk = p_qk * (_dot(do_qd, v_kd, trans_b=True) - delta_q[:, None])
        return dq_qd + _dot(ds_qk.astype(k_kd.dtype), k_kd)

    num_k = k_ref.shape[0] // block_k
    upper = jnp.minimum(pl.cdiv((i + 1) * block_q, block_k), num_k) if causal else num_k
    dq_qd = jax.lax.fori_loop(0, upper, body, jnp.zeros(q_qd.shape, jnp.float32))
    dq_ref[...] = (dq_qd * sm_scale).astype(dq_ref.dtype)


def flash_attention_bwd(q, k, v, q_seg, kv_seg, o, lse, do, *, causal: bool, sm_scale: float,
                        block_sizes: AttentionBlockSizes, interpret: bool):
    """(dq [B,T,H,D], dk [B,S,KV,D], dv [B,S,KV,D]); see the package contract."""
    b, t, h, d = q.shape
    _, s, kv, _ = k.shape
    group, bq, bk = h // kv, block_sizes.block_q_bwd, block_sizes.block_k_bwd
    with_seg = q_seg is not None
    common = dict(compiler_params=_params(block_sizes, q), interpret=interpret)

    row_spec = pl.BlockSpec((None, bq, None, d), lambda i, j: (j // h, i, j % h, 0))
    vec_spec = pl.BlockSpec((None, None, bq), lambda i, j: (j // h, j % h, i))
    delta = pl.pallas_call(
        _delta_kernel, grid=(t // bq, b * h), in_specs=[row_spec, row_spec], out_specs=vec_spec,
        out_shape=jax.ShapeDtypeStruct((b, h, t), jnp.float32), name="flash_attention_delta",
        **common)(o, do)

    # dk, dv: a program per (key block, batch * kv head); query heads of the group inside.
    group_rows = pl.BlockSpec((None, t, group, d), lambda i, j: (j // kv, 0, j % kv, 0))
    group_vec = pl.BlockSpec((None, group, t), lambda i, j: (j // kv, j % kv, 0))
    key_block = pl.BlockSpec((None, bk, None, d), lambda i, j: (j // kv, i, j % kv, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, causal=causal, sm_scale=sm_scale, block_q=bq),
        grid=(s // bk, b * kv),
        in_specs=[group_rows, key_block, key_block,
                  _seg_spec(t, lambda i, j: (j // kv, 0)) if with_seg else None,
                  _seg_spec(bk, lambda i, j: (j // kv, i)) if with_seg else None,
                  group_rows, group_vec, group_vec],
        out_specs=[key_block, key_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="flash_attention_dkdv", **common,
    )(q, k, v, q_seg, kv_seg, do, lse, delta)

    # dq: a program per (query block, batch * query head), key blocks inside.
    kv_rows = pl.BlockSpec((None, s, None, d), lambda i, j: (j // h, 0, (j % h) // group, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, causal=causal, sm_scale=sm_scale, block_k=bk),
        grid=(t // bq, b * h),
        in_specs=[row_spec, kv_rows, kv_rows,
                  _seg_spec(bq, lambda i, j: (j // h, i)) if with_seg else None,
                  _seg_spec(s, lambda i, j: (j // h, 0)) if with_seg else None,
                  row_spec, vec_spec, vec_spec],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="flash_attention_dq", **common,
    )(q, k, v, q_seg, kv_seg, do, lse, delta)
    return dq, dk, dv

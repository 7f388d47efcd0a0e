"""Grouped matmul as Pallas kernels lowered through Triton, for NVIDIA GPUs.

`gmm`: one program per (work item, column tile). A work item is a row tile and one
group it touches (see `metadata.py`); the program loads the tile's rows with the other
groups' rows masked to zero, loops over K in steps of `tk` accumulating in fp32, and
stores only its group's rows, so programs sharing a tile write disjoint rows:

    grid = (num_items, cdiv(N, tn))
    acc[tm, tn] = sum_k  x[tile rows, k-block] @ w[group, k-block, n-block]

`tgmm` (the weight gradient): one program per (group, K tile, N tile), looping over the
group's rows `tm` at a time from wherever the group starts, so an empty group runs zero
iterations and writes zeros:

    out[g, k-block, n-block] = sum over row chunks of x_mk[rows, k-block].T @ g_mn[rows, n-block]

Loads are masked at every edge, so M, K and N need not be multiples of the tiles.
`interpret=True` runs the same kernels on CPU through the Pallas interpreter (the tests
do); on a GPU they compile through Triton. Tiles come from `tuning.block_sizes`.

    out_mn = gmm(x_mk, w_gkn, sizes_g, group_offset=0, transpose_rhs=False,
                 block_sizes=GmmBlockSizes(tm=64, tk=64, tn=128), out_dtype=jnp.bfloat16,
                 interpret=False)
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gmm.metadata import make_work_list

SHARED_MEMORY_BUDGET = 192 * 1024  # bytes of pipelined tiles per program (H100 allows 227 KiB)


def _compiler_params(bs, interpret, stage_bytes):
    """Triton options; pipelining stages capped so `stages * stage_bytes` fits shared memory."""
    if interpret:
        return None
    stages = bs.num_stages
    if stages is not None:
        stages = max(1, min(stages, SHARED_MEMORY_BUDGET // stage_bytes))
    return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=stages)


def _gmm_kernel(group_ref, tile_ref, start_ref, end_ref, num_ref, x_ref, w_ref, o_ref, *,
                tm, tk, tn, num_local, transpose_rhs):
    m, k = x_ref.shape
    n = o_ref.shape[1]
    item, j = pl.program_id(0), pl.program_id(1)

    @pl.when(item < num_ref[0])
    def _():
        group, row0 = group_ref[item], tile_ref[item] * tm
        rows_m = row0 + jnp.arange(tm)
        row_ok_m = (rows_m >= start_ref[item]) & (rows_m < end_ref[item])
        cols_n = j * tn + jnp.arange(tn)
        col_ok_n = cols_n < n
        is_group = (group >= 0) & (group < num_local)
        g = jnp.clip(group, 0, num_local - 1)

        def step(kb, acc_mn):
            ks_k = kb * tk + jnp.arange(tk)
            k_ok_k = ks_k < k
            x_mk = plgpu.load(x_ref.at[pl.ds(row0, tm), pl.ds(kb * tk, tk)],
                              mask=row_ok_m[:, None] & k_ok_k[None, :], other=0.0)
            if transpose_rhs:  # w: [G, N, K]
                w_nk = plgpu.load(w_ref.at[g, pl.ds(j * tn, tn), pl.ds(kb * tk, tk)],
                                  mask=col_ok_n[:, None] & k_ok_k[None, :], other=0.0)
                return acc_mn + plgpu.dot(x_mk, w_nk, trans_b=True)
            w_kn = plgpu.load(w_ref.at[g, pl.ds(kb * tk, tk), pl.ds(j * tn, tn)],
                              mask=k_ok_k[:, None] & col_ok_n[None, :], other=0.0)
            return acc_mn + plgpu.dot(x_mk, w_kn)

        def store(val_mn):
            plgpu.store(o_ref.at[pl.ds(row0, tm), pl.ds(j * tn, tn)], val_mn.astype(o_ref.dtype),
                        mask=row_ok_m[:, None] & col_ok_n[None, :])

        @pl.when(is_group)
        def _():  # a static trip count, so Triton can software-pipeline the loads
            store(jax.lax.fori_loop(0, pl.cdiv(k, tk), step, jnp.zeros((tm, tn), jnp.float32)))

        @pl.when(jnp.logical_not(is_group))
        def _():  # rows outside the computed groups
            store(jnp.zeros((tm, tn), jnp.float32))


def gmm(lhs_mk, rhs, group_sizes_g, group_offset, *, transpose_rhs, block_sizes, out_dtype,
        interpret):
    """`out[m] = lhs[m] @ rhs[group(m) - offset]`; rows of other groups are zeros."""
    m, k = lhs_mk.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = block_sizes.tm, block_sizes.tk, block_sizes.tn
    work = make_work_list(group_sizes_g, num_rows=m, tm=tm, group_offset=group_offset,
                          num_local=num_local)
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, num_local=num_local,
                               transpose_rhs=transpose_rhs)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(work.group.shape[0], pl.cdiv(n, tn)),
        compiler_params=_compiler_params(block_sizes, interpret,
                                         (tm * tk + tk * tn) * lhs_mk.dtype.itemsize),
        interpret=interpret,
        name="gmm",
    )(work.group, work.tile, work.row_start, work.row_end, work.num_work, lhs_mk, rhs)


def _tgmm_kernel(start_ref, end_ref, x_ref, g_ref, o_ref, *, tm, tk, tn):
    m, k = x_ref.shape
    n = g_ref.shape[1]
    group, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = start_ref[group], end_ref[group]
    ks_k = i * tk + jnp.arange(tk)
    cols_n = j * tn + jnp.arange(tn)
    k_ok_k, col_ok_n = ks_k < k, cols_n < n

    def step(c, acc_kn):
        rows_m = start + c * tm + jnp.arange(tm)
        row_ok_m = rows_m < end
        # Both loads run along contiguous rows of [M, K] and [M, N]; the dot transposes x.
        x_mk = plgpu.load(x_ref.at[pl.ds(start + c * tm, tm), pl.ds(i * tk, tk)],
                          mask=row_ok_m[:, None] & k_ok_k[None, :], other=0.0)
        g_mn = plgpu.load(g_ref.at[pl.ds(start + c * tm, tm), pl.ds(j * tn, tn)],
                          mask=row_ok_m[:, None] & col_ok_n[None, :], other=0.0)
        return acc_kn + plgpu.dot(x_mk, g_mn, trans_a=True)

    num_chunks = pl.cdiv(end - start, tm)  # zero for an empty group
    acc_kn = jax.lax.fori_loop(0, num_chunks, step, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(o_ref.at[group, pl.ds(i * tk, tk), pl.ds(j * tn, tn)], acc_kn.astype(o_ref.dtype),
                mask=k_ok_k[:, None] & col_ok_n[None, :])


def tgmm(lhs_mk, grad_mn, group_sizes_g, group_offset, *, num_groups, block_sizes, out_dtype,
         interpret):
    """`out[l] = lhs[rows of group offset + l].T @ grad[those rows]`: `[num_groups, K, N]`."""
    m, k = lhs_mk.shape
    n = grad_mn.shape[1]
    tm, tk, tn = block_sizes.tm, block_sizes.tk, block_sizes.tn
    work = make_work_list(group_sizes_g, num_rows=m, tm=tm, group_offset=group_offset,
                          num_local=num_groups)
    kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(num_groups, pl.cdiv(k, tk), pl.cdiv(n, tn)),
        compiler_params=_compiler_params(block_sizes, interpret,
                                         (tm * tk + tm * tn) * lhs_mk.dtype.itemsize),
        interpret=interpret,
        name="tgmm",
    )(work.group_start, work.group_end, lhs_mk, grad_mn)

"""Grouped matmul as Pallas Mosaic kernels for TPUs, driven by scalar-prefetched work lists.

On a TPU, Pallas moves blocks between HBM and VMEM itself, following each operand's
`index_map`. The work list of `metadata.py` (which row tile, which group) is handed to
the kernel as *scalar prefetch* operands: they land in SMEM before the grid starts, and
the index maps read them to pick each step's blocks:

    gmm grid = (N tiles, work items, K tiles)           K innermost: accumulate in VMEM
      x block   (tm, tk) at (tile[w], k)
      w block   (tk, tn) at (group[w], k, n)
      out block (tm, tn) at (tile[w], n)                same tile on consecutive items:
                                                        the block stays in VMEM
    tgmm grid = (K tiles, N tiles, work items)          items innermost: one group's
      x_km block (tk, tm) at (k, tile[w])               tiles in a row, summed in VMEM
      g block    (tm, tn) at (tile[w], n)
      out block  (tk, tn) at (group[w], k, n)

A tile shared by two groups is visited once per group; each visit masks the other
group's rows and merges its own rows into the resident output block (the first visit of
a tile starts from zeros). `tgmm` visits empty groups once, so their gradient is zero.
Rows are padded to a multiple of `tm` (padding rows belong to no group); K and N must
split into tiles that are multiples of 128 or be used whole (`fit_tile`).

    out_mn = gmm(x_mk, w_gkn, sizes_g, 0, transpose_rhs=False,
                 block_sizes=GmmBlockSizes(tm=512, tk=512, tn=512), out_dtype=jnp.bfloat16,
                 interpret=False)
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gmm.metadata import make_work_list

LANE = 128


def fit_tile(dim: int, want: int) -> int | None:
    """The largest tile <= `want` that divides `dim` and is a multiple of 128, or `dim`
    itself when it is no larger than `want`; None when there is none (use another backend)."""
    if dim <= want:
        return dim
    t = (want // LANE) * LANE
    while t >= LANE and dim % t:
        t -= LANE
    return t if t >= LANE else None


def _row_tile(m: int, tm: int) -> int:
    """`tm`, or all the rows (rounded up to 8 sublanes) when there are fewer."""
    return min(tm, -(-m // 8) * 8)


def _interpret(interpret):
    return pltpu.InterpretParams() if interpret else False


def _pad_rows(x, axis, tm):
    pad = -x.shape[axis] % tm
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _gmm_kernel(group_ref, tile_ref, start_ref, end_ref, num_ref, x_ref, w_ref, o_ref, acc_ref,
                *, num_local, transpose_rhs):
    item, kb = pl.program_id(1), pl.program_id(2)
    tm, tn = o_ref.shape
    group, tile = group_ref[item], tile_ref[item]
    is_group = (group >= 0) & (group < num_local)

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((item < num_ref[0]) & is_group)
    def _():  # other groups' rows are multiplied too, and dropped by the masked store below
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += jax.lax.dot_general(x_ref[...], w_ref[...], dims,
                                            preferred_element_type=jnp.float32)

    @pl.when((item < num_ref[0]) & (kb == pl.num_programs(2) - 1))
    def _():
        rows_mn = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        mine_mn = (rows_mn >= start_ref[item]) & (rows_mn < end_ref[item])
        first = (item == 0) | (tile_ref[jnp.maximum(item - 1, 0)] != tile)
        before_mn = jnp.where(first, jnp.zeros((tm, tn), o_ref.dtype), o_ref[...])
        o_ref[...] = jnp.where(mine_mn, acc_ref[...].astype(o_ref.dtype), before_mn)


def gmm(lhs_mk, rhs, group_sizes_g, group_offset, *, transpose_rhs, block_sizes, out_dtype,
        interpret):
    """`out[m] = lhs[m] @ rhs[group(m) - offset]`; rows of other groups are zeros."""
    m, k = lhs_mk.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = _row_tile(m, block_sizes.tm), fit_tile(k, block_sizes.tk), fit_tile(n, block_sizes.tn)
    if tk is None or tn is None:
        raise ValueError(f"gmm[pallas_tpu]: K={k} and N={n} must be <= the tiles "
                         f"({block_sizes.tk}, {block_sizes.tn}) or split into multiples of 128")
    x_mk = _pad_rows(lhs_mk, 0, tm)
    work = make_work_list(group_sizes_g, num_rows=m, tm=tm, group_offset=group_offset,
                          num_local=num_local)
    num_k = k // tk
    grp = lambda w, g: jnp.clip(g[w], 0, num_local - 1)

    def kblock(w, kb, g, num):
        # Items that compute nothing (past num_work, or rows of no group) hold the last K
        # block, so stepping through their K loop fetches no new blocks.
        busy = (w < num[0]) & (g[w] >= 0) & (g[w] < num_local)
        return jnp.where(busy, kb, num_k - 1)

    if transpose_rhs:
        w_spec = pl.BlockSpec((None, tn, tk), lambda j, w, kb, g, t, s, e, num: (
            grp(w, g), j, kblock(w, kb, g, num)))
    else:
        w_spec = pl.BlockSpec((None, tk, tn), lambda j, w, kb, g, t, s, e, num: (
            grp(w, g), kblock(w, kb, g, num), j))
    x_spec = pl.BlockSpec((tm, tk), lambda j, w, kb, g, t, s, e, num: (t[w], kblock(w, kb, g, num)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(n // tn, work.group.shape[0], num_k),
        in_specs=[x_spec, w_spec],
        out_specs=pl.BlockSpec((tm, tn), lambda j, w, kb, g, t, *_: (t[w], j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, num_local=num_local, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((x_mk.shape[0], n), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret),
        name="gmm",
    )(work.group, work.tile, work.row_start, work.row_end, work.num_work, x_mk, rhs)
    return out[:m]


def _tgmm_kernel(group_ref, tile_ref, start_ref, end_ref, num_ref, x_ref, g_ref, o_ref, acc_ref):
    item = pl.program_id(2)
    last_item = pl.num_programs(2) - 1
    num_work = num_ref[0]
    group, tile = group_ref[item], tile_ref[item]
    tk, tm = x_ref.shape
    first = (item == 0) | (group_ref[jnp.maximum(item - 1, 0)] != group)
    last = (item == num_work - 1) | (group_ref[jnp.minimum(item + 1, last_item)] != group)

    @pl.when((item < num_work) & first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(item < num_work)
    def _():
        lo, hi = start_ref[item], end_ref[item]
        cols_km = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tk, tm), 1)
        rows_mn = tile * tm + jax.lax.broadcasted_iota(jnp.int32, g_ref.shape, 0)
        x_km = jnp.where((cols_km >= lo) & (cols_km < hi), x_ref[...], 0)
        g_mn = jnp.where((rows_mn >= lo) & (rows_mn < hi), g_ref[...], 0)
        acc_ref[...] += jnp.dot(x_km, g_mn, preferred_element_type=jnp.float32)

    @pl.when((item < num_work) & last)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm(lhs_mk, grad_mn, group_sizes_g, group_offset, *, num_groups, block_sizes, out_dtype,
         interpret):
    """`out[l] = lhs[rows of group offset + l].T @ grad[those rows]`: `[num_groups, K, N]`."""
    lhs_km = lhs_mk.T  # rows along lanes: the MXU contracts x_km @ g_mn directly
    k, m = lhs_km.shape
    n = grad_mn.shape[1]
    tm, tk, tn = _row_tile(m, block_sizes.tm), fit_tile(k, block_sizes.tk), fit_tile(n, block_sizes.tn)
    if tk is None or tn is None:
        raise ValueError(f"tgmm[pallas_tpu]: K={k} and N={n} must be <= the tiles "
                         f"({block_sizes.tk}, {block_sizes.tn}) or split into multiples of 128")
    x_km, g_mn = _pad_rows(lhs_km, 1, tm), _pad_rows(grad_mn, 0, tm)
    work = make_work_list(group_sizes_g, num_rows=m, tm=tm, group_offset=group_offset,
                          num_local=num_groups, visit_empty_groups=True, cover_all_rows=False)
    grp = lambda w, g: jnp.clip(g[w], 0, num_groups - 1)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(k // tk, n // tn, work.group.shape[0]),
        in_specs=[pl.BlockSpec((tk, tm), lambda kb, j, w, g, t, *_: (kb, t[w])),
                  pl.BlockSpec((tm, tn), lambda kb, j, w, g, t, *_: (t[w], j))],
        out_specs=pl.BlockSpec((None, tk, tn), lambda kb, j, w, g, t, *_: (grp(w, g), kb, j)),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    return pl.pallas_call(
        _tgmm_kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
        name="tgmm",
    )(work.group, work.tile, work.row_start, work.row_end, work.num_work, x_km, g_mn)

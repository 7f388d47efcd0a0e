"""Grouped matmul in plain XLA ops, fast on CPU: pad each group to whole row tiles.

`jax.lax.ragged_dot` on CPU expands to dense work over every group (7-14x slower than
a dense matmul of the same FLOPs). Instead we lay the rows out MegaBlocks-style: each
group is padded up to a multiple of `tile_rows`, so every tile of rows belongs to exactly
one group, and one batched matmul multiplies every tile by its group's matrix:

    group_sizes = [5, 0, 3], tile_rows = 4
    padded rows:  g0 g0 g0 g0 | g0 -- -- -- | g2 g2 g2 --      3 tiles
    out_tiles = einsum("tmk,tkn->tmn", x_tiles, rhs[tile_group])

The number of tiles has a static bound, `ceil((M + G * (tile_rows - 1)) / tile_rows)`,
so the program shape never depends on the routing. Gradients come from JAX's transposes
of the gather, scatter and einsum (a segment sum into `rhs` for the weight gradient).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.gmm.reference import group_ids


def default_tile_rows(num_rows: int, num_groups: int) -> int:
    """A power of two near `M / (4 G)`: padding costs at most ~25% extra rows when balanced."""
    target = max(8, num_rows // max(1, 4 * num_groups))
    tile = 8
    while tile * 2 <= min(target, 512):
        tile *= 2
    return tile


def _tile_layout(group_sizes_g, num_rows, tm, group_offset, num_local):
    """Where each row goes when local groups are padded to whole tiles of `tm` rows.

    Returns (dest_m, tile_group_t, num_tiles): the padded row of every input row (out of
    bounds for rows outside the local groups) and the local group of every tile.
    """
    group_sizes_g = group_sizes_g.astype(jnp.int32)
    num_tiles = -(-(num_rows + num_local * (tm - 1)) // tm)
    local_sizes_l = jax.lax.dynamic_slice_in_dim(group_sizes_g, group_offset, num_local)
    padded_sizes_l = -(-local_sizes_l // tm) * tm
    padded_ends_l = jnp.cumsum(padded_sizes_l)
    padded_starts_l = padded_ends_l - padded_sizes_l
    starts_g = jnp.cumsum(group_sizes_g) - group_sizes_g

    local_m = group_ids(group_sizes_g, num_rows) - group_offset
    in_local_m = (local_m >= 0) & (local_m < num_local)
    safe_l = jnp.clip(local_m, 0, num_local - 1)
    dest_m = padded_starts_l[safe_l] + jnp.arange(num_rows) - starts_g[safe_l + group_offset]
    dest_m = jnp.where(in_local_m, dest_m, num_tiles * tm)  # out of bounds: dropped
    tile_group_t = jnp.searchsorted(padded_ends_l, jnp.arange(num_tiles) * tm, side="right")
    return dest_m, jnp.minimum(tile_group_t, num_local - 1), num_tiles


def _to_tiles(x_mk, dest_m, num_tiles, tm):
    x_pk = jnp.zeros((num_tiles * tm, x_mk.shape[1]), x_mk.dtype)
    return x_pk.at[dest_m].set(x_mk, mode="drop").reshape(num_tiles, tm, -1)


def gmm_tiled(lhs_mk, rhs, group_sizes_g, *, transpose_rhs=False, group_offset=0,
              tile_rows=None, preferred_element_type=None):
    """Grouped matmul by padding groups to row tiles; exact, no FLOPs spent on other groups.

    `rhs` is `[G_local, K, N]` (or `[G_local, N, K]` with `transpose_rhs`), holding groups
    `[group_offset, group_offset + G_local)` of `group_sizes`.
    """
    num_rows = lhs_mk.shape[0]
    num_local = rhs.shape[0]
    out_dtype = preferred_element_type or lhs_mk.dtype
    tm = tile_rows or default_tile_rows(num_rows, num_local)
    dest_m, tile_group_t, num_tiles = _tile_layout(group_sizes_g, num_rows, tm, group_offset,
                                                   num_local)
    x_tmk = _to_tiles(lhs_mk, dest_m, num_tiles, tm)
    spec = "tmk,tnk->tmn" if transpose_rhs else "tmk,tkn->tmn"
    out_tmn = jnp.einsum(spec, x_tmk, rhs[tile_group_t], preferred_element_type=jnp.float32)
    out_pn = out_tmn.reshape(num_tiles * tm, -1)
    out_mn = jnp.take(out_pn, dest_m, axis=0, mode="fill", fill_value=0)
    return out_mn.astype(out_dtype)


def tgmm_tiled(lhs_km, grad_mn, group_sizes_g, *, num_groups=None, group_offset=0,
               tile_rows=None, preferred_element_type=None):
    """Transposed grouped matmul `out[l] = lhs[:, rows_l] @ grad[rows_l]`: `[G_local, K, N]`.

    Same tile layout as `gmm_tiled`: one batched outer product per tile, then a segment sum
    of the tiles into their groups.
    """
    num_rows = lhs_km.shape[1]
    num_local = num_groups or group_sizes_g.shape[0]
    out_dtype = preferred_element_type or lhs_km.dtype
    tm = tile_rows or default_tile_rows(num_rows, num_local)
    dest_m, tile_group_t, num_tiles = _tile_layout(group_sizes_g, num_rows, tm, group_offset,
                                                   num_local)
    x_tmk = _to_tiles(lhs_km.T, dest_m, num_tiles, tm)
    g_tmn = _to_tiles(grad_mn, dest_m, num_tiles, tm)
    out_tkn = jnp.einsum("tmk,tmn->tkn", x_tmk, g_tmn, preferred_element_type=jnp.float32)
    out_lkn = jax.ops.segment_sum(out_tkn, tile_group_t, num_segments=num_local,
                                  indices_are_sorted=True)
    return out_lkn.astype(out_dtype)


def padded_gmm(lhs_gck, rhs_gkn, group_sizes_g, *, preferred_element_type=None):
    """Padded (capacity) layout: one batched matmul, rows past each group's size zeroed.

    Leading batch dims (`[..., G, C, K]` with sizes `[..., G]`) join the matmul directly.
    """
    out_dtype = preferred_element_type or lhs_gck.dtype
    out_gcn = jnp.einsum("...gck,gkn->...gcn", lhs_gck, rhs_gkn, preferred_element_type=jnp.float32)
    valid_gc = jnp.arange(lhs_gck.shape[-2]) < group_sizes_g[..., None]
    return jnp.where(valid_gc[..., None], out_gcn, 0.0).astype(out_dtype)


def gmm(lhs_mk, rhs, group_sizes_g, group_offset, *, transpose_rhs, block_sizes, out_dtype,
        interpret=False):
    """`gmm_tiled` with the backend signature shared by `triton.py` and `mosaic_tpu.py`."""
    del interpret
    return gmm_tiled(lhs_mk, rhs, group_sizes_g, transpose_rhs=transpose_rhs,
                     group_offset=group_offset, tile_rows=block_sizes and block_sizes.tm,
                     preferred_element_type=out_dtype)


def tgmm(lhs_km, grad_mn, group_sizes_g, group_offset, *, num_groups, block_sizes, out_dtype,
         interpret=False):
    """`tgmm_tiled` with the backend signature shared by `triton.py` and `mosaic_tpu.py`."""
    del interpret
    return tgmm_tiled(lhs_km, grad_mn, group_sizes_g, num_groups=num_groups,
                      group_offset=group_offset, tile_rows=block_sizes and block_sizes.tm,
                      preferred_element_type=out_dtype)

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

import jax.numpy as jnp

from pallas_kernels.gmm.reference import group_ids


def default_tile_rows(num_rows: int, num_groups: int) -> int:
    """A power of two near `M / (4 G)`: padding costs at most ~25% extra rows when balanced."""
    target = max(8, num_rows // max(1, 4 * num_groups))
    tile = 8
    while tile * 2 <= min(target, 512):
        tile *= 2
    return tile


def gmm_tiled(lhs_mk, rhs_gkn, group_sizes_g, *, tile_rows=None, preferred_element_type=None):
    """Grouped matmul by padding groups to row tiles; exact, no FLOPs spent on other groups."""
    num_rows, _ = lhs_mk.shape
    num_groups, _, n = rhs_gkn.shape
    out_dtype = preferred_element_type or lhs_mk.dtype
    tm = tile_rows or default_tile_rows(num_rows, num_groups)
    num_tiles = -(-(num_rows + num_groups * (tm - 1)) // tm)
    group_sizes_g = group_sizes_g.astype(jnp.int32)

    padded_sizes_g = -(-group_sizes_g // tm) * tm
    padded_ends_g = jnp.cumsum(padded_sizes_g)
    padded_starts_g = padded_ends_g - padded_sizes_g
    starts_g = jnp.cumsum(group_sizes_g) - group_sizes_g

    gid_m = group_ids(group_sizes_g, num_rows)
    in_group_m = gid_m < num_groups
    safe_gid_m = jnp.minimum(gid_m, num_groups - 1)
    dest_m = padded_starts_g[safe_gid_m] + jnp.arange(num_rows) - starts_g[safe_gid_m]
    dest_m = jnp.where(in_group_m, dest_m, num_tiles * tm)  # out of bounds: dropped

    x_pk = jnp.zeros((num_tiles * tm, lhs_mk.shape[1]), lhs_mk.dtype)
    x_pk = x_pk.at[dest_m].set(lhs_mk, mode="drop")
    tile_group_t = jnp.searchsorted(padded_ends_g, jnp.arange(num_tiles) * tm, side="right")
    w_tkn = rhs_gkn[jnp.minimum(tile_group_t, num_groups - 1)]
    out_tmn = jnp.einsum(
        "tmk,tkn->tmn", x_pk.reshape(num_tiles, tm, -1), w_tkn,
        preferred_element_type=jnp.float32,
    )
    out_pn = out_tmn.reshape(num_tiles * tm, n)
    out_mn = jnp.take(out_pn, dest_m, axis=0, mode="fill", fill_value=0)
    return out_mn.astype(out_dtype)


def padded_gmm(lhs_gck, rhs_gkn, group_sizes_g, *, preferred_element_type=None):
    """Padded (capacity) layout: one batched matmul, rows past each group's size zeroed.

    Leading batch dims (`[..., G, C, K]` with sizes `[..., G]`) join the matmul directly.
    """
    out_dtype = preferred_element_type or lhs_gck.dtype
    out_gcn = jnp.einsum("...gck,gkn->...gcn", lhs_gck, rhs_gkn, preferred_element_type=jnp.float32)
    valid_gc = jnp.arange(lhs_gck.shape[-2]) < group_sizes_g[..., None]
    return jnp.where(valid_gc[..., None], out_gcn, 0.0).astype(out_dtype)

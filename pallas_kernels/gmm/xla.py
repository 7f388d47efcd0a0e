"""Grouped matmul in plain XLA ops, fast on CPU: a loop over groups, dense matmuls inside.

`jax.lax.ragged_dot` on CPU expands to dense work over every group (7-14x slower than a
dense matmul of the same FLOPs), and padding every group to tiles and running one batched
matmul pays twice: a `[tiles, K, N]` gather of the weights and a static tile budget that
is mostly padding. Instead we walk the groups. Rows are sorted by group, so group g owns
the contiguous rows `[start_g, end_g)`; each is multiplied in windows of `tm` rows by the
group's own matrix, each window one ordinary (multi-threaded) matmul written in place:

    for g in groups:                                  # fori_loop, w[g] read once
        for each full window of tm rows in g:         # fori_loop, traced trip count
            out[rows] = x[rows] @ w[g]
        for each window of tm/2 rows in g's tail:      # the last < tm rows
            out[rows] = where(row in g, x[rows] @ w[g], out[rows])

Work is exact up to the tail windows (under `tm / 2` wasted rows per group), empty
groups cost nothing, and nothing is padded or gathered. `tgmm` walks the same windows,
accumulating `x[rows].T @ grad[rows]` per group. Both loops have traced trip counts, so
they are written for the forward program only: `ops.py` differentiates through its own
custom VJP, which calls these two functions again.

    out_mn = gmm(x_mk, w_gkn, sizes_g, 0, transpose_rhs=False, block_sizes=None,
                 out_dtype=jnp.float32)
"""

import jax
import jax.numpy as jnp


def default_tile_rows(num_rows: int, num_groups: int) -> int:
    """A power of two near the mean group size, in [16, 1024]: most rows fall in full windows
    (each window is one matmul call, whose fixed cost on CPU rewards few, large windows)."""
    target = max(16, num_rows // max(1, num_groups))
    tile = 16
    while tile * 2 <= min(target, 1024):
        tile *= 2
    return tile


def _windows(num_rows, tm):
    """(full window rows, tail window rows), both at most `num_rows`."""
    tm = max(1, min(tm, num_rows))
    return tm, max(1, min(max(8, tm // 2), num_rows))


def _group_bounds(group_sizes_g, group_offset, num_local):
    sizes_g = group_sizes_g.astype(jnp.int32)
    ends_g = jnp.cumsum(sizes_g)
    starts_l = jax.lax.dynamic_slice_in_dim(ends_g - sizes_g, group_offset, num_local)
    ends_l = jax.lax.dynamic_slice_in_dim(ends_g, group_offset, num_local)
    return starts_l, ends_l


def _walk(start, end, tm, tail, num_rows, full_fn, tail_fn, carry):
    """Run `full_fn(lo, carry)` on full windows of `[start, end)`, then `tail_fn(lo, st,
    carry)` on tail windows (`lo`: first row of the window; `st`: where a window that
    would run past the last row is moved back to)."""
    num_full = (end - start) // tm
    carry = jax.lax.fori_loop(0, num_full, lambda c, a: full_fn(start + c * tm, a), carry)
    tail_start = start + num_full * tm
    num_tail = (end - tail_start + tail - 1) // tail

    def tail_step(c, a):
        lo = tail_start + c * tail
        return tail_fn(lo, jnp.minimum(lo, num_rows - tail), a)

    return jax.lax.fori_loop(0, num_tail, tail_step, carry)


def gmm(lhs_mk, rhs, group_sizes_g, group_offset, *, transpose_rhs, block_sizes, out_dtype,
        interpret=False):
    """`out[m] = lhs[m] @ rhs[group(m) - offset]`; rows of other groups are zeros."""
    del interpret
    num_rows, num_local = lhs_mk.shape[0], rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = out_dtype or lhs_mk.dtype
    if num_rows == 0:
        return jnp.zeros((0, n), out_dtype)
    tm = block_sizes.tm if block_sizes else default_tile_rows(num_rows, num_local)
    tm, tail = _windows(num_rows, tm)
    starts_l, ends_l = _group_bounds(group_sizes_g, group_offset, num_local)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def group(g, out_mn):
        w = rhs[g]
        end = ends_l[g]

        def mul(x_rk):
            return jax.lax.dot_general(x_rk, w, dims, preferred_element_type=jnp.float32)

        def full(lo, out_mn):
            y = mul(jax.lax.dynamic_slice_in_dim(lhs_mk, lo, tm))
            return jax.lax.dynamic_update_slice_in_dim(out_mn, y.astype(out_dtype), lo, 0)

        def part(lo, st, out_mn):
            y = mul(jax.lax.dynamic_slice_in_dim(lhs_mk, st, tail))
            rows = st + jnp.arange(tail)
            mine = ((rows >= lo) & (rows < end))[:, None]
            old = jax.lax.dynamic_slice_in_dim(out_mn, st, tail)
            return jax.lax.dynamic_update_slice_in_dim(
                out_mn, jnp.where(mine, y.astype(out_dtype), old), st, 0)

        return _walk(starts_l[g], end, tm, tail, num_rows, full, part, out_mn)

    return jax.lax.fori_loop(0, num_local, group, jnp.zeros((num_rows, n), out_dtype))


def tgmm(x_mk, grad_mn, group_sizes_g, group_offset, *, num_groups, block_sizes, out_dtype,
         interpret=False):
    """`out[l] = x[rows of group offset + l].T @ grad[those rows]`: `[num_groups, K, N]`."""
    del interpret
    num_rows, k = x_mk.shape
    n = grad_mn.shape[1]
    out_dtype = out_dtype or x_mk.dtype
    if num_rows == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    tm = block_sizes.tm if block_sizes else default_tile_rows(num_rows, num_groups)
    tm, tail = _windows(num_rows, tm)
    starts_l, ends_l = _group_bounds(group_sizes_g, group_offset, num_groups)
    contract_rows = (((0,), (0,)), ((), ()))

    def group(g, out_lkn):
        start, end = starts_l[g], ends_l[g]

        def full(lo, acc_kn):
            x = jax.lax.dynamic_slice_in_dim(x_mk, lo, tm)
            g = jax.lax.dynamic_slice_in_dim(grad_mn, lo, tm)
            return acc_kn + jax.lax.dot_general(x, g, contract_rows,
                                                preferred_element_type=jnp.float32)

        def part(lo, st, acc_kn):
            rows = st + jnp.arange(tail)
            mine = ((rows >= lo) & (rows < end))[:, None]
            x = jnp.where(mine, jax.lax.dynamic_slice_in_dim(x_mk, st, tail), 0)
            g = jnp.where(mine, jax.lax.dynamic_slice_in_dim(grad_mn, st, tail), 0)
            return acc_kn + jax.lax.dot_general(x, g, contract_rows,
                                                preferred_element_type=jnp.float32)

        acc_kn = _walk(start, end, tm, tail, num_rows, full, part, jnp.zeros((k, n), jnp.float32))
        return jax.lax.dynamic_update_index_in_dim(out_lkn, acc_kn.astype(out_dtype), g, 0)

    return jax.lax.fori_loop(0, num_groups, group, jnp.zeros((num_groups, k, n), out_dtype))


def padded_gmm(lhs_gck, rhs_gkn, group_sizes_g, *, preferred_element_type=None):
    """Padded (capacity) layout: one batched matmul, rows past each group's size zeroed.

    Leading batch dims (`[..., G, C, K]` with sizes `[..., G]`) join the matmul directly.
    """
    out_dtype = preferred_element_type or lhs_gck.dtype
    out_gcn = jnp.einsum("...gck,gkn->...gcn", lhs_gck, rhs_gkn, preferred_element_type=jnp.float32)
    valid_gc = jnp.arange(lhs_gck.shape[-2]) < group_sizes_g[..., None]
    return jnp.where(valid_gc[..., None], out_gcn, 0.0).astype(out_dtype)

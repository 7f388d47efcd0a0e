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
        for the last < tm rows, one window sized to   # switch over the multiples
            the next multiple of tm/8:                # of tm/8
            out[rows] = where(row in g, x[rows] @ w[g], out[rows])

Work is exact up to the tail windows (under `tm / 8` rows wasted per group), empty
groups cost nothing, and nothing is padded or gathered; on CPU every matmul call has a
fixed cost, so one tail window beats several small ones. `tgmm` walks the same windows,
accumulating `x[rows].T @ grad[rows]` per group. Both loops have traced trip counts, so
they are written for the forward program only: `ops.py` differentiates through its own
custom VJP, which calls these two functions again.

    out_bmn = gmm(x_bmk, w_gkn, sizes_bg, 0, transpose_rhs=False, block_sizes=None,
                  out_dtype=jnp.float32)          # B problems sharing w, one loop
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
    """(full window rows, tail window sizes): `tm` and its multiples of `tm / 8` (at least
    8 rows), all <= `num_rows`."""
    tm = max(1, min(tm, num_rows))
    step = max(8, tm // 8)
    return tm, tuple(sorted({min(tm, step * j) for j in range(1, 9)}))


def _group_bounds(sizes_bg, group_offset, num_local, rows_per_problem):
    """Rows `[start, end)` of local group l of problem b in the flattened `[B * M]` rows,
    as `[B * num_local]` arrays ordered (b, l)."""
    sizes_bg = sizes_bg.astype(jnp.int32)
    ends_bg = jnp.cumsum(sizes_bg, axis=-1)
    base_b1 = (jnp.arange(sizes_bg.shape[0], dtype=jnp.int32) * rows_per_problem)[:, None]
    local = lambda a: jax.lax.dynamic_slice_in_dim(a, group_offset, num_local, axis=1)
    return (local(ends_bg - sizes_bg) + base_b1).reshape(-1), (local(ends_bg) + base_b1).reshape(-1)


def _full_windows(start, end, tm, full_fn, carry):
    """`carry = full_fn(lo, carry)` for each full window of rows `[start, end)`; returns
    the carry and the first row left over."""
    num_full = (end - start) // tm
    carry = jax.lax.fori_loop(0, num_full, lambda c, a: full_fn(start + c * tm, a), carry)
    return carry, start + num_full * tm


def _tail(lo, end, tails, num_rows, tail_fn, zero):
    """`tail_fn(st, size)` for the smallest window `size` in `tails` holding rows
    `[lo, end)`, starting at `st = min(lo, num_rows - size)`; `zero` when there are none.

    Only the small result passes through the `switch` (a large carry would be copied
    into its branches).
    """
    rest = end - lo
    branches = [lambda: zero] + [
        lambda size=size: tail_fn(jnp.minimum(lo, num_rows - size), size) for size in tails]
    which = sum((rest > size).astype(jnp.int32) for size in tails[:-1]) + 1
    return jax.lax.switch(jnp.where(rest > 0, which, 0), branches)


def gmm(lhs_bmk, rhs, sizes_bg, group_offset, *, transpose_rhs, block_sizes, out_dtype,
        interpret=False):
    """`out[b, m] = lhs[b, m] @ rhs[group(b, m) - offset]`; rows of other groups are zeros.

    Takes B problems at once (`[B, M, K]` with sizes `[B, G]`, sharing `rhs`): their rows
    are walked as one list of `B * G_local` groups, so batching adds no work per group
    (a `vmap` of the loops would turn every step into a select over all problems).
    """
    del interpret
    b, m, _ = lhs_bmk.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = out_dtype or lhs_bmk.dtype
    if m == 0:
        return jnp.zeros((b, 0, n), out_dtype)
    x_rk = lhs_bmk.reshape(b * m, -1)
    num_rows = b * m
    tm = block_sizes.tm if block_sizes else default_tile_rows(m, num_local)
    tm, tails = _windows(num_rows, tm)
    starts, ends = _group_bounds(sizes_bg, group_offset, num_local, m)
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def group(i, out_rn):
        w = rhs[i % num_local]
        end = ends[i]

        def mul(x):
            return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)

        def full(lo, out_rn):
            y = mul(jax.lax.dynamic_slice_in_dim(x_rk, lo, tm))
            return jax.lax.dynamic_update_slice_in_dim(out_rn, y.astype(out_dtype), lo, 0)

        out_rn, lo = _full_windows(starts[i], end, tm, full, out_rn)
        st = jnp.minimum(lo, num_rows - tm)  # the tm-row window holding the tail

        def tail(a, size):  # the tail's product, placed in the tm-row window at st
            y = mul(jax.lax.dynamic_slice_in_dim(x_rk, a, size)).astype(out_dtype)
            return jax.lax.dynamic_update_slice_in_dim(jnp.zeros((tm, n), out_dtype), y, a - st, 0)

        y_tn = _tail(lo, end, tails, num_rows, tail, jnp.zeros((tm, n), out_dtype))
        rows = st + jnp.arange(tm)
        mine = ((rows >= lo) & (rows < end))[:, None]
        old = jax.lax.dynamic_slice_in_dim(out_rn, st, tm)
        return jax.lax.dynamic_update_slice_in_dim(out_rn, jnp.where(mine, y_tn, old), st, 0)

    out = jax.lax.fori_loop(0, b * num_local, group, jnp.zeros((num_rows, n), out_dtype))
    return out.reshape(b, m, n)


def tgmm(x_bmk, grad_bmn, sizes_bg, group_offset, *, num_groups, block_sizes, out_dtype,
         interpret=False):
    """`out[l] = sum_b x[b, rows of group offset + l].T @ grad[b, those rows]`: `[L, K, N]`."""
    del interpret
    b, m, k = x_bmk.shape
    n = grad_bmn.shape[-1]
    out_dtype = out_dtype or x_bmk.dtype
    if m == 0:
        return jnp.zeros((num_groups, k, n), out_dtype)
    x_rk, g_rn = x_bmk.reshape(b * m, k), grad_bmn.reshape(b * m, n)
    num_rows = b * m
    tm = block_sizes.tm if block_sizes else default_tile_rows(m, num_groups)
    tm, tails = _windows(num_rows, tm)
    starts, ends = _group_bounds(sizes_bg, group_offset, num_groups, m)
    contract_rows = (((0,), (0,)), ((), ()))

    def xtg(x, g):
        return jax.lax.dot_general(x, g, contract_rows, preferred_element_type=jnp.float32)

    def group(i, out_lkn):
        end = ends[i]

        def full(lo, acc_kn):
            return acc_kn + xtg(jax.lax.dynamic_slice_in_dim(x_rk, lo, tm),
                                jax.lax.dynamic_slice_in_dim(g_rn, lo, tm))

        acc_kn, lo = _full_windows(starts[i], end, tm, full, jnp.zeros((k, n), jnp.float32))

        def tail(a, size):
            rows = a + jnp.arange(size)
            mine = ((rows >= lo) & (rows < end))[:, None]
            x = jnp.where(mine, jax.lax.dynamic_slice_in_dim(x_rk, a, size), 0)
            g = jnp.where(mine, jax.lax.dynamic_slice_in_dim(g_rn, a, size), 0)
            return xtg(x, g)

        acc_kn = acc_kn + _tail(lo, end, tails, num_rows, tail, jnp.zeros((k, n), jnp.float32))
        return out_lkn.at[i % num_groups].add(acc_kn)

    out = jax.lax.fori_loop(0, b * num_groups, group, jnp.zeros((num_groups, k, n), jnp.float32))
    return out.astype(out_dtype)


def padded_gmm(lhs_gck, rhs_gkn, group_sizes_g, *, preferred_element_type=None):
    """Padded (capacity) layout: one batched matmul, rows past each group's size zeroed.

    Leading batch dims (`[..., G, C, K]` with sizes `[..., G]`) join the matmul directly.
    """
    out_dtype = preferred_element_type or lhs_gck.dtype
    out_gcn = jnp.einsum("...gck,gkn->...gcn", lhs_gck, rhs_gkn, preferred_element_type=jnp.float32)
    valid_gc = jnp.arange(lhs_gck.shape[-2]) < group_sizes_g[..., None]
    return jnp.where(valid_gc[..., None], out_gcn, 0.0).astype(out_dtype)

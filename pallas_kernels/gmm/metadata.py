"""Work lists for the Pallas grouped-matmul kernels: which (row tile, group) pairs to visit.

Rows are cut into tiles of `tm`. Group boundaries need not fall on tile boundaries, so
a tile may hold rows of several groups. Instead of letting a tile straddle groups, the
kernels visit a tile once per group it touches and mask the other rows:

    group_sizes = [5, 0, 3], tm = 4, M = 10 rows
    rows:    0 1 2 3 | 4 5 6 7 | 8 9
    group:   0 0 0 0 | 0 2 2 2 | - -        ("-": no group; written as zeros)
    work:    (tile 0, g0) (tile 1, g0) (tile 1, g2) (tile 2, none)

Empty groups cost nothing (they touch no tile). The rows outside the groups this call
computes, those before and after them for an expert shard (`group_offset`) or past
`sum(group_sizes)`, form two "none" segments whose items write zeros, so every output row
is written without a separate memset. The list has a static length
`num_tiles + num_local + 1` (+ `num_local` with `visit_empty_groups`, for `tgmm`, whose
empty groups must still write a zero gradient); items past `num_work` repeat the last one
so a kernel can skip them without fetching new blocks.

    meta = make_work_list(sizes_g, num_rows=10, tm=4, group_offset=0, num_local=3)
    meta.group[:meta.num_work]   # [0, 0, 2, 3]   (3 = num_local: the "none" after)
"""

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WorkList:
    """One item per (row tile, segment) pair, in row order; all int32.

    Attributes:
      group: `[W]` local group of the item: `0..num_local-1`, or -1 / `num_local` for the
        rows before / after the local groups (write zeros).
      tile: `[W]` row tile of the item (rows `tile * tm` to `tile * tm + tm`).
      row_start: `[W]` first row of the item's segment (rows before it are masked).
      row_end: `[W]` one past the segment's last row (rows from it on are masked).
      num_work: `[1]` items in use; items from `num_work` on repeat the last item.
      group_start: `[num_local]` first row of each local group.
      group_end: `[num_local]` one past the last row of each local group.
    """

    group: jax.Array
    tile: jax.Array
    row_start: jax.Array
    row_end: jax.Array
    num_work: jax.Array
    group_start: jax.Array
    group_end: jax.Array


def num_items(num_rows: int, tm: int, num_local: int, visit_empty_groups: bool) -> int:
    """The static length of the work list (a bound on the items in use)."""
    return pl_cdiv(num_rows, tm) + num_local + 1 + (num_local if visit_empty_groups else 0)


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_work_list(group_sizes_g, *, num_rows: int, tm: int, group_offset, num_local: int,
                   visit_empty_groups: bool = False, cover_all_rows: bool = True) -> WorkList:
    """The work list for groups `[group_offset, group_offset + num_local)` of `group_sizes_g`.

    `sum(group_sizes_g)` may be less than `num_rows` (the tail is a "none" segment) but not
    more. `group_offset` may be traced. `cover_all_rows=False` leaves out the "none"
    items: `tgmm` writes per group, not per row, and need not visit rows of no group (it
    must then visit empty groups, so that the list is never empty).
    """
    if not cover_all_rows and not visit_empty_groups:
        raise ValueError("make_work_list: cover_all_rows=False needs visit_empty_groups=True, "
                         "else a shard whose groups are all empty would have no work item")
    sizes_g = group_sizes_g.astype(jnp.int32)
    num_tiles = pl_cdiv(num_rows, tm)
    before = jnp.sum(jnp.where(jnp.arange(sizes_g.shape[0]) < group_offset, sizes_g, 0))
    local_l = jax.lax.dynamic_slice_in_dim(sizes_g, group_offset, num_local)
    after = jnp.maximum(num_rows - before - jnp.sum(local_l), 0)
    # Segments: [before, local groups..., after], contiguous over the rows.
    sizes_s = jnp.concatenate([before[None], local_l, after[None]])
    ends_s = jnp.cumsum(sizes_s)
    starts_s = ends_s - sizes_s
    first_s = jnp.minimum(starts_s // tm, num_tiles - 1)
    last_s = (ends_s - 1) // tm
    is_group_s = (jnp.arange(num_local + 2) >= 1) & (jnp.arange(num_local + 2) <= num_local)
    empty_items = 1 if visit_empty_groups else 0
    count_s = jnp.where(sizes_s > 0, last_s - first_s + 1, jnp.where(is_group_s, empty_items, 0))
    if not cover_all_rows:
        count_s = jnp.where(is_group_s, count_s, 0)

    total = num_items(num_rows, tm, num_local, visit_empty_groups)
    ends_count_s = jnp.cumsum(count_s)
    num_work = ends_count_s[-1]
    w = jnp.minimum(jnp.arange(total), num_work - 1)  # padding repeats the last item
    seg_w = jnp.minimum(jnp.searchsorted(ends_count_s, w, side="right"), num_local + 1)
    tile_w = first_s[seg_w] + w - (ends_count_s[seg_w] - count_s[seg_w])
    i32 = lambda a: a.astype(jnp.int32)
    return WorkList(group=i32(seg_w - 1), tile=i32(jnp.minimum(tile_w, num_tiles - 1)),
                    row_start=i32(starts_s[seg_w]), row_end=i32(ends_s[seg_w]),
                    num_work=i32(num_work[None]), group_start=i32(starts_s[1:-1]),
                    group_end=i32(ends_s[1:-1]))

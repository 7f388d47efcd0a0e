"""The definition of grouped matmul and its transpose, written for clarity rather than speed.

Rows of `lhs_mk` are grouped consecutively: group g owns rows
`[sum(group_sizes[:g]), sum(group_sizes[:g+1]))` and multiplies them by `rhs[g]`.
Rows past `sum(group_sizes)` belong to no group and produce zeros.

With `group_offset=a` and `rhs` holding `G_local` groups, only groups `[a, a + G_local)`
are computed (an expert-parallel shard): rows of other groups give zeros.

`tgmm(lhs_km, grad_mn, group_sizes)` is the weight gradient: `out[g] = lhs[:, rows_g] @
grad[rows_g]`. The references compute every group against every row and mask, so they
cost G times the FLOPs: use them in tests only.
"""

import jax.numpy as jnp


def group_ids(group_sizes_g: jnp.ndarray, num_rows: int) -> jnp.ndarray:
    """Group index of every row; rows past the last group get `G` (no group)."""
    ends_g = jnp.cumsum(group_sizes_g)
    return jnp.searchsorted(ends_g, jnp.arange(num_rows), side="right")


def _local_onehot(group_sizes_g, num_rows, group_offset, num_local):
    """float32 [G_local, M]: 1 where row m belongs to local group l (= global offset + l)."""
    gid_m = group_ids(group_sizes_g, num_rows)
    local_ids = jnp.arange(num_local) + group_offset
    return (gid_m[None, :] == local_ids[:, None]).astype(jnp.float32)


def gmm_reference(lhs_mk, rhs, group_sizes_g, *, transpose_rhs=False, group_offset=0,
                  preferred_element_type=None):
    """out[m] = lhs[m] @ rhs[group(m) - offset] (transposed if asked); zeros elsewhere."""
    out_dtype = preferred_element_type or lhs_mk.dtype
    spec = "mk,gnk->gmn" if transpose_rhs else "mk,gkn->gmn"
    all_gmn = jnp.einsum(spec, lhs_mk, rhs, preferred_element_type=jnp.float32)
    onehot_gm = _local_onehot(group_sizes_g, lhs_mk.shape[0], group_offset, rhs.shape[0])
    return jnp.einsum("gm,gmn->mn", onehot_gm, all_gmn).astype(out_dtype)


def tgmm_reference(lhs_km, grad_mn, group_sizes_g, *, num_groups=None, group_offset=0,
                   preferred_element_type=None):
    """out[l] = lhs[:, rows of group offset + l] @ grad[those rows]: [G_local, K, N]."""
    out_dtype = preferred_element_type or lhs_km.dtype
    num_local = num_groups or group_sizes_g.shape[0]
    onehot_gm = _local_onehot(group_sizes_g, lhs_km.shape[1], group_offset, num_local)
    out = jnp.einsum("km,gm,mn->gkn", lhs_km, onehot_gm, grad_mn, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def padded_gmm_reference(lhs_gck, rhs_gkn, group_sizes_g, preferred_element_type=None):
    """Padded layout: group g owns rows `lhs[g, :group_sizes[g]]`; other rows give zeros."""
    out_dtype = preferred_element_type or lhs_gck.dtype
    out_gcn = jnp.einsum("gck,gkn->gcn", lhs_gck, rhs_gkn, preferred_element_type=jnp.float32)
    valid_gc = jnp.arange(lhs_gck.shape[1])[None, :] < group_sizes_g[:, None]
    return jnp.where(valid_gc[..., None], out_gcn, 0.0).astype(out_dtype)

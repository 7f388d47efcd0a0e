"""The definition of grouped matmul, written for clarity rather than speed.

Rows of `lhs_mk` are grouped consecutively: group g owns rows
`[sum(group_sizes[:g]), sum(group_sizes[:g+1]))` and multiplies them by `rhs_gkn[g]`.
Rows past `sum(group_sizes)` belong to no group and produce zeros. The reference
computes every group against every row and masks, so it costs G times the FLOPs:
use it in tests only.
"""

import jax.numpy as jnp


def group_ids(group_sizes_g: jnp.ndarray, num_rows: int) -> jnp.ndarray:
    """Group index of every row; rows past the last group get `G` (no group)."""
    ends_g = jnp.cumsum(group_sizes_g)
    return jnp.searchsorted(ends_g, jnp.arange(num_rows), side="right")


def gmm_reference(lhs_mk, rhs_gkn, group_sizes_g, preferred_element_type=None):
    """out[m] = lhs[m] @ rhs[group(m)], zero for rows outside every group."""
    out_dtype = preferred_element_type or lhs_mk.dtype
    gid_m = group_ids(group_sizes_g, lhs_mk.shape[0])
    all_gmn = jnp.einsum("mk,gkn->gmn", lhs_mk, rhs_gkn, preferred_element_type=jnp.float32)
    onehot_gm = (gid_m[None, :] == jnp.arange(rhs_gkn.shape[0])[:, None]).astype(jnp.float32)
    return jnp.einsum("gm,gmn->mn", onehot_gm, all_gmn).astype(out_dtype)


def padded_gmm_reference(lhs_gck, rhs_gkn, group_sizes_g, preferred_element_type=None):
    """Padded layout: group g owns rows `lhs[g, :group_sizes[g]]`; other rows give zeros."""
    out_dtype = preferred_element_type or lhs_gck.dtype
    out_gcn = jnp.einsum("gck,gkn->gcn", lhs_gck, rhs_gkn, preferred_element_type=jnp.float32)
    valid_gc = jnp.arange(lhs_gck.shape[1])[None, :] < group_sizes_g[:, None]
    return jnp.where(valid_gc[..., None], out_gcn, 0.0).astype(out_dtype)

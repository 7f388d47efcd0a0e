"""The `"ragged_dot"` backend: `jax.lax.ragged_dot`, which XLA lowers to its own grouped
kernels on GPU and TPU (and expands to dense work over every group on CPU).

ragged_dot has no batch dims and no expert-shard form, so both are built from zero
matrices: B problems of G groups become one problem of B * (G + 2) groups, where each
problem's rows before and after its local groups multiply zeros.

    out_bmn = gmm(x_bmk, w_gkn, sizes_bg, group_offset=None, transpose_rhs=False,
                  out_dtype=jnp.float32)
"""

import jax
import jax.numpy as jnp


def _ragged_sizes(group_sizes_g, group_offset, num_local, num_rows):
    """Sizes `[rows before, local groups..., rows after]` for the shard's ragged_dot."""
    sizes = group_sizes_g.astype(jnp.int32)
    before = jnp.sum(jnp.where(jnp.arange(sizes.shape[0]) < group_offset, sizes, 0))
    local = jax.lax.dynamic_slice_in_dim(sizes, group_offset, num_local)
    return jnp.concatenate([before[None], local, (num_rows - before - jnp.sum(local))[None]])


def gmm(lhs_bmk, rhs, group_sizes_bg, group_offset, transpose_rhs, out_dtype):
    """`jax.lax.ragged_dot` over `[B, M, K]` problems sharing `rhs`."""
    rhs_gkn = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    num_local, k, n = rhs_gkn.shape
    b, m, _ = lhs_bmk.shape
    if b == 1 and group_offset is None:  # the common case: no extra groups to pay for
        sizes_g = group_sizes_bg[0].astype(jnp.int32)
        out = jax.lax.ragged_dot(lhs_bmk[0], rhs_gkn, sizes_g, preferred_element_type=jnp.float32)
        valid_m = jnp.arange(m) < jnp.sum(sizes_g)
        return jnp.where(valid_m[:, None], out, 0.0)[None].astype(out_dtype)
    group_offset = 0 if group_offset is None else group_offset
    sizes_bh = jax.vmap(lambda gs: _ragged_sizes(gs, group_offset, num_local, m))(group_sizes_bg)
    zero = jnp.zeros((1, k, n), rhs_gkn.dtype)
    w_hkn = jnp.concatenate([zero, rhs_gkn, zero])
    w = jnp.broadcast_to(w_hkn, (b, *w_hkn.shape)).reshape(-1, k, n)
    out = jax.lax.ragged_dot(lhs_bmk.reshape(b * m, -1), w, sizes_bh.reshape(-1),
                             preferred_element_type=jnp.float32)
    return out.reshape(b, m, n).astype(out_dtype)


def tgmm(lhs_km, grad_mn, group_sizes_g, group_offset, num_groups, out_dtype):
    """The weight gradient of `gmm`, taken by JAX's transpose of ragged_dot."""
    w0 = jnp.zeros((num_groups, lhs_km.shape[0], grad_mn.shape[1]), jnp.float32)
    fwd = lambda w: gmm(lhs_km.T[None], w, group_sizes_g[None], group_offset, False, jnp.float32)
    _, vjp = jax.vjp(fwd, w0)
    return vjp(grad_mn[None].astype(jnp.float32))[0].astype(out_dtype)

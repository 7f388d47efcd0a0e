"""`gmm`: grouped matmul behind one door, with the backend chosen by platform.

Two layouts share the op, told apart by rank:

* ragged, `lhs: [M, K]`, `group_sizes: [G]`: group g owns the next `group_sizes[g]` rows
  (rows sorted by group, as dropless dispatch produces them); rows past the last group
  give zeros;
* padded, `lhs: [G, C, K]`, `group_sizes: [G]`: group g owns `lhs[g, :group_sizes[g]]`
  (the capacity layout).

Both take leading batch dims on `lhs` and `group_sizes` (`[B, M, K]` with `[B, G]`):
independent problems sharing `rhs`, such as the dispatch groups of an MoE layer.

`transpose_rhs=True` takes `rhs` as `[G, N, K]`; `group_offset=a` with a `rhs` of
`G_local` groups computes only groups `[a, a + G_local)` of `group_sizes` (the experts
one device holds in expert parallelism), giving zeros for other rows. `tgmm(lhs_km,
grad_mn, group_sizes)` is the transposed op, `out[g] = lhs[:, rows_g] @ grad[rows_g]`.

The `"xla"` backend has a custom VJP written with the same two ops:
`d lhs = gmm(grad, rhs, transpose_rhs=not transpose_rhs)` and `d rhs = tgmm(lhs.T, grad)`.

Backends (`impl=`):

* `"xla"`: row-tile padding plus one batched matmul (`xla.py`); the CPU default, since
  XLA:CPU expands `jax.lax.ragged_dot` to dense work over every group (7-14x a dense
  matmul of the same FLOPs for one matmul; about 4x for a whole MoE layer, see
  `benchmarks/moe_layer.py`);
* `"ragged_dot"`: `jax.lax.ragged_dot`, the default on GPU and TPU, where XLA lowers it
  to a grouped kernel;
* `"reference"`: the masked definition (`reference.py`), G times the FLOPs, for tests.

    out_mn = gmm(x_mk, w_gkn, sizes_g)                 # platform default
    out_mn = gmm(x_mk, w_gkn, sizes_g, impl="reference")
    dw_gkn = tgmm(x_mk.T, dout_mn, sizes_g)            # weight gradient
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import reference, xla

GMM_IMPLS = ("xla", "ragged_dot", "reference")


def default_impl() -> str:
    """The backend `gmm` uses when `impl` is None, for the default JAX platform."""
    return "xla" if jax.default_backend() == "cpu" else "ragged_dot"


def _resolve(impl):
    impl = impl or default_impl()
    if impl not in GMM_IMPLS:
        raise ValueError(f"gmm: impl={impl!r} is not one of {GMM_IMPLS}")
    return impl


def _check_shapes(lhs, rhs, group_sizes, transpose_rhs, local):
    if rhs.ndim != 3:
        raise ValueError(f"gmm: rhs must be [G, K, N] ([G, N, K] with transpose_rhs), got {rhs.shape}")
    if group_sizes.ndim < 1 or (group_sizes.shape[-1] != rhs.shape[0] and not local):
        raise ValueError(
            f"gmm: group_sizes must be [..., G] with G={rhs.shape[0]} to match rhs {rhs.shape}, "
            f"got shape {group_sizes.shape} (pass group_offset for an expert shard)")
    if local and group_sizes.shape[-1] < rhs.shape[0]:
        raise ValueError(f"gmm: rhs holds {rhs.shape[0]} groups but group_sizes has only "
                         f"{group_sizes.shape[-1]}")
    extra = lhs.ndim - group_sizes.ndim
    if extra not in (1, 2):
        raise ValueError(f"gmm: lhs {lhs.shape} must be [..., M, K] (ragged) or [..., G, C, K] "
                         f"(padded) for group_sizes {group_sizes.shape}")
    if lhs.shape[: group_sizes.ndim - 1] != group_sizes.shape[:-1]:
        raise ValueError(f"gmm: batch dims differ: lhs {lhs.shape} vs group_sizes {group_sizes.shape}")
    if extra == 2 and lhs.shape[-3] != rhs.shape[0]:
        raise ValueError(f"gmm: padded lhs [..., G, C, K] has G={lhs.shape[-3]}, rhs has G={rhs.shape[0]}")
    if extra == 2 and local:
        raise ValueError("gmm: group_offset applies to the ragged layout [..., M, K] only")
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[-1] != k:
        raise ValueError(f"gmm: contracting dims differ: lhs {lhs.shape} vs rhs {rhs.shape}"
                         f"{' (transpose_rhs)' if transpose_rhs else ''}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _gmm_xla(lhs, rhs, group_sizes, group_offset, transpose_rhs, tile_rows, out_dtype):
    return xla.gmm_tiled(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                         group_offset=group_offset, tile_rows=tile_rows,
                         preferred_element_type=out_dtype)


def _gmm_xla_fwd(lhs, rhs, group_sizes, group_offset, transpose_rhs, tile_rows, out_dtype):
    out = _gmm_xla(lhs, rhs, group_sizes, group_offset, transpose_rhs, tile_rows, out_dtype)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_xla_bwd(transpose_rhs, tile_rows, out_dtype, res, grad_mn):
    lhs, rhs, group_sizes, group_offset = res
    kw = dict(group_offset=group_offset, tile_rows=tile_rows)
    dlhs = xla.gmm_tiled(grad_mn, rhs, group_sizes, transpose_rhs=not transpose_rhs,
                         preferred_element_type=lhs.dtype, **kw)
    a, b = (grad_mn.T, lhs) if transpose_rhs else (lhs.T, grad_mn)
    drhs = xla.tgmm_tiled(a, b, group_sizes, num_groups=rhs.shape[0],
                          preferred_element_type=rhs.dtype, **kw)
    return dlhs, drhs, None, None


_gmm_xla.defvjp(_gmm_xla_fwd, _gmm_xla_bwd)


def _ragged_sizes(group_sizes_g, group_offset, num_local, num_rows):
    """Sizes `[rows before, local groups..., rows after]` for the shard's ragged_dot."""
    sizes = group_sizes_g.astype(jnp.int32)
    before = jnp.sum(jnp.where(jnp.arange(sizes.shape[0]) < group_offset, sizes, 0))
    local = jax.lax.dynamic_slice_in_dim(sizes, group_offset, num_local)
    return jnp.concatenate([before[None], local, (num_rows - before - jnp.sum(local))[None]])


def _ragged_dot(lhs_bmk, rhs, group_sizes_bg, group_offset, transpose_rhs, out_dtype):
    """`jax.lax.ragged_dot` over `[B, M, K]` problems at once.

    ragged_dot has no batching rule, so B problems of G groups become one problem of
    B * (G + 2) groups: each problem's rows before and after its local groups multiply
    zero matrices.
    """
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


def _one(lhs, rhs, group_sizes, group_offset, impl, transpose_rhs, tile_rows, out_dtype):
    """gmm for one problem (no batch dims), ragged layout, reference or xla."""
    if impl == "reference":
        return reference.gmm_reference(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                                       group_offset=group_offset, preferred_element_type=out_dtype)
    return _gmm_xla(lhs, rhs, group_sizes, group_offset, transpose_rhs, tile_rows, out_dtype)


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, group_offset=None, impl=None,
        tile_rows=None, preferred_element_type=None):
    """Grouped matmul `out[m] = lhs[m] @ rhs[group(m)]`; see the module docstring.

    Args:
      lhs: `[..., M, K]` rows sorted by group, or `[..., G, C, K]` padded groups; leading
        dims are independent batches (e.g. dispatch groups) that share `rhs`.
      rhs: `[G, K, N]` one matrix per group (`[G, N, K]` with `transpose_rhs`).
      group_sizes: int `[..., G]`; for the ragged layout `sum(group_sizes) <= M`.
      transpose_rhs: multiply by `rhs[g].T`.
      group_offset: int (may be traced): `rhs` holds groups `[offset, offset + rhs.shape[0])`
        of `group_sizes`; rows of other groups give zeros. Ragged layout only.
      impl: one of `GMM_IMPLS`, or None for `default_impl()`.
      tile_rows: row tile of the `"xla"` backend (None: chosen from the shapes).
      preferred_element_type: output dtype (default: `lhs.dtype`); accumulation is fp32.
    """
    _check_shapes(lhs, rhs, group_sizes, transpose_rhs, group_offset is not None)
    impl = _resolve(impl)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    batch = group_sizes.shape[:-1]
    if lhs.ndim == group_sizes.ndim + 2:
        w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        if impl != "reference":
            return xla.padded_gmm(lhs, w, group_sizes, preferred_element_type=out_dtype)
        fn = lambda x, gs: reference.padded_gmm_reference(x, w, gs, preferred_element_type=out_dtype)
    elif impl == "ragged_dot":
        flat = _ragged_dot(lhs.reshape(-1, *lhs.shape[-2:]), rhs,
                           group_sizes.reshape(-1, group_sizes.shape[-1]),
                           group_offset, transpose_rhs, out_dtype)
        return flat.reshape(*lhs.shape[:-1], flat.shape[-1])
    else:
        offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
        fn = lambda x, gs: _one(x, rhs, gs, offset, impl, transpose_rhs, tile_rows, out_dtype)
    for _ in batch:
        fn = jax.vmap(fn)
    return fn(lhs, group_sizes)


def tgmm(lhs_km, grad_mn, group_sizes, *, num_groups=None, group_offset=None, impl=None,
         tile_rows=None, preferred_element_type=None):
    """Transposed grouped matmul: `out[l] = lhs[:, rows of group offset + l] @ grad[rows]`.

    Args:
      lhs_km: `[K, M]`, the transpose of a ragged `lhs` (rows sorted by group).
      grad_mn: `[M, N]`.
      group_sizes: int `[G]`.
      num_groups: groups to produce (default `G`); with `group_offset`, the local shard size.
      group_offset: first group produced (may be traced).
      impl, tile_rows, preferred_element_type: as for `gmm`.

    Returns `[num_groups, K, N]`: the gradient of `gmm` with respect to `rhs`.
    """
    if lhs_km.ndim != 2 or grad_mn.ndim != 2 or lhs_km.shape[1] != grad_mn.shape[0]:
        raise ValueError(f"tgmm: need lhs [K, M] and grad [M, N] with equal M, got {lhs_km.shape} "
                         f"and {grad_mn.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"tgmm: group_sizes must be [G], got shape {group_sizes.shape}")
    impl = _resolve(impl)
    out_dtype = jnp.dtype(preferred_element_type or lhs_km.dtype)
    num = num_groups or group_sizes.shape[0]
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    kw = dict(num_groups=num, group_offset=offset, preferred_element_type=out_dtype)
    if impl == "reference":
        return reference.tgmm_reference(lhs_km, grad_mn, group_sizes, **kw)
    if impl == "xla":
        return xla.tgmm_tiled(lhs_km, grad_mn, group_sizes, tile_rows=tile_rows, **kw)
    w0 = jnp.zeros((num, lhs_km.shape[0], grad_mn.shape[1]), jnp.float32)
    fwd = lambda w: _ragged_dot(lhs_km.T[None], w, group_sizes[None], offset, False, jnp.float32)
    _, vjp = jax.vjp(fwd, w0)
    return vjp(grad_mn[None].astype(jnp.float32))[0].astype(out_dtype)

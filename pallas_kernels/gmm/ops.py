"""`gmm`: grouped matmul behind one door, with the backend chosen by platform.

Two layouts share the op, told apart by rank:

* ragged, `lhs: [M, K]`, `group_sizes: [G]`: group g owns the next `group_sizes[g]` rows
  (rows sorted by group, as dropless dispatch produces them); rows past the last group
  give zeros;
* padded, `lhs: [G, C, K]`, `group_sizes: [G]`: group g owns `lhs[g, :group_sizes[g]]`
  (the capacity layout).

Both take leading batch dims on `lhs` and `group_sizes` (`[B, M, K]` with `[B, G]`):
independent problems sharing `rhs`, such as the dispatch groups of an MoE layer.

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
"""

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import reference, xla

GMM_IMPLS = ("xla", "ragged_dot", "reference")


def default_impl() -> str:
    """The backend `gmm` uses when `impl` is None, for the default JAX platform."""
    return "xla" if jax.default_backend() == "cpu" else "ragged_dot"


def _check_shapes(lhs, rhs, group_sizes):
    if rhs.ndim != 3:
        raise ValueError(f"gmm: rhs must be [G, K, N], got shape {rhs.shape}")
    if group_sizes.ndim < 1 or group_sizes.shape[-1] != rhs.shape[0]:
        raise ValueError(
            f"gmm: group_sizes must be [..., G] with G={rhs.shape[0]} to match rhs {rhs.shape}, "
            f"got shape {group_sizes.shape}")
    extra = lhs.ndim - group_sizes.ndim
    if extra not in (1, 2):
        raise ValueError(f"gmm: lhs {lhs.shape} must be [..., M, K] (ragged) or [..., G, C, K] "
                         f"(padded) for group_sizes {group_sizes.shape}")
    if lhs.shape[: group_sizes.ndim - 1] != group_sizes.shape[:-1]:
        raise ValueError(f"gmm: batch dims differ: lhs {lhs.shape} vs group_sizes {group_sizes.shape}")
    if extra == 2 and lhs.shape[-3] != rhs.shape[0]:
        raise ValueError(f"gmm: padded lhs [..., G, C, K] has G={lhs.shape[-3]}, rhs has G={rhs.shape[0]}")
    if lhs.shape[-1] != rhs.shape[1]:
        raise ValueError(f"gmm: contracting dims differ: lhs {lhs.shape} vs rhs {rhs.shape}")


def _ragged_dot(lhs_mk, rhs_gkn, group_sizes_g, out_dtype):
    out = jax.lax.ragged_dot(lhs_mk, rhs_gkn, group_sizes_g.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    valid_m = jnp.arange(lhs_mk.shape[0]) < jnp.sum(group_sizes_g)
    return jnp.where(valid_m[:, None], out, 0.0).astype(out_dtype)


def _batched_ragged_dot(lhs_bmk, rhs_gkn, group_sizes_bg, out_dtype):
    """ragged_dot has no batching rule: flatten B batches of G groups into B * (G + 1) groups.

    Group G + 1 of each batch covers its padding rows and multiplies them by zeros.
    """
    b, m, k = lhs_bmk.shape
    g, _, n = rhs_gkn.shape
    pad_b = m - jnp.sum(group_sizes_bg, axis=-1)
    sizes = jnp.concatenate([group_sizes_bg, pad_b[:, None]], axis=-1).reshape(-1)
    rhs = jnp.concatenate([rhs_gkn, jnp.zeros((1, k, n), rhs_gkn.dtype)], axis=0)
    rhs = jnp.broadcast_to(rhs, (b, g + 1, k, n)).reshape(b * (g + 1), k, n)
    out = jax.lax.ragged_dot(lhs_bmk.reshape(b * m, k), rhs, sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.reshape(b, m, n).astype(out_dtype)


def gmm(lhs, rhs, group_sizes, *, impl=None, tile_rows=None, preferred_element_type=None):
    """Grouped matmul `out[m] = lhs[m] @ rhs[group(m)]`; see the module docstring.

    Args:
      lhs: `[..., M, K]` rows sorted by group, or `[..., G, C, K]` padded groups; leading
        dims are independent batches (e.g. dispatch groups) that share `rhs`.
      rhs: `[G, K, N]`, one matrix per group.
      group_sizes: int `[..., G]`; for the ragged layout `sum(group_sizes) <= M`.
      impl: one of `GMM_IMPLS`, or None for `default_impl()`.
      tile_rows: row tile of the `"xla"` backend (None: chosen from the shapes).
      preferred_element_type: output dtype (default: `lhs.dtype`); accumulation is fp32.
    """
    _check_shapes(lhs, rhs, group_sizes)
    impl = impl or default_impl()
    if impl not in GMM_IMPLS:
        raise ValueError(f"gmm: impl={impl!r} is not one of {GMM_IMPLS}")
    out_dtype = preferred_element_type or lhs.dtype
    batch = group_sizes.shape[:-1]
    kw = dict(preferred_element_type=out_dtype)
    if lhs.ndim == group_sizes.ndim + 2:
        if impl != "reference":
            return xla.padded_gmm(lhs, rhs, group_sizes, **kw)
        fn = lambda x, w, gs: reference.padded_gmm_reference(x, w, gs, **kw)
    elif impl == "ragged_dot":
        if not batch:
            return _ragged_dot(lhs, rhs, group_sizes, out_dtype)
        flat = _batched_ragged_dot(lhs.reshape(-1, *lhs.shape[-2:]), rhs,
                                   group_sizes.reshape(-1, group_sizes.shape[-1]), out_dtype)
        return flat.reshape(*batch, *flat.shape[-2:])
    elif impl == "reference":
        fn = lambda x, w, gs: reference.gmm_reference(x, w, gs, **kw)
    else:
        fn = lambda x, w, gs: xla.gmm_tiled(x, w, gs, tile_rows=tile_rows, **kw)
    for _ in batch:
        fn = jax.vmap(fn, in_axes=(0, None, 0))
    return fn(lhs, rhs, group_sizes)

"""`gmm`: grouped matmul behind one door, with the backend chosen by platform.

Two layouts share the op:

* ragged, `lhs: [M, K]`: group g owns the next `group_sizes[g]` rows (rows sorted by
  group, as dropless dispatch produces them); rows past `sum(group_sizes)` give zeros;
* padded, `lhs: [G, C, K]`: group g owns `lhs[g, :group_sizes[g]]` (the capacity layout).

Backends (`impl=`):

* `"xla"`: row-tile padding plus one batched matmul (`xla.py`); the CPU default, since
  `jax.lax.ragged_dot` on CPU costs 7-14x a dense matmul of the same FLOPs;
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
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(
            f"gmm: group_sizes must be [G]=[{rhs.shape[0]}] to match rhs {rhs.shape}, "
            f"got shape {group_sizes.shape}"
        )
    if lhs.ndim == 3 and lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"gmm: padded lhs [G, C, K] has G={lhs.shape[0]}, rhs has G={rhs.shape[0]}")
    if lhs.ndim not in (2, 3):
        raise ValueError(f"gmm: lhs must be [M, K] or [G, C, K], got shape {lhs.shape}")
    if lhs.shape[-1] != rhs.shape[1]:
        raise ValueError(f"gmm: contracting dims differ: lhs {lhs.shape} vs rhs {rhs.shape}")


def gmm(lhs, rhs, group_sizes, *, impl=None, tile_rows=None, preferred_element_type=None):
    """Grouped matmul `out[m] = lhs[m] @ rhs[group(m)]`; see the module docstring.

    Args:
      lhs: `[M, K]` rows sorted by group, or `[G, C, K]` padded groups.
      rhs: `[G, K, N]`, one matrix per group.
      group_sizes: int `[G]`; for the ragged layout `sum(group_sizes) <= M`.
      impl: one of `GMM_IMPLS`, or None for `default_impl()`.
      tile_rows: row tile of the `"xla"` backend (None: chosen from the shapes).
      preferred_element_type: output dtype (default: `lhs.dtype`); accumulation is fp32.
    """
    _check_shapes(lhs, rhs, group_sizes)
    impl = impl or default_impl()
    if impl not in GMM_IMPLS:
        raise ValueError(f"gmm: impl={impl!r} is not one of {GMM_IMPLS}")
    kw = dict(preferred_element_type=preferred_element_type)
    if lhs.ndim == 3:
        if impl == "reference":
            return reference.padded_gmm_reference(lhs, rhs, group_sizes, **kw)
        return xla.padded_gmm(lhs, rhs, group_sizes, **kw)
    if impl == "reference":
        return reference.gmm_reference(lhs, rhs, group_sizes, **kw)
    if impl == "xla":
        return xla.gmm_tiled(lhs, rhs, group_sizes, tile_rows=tile_rows, **kw)
    out = jax.lax.ragged_dot(
        lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    )
    valid_m = jnp.arange(lhs.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid_m[:, None], out, 0.0).astype(preferred_element_type or lhs.dtype)

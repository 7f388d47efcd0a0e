"""Hot-path kernels for sparse MoE models, each behind one door.

`gmm(lhs, rhs, group_sizes)` multiplies consecutive row groups of `lhs` by their own
matrix in `rhs`: rows `[offset_g, offset_g + group_sizes[g])` use `rhs[g]`. It picks a
backend by platform and keeps a pure-JAX reference beside it for tests.

    import jax.numpy as jnp
    from pallas_kernels import gmm
    out = gmm(x_mk, w_gkn, jnp.array([3, 0, 5]))   # rows 0-2 use w[0], rows 3-7 use w[2]
"""

from pallas_kernels import tuning
from pallas_kernels.flash_attention import ATTENTION_IMPLS, default_attention_impl, flash_attention
from pallas_kernels.gmm.ops import FALLBACK_ORDER, GMM_IMPLS, choose_impl, default_impl, gmm, tgmm
from pallas_kernels.tuning import AttentionBlockSizes, GmmBlockSizes

__all__ = ["ATTENTION_IMPLS", "AttentionBlockSizes", "FALLBACK_ORDER", "GMM_IMPLS", "GmmBlockSizes",
           "choose_impl", "default_attention_impl", "default_impl", "flash_attention", "gmm",
           "tgmm", "tuning"]

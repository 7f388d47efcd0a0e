"""Routed experts: E SwiGLU FFNs whose matmuls all go through `pallas_kernels.gmm`.

Experts only compute. They take rows already grouped by dispatch, either ragged
(`[R, d]` with `group_sizes`) or padded (`[E, C, d]`), and return the same layout:

    h = silu(x W_gate[e]) * (x W_up[e])       # one gmm over [W_gate | W_up]
    y = h W_down[e]                           # second gmm
"""

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import gmm
from toolkit.models.layers import param
from toolkit.sharding.rules import constrain


class Experts(nnx.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, *, gmm_impl: str = "",
                 rngs: nnx.Rngs):
        """`gmm_impl`: a `pallas_kernels.GMM_IMPLS` backend, or "" for the platform's best."""
        self.w_gate = param(rngs, (num_experts, d_model, d_expert), ("expert", "embed", "mlp"),
                            fan_in=d_model)
        self.w_up = param(rngs, (num_experts, d_model, d_expert), ("expert", "embed", "mlp"),
                          fan_in=d_model)
        self.w_down = param(rngs, (num_experts, d_expert, d_model), ("expert", "mlp", "embed"),
                            fan_in=d_expert)
        self.d_expert = d_expert
        self.gmm_impl = gmm_impl or None

    def __call__(self, xs, group_sizes_e):
        dt = xs.dtype
        # Gather FSDP shards of the weights before use (the `embed` dim unsharded), so every
        # dispatch group multiplies by whole expert matrices.
        w_gate_up = jnp.concatenate([self.w_gate[...], self.w_up[...]], axis=-1).astype(dt)
        w_gate_up = constrain(w_gate_up, ("expert", None, "mlp"))
        w_down = constrain(self.w_down[...].astype(dt), ("expert", "mlp", None))
        h = gmm(xs, w_gate_up, group_sizes_e, impl=self.gmm_impl)
        gate, up = h[..., : self.d_expert], h[..., self.d_expert:]
        return gmm(jax.nn.silu(gate) * up, w_down, group_sizes_e, impl=self.gmm_impl)

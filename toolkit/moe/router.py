"""Routers decide; they never move tokens. Each returns one `Routing` record.

The top-k softmax router (Shazeer et al. 2017; Switch, GShard, Mixtral):

    logits = x W_r                        # [T, E], float32
    probs  = softmax(logits)
    w, ids = top_k(probs, k)              # renormalised to sum to 1 when `renormalize`

    routing = TopKRouter(d_model=128, num_experts=8, top_k=2, rngs=nnx.Rngs(0))(x_td)
    routing.expert_ids    # int32 [T, k]
"""

import jax
import jax.numpy as jnp
from flax import nnx, struct

from toolkit.models.layers import param


@struct.dataclass
class Routing:
    """What a router decided for T tokens.

    Attributes:
      weights: float32 [T, k] combine weight of each chosen expert (0 where not valid).
      expert_ids: int32 [T, k] chosen experts.
      valid: bool [T, k] which of the k slots are used (all True for fixed top-k).
      probs: float32 [T, E] router probabilities.
      logits: float32 [T, E] router logits.
    """

    weights: jax.Array
    expert_ids: jax.Array
    valid: jax.Array
    probs: jax.Array
    logits: jax.Array


class TopKRouter(nnx.Module):
    """Softmax over experts, keep the k largest, optionally renormalise their weights."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, renormalize: bool = True,
                 rngs: nnx.Rngs):
        self.w_de = param(rngs, (d_model, num_experts), ("embed", None))
        self.top_k, self.renormalize = top_k, renormalize

    def __call__(self, x_td) -> Routing:
        logits_te = x_td.astype(jnp.float32) @ self.w_de[...]
        probs_te = jax.nn.softmax(logits_te, axis=-1)
        weights_tk, ids_tk = jax.lax.top_k(probs_te, self.top_k)
        if self.renormalize:
            weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
        return Routing(weights=weights_tk, expert_ids=ids_tk.astype(jnp.int32),
                       valid=jnp.ones_like(ids_tk, dtype=bool), probs=probs_te, logits=logits_te)

"""The MoE layer: router -> dispatch -> experts -> combine, plus what it observed.

    layer = MoELayer(cfg.model.d_model, cfg.moe, rngs=nnx.Rngs(0))
    y_btd, aux = layer(x_btd)
    aux.expert_counts       # [E] tokens routed to each expert
    aux.dropped_fraction    # share of assignments past capacity (0 when dropless)

Shared experts (DeepSeekMoE) are one dense SwiGLU of width `num_shared_experts *
d_expert` that every token passes through; its output is added to the routed output.
"""

import jax
from flax import nnx, struct

from toolkit.config import MoEConfig
from toolkit.models.layers import SwiGLU
from toolkit.moe import losses
from toolkit.moe.dispatch import capacity_plan, combine, dispatch, dropless_plan, dropped_fraction
from toolkit.moe.experts import Experts
from toolkit.moe.router import TopKRouter


@struct.dataclass
class MoEAux:
    """What one MoE layer did to one batch (the model stacks these per layer).

    Attributes:
      expert_counts: float32 [E] routed assignments per expert, before dropping.
      dropped_fraction: float32 [] share of assignments not computed.
      load_balance_loss: float32 [] Switch loss E * sum_i f_i P_i (1 when uniform).
      z_loss: float32 [] mean squared logsumexp of router logits.
      entropy: float32 [] mean router entropy per token, nats.
      expert_ids: int32 [B, S, k] chosen experts, for analysis by domain or position.
    """

    expert_counts: jax.Array
    dropped_fraction: jax.Array
    load_balance_loss: jax.Array
    z_loss: jax.Array
    entropy: jax.Array
    expert_ids: jax.Array


class MoELayer(nnx.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = TopKRouter(d_model, cfg.num_experts, cfg.top_k,
                                 renormalize=cfg.renormalize, rngs=rngs)
        self.experts = Experts(cfg.num_experts, d_model, cfg.d_expert, gmm_impl=cfg.gmm_impl,
                               rngs=rngs)
        self.shared = (SwiGLU(d_model, cfg.num_shared_experts * cfg.d_expert, rngs=rngs)
                       if cfg.num_shared_experts else None)

    def __call__(self, x_btd):
        cfg, (b, s, d) = self.cfg, x_btd.shape
        x_td = x_btd.reshape(b * s, d)
        routing = self.router(x_td)
        if cfg.dispatch == "capacity":
            plan = capacity_plan(routing, cfg.num_experts, cfg.capacity_factor)
        else:
            plan = dropless_plan(routing, cfg.num_experts)
        ys = self.experts(dispatch(x_td, plan), plan.group_sizes)
        y_td = combine(ys, plan, routing)
        if self.shared is not None:
            y_td = y_td + self.shared(x_td)
        aux = MoEAux(
            expert_counts=losses.expert_counts(routing, cfg.num_experts),
            dropped_fraction=dropped_fraction(plan, routing),
            load_balance_loss=losses.load_balance_loss(routing, cfg.num_experts),
            z_loss=losses.z_loss(routing),
            entropy=losses.router_entropy(routing),
            expert_ids=routing.expert_ids.reshape(b, s, -1),
        )
        return y_td.reshape(b, s, d).astype(x_btd.dtype), aux

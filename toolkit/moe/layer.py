"""The MoE layer: router -> dispatch -> experts -> combine, plus what it observed.

    layer = MoELayer(cfg.model.d_model, cfg.moe, rngs=nnx.Rngs(0))
    y_btd, aux = layer(x_btd)
    aux.expert_counts       # [E] tokens routed to each expert
    aux.dropped_fraction    # share of assignments past capacity (0 when dropless)

Tokens are dispatched in groups of whole sequences (`moe.dispatch_groups`; by default one
group per batch shard of the mesh, so each device routes its own tokens and nothing crosses
devices). Dropless results do not depend on the grouping; with capacity dispatch, capacity
is per group, as in GShard and Switch where each device has its own expert buffers. Router
statistics and losses always cover the whole batch.

Shared experts (DeepSeekMoE) are one dense SwiGLU of width `num_shared_experts *
d_expert` that every token passes through; its output is added to the routed output.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from toolkit.config import MoEConfig
from toolkit.models.layers import SwiGLU
from toolkit.moe import losses
from toolkit.moe.dispatch import capacity_plan, combine, dispatch, dropless_plan
from toolkit.moe.experts import Experts
from toolkit.moe.router import make_router
from toolkit.sharding.rules import constrain, logical_to_spec


@struct.dataclass
class MoEAux:
    """What one MoE layer did to one batch (the model stacks these per layer).

    Attributes:
      expert_counts: float32 [E] routed assignments per expert, before dropping.
      dropped_fraction: float32 [] share of assignments not computed.
      load_balance_loss: float32 [] Switch loss E * sum_i f_i P_i (1 when uniform).
      z_loss: float32 [] mean squared logsumexp of router logits.
      entropy: float32 [] mean router entropy per token, nats.
      experts_per_token: float32 [] mean routed experts per token (k for fixed top-k).
      expert_ids: int32 [B, S, k] chosen experts, -1 in unused slots (variable-k routers),
        for analysis by domain or position.
    """

    expert_counts: jax.Array
    dropped_fraction: jax.Array
    load_balance_loss: jax.Array
    z_loss: jax.Array
    entropy: jax.Array
    experts_per_token: jax.Array
    expert_ids: jax.Array


def _per_group(fn, num_groups: int, *args):
    """`jax.vmap(fn)(*args)`; a single group skips vmap, whose batched ops cost more on CPU."""
    if num_groups > 1:
        return jax.vmap(fn)(*args)
    out = fn(*jax.tree.map(lambda a: a[0], args))
    return jax.tree.map(lambda a: a[None], out)


class MoELayer(nnx.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, *, gmm_impl: str = "", rngs: nnx.Rngs):
        """`gmm_impl`: the experts' grouped-matmul backend (`KernelConfig.gmm`; "" = by platform)."""
        self.cfg = cfg
        self.router = make_router(d_model, cfg, rngs=rngs)
        self.experts = Experts(cfg.num_experts, d_model, cfg.d_expert, gmm_impl=gmm_impl,
                               rngs=rngs)
        self.shared = (SwiGLU(d_model, cfg.num_shared_experts * cfg.d_expert, rngs=rngs)
                       if cfg.num_shared_experts else None)

    def num_groups(self, batch: int) -> int:
        """Dispatch groups: `moe.dispatch_groups`, or (0) one per batch shard of the mesh."""
        if self.cfg.dispatch_groups:
            return self.cfg.dispatch_groups
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1
        axes = logical_to_spec(("batch",))[0] or ()
        axes = (axes,) if isinstance(axes, str) else axes
        n = math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
        return n if batch % n == 0 else 1

    def _plan(self, routing):
        cfg = self.cfg
        if cfg.dispatch == "capacity":
            return capacity_plan(routing, cfg.num_experts, cfg.capacity_factor)
        return dropless_plan(routing, cfg.num_experts)

    def __call__(self, x_btd):
        cfg, (b, s, d) = self.cfg, x_btd.shape
        x_td = x_btd.reshape(b * s, d)
        routing = self.router(x_td)
        g = self.num_groups(b)
        # Whole sequences per group; with the group axis sharded like the batch, every device
        # dispatches its own tokens and no token crosses devices.
        x_gtd = constrain(x_td.reshape(g, -1, d), ("batch", None, "embed"))
        routing_g = jax.tree.map(lambda a: a.reshape(g, -1, *a.shape[1:]), routing)
        plan_g = _per_group(self._plan, g, routing_g)
        xs = _per_group(dispatch, g, x_gtd, plan_g)
        ys = self.experts(xs, plan_g.group_sizes)
        y_gtd = _per_group(combine, g, ys, plan_g, routing_g)
        kept_gtk = plan_g.kept
        y_td = y_gtd.reshape(b * s, d)
        if self.shared is not None:
            y_td = y_td + self.shared(x_td)
        valid = jnp.maximum(jnp.sum(routing.valid.astype(jnp.float32)), 1.0)
        aux = MoEAux(
            expert_counts=losses.expert_counts(routing, cfg.num_experts),
            dropped_fraction=1.0 - jnp.sum(kept_gtk.astype(jnp.float32)) / valid,
            load_balance_loss=losses.load_balance_loss(routing, cfg.num_experts),
            z_loss=losses.z_loss(routing),
            entropy=losses.router_entropy(routing),
            experts_per_token=valid / (b * s),
            expert_ids=jnp.where(routing.valid, routing.expert_ids, -1).reshape(b, s, -1),
        )
        return y_td.reshape(b, s, d).astype(x_btd.dtype), aux

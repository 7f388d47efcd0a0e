"""The MoE layer: router -> dispatch -> experts -> combine, plus what it observed.

    layer = MoELayer(cfg.model.d_model, cfg.moe, rngs=nnx.Rngs(0))
    y_btd, aux, state = layer(x_btd)
    aux.expert_counts       # [E] tokens routed to each expert
    aux.dropped_fraction    # share of assignments past capacity (0 when dropless)

Tokens are dispatched in groups of whole sequences (`moe.dispatch_groups`; by default one
group per device of the mesh's MoE token split, logical axis `moe_batch`, so each device
plans its own tokens; with expert parallelism `toolkit.sharding.expert_parallel.routed_ffn`
then moves them to their experts' devices and back). Dropless results do not depend on the
grouping; with capacity dispatch, capacity is per group, as in GShard and Switch where each
device has its own expert buffers. Router statistics and losses always cover the whole batch.

The router chooses among `moe.num_routed` experts: the FFN experts (big, then small),
which dispatch sends through the grouped matmuls, and the local experts (MoE++ zero, copy
and constant experts; GRU experts), which `LocalExperts` computes in place and dispatch
routes around. Shared experts (DeepSeekMoE) are one dense SwiGLU of width
`num_shared_experts * d_expert` (or `moe.d_shared_expert`) that every token passes through;
with `moe.shared_expert_gate` (Qwen2-MoE) its output is scaled by `sigmoid(x W_s)` per token.

BigMac (DCCA, Jin et al. 2025) moves narrower tokens: the router reads the full x, but the
FFN experts see `x W_descend` of width `r * d` (`moe.bigmac_ratio`), so dispatch carries
`r*d`-wide rows, and the combined result is lifted back by `W_ascend`. The experts' hidden
width d_expert is then wider than their input (the paper's inverted shape).

`state` is what the router hands the next MoE layer (`Routing.state`): the logits for
MoE++ gating residuals, and the recurrent router's GRU state.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from toolkit.config import MoEConfig
from toolkit.models.layers import SwiGLU, param
from toolkit.moe import losses
from toolkit.moe.experts import Experts
from toolkit.moe.local_experts import LocalExperts
from toolkit.moe.router import make_router
from toolkit.sharding.expert_parallel import routed_ffn
from toolkit.sharding.rules import constrain, mesh_axes_of


@struct.dataclass
class MoEAux:
    """What one MoE layer did to one batch (the model stacks these per layer).

    Attributes:
      expert_counts: float32 [E] routed assignments per expert (all `num_routed` ids),
        before dropping.
      computed_counts: float32 [E] assignments actually computed (after capacity drops).
      dropped_fraction: float32 [] share of assignments not computed.
      load_balance_loss: float32 [] Switch loss E * sum_i eta_i f_i P_i over the batch
        (1 when uniform; eta_i = moe.zc_tau for zero-computation experts, 1 otherwise).
      seq_balance_loss: float32 [] the same loss within each sequence, averaged.
      z_loss: float32 [] mean squared logsumexp of router logits.
      entropy: float32 [] mean router entropy per token, nats.
      tsallis_entropy: float32 [] mean normalised Tsallis entropy (q = moe.tsallis_q).
      experts_per_token: float32 [] mean routed experts per token (k for fixed top-k).
      activation_zeros: float32 [] share of the FFN experts' hidden activations that are
        exactly zero (ReGLU's activation sparsity; about 0 for SwiGLU).
      expert_ids: int32 [B, S, k] chosen experts, -1 in unused slots (variable-k routers),
        for analysis by domain or position.
    """

    expert_counts: jax.Array
    computed_counts: jax.Array
    dropped_fraction: jax.Array
    load_balance_loss: jax.Array
    seq_balance_loss: jax.Array
    z_loss: jax.Array
    entropy: jax.Array
    tsallis_entropy: jax.Array
    experts_per_token: jax.Array
    activation_zeros: jax.Array
    expert_ids: jax.Array


# Metric name the trainer logs -> MoEAux field.
AUX_METRICS = {"load_balance_loss": "load_balance_loss", "z_loss": "z_loss",
               "seq_balance_loss": "seq_balance_loss", "expert_counts": "expert_counts",
               "computed_counts": "computed_counts", "dropped_fraction": "dropped_fraction",
               "router_entropy": "entropy", "tsallis_entropy": "tsallis_entropy",
               "experts_per_token": "experts_per_token", "activation_zeros": "activation_zeros"}


def aux_metrics(aux: MoEAux) -> dict:
    """The per-layer metrics the trainer logs, from (stacked) `MoEAux` records."""
    return {name: getattr(aux, field) for name, field in AUX_METRICS.items()}


def balance_weights(cfg: MoEConfig) -> jax.Array:
    """[E] eta of the MoE++ heterogeneous balance loss: zc_tau on zero, copy and constant
    experts, 1 on FFN and GRU experts."""
    n_zc = cfg.zero_experts + cfg.copy_experts + cfg.constant_experts
    eta = [1.0] * cfg.num_ffn_experts + [cfg.zc_tau] * n_zc + [1.0] * cfg.gru_experts
    return jnp.asarray(eta, jnp.float32)


class MoELayer(nnx.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, *, d_expert: int | None = None,
                 gmm_impl: str = "", shared_gru=None, parallel=None, rngs: nnx.Rngs):
        """`d_expert`: routed expert width (default `cfg.d_expert`; the model passes
        `cfg.expert_width(d_ff)`). `gmm_impl`: the experts' grouped-matmul backend
        (`KernelConfig.gmm`; "" = by platform). `shared_gru`: the recurrent router's GRU.
        `parallel`: the `ParallelConfig` whose exchange options expert parallelism uses."""
        self.cfg, self.parallel = cfg, parallel
        d_expert = d_expert or cfg.d_expert
        self.router = make_router(d_model, cfg, shared_gru=shared_gru, rngs=rngs)
        d_in = d_model
        if cfg.bigmac_ratio:
            d_in = max(1, round(cfg.bigmac_ratio * d_model))
            self.w_descend = param(rngs, (d_model, d_in), ("embed", None))
            self.w_ascend = param(rngs, (d_in, d_model), (None, "embed"))
        self.d_dispatch = d_in
        self.experts = Experts(cfg.num_experts, d_in, d_expert, small_experts=cfg.small_experts,
                               d_small_expert=cfg.d_small_expert,
                               activation=cfg.expert_activation, gmm_impl=gmm_impl, rngs=rngs)
        self.local = LocalExperts(d_model, cfg, rngs=rngs) if cfg.num_local_experts else None
        chunks = parallel.overlap_chunks if parallel is not None else 1
        d_shared = cfg.d_shared_expert or cfg.num_shared_experts * d_expert
        self.shared = (SwiGLU(d_model, d_shared, tp_chunks=chunks, kind="experts", rngs=rngs)
                       if cfg.num_shared_experts else None)
        self.w_shared_gate = (param(rngs, (d_model, 1), ("embed", None))
                              if cfg.shared_expert_gate and cfg.num_shared_experts else None)

    def num_groups(self, batch: int) -> int:
        """Dispatch groups: `moe.dispatch_groups`, or (0) one per batch shard of the mesh."""
        if self.cfg.dispatch_groups:
            return self.cfg.dispatch_groups
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1
        n = math.prod(mesh.shape[a] for a in mesh_axes_of("moe_batch") if a in mesh.shape)
        return n if batch % n == 0 else 1

    def route(self, x_btd, state=None):
        """The router's decision for `x_btd` (called early for pre-attention routing)."""
        b, s, d = x_btd.shape
        return self.router(x_btd.reshape(b * s, d), state or {})

    def __call__(self, x_btd, state=None, routing=None):
        """`(y_btd, aux, state)`; `routing` from `route()` skips the router (pre-attention)."""
        cfg, (b, s, d) = self.cfg, x_btd.shape
        x_td = x_btd.reshape(b * s, d)
        routing = self.route(x_btd, state) if routing is None else routing
        is_ffn = routing.valid & (routing.expert_ids < cfg.num_ffn_experts)
        ffn_routing = routing.replace(valid=is_ffn)
        h_td = x_td @ self.w_descend[...].astype(x_td.dtype) if cfg.bigmac_ratio else x_td
        g = self.num_groups(b)
        # Whole sequences per group, the group axis sharded over the devices: each device
        # dispatches its own tokens; expert parallelism exchanges them (`routed_ffn`).
        h_gtd = constrain(h_td.reshape(g, -1, h_td.shape[-1]), ("moe_batch", None, None))
        routing_g = jax.tree.map(lambda a: a.reshape(g, -1, *a.shape[1:]),
                                 ffn_routing.replace(probs=None, logits=None, state={}))
        y_gtd, group_sizes_ge, kept_gtk, activation_zeros = routed_ffn(
            h_gtd, routing_g, self.experts, cfg, self.parallel)
        y_td = y_gtd.reshape(b * s, -1)
        if cfg.bigmac_ratio:
            y_td = y_td @ self.w_ascend[...].astype(y_td.dtype)
        y_btd = y_td.reshape(b, s, d)
        if self.local is not None:
            y_btd = y_btd + self.local(x_btd, *(a.reshape(b, s, -1) for a in
                                                (routing.weights, routing.expert_ids, routing.valid)))
        if self.w_shared_gate is not None:
            gate_bt1 = jax.nn.sigmoid(x_btd @ self.w_shared_gate[...].astype(x_btd.dtype))
            y_btd = y_btd + gate_bt1 * self.shared(x_btd)
        elif self.shared is not None:
            y_btd = y_btd + self.shared(x_btd)
        aux = self._aux(routing, kept_gtk, group_sizes_ge, activation_zeros, b)
        return y_btd.astype(x_btd.dtype), aux, routing.state

    def _aux(self, routing, kept_gtk, group_sizes_ge, activation_zeros, batch: int) -> MoEAux:
        cfg, e = self.cfg, self.cfg.num_routed
        valid_tk = routing.valid
        n_valid = jnp.maximum(jnp.sum(valid_tk.astype(jnp.float32)), 1.0)
        counts_e = losses.expert_counts(routing, e)
        local_counts = counts_e[cfg.num_ffn_experts:]
        computed_e = jnp.concatenate([jnp.sum(group_sizes_ge, 0).astype(jnp.float32), local_counts])
        eta_e = balance_weights(cfg)
        per_seq = jax.tree.map(lambda a: a.reshape(batch, -1, *a.shape[1:]), routing)
        seq_lb = jax.vmap(lambda r: losses.load_balance_loss(r, e, eta_e))(per_seq)
        return MoEAux(
            expert_counts=counts_e,
            computed_counts=computed_e,
            dropped_fraction=1.0 - jnp.sum(computed_e) / n_valid,
            load_balance_loss=losses.load_balance_loss(routing, e, eta_e),
            seq_balance_loss=jnp.mean(seq_lb),
            z_loss=losses.z_loss(routing),
            entropy=losses.router_entropy(routing),
            tsallis_entropy=losses.tsallis_loss(routing, cfg.tsallis_q),
            experts_per_token=n_valid / valid_tk.shape[0],
            activation_zeros=activation_zeros,
            expert_ids=jnp.where(valid_tk, routing.expert_ids, -1).reshape(batch, -1,
                                                                           valid_tk.shape[-1]),
        )

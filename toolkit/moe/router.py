"""Routers decide; they never move tokens. Each returns one `Routing` record.

`topk_softmax` (Shazeer et al. 2017; Switch k=1, GShard k=2, Mixtral):

    logits = x W_r                        # [T, E], float32
    probs  = softmax(logits)
    w, ids = top_k(probs, k)              # renormalised to sum to 1 when `renormalize`

`sigmoid_bias` (DeepSeek-V3, Ling 2.0): independent sigmoid scores, and balance without an
auxiliary loss. A per-expert bias b is added to the scores *for selection only*; after
every step `update_bias` raises the bias of under-loaded experts and lowers it for
over-loaded ones, outside the optimizer (b is a `RouterBias`, not a `Param`):

    s = sigmoid(x W_r);   ids = top_k(s + b, k)      # within the best groups, if grouped
    w = s[ids] / sum(s[ids]) * routed_scaling
    b <- b + u * (sign(e) - mean(sign(e))),   e_i = mean load - load_i

`top_p` (Huang et al. 2024, "Harder Tasks Need More Experts"): a token takes experts,
most probable first, until their probabilities sum past p, so uncertain tokens get more
experts. At most `top_k` are kept (the static bound on assignments); the unused slots
are marked invalid in the Routing record and cost nothing in dropless dispatch. The
paper weighs experts by their raw probabilities (`renormalize=False`) and adds the router
entropy as a loss (`moe.entropy_loss_weight`) so the router cannot stay flat:

    p_sorted = sort(softmax(x W_r), descending);  keep slot j while cumsum(p_sorted)[j-1] < p

`expert_choice` (Zhou et al. 2022): experts pick tokens. Each expert takes the
`ceil(top_k * T / E)` tokens of the batch it scores highest, so on average a token gets
`top_k` experts (some get none, some more) and load is perfectly balanced by
construction. Its Routing record has one slot per expert (`k = E`), valid where the
expert chose the token. The choice sees every token of the batch, later positions
included, so in a causal language model it leaks a little of the future into routing:
compare its validation numbers with that in mind.

`tsallis` (DynMoLE, Li et al. 2025): top-p that keeps at least `top_k` experts, and every
expert when the router is unsure. Unsureness is the normalised Tsallis entropy
`S_q(p) / S_q(uniform)`, `S_q(p) = (1 - sum_i p_i^q) / (q - 1)`, which tends to the Shannon
entropy as q -> 1; above `tsallis_threshold` the token takes all E experts. Its loss
(`moe.tsallis_loss_weight`) lowers that entropy. One slot per expert (`k = E`), sorted by
probability, valid where kept.

`recurrent` (RMoE) lives in `toolkit.moe.recurrent`: a GRU shared across layers.

Every router shares the front end in `Router.logits`: optional input jitter (Switch:
`x * U(1 - eps, 1 + eps)` in training only) and the MoE++ gating residual, which adds
`W_g` times the previous MoE layer's logits. What a router hands the next layer travels in
`Routing.state` (its logits, and the recurrent router's GRU state).

    routing = make_router(d_model, cfg, rngs=nnx.Rngs(0))(x_td)
    routing.expert_ids    # int32 [T, k]
"""

import jax
import jax.numpy as jnp
from flax import nnx, struct

from toolkit.models.layers import param
from toolkit.precision.fake_quant import linear, quantize_weight


@struct.dataclass
class Routing:
    """What a router decided for T tokens.

    Attributes:
      weights: float32 [T, k] combine weight of each chosen expert (0 where not valid).
      expert_ids: int32 [T, k] chosen experts.
      valid: bool [T, k] which of the k slots are used (all True for fixed top-k).
      probs: float32 [T, E] router probabilities.
      logits: float32 [T, E] router logits.
      state: dict of [T, ...] arrays for the next MoE layer's router: "logits" (for gating
        residuals) and, for the recurrent router, its GRU state "h".
    """

    weights: jax.Array
    expert_ids: jax.Array
    valid: jax.Array
    probs: jax.Array
    logits: jax.Array
    state: dict = struct.field(default_factory=dict)


class RouterBias(nnx.Variable):
    """Selection bias of aux-loss-free balancing: changed by `update_bias`, not by gradients."""


def update_bias(bias_e, counts_e, rate):
    """One aux-loss-free step: `b + u (sign(e) - mean sign(e))`, `e = mean load - load`.

    Under-loaded experts (load below the mean) gain `u`, over-loaded ones lose it; the
    update sums to zero, so the bias never drifts as a whole. `counts_e` are the step's
    routed assignments per expert.
    """
    load_e = counts_e / jnp.maximum(jnp.sum(counts_e), 1.0)
    sign_e = jnp.sign(jnp.mean(load_e) - load_e)
    return bias_e + rate * (sign_e - jnp.mean(sign_e))


class JitterCounter(nnx.Variable):
    """int32 [2] (seed, calls) of a router's input jitter; advanced per call, not by gradients."""


class Router(nnx.Module):
    """What all routers share: the gate `w_de`, input jitter and the gating residual.

    `deterministic` (set by `model.eval()` / `model.train()`) turns jitter off.
    """

    def __init__(self, d_model: int, num_experts: int, *, jitter: float = 0.0,
                 gating_residual: bool = False, gate_axes=("embed", None), rngs: nnx.Rngs):
        self.w_de = param(rngs, (d_model, num_experts), gate_axes)
        # Zero-initialised, so a gating residual starts as the plain router.
        self.w_ee = nnx.Param(jnp.zeros((num_experts, num_experts), jnp.float32),
                              logical_axes=(None, None)) if gating_residual else None
        self.jitter = jitter
        self.jitter_counter = JitterCounter(jnp.stack([
            jax.random.randint(rngs.params(), (), 0, 2**31 - 1), jnp.int32(0)]),
            logical_axes=(None,)) if jitter else None
        self.deterministic = False

    def jittered(self, x_td):
        """float32 x, times U(1 - jitter, 1 + jitter) noise when training with jitter."""
        x_td = x_td.astype(jnp.float32)
        if not self.jitter or self.deterministic:
            return x_td
        seed, calls = self.jitter_counter[0], self.jitter_counter[1]
        key = jax.random.fold_in(jax.random.key(seed), calls)
        self.jitter_counter[...] = self.jitter_counter[...].at[1].add(1)
        return x_td * jax.random.uniform(key, x_td.shape, jnp.float32, 1 - self.jitter,
                                         1 + self.jitter)

    def gated(self, logits_te, state):
        """Add the gating residual `W_g logits_prev` when on and a previous layer exists."""
        if self.w_ee is not None and "logits" in state:
            logits_te = logits_te + state["logits"] @ self.w_ee[...]
        return logits_te

    def logits(self, x_td, state):
        w_de = quantize_weight(self.w_de[...], "router")
        return self.gated(linear(self.jittered(x_td), w_de, "router"), state)


class TopKRouter(Router):
    """Softmax over experts, keep the k largest, optionally renormalise their weights."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, renormalize: bool = True,
                 rngs: nnx.Rngs, **front):
        super().__init__(d_model, num_experts, rngs=rngs, **front)
        self.top_k, self.renormalize = top_k, renormalize

    def __call__(self, x_td, state=None) -> Routing:
        logits_te = self.logits(x_td, state or {})
        return top_k_routing(logits_te, self.top_k, self.renormalize)


def sharded_top_k(x, k: int):
    """`jax.lax.top_k` over the last axis (ties to the lower index). Under a device mesh it
    is a stable sort instead: XLA's SPMD partitioner all-gathers a `top_k` operand whose
    token axis is split, so every device would receive every token's scores."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return jax.lax.top_k(x, k)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    neg, ids = jax.lax.sort((-x, iota), dimension=x.ndim - 1, is_stable=True, num_keys=1)
    return -neg[..., :k], ids[..., :k]


def top_k_routing(logits_te, top_k: int, renormalize: bool, state=None) -> Routing:
    """Softmax, top-k, optional renormalisation: the record of a plain top-k router."""
    probs_te = jax.nn.softmax(logits_te, axis=-1)
    weights_tk, ids_tk = sharded_top_k(probs_te, top_k)
    if renormalize:
        weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
    return Routing(weights=weights_tk, expert_ids=ids_tk.astype(jnp.int32),
                   valid=jnp.ones_like(ids_tk, dtype=bool), probs=probs_te, logits=logits_te,
                   state={"logits": logits_te, **(state or {})})


def _group_limited(scores_te, num_groups, topk_groups):
    """`scores` with experts outside each token's `topk_groups` best groups set to -inf;
    a group scores the sum of its two best experts (DeepSeek-V3's node-limited routing)."""
    t, e = scores_te.shape
    groups_tgs = scores_te.reshape(t, num_groups, e // num_groups)
    group_score_tg = jnp.sum(sharded_top_k(groups_tgs, min(2, e // num_groups))[0], axis=-1)
    _, best_tk = sharded_top_k(group_score_tg, topk_groups)
    keep_tg = jnp.sum(jax.nn.one_hot(best_tk, num_groups, dtype=bool), axis=1)
    return jnp.where(keep_tg[:, :, None], groups_tgs, -jnp.inf).reshape(t, e)


class SigmoidBiasRouter(Router):
    """Sigmoid scores, biased top-k selection, aux-loss-free balancing (see the module doc).

    `probs` in the Routing record are the scores normalised over experts, which is what the
    (optional) Switch loss and the entropy statistics read.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, renormalize: bool = True,
                 num_groups: int = 1, topk_groups: int = 1, routed_scaling: float = 1.0,
                 rngs: nnx.Rngs, **front):
        super().__init__(d_model, num_experts, rngs=rngs, **front)
        self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32), logical_axes=(None,))
        self.top_k, self.renormalize = top_k, renormalize
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.routed_scaling = routed_scaling

    def __call__(self, x_td, state=None) -> Routing:
        logits_te = self.logits(x_td, state or {})
        scores_te = jax.nn.sigmoid(logits_te)
        select_te = scores_te + jax.lax.stop_gradient(self.bias[...])
        if self.num_groups > 1:
            select_te = _group_limited(select_te, self.num_groups, self.topk_groups)
        _, ids_tk = sharded_top_k(select_te, self.top_k)
        weights_tk = jnp.take_along_axis(scores_te, ids_tk, axis=-1)
        if self.renormalize:
            weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
        probs_te = scores_te / jnp.sum(scores_te, axis=-1, keepdims=True)
        return Routing(weights=weights_tk * self.routed_scaling, expert_ids=ids_tk.astype(jnp.int32),
                       valid=jnp.ones_like(ids_tk, dtype=bool), probs=probs_te, logits=logits_te,
                       state={"logits": logits_te})


def _sorted_routing(probs_te, logits_te, keep_fn, slots: int, renormalize: bool) -> Routing:
    """Experts by descending probability, `slots` of them, valid where `keep_fn` says."""
    weights_tk, ids_tk = sharded_top_k(probs_te, slots)
    valid_tk = keep_fn(weights_tk)
    weights_tk = jnp.where(valid_tk, weights_tk, 0.0)
    if renormalize:
        weights_tk = weights_tk / jnp.sum(weights_tk, axis=-1, keepdims=True)
    return Routing(weights=weights_tk, expert_ids=ids_tk.astype(jnp.int32), valid=valid_tk,
                   probs=probs_te, logits=logits_te, state={"logits": logits_te})


class TopPRouter(Router):
    """Softmax, then the fewest most-probable experts whose probabilities reach `top_p`
    (the expert that crosses the threshold is kept), at most `max_k` of them."""

    def __init__(self, d_model: int, num_experts: int, max_k: int, *, top_p: float,
                 renormalize: bool = True, rngs: nnx.Rngs, **front):
        super().__init__(d_model, num_experts, rngs=rngs, **front)
        self.max_k, self.top_p, self.renormalize = max_k, top_p, renormalize

    def __call__(self, x_td, state=None) -> Routing:
        logits_te = self.logits(x_td, state or {})
        # slot 0 always: nothing comes before it
        keep = lambda p_tk: jnp.cumsum(p_tk, axis=-1) - p_tk < self.top_p
        return _sorted_routing(jax.nn.softmax(logits_te, axis=-1), logits_te, keep, self.max_k,
                               self.renormalize)


def tsallis_entropy(probs_te, q: float, *, normalize: bool = True):
    """[T] Tsallis entropy `(1 - sum_i p_i^q) / (q - 1)`; Shannon (nats) at q = 1.

    Computed as `-sum_i p_i expm1((q - 1) log p_i) / (q - 1)` (equal, as sum_i p_i = 1), which
    stays accurate in float32 as q -> 1. `normalize` divides by its value at the uniform
    distribution, `(1 - E^(1-q)) / (q - 1)` (log E at q = 1): 0 for a one-hot router, 1 for
    a uniform one.
    """
    p = jnp.maximum(probs_te, 0.0)
    log_p = jnp.log(jnp.maximum(p, 1e-30))
    e = probs_te.shape[-1]
    if abs(q - 1.0) < 1e-12:
        s, s_max = -jnp.sum(p * log_p, axis=-1), jnp.log(e)
    else:
        s = -jnp.sum(p * jnp.expm1((q - 1.0) * log_p), axis=-1) / (q - 1.0)
        s_max = -jnp.expm1((1.0 - q) * jnp.log(e)) / (q - 1.0)
    return s / s_max if normalize else s


class TsallisRouter(Router):
    """DynMoLE's hybrid rule: top-p (cumulative probability <= `top_p`, the first always),
    at least `keep_k` experts, and all experts when the normalised Tsallis entropy
    exceeds `threshold`."""

    def __init__(self, d_model: int, num_experts: int, keep_k: int, *, top_p: float, q: float,
                 threshold: float, renormalize: bool = True, rngs: nnx.Rngs, **front):
        super().__init__(d_model, num_experts, rngs=rngs, **front)
        self.keep_k, self.top_p, self.q, self.threshold = keep_k, top_p, q, threshold
        self.renormalize = renormalize

    def __call__(self, x_td, state=None) -> Routing:
        logits_te = self.logits(x_td, state or {})
        probs_te = jax.nn.softmax(logits_te, axis=-1)
        unsure_t = tsallis_entropy(probs_te, self.q) > self.threshold

        def keep(p_tk):
            rank_k = jnp.arange(p_tk.shape[-1])
            return ((jnp.cumsum(p_tk, axis=-1) <= self.top_p) | (rank_k < self.keep_k)
                    | unsure_t[:, None])

        return _sorted_routing(probs_te, logits_te, keep, probs_te.shape[-1], self.renormalize)


class ExpertChoiceRouter(Router):
    """Softmax over experts per token; each expert keeps its `ceil(top_k * T / E)` best tokens."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs, **front):
        super().__init__(d_model, num_experts, rngs=rngs, **front)
        self.top_k = top_k

    def capacity(self, num_tokens: int) -> int:
        return min(num_tokens, -(-self.top_k * num_tokens // self.w_de.shape[1]))

    def __call__(self, x_td, state=None) -> Routing:
        logits_te = self.logits(x_td, state or {})
        probs_te = jax.nn.softmax(logits_te, axis=-1)
        t, e = probs_te.shape
        _, tokens_ec = jax.lax.top_k(probs_te.T, self.capacity(t))
        chosen_te = jnp.zeros((t, e), bool).at[tokens_ec, jnp.arange(e)[:, None]].set(True)
        return Routing(weights=jnp.where(chosen_te, probs_te, 0.0),
                       expert_ids=jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (t, e)),
                       valid=chosen_te, probs=probs_te, logits=logits_te,
                       state={"logits": logits_te})


ROUTERS = ("topk_softmax", "sigmoid_bias", "top_p", "expert_choice", "recurrent", "tsallis")


def make_router(d_model: int, cfg, *, shared_gru=None, rngs: nnx.Rngs):
    """The router `cfg.router` names (`cfg` is a MoEConfig) over `cfg.num_routed` experts.

    `shared_gru`: the GRU all layers' recurrent routers share (`recurrent.RouterGRU`).
    """
    from toolkit.moe.recurrent import RecurrentRouter

    e = cfg.num_routed
    front = dict(jitter=cfg.router_jitter, gating_residual=cfg.gating_residual, rngs=rngs)
    if cfg.router == "topk_softmax":
        return TopKRouter(d_model, e, cfg.top_k, renormalize=cfg.renormalize, **front)
    if cfg.router == "sigmoid_bias":
        return SigmoidBiasRouter(d_model, e, cfg.top_k, renormalize=cfg.renormalize,
                                 num_groups=cfg.router_groups, topk_groups=cfg.router_topk_groups,
                                 routed_scaling=cfg.routed_scaling, **front)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(d_model, e, cfg.top_k, **front)
    if cfg.router == "top_p":
        return TopPRouter(d_model, e, cfg.top_k, top_p=cfg.top_p, renormalize=cfg.renormalize,
                          **front)
    if cfg.router == "tsallis":
        return TsallisRouter(d_model, e, cfg.top_k, top_p=cfg.top_p, q=cfg.tsallis_q,
                             threshold=cfg.tsallis_threshold, renormalize=cfg.renormalize,
                             **front)
    if cfg.router == "recurrent":
        if shared_gru is None:
            raise ValueError("moe.router='recurrent' needs the GRU shared by all layers; "
                             "build MoE layers through toolkit.models.Transformer")
        return RecurrentRouter(d_model, e, cfg.top_k, gru=shared_gru,
                               renormalize=cfg.renormalize, **front)
    raise ValueError(f"moe.router={cfg.router!r} is unknown; use one of {ROUTERS}")

"""What the routers did, as plain arrays: load, imbalance, domains, layers and FLOPs.

All functions take counts the trainer already collects:

* `counts_le`: routed assignments per MoE layer and expert (`MoEAux.expert_counts`, or
  `computed_counts` for what was computed after drops);
* `domain_counts_lde`: the same split by data domain (the eval step's `domain_counts`);
* `affinity_counts_lij`: tokens choosing expert i at MoE layer l and j at layer l+1 (the
  eval step's `affinity_counts`; a top-k token adds k*k pairs);
* `expert_ids_lbsk`: the chosen experts themselves (`MoEAux.expert_ids`, -1 = unused slot).

    prefs = domain_preferences(domain_counts_lde, ("prose", "code"))
    prefs[0]["code"]["top_experts"]     # experts layer 0 sends code to most, by lift
    p_lij = inter_layer_affinity(affinity_counts_lij)   # P(j at l+1 | i at l)
"""

import numpy as np


def load_fractions(counts_le) -> np.ndarray:
    """[L, E] share of each layer's assignments that went to each expert."""
    c = np.asarray(counts_le, np.float64)
    return c / np.maximum(c.sum(-1, keepdims=True), 1e-12)


def load_imbalance(counts_le) -> np.ndarray:
    """[L] max over mean expert load (1.0 is perfectly balanced)."""
    c = np.asarray(counts_le, np.float64)
    return c.max(-1) / np.maximum(c.mean(-1), 1e-12)


def _entropy_bits(p):
    p = np.clip(p, 1e-12, 1.0)
    return -(p * np.log2(p)).sum(-1)


def load_cv(counts_le) -> np.ndarray:
    """[L] coefficient of variation (std / mean) of the expert loads; 0 is perfectly balanced."""
    c = np.asarray(counts_le, np.float64)
    return c.std(-1) / np.maximum(c.mean(-1), 1e-12)


def experts_per_token_histogram(expert_ids_lbsk) -> np.ndarray:
    """[L, k+1] share of tokens that used 0, 1, ..., k experts (variable-k routers)."""
    ids = np.asarray(expert_ids_lbsk)
    n_lt = (ids >= 0).sum(-1).reshape(ids.shape[0], -1)
    k = ids.shape[-1]
    return np.stack([np.bincount(n_t, minlength=k + 1) / n_t.size for n_t in n_lt])


def domain_mutual_information(domain_counts_lde) -> np.ndarray:
    """[L] mutual information I(domain; expert) in bits, from the assignment counts.

    It equals the Jensen-Shannon divergence between the domains' expert distributions with
    domain weights proportional to their assignments: 0 when every domain uses experts
    alike, up to log2(D) when domains use disjoint experts.
    """
    c = np.asarray(domain_counts_lde, np.float64)
    w_ld = c.sum(-1) / np.maximum(c.sum((-1, -2))[:, None], 1e-12)
    p_lde = c / np.maximum(c.sum(-1, keepdims=True), 1e-12)
    mix_le = np.einsum("ld,lde->le", w_ld, p_lde)
    return _entropy_bits(mix_le) - np.einsum("ld,ld->l", w_ld, _entropy_bits(p_lde))


def domain_preferences(domain_counts_lde, domains, top: int = 2) -> list:
    """Per layer, per domain: expert shares, lift over all tokens, and the top experts by lift.

    Lift = share of the domain's assignments on expert e / share of all assignments on e;
    above 1 the domain prefers that expert.
    """
    c = np.asarray(domain_counts_lde, np.float64)
    out = []
    for layer in range(c.shape[0]):
        overall_e = c[layer].sum(0) / max(c[layer].sum(), 1e-12)
        per = {}
        for d, name in enumerate(domains):
            share_e = c[layer, d] / max(c[layer, d].sum(), 1e-12)
            lift_e = share_e / np.maximum(overall_e, 1e-12)
            order = np.argsort(-lift_e, kind="stable")[:top]
            per[name] = {"share": share_e.tolist(), "lift": lift_e.tolist(),
                         "top_experts": [int(e) for e in order]}
        out.append(per)
    return out


def inter_layer_affinity(affinity_counts_lij) -> np.ndarray:
    """[L-1, E, E] P(expert j at MoE layer l+1 | expert i at layer l) (ExFlow's affinity);
    rows of experts that layer l never chose are 0 (empty with one MoE layer)."""
    c = np.asarray(affinity_counts_lij, np.float64)
    if c.size == 0:
        return np.zeros((0, 0, 0))
    return c / np.maximum(c.sum(-1, keepdims=True), 1e-12)


def inter_layer_mutual_information(affinity_counts_lij) -> np.ndarray:
    """[L-1] bits of mutual information between the experts chosen at consecutive layers:
    0 when layer l+1 routes independently of layer l (RMoE measures this dependency)."""
    c = np.asarray(affinity_counts_lij, np.float64)
    if c.size == 0:                  # one MoE layer: no consecutive pair
        return np.zeros((0,))
    p_lij = c / np.maximum(c.sum((-1, -2), keepdims=True), 1e-12)
    joint = _entropy_bits(p_lij.reshape(p_lij.shape[0], -1))
    return _entropy_bits(p_lij.sum(-1)) + _entropy_bits(p_lij.sum(-2)) - joint


def expert_flops(cfg) -> np.ndarray:
    """[E] forward FLOPs of one assignment to each routed expert (2 per multiply-add).

    Big and small FFN experts: three matmuls of (their input width) x (their width); zero
    and copy experts: 0; constant experts: their 2-way gate and the mix. GRU experts cost 0
    here: they run over every token whatever the router says (see `dense_moe_flops`).
    """
    m, moe = cfg.model, cfg.moe
    d_in = max(1, round(moe.bigmac_ratio * m.d_model)) if moe.bigmac_ratio else m.d_model
    return np.array([6.0 * d_in * moe.expert_width(m.d_ff)] * moe.num_experts
                    + [6.0 * d_in * moe.d_small_expert] * moe.small_experts
                    + [0.0] * (moe.zero_experts + moe.copy_experts)
                    + [7.0 * m.d_model] * moe.constant_experts + [0.0] * moe.gru_experts)


def dense_moe_flops(cfg) -> float:
    """Forward FLOPs per token an MoE layer spends whatever the routing: the router, shared
    experts, BigMac's projections and GRU experts."""
    m, moe = cfg.model, cfg.moe
    d, n, p = m.d_model, moe.num_routed, moe.recurrent_dim
    router = 2.0 * (d * p + 3 * p * p * 2 + p * n) if moe.router == "recurrent" else 2.0 * d * n
    shared = 6.0 * d * moe.shared_width(m.d_ff)
    bigmac = 4.0 * d * round(moe.bigmac_ratio * d)
    h = moe.d_gru_expert
    gru = moe.gru_experts * 2.0 * (d * 3 * h + h * 3 * h + h * d)
    return router + shared + bigmac + gru


def flops_per_token(cfg, computed_counts_le, num_tokens: float) -> np.ndarray:
    """[L] FFN-side forward FLOPs per token actually spent in each MoE layer: the computed
    assignments times `expert_flops`, plus `dense_moe_flops`, over `num_tokens` tokens."""
    c = np.asarray(computed_counts_le, np.float64)
    return c @ expert_flops(cfg) / max(num_tokens, 1) + dense_moe_flops(cfg)

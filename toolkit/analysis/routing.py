"""What the routers did, as plain arrays: load, imbalance and domain preferences.

All functions take counts the trainer already collects:

* `counts_le`: routed assignments per MoE layer and expert (`MoEAux.expert_counts`);
* `domain_counts_lde`: the same split by data domain (the eval step's `domain_counts`).

    prefs = domain_preferences(domain_counts_lde, ("prose", "code"))
    prefs[0]["code"]["top_experts"]     # experts layer 0 sends code to most, by lift
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


def domain_specialization(domain_counts_lde) -> np.ndarray:
    """[L] Jensen-Shannon divergence (bits) between the domains' expert distributions.

    Generalised JSD with domain weights proportional to their token counts: 0 when every
    domain uses experts alike, up to log2(D) when domains use disjoint experts.
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

"""Analysis over plain values: routing statistics, FLOPs spent and parameter counts.

    total, active = count_params(cfg)
    imbalance_l = load_imbalance(summary["expert_counts"])
    flops_l = flops_per_token(cfg, summary["computed_counts"], summary["tokens_counted"])
"""

from toolkit.analysis.params import count_params
from toolkit.analysis.routing import (
    dense_moe_flops,
    domain_mutual_information,
    domain_preferences,
    expert_flops,
    experts_per_token_histogram,
    flops_per_token,
    inter_layer_affinity,
    inter_layer_mutual_information,
    load_cv,
    load_fractions,
    load_imbalance,
)

__all__ = ["count_params", "dense_moe_flops", "domain_mutual_information", "domain_preferences",
           "expert_flops", "experts_per_token_histogram", "flops_per_token",
           "inter_layer_affinity", "inter_layer_mutual_information", "load_cv", "load_fractions",
           "load_imbalance"]

"""Analysis over plain values: routing statistics, FLOPs spent and parameter counts.

    total, active = count_params(cfg)
    imbalance_l = load_imbalance(summary["expert_counts"])
    flops_l = flops_per_token(cfg, summary["computed_counts"], summary["tokens_counted"])
    table = summarize_collectives(parse_collectives(compiled.as_text()))   # bytes per kind
"""

from toolkit.analysis.collectives import Collective, parse_collectives, summarize_collectives
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

__all__ = ["Collective", "count_params", "dense_moe_flops", "domain_mutual_information",
           "domain_preferences", "expert_flops", "experts_per_token_histogram", "flops_per_token",
           "inter_layer_affinity", "inter_layer_mutual_information", "load_cv", "load_fractions",
           "load_imbalance", "parse_collectives", "summarize_collectives"]

"""Analysis over plain values: routing statistics, FLOPs spent, parameter counts, and how a
model's tensors fare in low-bit formats.

    total, active = count_params(cfg)
    imbalance_l = load_imbalance(summary["expert_counts"])
    flops_l = flops_per_token(cfg, summary["computed_counts"], summary["tokens_counted"])
    table = summarize_collectives(parse_collectives(compiled.as_text()))   # bytes per kind
    rows = qsnr_table(model_tensors(model, tokens_bt), ["mxint8", "nvfp4"], rotations=(0, 32))
"""

from toolkit.analysis.collectives import Collective, parse_collectives, summarize_collectives
from toolkit.analysis.params import count_params
from toolkit.analysis.precision import (
    activation_tensors,
    inference_policy,
    model_tensors,
    policy_losses,
    qsnr_table,
    weight_tensors,
)
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

__all__ = ["Collective", "activation_tensors", "count_params", "inference_policy", "model_tensors",
           "policy_losses", "qsnr_table", "weight_tensors", "dense_moe_flops", "domain_mutual_information",
           "domain_preferences", "expert_flops", "experts_per_token_histogram", "flops_per_token",
           "inter_layer_affinity", "inter_layer_mutual_information", "load_cv", "load_fractions",
           "load_imbalance", "parse_collectives", "summarize_collectives"]

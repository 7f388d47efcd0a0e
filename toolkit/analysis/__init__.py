"""Analysis over plain values: routing statistics, FLOPs spent, parameter counts, and how a
model's tensors fare in low-bit formats.

    total, active = count_params(cfg)
    imbalance_l = load_imbalance(summary["expert_counts"])
    flops_l = flops_per_token(cfg, summary["computed_counts"], summary["tokens_counted"])
    table = summarize_collectives(parse_collectives(compiled.as_text()))   # bytes per kind
    rows = qsnr_table(model_tensors(model, tokens_bt), ["mxint8", "nvfp4"], rotations=(0, 32))
    costs = estimate_costs(cfg, num_devices=64)          # FLOPs, memory, bytes per device
    t = estimate_step_time(cfg, get_cluster("h100x64"))  # seconds and MFU on a cluster
    plans = plan(cfg, get_cluster("v5p-128"), global_batch_tokens=4 * 2**20)
    best = place_experts(routing_trace(model, token_batches), num_devices=4)   # ExFlow placement
    efficiency_leverage(0.031, 12, 1e22)                 # Ling 2.0's EL law: 7.24
"""

from toolkit.analysis.collectives import Collective, parse_collectives, summarize_collectives
from toolkit.analysis.compiled import matmul_flops, step_collectives
from toolkit.analysis.costs import Costs, estimate_costs, forward_flops
from toolkit.analysis.hardware import Cluster, Device, DeviceGroup, Link, get_cluster, measure_cpu
from toolkit.analysis.params import count_params
from toolkit.analysis.placement import (
    Placement,
    Trace,
    contiguous_placement,
    cross_device_fraction,
    device_load_imbalance,
    place_experts,
    round_robin_placement,
    routing_trace,
)
from toolkit.analysis.planner import Plan, explain, parse_tokens, plan
from toolkit.analysis.precision import (
    activation_tensors,
    inference_policy,
    model_tensors,
    policy_losses,
    qsnr_table,
    weight_tensors,
)
from toolkit.analysis.published import PUBLISHED, compare_published
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
from toolkit.analysis.scaling import (
    activation_ratio,
    at_active_compute,
    efficiency_leverage,
    granularity,
    leverage_of,
    optimal_granularity,
    segmented,
    training_compute,
)
from toolkit.analysis.speculation import speculative_shuffle
from toolkit.analysis.step_time import StepTime, estimate_step_time

__all__ = ["Placement", "Trace", "contiguous_placement", "cross_device_fraction", "device_load_imbalance",
           "place_experts", "round_robin_placement", "routing_trace", "speculative_shuffle",
           "Cluster", "Costs", "Device", "DeviceGroup", "Link", "PUBLISHED", "Plan", "StepTime",
           "compare_published", "estimate_costs", "estimate_step_time", "explain", "forward_flops",
           "get_cluster", "matmul_flops", "measure_cpu", "parse_tokens", "plan", "step_collectives",
           "Collective", "activation_tensors", "count_params", "inference_policy", "model_tensors",
           "policy_losses", "qsnr_table", "weight_tensors", "dense_moe_flops", "domain_mutual_information",
           "domain_preferences", "expert_flops", "experts_per_token_histogram", "flops_per_token",
           "inter_layer_affinity", "inter_layer_mutual_information", "load_cv", "load_fractions",
           "load_imbalance", "parse_collectives", "summarize_collectives", "activation_ratio",
           "at_active_compute", "efficiency_leverage", "granularity", "leverage_of", "optimal_granularity",
           "segmented", "training_compute"]

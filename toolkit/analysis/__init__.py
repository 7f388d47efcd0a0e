"""Analysis over plain values: routing statistics and parameter counts.

    total, active = count_params(cfg)
    imbalance_l = load_imbalance(summary["expert_counts"])
"""

from toolkit.analysis.params import count_params
from toolkit.analysis.routing import domain_preferences, domain_specialization, load_fractions, load_imbalance

__all__ = ["count_params", "domain_preferences", "domain_specialization", "load_fractions",
           "load_imbalance"]

"""Figure builders over plain values (history lists, count arrays).

    fig = expert_load_heatmap(summary["expert_counts"])
"""

from toolkit.viz.plots import domain_preference_heatmap, expert_load_heatmap, loss_curves, save

__all__ = ["domain_preference_heatmap", "expert_load_heatmap", "loss_curves", "save"]

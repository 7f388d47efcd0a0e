"""Figure builders over plain values (history lists, count arrays) and HTML renderers.

    fig = expert_load_heatmap(summary["expert_counts"])
    fig = load_over_steps_heatmap(counts_sle)           # [steps, layers, experts]
    html = colored_text_html(tokens_s, top_ls)          # bytes coloured by their top expert
    fig = schedule_gantt(timeline("1f1b", 4, 8))        # a pipeline schedule's timeline
    fig = leverage_curve(compute=1e22)                  # Ling's efficiency leverage
"""

from toolkit.viz.costs import design_bars, leverage_curve, plan_breakdown
from toolkit.viz.pipeline import schedule_gantt
from toolkit.viz.plots import domain_preference_heatmap, expert_load_heatmap, loss_curves, save
from toolkit.viz.precision import quantization_histogram
from toolkit.viz.routing import (
    affinity_heatmap,
    byte_glyphs,
    colored_text_html,
    expert_colors,
    experts_per_token_bars,
    load_over_steps_heatmap,
    routing_series,
)

__all__ = ["affinity_heatmap", "byte_glyphs", "colored_text_html", "design_bars", "domain_preference_heatmap",
           "expert_colors", "expert_load_heatmap", "experts_per_token_bars", "leverage_curve",
           "load_over_steps_heatmap", "loss_curves", "plan_breakdown", "quantization_histogram",
           "routing_series", "save", "schedule_gantt"]

"""Figure builders over plain values (history lists, count arrays) and HTML renderers.

    fig = expert_load_heatmap(summary["expert_counts"])
    fig = load_over_steps_heatmap(counts_sle)           # [steps, layers, experts]
    html = colored_text_html(tokens_s, top_ls)          # bytes coloured by their top expert
    fig = schedule_gantt(timeline("1f1b", 4, 8))        # a pipeline schedule's timeline
"""

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

__all__ = ["affinity_heatmap", "byte_glyphs", "colored_text_html", "domain_preference_heatmap",
           "expert_colors", "expert_load_heatmap", "experts_per_token_bars",
           "load_over_steps_heatmap", "loss_curves", "quantization_histogram", "routing_series",
           "save", "schedule_gantt"]

"""Views for notebooks: they render plain state (trainer histories, summaries) and hold none.

    from toolkit.widgets import LivePlots
    live = LivePlots(every=10)
    live.update(trainer.history, trainer.val_history)
    display(figure_png(plots.expert_load_heatmap(summary["expert_counts"])))
"""

from toolkit.widgets.live_plots import LivePlots, figure_png, status_line

__all__ = ["LivePlots", "figure_png", "status_line"]

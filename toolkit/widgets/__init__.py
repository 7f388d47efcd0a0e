"""Views for notebooks: they render plain state (trainer histories, summaries) and hold none.

    from toolkit.widgets import LivePlots
    live = LivePlots(every=10)
    live.update(trainer.history, trainer.val_history)
    display(figure_png(plots.expert_load_heatmap(summary["expert_counts"])))

    explorer = RoutingExplorer("tiny", router="top_p")     # the state, driven by tests too
    display(RoutingExplorerView(explorer).widget)          # the widget over it
"""

from toolkit.widgets.live_plots import LivePlots, figure_png, status_line
from toolkit.widgets.routing_explorer import KNOBS, Knob, RoutingExplorer, expert_names, top_expert
from toolkit.widgets.routing_explorer_view import FIGURES, RoutingExplorerView

__all__ = ["FIGURES", "KNOBS", "Knob", "LivePlots", "RoutingExplorer", "RoutingExplorerView",
           "expert_names", "figure_png", "status_line", "top_expert"]

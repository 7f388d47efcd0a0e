"""Views for notebooks: they render plain state (trainer histories, summaries) and hold none.

    from toolkit.widgets import LivePlots
    live = LivePlots(every=10)
    live.update(trainer.history, trainer.val_history)
    display(figure_png(plots.expert_load_heatmap(summary["expert_counts"])))

    explorer = RoutingExplorer("tiny", router="top_p")     # the state, driven by tests too
    display(RoutingExplorerView(explorer).widget)          # the widget over it

    ex = ParallelismExplorer("tiny", expert=2, recipe="ep")  # a mesh and a recipe, as state
    display(ParallelismExplorerView(ex).widget)

    px = PrecisionExplorer.from_preset("tiny", format="nvint4")  # a format over a model's tensors
    px.train(50); display(PrecisionExplorerView(px).widget)

    sx = SparsityExplorer("tiny", num_experts=32, top_k=8)   # designs at equal active compute
    display(SparsityExplorerView(sx).widget)
    pe = PlanningExplorer("qwen3_30b_a3b", cluster="h100x16")  # ranked layouts on a cluster
    display(PlanningExplorerView(pe).widget)
"""

from toolkit.widgets.live_plots import LivePlots, figure_png, status_line
from toolkit.widgets.parallelism import CHOICES, Choice, ParallelismExplorer, recipes_table
from toolkit.widgets.parallelism_view import VIEWS, ParallelismExplorerView
from toolkit.widgets.planning import PlanningExplorer
from toolkit.widgets.planning_view import PlanningExplorerView
from toolkit.widgets.precision import PrecisionExplorer, element_grid
from toolkit.widgets.precision_view import PANELS, PrecisionExplorerView
from toolkit.widgets.routing_explorer import KNOBS, Knob, RoutingExplorer, expert_names, top_expert
from toolkit.widgets.routing_explorer_view import FIGURES, RoutingExplorerView
from toolkit.widgets.sparsity import SparsityExplorer
from toolkit.widgets.sparsity_view import SparsityExplorerView

__all__ = ["PlanningExplorer", "PlanningExplorerView", "SparsityExplorer", "SparsityExplorerView",
           "CHOICES", "FIGURES", "KNOBS", "PANELS", "VIEWS", "PrecisionExplorer", "PrecisionExplorerView",
           "element_grid", "Choice", "Knob", "LivePlots", "ParallelismExplorer",
           "ParallelismExplorerView", "RoutingExplorer", "RoutingExplorerView", "expert_names", "figure_png",
           "recipes_table", "status_line", "top_expert"]

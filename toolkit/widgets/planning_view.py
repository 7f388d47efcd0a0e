"""The planner's widget: a thin ipywidgets view over a `PlanningExplorer`.

    pv = PlanningExplorerView(PlanningExplorer("qwen3_30b_a3b", cluster="h100x16"))
    display(pv.widget)       # model, device, count, batch; ranked plans, breakdown bars, why

Every knob change plans again (seconds: nothing compiles); the plan number picks whose
memory and step-time bars are drawn. A planner error shows in red instead of a table.
"""

import html

import ipywidgets as W

from toolkit.analysis.hardware import device_names
from toolkit.config.presets import PRESETS
from toolkit.viz.costs import plan_breakdown
from toolkit.widgets.parallelism_view import html_table
from toolkit.widgets.planning import PlanningExplorer
from toolkit.widgets.sparsity_view import png


class PlanningExplorerView:
    def __init__(self, explorer: PlanningExplorer):
        self.ex = explorer
        i = explorer.inputs
        device, _, count = i["cluster"].partition("x")
        self.knobs = {
            "preset": W.Dropdown(options=list(PRESETS), value=i["preset"], description="model"),
            "device": W.Dropdown(options=list(device_names()), value=device if device in device_names()
                                 else "h100", description="device"),
            "count": W.IntText(value=int(count) if count.isdigit() else 16, description="devices"),
            "global_batch": W.Text(value=i["global_batch"], description="tokens/step"),
        }
        self.rank = W.BoundedIntText(value=1, min=1, max=max(1, i["top"]), description="plan #")
        self.message, self.table, self.text = W.HTML(), W.HTML(), W.HTML()
        self.bars = W.Image(format="png")
        for w in self.knobs.values():
            w.observe(lambda change: self.changed(), names="value")
        self.rank.observe(lambda change: self.selected(), names="value")
        self.widget = W.VBox([W.HBox(list(self.knobs.values())[:2]), W.HBox(list(self.knobs.values())[2:]),
                              self.message, self.table, self.rank, self.bars, self.text])
        self.render()

    def changed(self) -> None:
        k = self.knobs
        self.ex.set(preset=k["preset"].value, cluster=f"{k['device'].value}x{k['count'].value}",
                    global_batch=k["global_batch"].value)
        self.render()

    def selected(self) -> None:
        if self.ex.plans and 1 <= self.rank.value <= len(self.ex.plans):
            self.ex.select(self.rank.value)
            self.bars.value = png(plan_breakdown(self.ex.plan))

    def render(self) -> None:
        ex = self.ex
        self.message.value = f"<b style='color:#b00'>{html.escape(ex.error)}</b>" if ex.error else ""
        rows = [dict(r, step=f"{r['step_s']:.3f}", mfu=f"{r['mfu']:.1%}", mem=f"{r['memory_gb']:.1f}")
                for r in ex.rows()]
        cols = [("rank", "#"), ("layout", "layout"), ("step", "step s"), ("mfu", "MFU"), ("mem", "GB/device")]
        caption = "plans that fit, fastest first"
        self.table.value = html_table(rows, cols, caption=caption, highlight="mfu") if rows else ""
        self.text.value = f"<pre>{html.escape(ex.explanation())}</pre>" if rows else ""
        self.rank.max = max(1, len(rows))
        if ex.plan is not None:
            self.bars.value = png(plan_breakdown(ex.plan))

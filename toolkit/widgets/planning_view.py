"""The planner's widget: a thin ipywidgets view over a `PlanningExplorer`.

    pv = PlanningExplorerView(PlanningExplorer("qwen3_30b_a3b", cluster="h100x16"))
    display(pv.widget)       # model, device x count (or a spec), batch, fixed axes, remat
    pv.knobs["count"].value = 2      # what turning a knob does: plan again, redraw

Every knob change plans again (seconds: nothing compiles); the cluster is the spec box when
it is filled ("h100x32+a100x32", "v5p-128"), else device x count. The plan number picks
whose memory, communication and step-time bars are drawn. A planner error shows in red
instead of the table.
"""

import html
import re

import ipywidgets as W

from toolkit.analysis.hardware import device_names
from toolkit.config.presets import PRESETS
from toolkit.viz.costs import plan_breakdown
from toolkit.widgets.parallelism_view import html_table
from toolkit.widgets.planning import PlanningExplorer
from toolkit.widgets.sparsity_view import png

REMAT = {"remat each layer": (True,), "no remat": (False,), "both": (False, True)}


def plans_html(rows) -> str:
    """The ranked plans: layout, step time, MFU, tokens/s, memory per device."""
    shown = [dict(r, step=f"{r['step_s']:.3f}", mfu=f"{r['mfu']:.1%}", tps=f"{r['tokens_per_s']:,.0f}",
                  mem=f"{r['memory_gb']:.1f}") for r in rows]
    cols = [("rank", "#"), ("layout", "layout"), ("step", "step s"), ("mfu", "MFU"), ("tps", "tokens/s"),
            ("mem", "GB/device")]
    return html_table(shown, cols, caption="plans that fit, fastest first", highlight="mfu")


class PlanningExplorerView:
    """Widgets over a `PlanningExplorer`.

    Attributes:
      ex: the state it renders; widget: the box to display.
      knobs: "preset", "device", "count", "spec", "global_batch", "fixed", "remat" widgets.
      rank: the plan number whose bars are drawn.
      message, table, bars, text: the error, the ranked table, the breakdown bars, the explanation.
    """

    def __init__(self, explorer: PlanningExplorer):
        self.ex, self._rendering = explorer, False
        i = explorer.inputs
        simple = re.fullmatch(r"([a-z0-9]+?)x(\d+)", i["cluster"])
        device_count = simple and simple[1] in device_names()
        remat = {**REMAT, str(i["remat"]): i["remat"]} if i["remat"] not in REMAT.values() else REMAT
        fixed = i["fixed"]
        fixed = fixed if isinstance(fixed, str) else ", ".join(f"{k}={v}" for k, v in fixed.items())
        self.knobs = {
            "preset": W.Dropdown(options=list(PRESETS), value=i["preset"], description="model"),
            "device": W.Dropdown(options=list(device_names()), value=simple[1] if device_count else "h100",
                                 description="device"),
            "count": W.BoundedIntText(value=int(simple[2]) if device_count else 16, min=1, max=100_000,
                                      description="devices"),
            "spec": W.Text(value="" if device_count else i["cluster"], description="or cluster",
                           placeholder="h100x32+a100x32"),
            "global_batch": W.Text(value=str(i["global_batch"]), description="tokens/step"),
            "fixed": W.Text(value=fixed, description="fixed axes", placeholder="tensor=2, expert=8"),
            "remat": W.Dropdown(options=list(remat.items()), value=i["remat"], description="remat"),
        }
        self.rank = W.BoundedIntText(value=1, min=1, max=max(1, i["top"]), description="plan #")
        self.message, self.table, self.text = W.HTML(), W.HTML(), W.HTML()
        self.bars = W.Image(format="png")
        for w in self.knobs.values():
            w.observe(lambda change: self.changed(), names="value")
        self.rank.observe(lambda change: self.selected(), names="value")
        knobs = list(self.knobs.values())
        self.widget = W.VBox([W.HBox(knobs[:4]), W.HBox(knobs[4:]), self.message, self.table, self.rank,
                              self.bars, self.text])
        self.render()

    def cluster(self) -> str:
        """The cluster the knobs name: the spec box when filled, else device x count."""
        k = self.knobs
        return k["spec"].value.strip() or f"{k['device'].value}x{k['count'].value}"

    def changed(self) -> None:
        k = self.knobs
        self.ex.set(preset=k["preset"].value, cluster=self.cluster(), global_batch=k["global_batch"].value,
                    fixed=k["fixed"].value, remat=k["remat"].value)
        self.render()

    def selected(self) -> None:
        if not self._rendering and 1 <= self.rank.value <= len(self.ex.plans):
            self.ex.select(self.rank.value)
            self.draw()

    def draw(self) -> None:
        """The selected plan's breakdown bars (hidden when there is no plan)."""
        ex = self.ex
        self.bars.layout.display = None if ex.plans else "none"
        if ex.plans:
            self.bars.value = png(plan_breakdown(ex.breakdown(), ex.plan.label))

    def render(self) -> None:
        ex = self.ex
        self.message.value = f"<b style='color:#b00'>{html.escape(ex.error)}</b>" if ex.error else ""
        self.table.value = plans_html(ex.rows()) if ex.plans else ""
        self.text.value = f"<pre>{html.escape(ex.explanation())}</pre>" if ex.plans else ""
        self._rendering = True
        try:
            self.rank.max = max(1, len(ex.plans))
            self.rank.value = ex.selected + 1
        finally:
            self._rendering = False
        self.draw()

"""The sparsity explorer's widget: a thin ipywidgets view over a `SparsityExplorer`.

    view = SparsityExplorerView(SparsityExplorer("tiny"), designs=[(16, 4, 0), (32, 8, 0)])
    display(view.widget)               # experts, top-k, shared; the designs' numbers and EL

Every knob change updates the state and redraws (the cost model needs no compilation);
training a design for its validation loss runs from a button.
"""

import html

import ipywidgets as W

from toolkit.viz.costs import design_bars, leverage_curve
from toolkit.widgets.live_plots import figure_png
from toolkit.widgets.parallelism_view import html_table
from toolkit.widgets.sparsity import SparsityExplorer


def png(fig) -> bytes:
    """PNG bytes of a matplotlib figure (closed), for a `W.Image`."""
    return figure_png(fig).data


def design_html(rows) -> str:
    cols = [("design", "design"), ("d_expert", "d_expert"), ("activation", "A"), ("granularity", "G"),
            ("params", "params total / active"), ("flops", "FLOPs/token"), ("memory", "MB/device"),
            ("comm", "MB sent/step"), ("el", "EL"), ("loss", "val loss")]
    shown = [dict(r, activation=f"{r['activation']:.3f}", granularity=f"{r['granularity']:.1f}",
                  params=f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M",
                  flops=f"{r['flops_per_token'] / 1e6:.3f}M", memory=f"{r['memory_per_device'] / 1e6:.1f}",
                  comm=f"{r['comm_per_step'] / 1e6:.1f}", el=f"{r['leverage']:.2f}",
                  loss="" if r["val_loss"] is None else f"{r['val_loss']:.3f}") for r in rows]
    return html_table(shown, cols, caption="designs at equal active compute", highlight="el")


class SparsityExplorerView:
    def __init__(self, explorer: SparsityExplorer, *, designs=(), train_steps: int = 50):
        self.ex, self.designs, self.train_steps = explorer, list(designs), train_steps
        d = explorer.design
        self.knobs = {
            "num_experts": W.IntSlider(value=d["num_experts"], min=2, max=256, description="experts"),
            "top_k": W.IntSlider(value=d["top_k"], min=1, max=32, description="top-k"),
            "num_shared_experts": W.IntSlider(value=d["num_shared_experts"], min=0, max=4,
                                              description="shared")}
        self.message, self.table, self.plot = W.HTML(), W.HTML(), W.Image(format="png")
        self.bars = W.Image(format="png")
        self.train_button = W.Button(description="Train this design")
        for w in self.knobs.values():
            w.observe(lambda change: self.changed(), names="value")
        self.train_button.on_click(lambda _: self.train())
        self.widget = W.VBox([W.HBox(list(self.knobs.values())), self.message, self.table, self.plot,
                              self.bars, self.train_button])
        self.changed()

    def changed(self) -> None:
        self.ex.set(**{k: w.value for k, w in self.knobs.items()})
        error = self.ex.error
        self.message.value = f"<b style='color:#b00'>{html.escape(error)}</b>" if error else ""
        row = self.ex.row()
        self.table.value = design_html([row] + self.ex.sweep(self.designs))
        self.plot.value = png(leverage_curve(self.ex.compute, mark=(row["activation"], row["granularity"])))
        if self.designs:
            self.bars.value = png(design_bars([row] + self.ex.sweep(self.designs)))

    def train(self) -> None:
        self.ex.train(self.train_steps)
        self.changed()

"""The precision explorer's widget: a thin ipywidgets view over a `PrecisionExplorer`.

    view = PrecisionExplorerView(explorer)
    display(view.widget)                      # format, block, scale rule, rotation, tensors
    display(view.render("histogram"))         # any panel, as an image or HTML

Every knob change updates the state, then redraws the histogram and the QSNR table (both
cheap); the validation-loss impact compiles the model once per format, so it runs from
its button.
"""

import html

import ipywidgets as W
from IPython.display import HTML

from toolkit.precision import FORMATS
from toolkit.viz.precision import quantization_histogram
from toolkit.widgets.live_plots import figure_png
from toolkit.widgets.parallelism_view import html_table
from toolkit.widgets.precision import ROTATIONS, SCALE_RULES, PrecisionExplorer

PANELS = ("histogram", "qsnr", "loss")


def qsnr_html(rows) -> str:
    cols = [("kind", "tensors"), ("class", "class"), ("format", "format"), ("rotation", "rotation"),
            ("qsnr", "QSNR dB"), ("crest", "block crest")]
    rows = [dict(r, qsnr=f"{r['qsnr_db']:.2f}", crest=f"{r['crest']:.2f}") for r in rows]
    return html_table(rows, cols, caption="QSNR per tensor class", highlight="qsnr")


def loss_html(losses: dict) -> str:
    base = losses["full precision"]
    rows = [{"policy": k, "loss": f"{v:.4f}", "change": f"{100 * (v - base) / base:+.2f}%"}
            for k, v in losses.items()]
    return html_table(rows, [("policy", "policy"), ("loss", "val loss"), ("change", "change")],
                      caption="validation loss (nats/token)", highlight="change")


class PrecisionExplorerView:
    def __init__(self, explorer: PrecisionExplorer):
        self.ex = explorer
        ex = explorer
        self.knobs = {
            "format": W.Dropdown(options=list(FORMATS), value=ex.format, description="format"),
            "block": W.Dropdown(options=[0, 8, 16, 32, 64, 128], value=ex.block, description="block"),
            "scale_rule": W.Dropdown(options=list(SCALE_RULES), value=ex.scale_rule, description="scale"),
            "symmetric": W.Checkbox(value=ex.symmetric, description="symmetric INT"),
            "rotation": W.Dropdown(options=list(ROTATIONS), value=ex.rotation, description="Hadamard"),
        }
        kinds = [(f"{k} {c}", (k, c)) for k in ("weights", "acts") for c in ex.classes(k)]
        self.tensor = W.Dropdown(options=kinds, description="tensors")
        self.message = W.HTML()
        self.plot, self.table, self.loss = W.Image(format="png"), W.HTML(), W.HTML()
        self.loss_button = W.Button(description="Loss impact")
        for w in [*self.knobs.values(), self.tensor]:
            w.observe(self._changed, names="value")
        self.loss_button.on_click(lambda _: self._loss())
        self.widget = W.VBox([W.HBox(list(self.knobs.values())[:3]),
                              W.HBox([*list(self.knobs.values())[3:], self.tensor]),
                              self.message, self.plot, self.table, self.loss_button, self.loss])
        self.refresh()

    def _changed(self, _change):
        self.ex.set(**{k: w.value for k, w in self.knobs.items()})
        self.refresh()

    def _loss(self):
        self.loss.value = self.render("loss").data

    def render(self, panel: str):
        """One panel: "histogram" (PNG bytes in an image), "qsnr" or "loss" (HTML)."""
        if panel == "histogram":
            kind, cls = self.tensor.value or ("acts", self.ex.classes()[0])
            h = self.ex.histogram(kind, cls)
            return figure_png(quantization_histogram(h["scaled"], h["grid"], title=h["title"]))
        if panel == "qsnr":
            return HTML(qsnr_html(self.ex.qsnr_rows()))
        if panel == "loss":
            return HTML(loss_html(self.ex.loss_impact()))
        raise ValueError(f"panel {panel!r} is unknown; use one of {PANELS}")

    def refresh(self):
        self.message.value = (f"<span style='color:#b00'>{html.escape(self.ex.error)}</span>"
                              if self.ex.error else f"format <code>{html.escape(self.ex.spec())}</code>: "
                              f"{self.ex.number_format().bits_per_value:.2f} bits per value")
        if not self.ex.tensors:
            return
        self.plot.value = self.render("histogram").data
        self.table.value = self.render("qsnr").data

"""The routing explorer's widget: a thin ipywidgets view over a `RoutingExplorer`.

The view renders the state (the router, the knobs that matter for it, the status, the
error, four figures and the coloured text) and forwards what the user changes to it; the
logic stays in the state object. Training runs in a background thread so the notebook
stays responsive while it trains, and Stop ends it after the step in flight.

    view = RoutingExplorerView(RoutingExplorer("tiny", overrides=["train.steps=100"]))
    display(view.widget)
    view.start(20); view.wait()                  # what the Train button does, then wait for it
    display(view.render("load"))                 # any view as a static picture (PNG)
    display(view.render("text"))                 # the coloured bytes (HTML)
"""

import html
import threading
import traceback

import ipywidgets as W
from IPython.display import HTML, Markdown

from toolkit.moe import ROUTERS
from toolkit.viz import routing as rviz
from toolkit.widgets.live_plots import figure_png
from toolkit.widgets.routing_explorer import KNOBS, RoutingExplorer

FIGURES = ("load", "series", "experts_per_token", "affinity")
"""The figure views: load over steps, drop rate and experts per token over steps, the
experts-per-token histogram, and the layer-to-layer affinity."""


def _knob_widget(knob, value):
    common = dict(description=knob.key.split(".")[1], tooltip=knob.help,
                  style={"description_width": "140px"}, layout=W.Layout(width="420px"))
    if knob.options:
        return W.Dropdown(options=knob.options, value=value, **common)
    if isinstance(value, int):
        return W.IntSlider(value=value, min=min(int(knob.lo), value), max=max(int(knob.hi), value),
                           step=int(knob.step), **common)
    return W.FloatSlider(value=value, min=min(knob.lo, value), max=max(knob.hi, value),
                         step=knob.step, readout_format=".4g", **common)


class RoutingExplorerView:
    """Widgets over a `RoutingExplorer`: router, knobs, train/stop, load a run, the views.

    Attributes:
      explorer: the state it renders.
      widget: the box to display.
      router: the router dropdown; knobs: knob key -> its slider or dropdown.
      images: figure name (`FIGURES`) -> an Image widget; text: the coloured bytes (HTML).
      failure: the traceback of a training thread that raised, or None.
    """

    def __init__(self, explorer: RoutingExplorer, *, every: int = 5, steps: int = 20,
                 text_rows: int = 1):
        if every < 1:
            raise ValueError(f"every={every!r} must be a positive number of steps; use e.g. 5")
        self.explorer, self.every, self.text_rows = explorer, every, text_rows
        self.failure, self._busy, self._syncing = None, False, False
        self._stop, self._thread = threading.Event(), None
        self.router = W.Dropdown(options=ROUTERS, description="router")
        self.knobs = {k.key: _knob_widget(k, explorer.values[k.key]) for k in KNOBS}
        self.steps = W.BoundedIntText(value=steps, min=1, max=1_000_000, description="steps",
                                      layout=W.Layout(width="180px"))
        self.train_button = W.Button(description="Train", button_style="primary", icon="play")
        self.stop_button = W.Button(description="Stop", icon="stop", disabled=True)
        self.run_path = W.Text(placeholder="runs/tiny", description="run dir")
        self.load_button = W.Button(description="Load run", icon="folder-open")
        self.status, self.error, self.text = W.HTML(), W.HTML(), W.HTML()
        self.images = {name: W.Image(format="png") for name in FIGURES}

        self.router.observe(self._on_router, names="value")
        for key, w in self.knobs.items():
            w.observe(lambda change, key=key: self._on_knob(key, change["new"]), names="value")
        self.train_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.load_button.on_click(lambda _: self._on_load())
        self.widget = W.VBox([
            W.HBox([W.VBox([self.router, *self.knobs.values()]),
                    W.VBox([W.HBox([self.steps, self.train_button, self.stop_button]),
                            W.HBox([self.run_path, self.load_button]), self.status, self.error])]),
            W.HBox([self.images["load"], self.images["series"]]),
            W.HBox([self.images["experts_per_token"], self.images["affinity"]]),
            self.text,
        ])
        self.refresh()

    # -- rendering -------------------------------------------------------------------------
    def figure(self, name: str):
        """The Figure of one view (`FIGURES`), or None while the state has nothing to show."""
        ex = self.explorer
        layers, experts = ex.layer_names(), ex.expert_names()
        if name == "load":
            counts_sle = ex.load_over_steps()
            return rviz.load_over_steps_heatmap(counts_sle, steps=ex.steps(), layer_names=layers,
                                                expert_names=experts) if counts_sle.size else None
        if name == "series":
            drop_sl = ex.drop_rate()
            return rviz.routing_series(ex.steps(), drop_sl, ex.experts_per_token(),
                                       layer_names=layers) if drop_sl.size else None
        if name == "experts_per_token":
            hist_lk = ex.experts_per_token_histogram()
            return rviz.experts_per_token_bars(hist_lk, layer_names=layers) if hist_lk.size else None
        if name == "affinity":
            p_lij = ex.affinity()
            return rviz.affinity_heatmap(p_lij, layer_names=layers,
                                         expert_names=experts) if p_lij.size else None
        raise ValueError(f"figure {name!r} is unknown; use one of {FIGURES}")

    def render(self, name: str):
        """One view as a display object: a figure (`FIGURES`) as PNG, "text" as HTML, or a
        line on why there is nothing to show yet."""
        if name == "text":
            return HTML(self.text_html())
        fig = self.figure(name)
        if fig is not None:
            return figure_png(fig)
        why = " (it needs two MoE layers or more)" if name == "affinity" else ""
        return Markdown(f"*nothing to show for {name} yet: train a step or load a run{why}*")

    def text_html(self, rows: int | None = None) -> str:
        """The probed text of every domain, each byte coloured by its top expert per layer."""
        ex = self.explorer
        blocks = [rviz.colored_text_html(tokens_s, top_ls, layer_names=ex.layer_names(),
                                         expert_names=ex.expert_names(),
                                         title=f"{domain}: each byte on its top expert, per MoE layer")
                  for domain, (tokens_s, top_ls) in ex.top_experts(rows or self.text_rows).items()]
        return "".join(blocks) or "<i>train a step or load a run to see which expert takes each byte</i>"

    def sync_controls(self) -> None:
        """Controls, status and error from the state (without echoing back as knob changes)."""
        ex = self.explorer
        relevant = {k.key for k in ex.knobs()}
        self._syncing = True
        try:
            if ex.router in ROUTERS:
                self.router.value = ex.router
            for key, w in self.knobs.items():
                value = ex.values[key]
                if not isinstance(w, W.Dropdown):
                    w.min, w.max = min(w.min, value), max(w.max, value)
                w.value = value
                w.layout.display = None if key in relevant else "none"
                w.disabled = self._busy
        finally:
            self._syncing = False
        self.router.disabled = self.load_button.disabled = self.train_button.disabled = self._busy
        self.stop_button.disabled = not self._busy
        self.status.value = f"<b>{'training: ' if self._busy else ''}{html.escape(ex.status)}</b>"
        problem = self.failure or ex.error
        self.error.value = (f'<pre style="color:#b00020;white-space:pre-wrap">{html.escape(problem)}</pre>'
                            if problem else "")

    def refresh_figures(self, names=FIGURES) -> None:
        for name in names:
            fig = self.figure(name)
            self.images[name].value = figure_png(fig).data if fig is not None else b""
            self.images[name].layout.display = None if fig is not None else "none"
        if "experts_per_token" in names:
            self.text.value = self.text_html()

    def refresh(self) -> None:
        self.sync_controls()
        self.refresh_figures()

    # -- forwarding --------------------------------------------------------------------------
    def _on_router(self, change) -> None:
        if not self._syncing:
            self.explorer.set_router(change["new"])
            self.sync_controls()

    def _on_knob(self, key: str, value) -> None:
        if not self._syncing:
            self.explorer.set_knob(key, value)
            self.sync_controls()

    def _on_load(self) -> None:
        self.failure = None
        self.explorer.load_run(self.run_path.value)
        self.refresh()

    # -- training in the background ------------------------------------------------------------
    def start(self, steps: int | None = None) -> bool:
        """Train `steps` (the steps box by default) in a background thread; False if busy."""
        if self._busy:
            return False
        self._busy, self.failure = True, None
        self._stop.clear()
        self.sync_controls()
        self._thread = threading.Thread(target=self._train, args=(steps or self.steps.value,),
                                        daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """End training after the step in flight."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _on_step(self, rec: dict) -> None:
        self.sync_controls()
        if rec["step"] % self.every == 0:
            self.refresh_figures(("load", "series"))

    def _train(self, steps: int) -> None:
        try:
            self.explorer.train(steps, stop=self._stop.is_set, on_step=self._on_step)
            self.refresh_figures()
        except Exception:  # a thread has no cell to raise into: show the traceback in the view
            self.failure = traceback.format_exc()
        finally:
            self._busy = False
            self.sync_controls()

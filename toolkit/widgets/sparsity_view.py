"""The sparsity explorer's widget: a thin ipywidgets view over a `SparsityExplorer`.

    view = SparsityExplorerView(SparsityExplorer("tiny"), designs=[(16, 4, 0), (32, 8, 0)])
    display(view.widget)      # experts, top-k, shared, finer/coarser, cluster, budget; numbers and EL
    view.start(20); view.wait()                  # what the Train button does, then wait for it

Every knob change updates the state and redraws (the cost model needs no compilation).
Training a design for its validation loss runs in a background thread, so the notebook
stays responsive; Stop ends it after the step in flight and records the loss so far.
"""

import html
import threading

import ipywidgets as W

from toolkit.viz.costs import design_bars, leverage_curve
from toolkit.widgets.live_plots import figure_png
from toolkit.widgets.parallelism_view import html_table
from toolkit.widgets.sparsity import DESIGN, SparsityExplorer

CLUSTERS = ("h100x8", "h100x64", "b200x8", "v5p-128", "h100x32+a100x32")
BUDGETS = (1e20, 1e21, 1e22, 1e23, 1e24, 1e25)


def png(fig) -> bytes:
    """PNG bytes of a matplotlib figure (closed), for a `W.Image`."""
    return figure_png(fig).data


def design_html(rows) -> str:
    """The designs' table: width, A, G, parameters, FLOPs, memory, bytes, step, EL, loss."""
    cols = [("design", "design"), ("d_expert", "d_expert"), ("activation", "A"), ("granularity", "G"),
            ("params", "params total / active"), ("flops", "FLOPs/token"), ("memory", "MB/device"),
            ("comm", "MB sent/step"), ("step", "step ms"), ("el", "EL"), ("loss", "val loss")]
    shown = [dict(r, activation=f"{r['activation']:.3f}", granularity=f"{r['granularity']:.1f}",
                  params=f"{r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M",
                  flops=f"{r['flops_per_token'] / 1e6:.3f}M",
                  memory=f"{r['memory_per_device'] / 1e6:,.1f}" + ("" if r["fits"] else " (over HBM)"),
                  comm=f"{r['comm_per_step'] / 1e6:,.1f}", step=f"{r['step_s'] * 1e3:.3g}",
                  el=f"{r['leverage']:.2f}",
                  loss="" if r["val_loss"] is None else f"{r['val_loss']:.3f} ({r['val_steps']} steps)")
             for r in rows]
    return html_table(shown, cols, caption="designs at equal active compute", highlight="el")


class SparsityExplorerView:
    """Widgets over a `SparsityExplorer`.

    Attributes:
      ex: the state it renders; widget: the box to display.
      knobs: knob name -> its slider or dropdown; finer, coarser: the refine buttons.
      message, table, plot, bars, status: what is drawn.
      failure: the message of a training run that raised, or "".
    """

    def __init__(self, explorer: SparsityExplorer, *, designs=(), train_steps: int = 50):
        self.ex, self.designs = explorer, [tuple(d) for d in designs]
        self.failure, self._busy, self._syncing = "", False, False
        self._stop, self._thread = threading.Event(), None
        k = explorer.knobs
        self.knobs = {
            "num_experts": W.IntSlider(value=k["num_experts"], min=2, max=256, description="experts"),
            "top_k": W.IntSlider(value=k["top_k"], min=1, max=64, description="top-k"),
            "num_shared_experts": W.IntSlider(value=k["num_shared_experts"], min=0, max=4,
                                              description="shared"),
            "cluster": W.Dropdown(options=sorted({*CLUSTERS, k["cluster"]}), value=k["cluster"],
                                  description="cluster"),
            "compute": W.Dropdown(options=[(f"{c:.0e}", c) for c in sorted({*BUDGETS, k["compute"]})],
                                  value=k["compute"], description="C FLOPs"),
        }
        self.finer, self.coarser = W.Button(description="finer x2"), W.Button(description="coarser /2")
        self.steps = W.BoundedIntText(value=train_steps, min=1, max=100_000, description="steps")
        self.train_button = W.Button(description="Train this design", button_style="primary")
        self.stop_button = W.Button(description="Stop", disabled=True)
        self.message, self.status, self.table = W.HTML(), W.HTML(), W.HTML()
        self.plot, self.bars = W.Image(format="png"), W.Image(format="png")
        for w in self.knobs.values():
            w.observe(lambda change: self.changed(), names="value")
        self.finer.on_click(lambda _: self.refine(2))
        self.coarser.on_click(lambda _: self.refine(0.5))
        self.train_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self._stop.set())
        knobs = list(self.knobs.values())
        self.widget = W.VBox([W.HBox(knobs[:3]), W.HBox([*knobs[3:], self.finer, self.coarser]),
                              self.message, self.table, self.plot, self.bars,
                              W.HBox([self.steps, self.train_button, self.stop_button]), self.status])
        self.render()

    def changed(self) -> None:
        if not self._syncing:
            self.redraw(self.ex.set(**{k: w.value for k, w in self.knobs.items()}))

    def refine(self, factor: float) -> None:
        self.redraw(self.ex.refine(factor))

    def redraw(self, taken: bool) -> None:
        """Everything after a change the state took; only the knobs and the message after one
        it refused (the numbers did not move)."""
        if taken:
            self.render()
        else:
            self.sync()

    def sync(self) -> None:
        """Knobs and buttons to the state's values (a refused change snaps back)."""
        self._syncing = True
        try:
            for name, w in self.knobs.items():
                value = self.ex.knobs[name]
                if name in DESIGN:
                    w.min, w.max = min(w.min, value), max(w.max, value)
                w.value = value
        finally:
            self._syncing = False
        for w in [*self.knobs.values(), self.finer, self.coarser, self.train_button]:
            w.disabled = self._busy
        self.stop_button.disabled = not self._busy
        problem = self.failure or self.ex.error
        self.message.value = f"<b style='color:#b00'>{html.escape(problem)}</b>" if problem else ""

    def render(self) -> None:
        self.sync()
        rows = self.ex.sweep([self.ex.design, *self.designs])
        self.table.value = design_html(rows)
        self.plot.value = png(leverage_curve(self.ex.knobs["compute"],
                                             mark=(rows[0]["activation"], rows[0]["granularity"])))
        self.bars.value = png(design_bars(rows))

    # -- training in the background ------------------------------------------------------------
    def start(self, steps: int | None = None) -> bool:
        """Train the current design for `steps` (the steps box by default) in a background
        thread; False if one is running."""
        if self._busy:
            return False
        self._busy, self.failure = True, ""
        self._stop.clear()
        self.sync()
        steps = steps or self.steps.value
        self._thread = threading.Thread(target=self._train, args=(steps,), daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _train(self, steps: int) -> None:
        name = "E{} k{} s{}".format(*self.ex.design)
        show = lambda rec: setattr(self.status, "value", f"training {name}: step {rec['step']}/{steps}, "
                                                         f"train loss {rec['ce']:.3f}")
        try:
            loss = self.ex.train(steps, stop=self._stop.is_set, on_step=show)
            self.status.value = f"{name}: validation loss {loss:.3f}"
        except Exception as e:  # a thread has no cell to raise into: show the message in the view
            self.failure = f"training {name} failed: {e}"
        finally:
            self._busy = False
            self.render()

"""Live training plots: a view that redraws in place while a loop trains step by step.

The state is the trainer's own plain lists (`trainer.history`, `trainer.val_history`);
the view only turns them into figures (`toolkit.viz.plots`) and swaps them into fixed
output slots (IPython display handles), so a notebook shows one plot that changes, not
one plot per step, and a headless run (nbclient) keeps the last frame in the cell output.

    live = LivePlots(every=10, layer_names=["L0", "L1"])
    live.show()                                    # three slots below the cell
    while trainer.step_num < trainer.cfg.train.steps:
        trainer.advance()
        live.update(trainer.history, trainer.val_history)   # redraws every 10th step
"""

import io

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import DisplayHandle, Image, Markdown

from toolkit.viz import plots


def figure_png(fig) -> Image:
    """The figure as a PNG display object, whatever the matplotlib backend.

    The figure is closed, so it neither leaks nor shows a second time at the end of the cell.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return Image(data=buf.getvalue(), format="png")


def status_line(history: list, val_history: list) -> str:
    """One markdown line: the last step's train CE, drop rate, speed and validation bits/byte."""
    if not history:
        return "waiting for the first step..."
    h = history[-1]
    text = f"**step {h['step']}**: train CE {h['ce']:.3f} nats/token, {h['tokens_per_s']:,.0f} tokens/s"
    if "drop_rate" in h:
        text += f", drop rate {np.mean(h['drop_rate']):.3f}"
    if val_history:
        v = val_history[-1]
        bpb = ", ".join(f"{d} {x:.3f}" for d, x in v["val_bits_per_byte"].items())
        text += f"; val bits/byte at step {v['step']}: {bpb}"
    return text


class LivePlots:
    """Loss curves, expert-load heatmap and a status line, redrawn every `every` steps.

    Attributes:
      every: redraw when the last step is a multiple of this (or when `force=True`).
      layer_names: heatmap row labels, one per MoE layer.
      frames: how many times the view has drawn (tests read it).
    """

    def __init__(self, *, every: int = 10, layer_names=None):
        if every < 1:
            raise ValueError(f"every={every!r} must be a positive number of steps; use e.g. 10")
        self.every, self.layer_names, self.frames = every, layer_names, 0
        self._handles = None

    def show(self) -> None:
        """Create the output slots under the running cell (a status line and two plots)."""
        self._handles = [DisplayHandle() for _ in range(3)]
        for handle, text in zip(self._handles, [status_line([], []), "", ""], strict=True):
            handle.display(Markdown(text))

    def render(self, history: list, val_history: list) -> list:
        """[status Markdown, loss-curve PNG, expert-load PNG or None] for the current state.

        The heatmap shows expert load summed over the last `every` steps.
        """
        frame = [Markdown(status_line(history, val_history)),
                 figure_png(plots.loss_curves(history, val_history)), None]
        recent = [h for h in history[-self.every:] if "expert_counts" in h]
        if recent:
            counts_le = np.sum([h["expert_counts"] for h in recent], axis=0)
            title = f"expert load, steps {recent[0]['step']}-{recent[-1]['step']}"
            frame[2] = figure_png(plots.expert_load_heatmap(counts_le, layer_names=self.layer_names,
                                                            title=title))
        return frame

    def update(self, history: list, val_history: list, *, force: bool = False) -> bool:
        """Redraw in place if the last step is a multiple of `every` (or `force`); return whether it drew."""
        if not history or not (force or history[-1]["step"] % self.every == 0):
            return False
        if self._handles is None:
            self.show()
        for handle, obj in zip(self._handles, self.render(history, val_history), strict=True):
            if obj is not None:
                handle.update(obj)
        self.frames += 1
        return True

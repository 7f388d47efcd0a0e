"""The live-plot view driven directly, without a kernel or a trainer: state in, frames out."""

import pytest
from IPython.display import Image, Markdown

from toolkit.widgets import LivePlots, status_line


def _history(steps: int, layers: int = 2, experts: int = 4) -> list:
    return [{"step": s, "ce": 5.0 - 0.1 * s, "tokens_per_s": 1000.0, "drop_rate": [0.0] * layers,
             "expert_counts": [[s + e for e in range(experts)]] * layers} for s in range(1, steps + 1)]


VAL = [{"step": 4, "val_loss": {"prose": 3.0, "code": 2.5},
        "val_bits_per_byte": {"prose": 4.25, "code": 3.5}}]


def test_status_line_reads_the_last_step_and_validation():
    assert status_line([], []) == "waiting for the first step..."
    line = status_line(_history(4), VAL)
    assert "**step 4**" in line and "prose 4.250" in line and "code 3.500" in line


def test_render_gives_status_loss_and_load_frames():
    status, loss, load = LivePlots(every=2, layer_names=["L0", "L1"]).render(_history(4), VAL)
    assert isinstance(status, Markdown) and "step 4" in status.data
    for img in (loss, load):
        assert isinstance(img, Image) and img.data.startswith(b"\x89PNG")


def test_render_without_moe_layers_has_no_load_frame():
    history = [{"step": 1, "ce": 5.0, "tokens_per_s": 10.0}]
    assert LivePlots().render(history, [])[2] is None


def test_update_draws_on_schedule_or_when_forced():
    live = LivePlots(every=3)
    assert not live.update([], [])
    assert not live.update(_history(2), [])
    assert live.update(_history(3), [])
    assert live.update(_history(4), VAL, force=True)
    assert live.frames == 2


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every=0"):
        LivePlots(every=0)

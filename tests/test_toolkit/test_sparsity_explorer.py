"""Ling's efficiency-leverage law, designs at equal active compute, the sparsity explorer's
state and widget, and their figures, without a browser.

    .venv/bin/python -m pytest -q tests/test_toolkit/test_sparsity_explorer.py

Nothing compiles: training runs through a stand-in trainer here and for real in notebook 05's
test (tests/notebooks), which trains a design through `SparsityExplorer.train`.
"""

import matplotlib
import numpy as np
import pytest

from toolkit.analysis.costs import forward_flops
from toolkit.analysis.scaling import (
    activation_ratio,
    at_active_compute,
    efficiency_leverage,
    granularity,
    leverage_of,
    optimal_granularity,
    segmented,
    training_compute,
)
from toolkit.config import ParallelConfig, preset
from toolkit.viz.costs import design_bars, leverage_curve
from toolkit.widgets import SparsityExplorer, SparsityExplorerView
from toolkit.widgets import sparsity as sparsity_module
from toolkit.widgets.sparsity_view import design_html

matplotlib.use("Agg")


def test_efficiency_leverage_reproduces_the_papers_statements():
    assert efficiency_leverage(0.031, 12, 1e22) == pytest.approx(7.245, abs=0.005)   # "> 7x"
    assert optimal_granularity() == pytest.approx(11.34, abs=0.005)                 # "around 12"
    assert efficiency_leverage(1.0, 12, 1e22) == pytest.approx(0.990, abs=0.002)     # dense: none
    assert efficiency_leverage(0.031, 12, 1e23) > efficiency_leverage(0.031, 12, 1e21)   # grows with C
    at_a = efficiency_leverage(np.array([0.5, 0.1, 0.02]), 12, 1e22)                # arrays broadcast
    assert at_a.shape == (3,) and np.all(np.diff(at_a) > 0)                         # sparser: more EL
    near_best = [efficiency_leverage(0.031, g, 1e22) for g in (8, 11.34, 16)]
    assert near_best[1] > near_best[0] and near_best[1] > near_best[2]
    with pytest.raises(ValueError, match=r"activation ratio 0.0 must lie in \(0, 1\]"):
        efficiency_leverage(0.0, 12, 1e22)


def test_a_configs_ratio_granularity_leverage_and_compute():
    ling, tiny = preset("ling_mini_2"), preset("tiny")
    assert activation_ratio(ling) == pytest.approx(9 / 257)          # 8 routed + 1 shared of 256 + 1
    assert granularity(ling) == 2 * 2048 / 512
    assert leverage_of(ling, 1e22) == efficiency_leverage(9 / 257, 8.0, 1e22)
    assert training_compute(tiny, 1e6) == 3e6 * sum(forward_flops(tiny, causal=True).values())


def test_at_active_compute_and_segmented_keep_the_active_width():
    base = preset("tiny")                                            # E8 k2, d_expert 128
    fine = at_active_compute(base, num_experts=32, top_k=8)
    assert fine.moe.d_expert * 8 == base.moe.d_expert * 2 and fine.moe.expert_fraction == 0.0
    shared = at_active_compute(base, num_experts=32, top_k=7, num_shared_experts=1)
    assert shared.moe.d_expert * 8 == base.moe.d_expert * 2
    assert segmented(base, 4).moe == fine.moe                         # E, k x 4, width / 4
    assert activation_ratio(segmented(base, 4)) == activation_ratio(base)
    assert granularity(segmented(base, 4)) == 4 * granularity(base)
    with pytest.raises(ValueError, match="top_k=9 must be in 1..num_experts=8"):
        at_active_compute(base, top_k=9)
    with pytest.raises(ValueError, match="top_k \\+ shared = 64 .* use top_k \\+ shared <= 32"):
        at_active_compute(base, num_experts=256, top_k=64)
    with pytest.raises(ValueError, match=r"factor=0.3: .* numbers; use one of \['0.5', '2', '4', '8'\]"):
        segmented(base, 0.3)


def test_more_experts_at_fixed_active_compute_cost_parameters_not_flops():
    ex = SparsityExplorer("tiny", cluster="h100x8")
    before = ex.row()
    assert ex.set(num_experts=32)                   # top_k stays 2: same width, 4x the experts
    after = ex.row()
    assert after["expert_flops_per_token"] == before["expert_flops_per_token"]
    assert after["params_total"] > 3 * before["params_total"]
    assert after["params_active"] - before["params_active"] == 4 * 128 * (32 - 8)   # the routers grow only
    assert after["memory_per_device"] > before["memory_per_device"] and after["fits"]
    assert after["comm_per_step"] > before["comm_per_step"]          # bigger gradients to reduce
    assert after["leverage"] > before["leverage"]   # lower activation ratio at the same G
    assert ex.refine(4) and ex.design == (128, 8, 0) and ex.row()["d_expert"] == 32   # finer, same A
    assert ex.row()["activation"] == after["activation"]
    assert ex.row()["expert_flops_per_token"] == before["expert_flops_per_token"]
    assert not ex.refine(0.3) and "factor=0.3" in ex.error and ex.design == (128, 8, 0)
    assert not ex.set(top_k=400) and "top_k=400" in ex.error and ex.knobs["num_experts"] == 128   # kept
    assert not ex.set(cluster="h100x64") and "train.batch_size=32" in ex.error and ex.cluster.num_devices == 8
    assert ex.set(num_experts=8, top_k=2, cluster="h100x16")         # twice the devices, half the batch
    assert ex.row()["memory_per_device"] < before["memory_per_device"]
    rows = ex.sweep([(8, 2, 0), (32, 8, 0), (32, 7, 1)])
    assert [r["design"] for r in rows] == ["E8 k2 s0", "E32 k8 s0", "E32 k7 s1"]
    assert rows[1]["granularity"] == 4 * rows[0]["granularity"] == rows[2]["granularity"]
    with pytest.raises(ValueError, match="unknown knob"):
        ex.set(experts=8)


class _Trainer:
    """Stands in for `toolkit.training.Trainer` (notebook 05's test trains for real): steps
    through `train.steps`, asking the callback, and reports a loss that falls per step."""

    configs = []

    def __init__(self, cfg, *, devices, progress):
        self.cfg = cfg
        self.configs.append(cfg)

    def run(self, callback):
        for step in range(1, self.cfg.train.steps + 1):
            if callback(self, {"step": step, "ce": 3.0}) is False:
                break
        return {"steps": step, "final_val_loss": 4.0 - step / 10}


def test_training_a_design_records_its_loss_per_steps_and_caches_it(monkeypatch):
    monkeypatch.setattr(sparsity_module, "Trainer", _Trainer)
    ex = SparsityExplorer("tiny")
    seen = []
    assert ex.train(5, on_step=lambda rec: seen.append(rec["step"])) == pytest.approx(3.5)
    cfg = _Trainer.configs[-1]
    assert seen == [1, 2, 3, 4, 5] and ex.losses == {(8, 2, 0): {5: pytest.approx(3.5)}}
    assert cfg.parallel == ParallelConfig() and (cfg.train.steps, cfg.train.eval_every) == (5, 0)
    assert ex.set(num_experts=32, top_k=8)
    ex.train(10, stop=lambda: len(seen) >= 8, on_step=lambda rec: seen.append(rec["step"]))   # 3 of 10
    assert _Trainer.configs[-1].moe.d_expert == 32 and ex.losses[(32, 8, 0)] == {3: pytest.approx(3.7)}
    assert (ex.row()["val_loss"], ex.row()["val_steps"]) == (pytest.approx(3.7), 3)
    assert ex.row((16, 4, 0))["val_loss"] is None
    monkeypatch.setattr(sparsity_module, "Trainer", None)           # seen before: must not train
    assert ex.set(num_experts=8, top_k=2) and ex.train(5) == pytest.approx(3.5)
    big = SparsityExplorer("ling_mini_2")                           # 16B: 200+ GB a GPU in plain EP x DP
    assert not big.row()["fits"] and "(over HBM)" in design_html([big.row()])
    with pytest.raises(ValueError, match="16,256M parameters; training here is for designs under 100M"):
        big.train(2)


def test_the_view_forwards_knobs_and_snaps_back_refused_ones():
    view = SparsityExplorerView(SparsityExplorer("tiny"), designs=[(32, 8, 0)])
    first_plot, first_table = view.plot.value, view.table.value
    assert first_plot[:4] == b"\x89PNG" and "E32 k8 s0" in first_table
    view.knobs["num_experts"].value = 16
    assert view.ex.design == (16, 2, 0) and "E16 k2 s0" in view.table.value and view.plot.value != first_plot
    view.knobs["top_k"].value = 20
    assert "top_k=20" in view.message.value and view.knobs["top_k"].value == 2
    view.knobs["cluster"].value = "h100x64"
    assert "batch_size" in view.message.value and view.knobs["cluster"].value == "h100x8"
    view.finer.click()
    assert view.ex.design == (32, 4, 0) and view.knobs["top_k"].value == 4 and view.message.value == ""
    el = view.ex.row()["leverage"]
    view.knobs["compute"].value = 1e24
    assert view.ex.row()["leverage"] > el and f"{view.ex.row()['leverage']:.2f}" in view.table.value


def test_the_view_trains_in_a_thread_and_shows_failures(monkeypatch):
    ex = SparsityExplorer("tiny")
    view = SparsityExplorerView(ex)

    def train(steps, *, stop, on_step):                  # the state's training, without compiling
        on_step({"step": 1, "ce": 3.25})
        assert view.status.value == "training E8 k2 s0: step 1/7, train loss 3.250"
        assert view.train_button.disabled and not view.stop_button.disabled and not stop()
        ex.losses[ex.design] = {steps: 2.5}
        return 2.5

    monkeypatch.setattr(ex, "train", train)
    assert view.start(7)
    view.wait(60)
    assert view.status.value == "E8 k2 s0: validation loss 2.500" and "2.500 (7 steps)" in view.table.value
    assert not view.train_button.disabled and view.stop_button.disabled
    monkeypatch.setattr(ex, "train", lambda steps, **_: 1 / 0)
    assert view.start(3)
    view.wait(60)
    assert "training E8 k2 s0 failed: division by zero" in view.message.value


def test_figures_draw_the_numbers_they_are_given():
    fig = leverage_curve(1e21, granularities=(2, 12), mark=(0.25, 2))
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines if not ln.get_label().startswith("_")] == \
        ["G = 2", "G = 12", "this design"]
    assert lines[2].get_ydata()[0] == pytest.approx(efficiency_leverage(0.25, 2, 1e21))
    rows = SparsityExplorer("tiny").sweep([(8, 2, 0), (32, 8, 0)])
    axes = design_bars(rows).axes
    assert len(axes) == 4
    heights = [p.get_height() for p in axes[0].patches]           # total then active, per design
    assert heights == pytest.approx([r["params_total"] / 1e6 for r in rows] +
                                    [r["params_active"] / 1e6 for r in rows])
    sent = [p.get_height() for p in axes[3].patches]
    assert sent == pytest.approx([r["comm_per_step"] / 1e6 for r in rows])

"""Ling's efficiency-leverage law, designs at equal active compute, and the planner's widget state."""

import matplotlib
import pytest

from toolkit.analysis.scaling import (
    activation_ratio,
    at_active_compute,
    efficiency_leverage,
    granularity,
    optimal_granularity,
)
from toolkit.config import preset
from toolkit.viz.costs import design_bars, leverage_curve, plan_breakdown
from toolkit.widgets import PlanningExplorer, PlanningExplorerView, SparsityExplorer, SparsityExplorerView

matplotlib.use("Agg")


def test_efficiency_leverage_reproduces_the_papers_statements():
    assert efficiency_leverage(0.031, 12, 1e22) == pytest.approx(7.24, abs=0.02)     # "> 7x"
    assert optimal_granularity() == pytest.approx(11.3, abs=0.05)                   # "around 12"
    assert efficiency_leverage(1.0, 12, 1e22) == pytest.approx(1.0, abs=0.02)       # dense: no leverage
    assert efficiency_leverage(0.031, 12, 1e23) > efficiency_leverage(0.031, 12, 1e21)  # grows with C
    with pytest.raises(ValueError, match="activation ratio"):
        efficiency_leverage(0.0, 12, 1e22)


def test_ling_mini_design_numbers():
    cfg = preset("ling_mini_2")
    assert activation_ratio(cfg) == pytest.approx(9 / 257)
    assert granularity(cfg) == 8.0


def test_at_active_compute_keeps_the_active_width():
    base = preset("tiny")
    fine = at_active_compute(base, num_experts=32, top_k=8)
    assert fine.moe.d_expert * 8 == base.moe.d_expert * 2
    shared = at_active_compute(base, num_experts=32, top_k=7, num_shared_experts=1)
    assert shared.moe.d_expert * 8 == base.moe.d_expert * 2
    with pytest.raises(ValueError, match="top_k=9 must be in 1..num_experts=8"):
        at_active_compute(base, top_k=9)


def test_sparsity_explorer_more_experts_same_flops_more_parameters():
    ex = SparsityExplorer("tiny", devices=8)
    before = ex.row()
    ex.set(num_experts=32)                          # top_k stays 2: same width, 4x the experts
    after = ex.row()
    assert after["expert_flops_per_token"] == before["expert_flops_per_token"]
    assert after["params_total"] > 3 * before["params_total"] / 2
    assert after["params_active"] - before["params_active"] == 4 * 128 * (32 - 8)   # the routers grow only
    assert after["leverage"] > before["leverage"]   # lower activation ratio at the same G
    ex.set(top_k=33)
    assert "top_k=33" in ex.error and ex.design["num_experts"] == 32       # the old design stays
    rows = ex.sweep([(8, 2, 0), (32, 8, 0)])
    assert [r["design"] for r in rows] == ["E8 k2 s0", "E32 k8 s0"]
    assert rows[1]["granularity"] == 4 * rows[0]["granularity"]


def test_sparsity_explorer_trains_a_design():
    ex = SparsityExplorer("tiny", overrides=["model.num_layers=1", "train.batch_size=4", "model.seq_len=32",
                                             "data.max_code_bytes=300000", "train.eval_batches=1"])
    loss = ex.train(steps=2)
    assert 0 < loss < 10 and ex.row()["val_loss"] == loss


def test_planning_explorer_ranks_and_reports_errors():
    pe = PlanningExplorer("qwen3_30b_a3b", cluster="h100x16", global_batch="256K", top=4)
    rows = pe.rows()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows == sorted(rows, key=lambda r: r["step_s"])
    pe.select(2)
    assert pe.plan is pe.plans[1] and set(pe.breakdown()["memory"]) >= {"params", "activations"}
    pe.set(cluster="h100x2")
    assert pe.plans == [] and "does not fit on h100x2" in pe.error
    pe.set(cluster="h900x8")
    assert "devices: h100" in pe.error
    with pytest.raises(ValueError, match="unknown knob"):
        pe.set(gpus=8)


def test_views_and_figures_follow_the_state():
    sv = SparsityExplorerView(SparsityExplorer("tiny"), designs=[(32, 8, 0)])
    first = sv.plot.value
    sv.knobs["num_experts"].value = 16
    assert sv.ex.design["num_experts"] == 16 and "E16 k2 s0" in sv.table.value and sv.plot.value != first
    sv.knobs["top_k"].value = 20
    assert "top_k=20" in sv.message.value
    pv = PlanningExplorerView(PlanningExplorer("qwen3_30b_a3b", cluster="h100x16", top=3))
    assert "plans that fit" in pv.table.value and pv.bars.value
    pv.knobs["count"].value = 2
    assert "does not fit" in pv.message.value and pv.table.value == ""
    assert leverage_curve(1e21, mark=(0.25, 2)).axes and design_bars(sv.ex.sweep([(8, 2, 0)])).axes
    assert plan_breakdown(PlanningExplorer("qwen3_30b_a3b", cluster="h100x16", top=1).plan).axes

"""The planner's widget state and view, without a browser: ranked plans, the breakdown of the
selected one, and planner errors shown as messages.

    .venv/bin/python -m pytest -q tests/test_toolkit/test_planning_widget.py

Qwen3-30B-A3B on 16 H100s with remat: about half a second per distinct input, nothing compiles.
"""

import matplotlib
import pytest

from toolkit.viz.costs import plan_breakdown
from toolkit.widgets import PlanningExplorer, PlanningExplorerView
from toolkit.widgets.planning import parse_fixed

matplotlib.use("Agg")
QWEN = dict(cluster="h100x16", global_batch="256K", top=4)


def test_parse_fixed_reads_axis_sizes_and_names_what_works():
    assert parse_fixed("tensor=2, expert=8") == {"tensor": 2, "expert": 8}
    assert parse_fixed("") == {} and parse_fixed({"fsdp": 4}) == {"fsdp": 4}
    with pytest.raises(ValueError, match="cannot read 'tensr=2'.* AXIS one of pipeline, data"):
        parse_fixed("tensr=2")
    with pytest.raises(ValueError, match="cannot read 'tensor=0'"):
        parse_fixed("tensor=0")


def test_planning_explorer_ranks_breaks_down_constrains_and_reports_errors():
    pe = PlanningExplorer("qwen3_30b_a3b", **QWEN)
    rows = pe.rows()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4] and pe.error == ""
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    assert "best: " in pe.explanation() and rows[0]["layout"] in pe.explanation()
    pe.select(2)
    parts = pe.breakdown()
    assert pe.plan is pe.plans[1] and set(parts) == {"memory", "communication", "time"}
    assert sum(parts["memory"].values()) == pytest.approx(pe.plan.memory_bytes / 1e9, rel=0.1)
    assert parts["communication"] and all(v > 0 for v in parts["communication"].values())
    assert not any(k.startswith("overlapped_") for k in parts["time"])
    fig = plan_breakdown(parts, pe.plan.label)                     # the bars draw these numbers
    assert len(fig.axes) == 3 and fig._suptitle.get_text() == pe.plans[1].label
    for ax, kind in zip(fig.axes, ("memory", "communication", "time"), strict=True):
        assert [p.get_width() for p in ax.patches] == pytest.approx(list(parts[kind].values()))
    with pytest.raises(ValueError, match="rank 5: choose 1..4"):
        pe.select(5)
    pe.set(fixed="tensor=2")
    assert pe.plans and all(p.cfg.parallel.tensor == 2 for p in pe.plans) and pe.selected == 0
    pe.set(fixed={"tensor": 3})
    assert pe.plans == [] and "tensor=3 cannot hold" in pe.error and pe.breakdown() == {}
    pe.set(fixed="", cluster="h100x2")
    assert pe.plans == [] and "does not fit on h100x2" in pe.error and "use about" in pe.error
    assert pe.explanation() == pe.error
    pe.set(cluster="h900x8")
    assert "devices: h100" in pe.error
    pe.set(cluster="h100x16", global_batch="lots")
    assert "global batch 'lots'" in pe.error
    with pytest.raises(ValueError, match="unknown knob"):
        pe.set(gpus=8)


def test_planning_view_shows_plans_bars_and_errors():
    pv = PlanningExplorerView(PlanningExplorer("qwen3_30b_a3b", **QWEN))
    assert (pv.knobs["device"].value, pv.knobs["count"].value, pv.knobs["spec"].value) == ("h100", 16, "")
    assert "plans that fit" in pv.table.value and "best: " in pv.text.value
    assert pv.bars.value[:4] == b"\x89PNG"
    first = pv.bars.value
    pv.rank.value = 3
    assert pv.ex.selected == 2 and pv.bars.value != first
    pv.knobs["count"].value = 2
    assert "does not fit" in pv.message.value and pv.table.value == "" and pv.bars.layout.display == "none"
    pv.knobs["spec"].value = "h100x16"                              # the spec box wins over device x count
    assert pv.ex.inputs["cluster"] == "h100x16" and pv.ex.plans and pv.message.value == ""
    assert pv.rank.value == 1 and pv.bars.layout.display is None
    pv.knobs["fixed"].value = "tensr=2"
    assert "cannot read" in pv.message.value
    spec = PlanningExplorerView(PlanningExplorer("qwen3_30b_a3b", cluster="v5p-8", remat=(False, True),
                                                 fixed={"expert": 4}))
    assert spec.knobs["spec"].value == "v5p-8" and spec.knobs["fixed"].value == "expert=4"
    assert spec.knobs["remat"].value == (False, True) and "does not fit on v5p-8" in spec.message.value


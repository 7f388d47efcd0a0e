"""The parallelism explorer without a browser: its state driven directly, its view built.

    .venv/bin/python -m pytest -q tests/test_toolkit/test_parallelism_explorer.py

Five compiles in all (a train step, two blocks, the equivalence pair), on a micro model.
"""

import pytest
from jax.sharding import PartitionSpec as P

from toolkit.sharding import RECIPES, logical_to_spec, recipe_rules
from toolkit.widgets import VIEWS, ParallelismExplorer, ParallelismExplorerView, recipes_table
from toolkit.widgets.parallelism import spec_text
from toolkit.widgets.parallelism_view import sharding_html

MICRO = ["model.num_layers=1", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.head_dim=8", "model.d_ff=64", "model.seq_len=16", "train.batch_size=8",
         "moe.num_experts=8", "moe.d_expert=32", "data.max_code_bytes=300000"]
# Every axis takes its role, no FSDP: the HLO bytes of the exchange equal the formulas.
TP_EP = {"data": 2, "tensor": 2, "expert": 2, "recipe": "fsdp_tp_ep"}


def _explorer(**choices):
    return ParallelismExplorer("tiny", overrides=MICRO, **choices)


def _row(rows, path):
    return next(r for r in rows if r["path"] == path)


@pytest.fixture(scope="module")
def inspected():
    ex = _explorer(**TP_EP)
    ex.inspect()
    ex.communication()
    return ex


def test_recipes_table_lists_every_recipe():
    rows = {r["logical"]: r for r in recipes_table()}
    assert set(RECIPES) <= set(rows["expert"])
    assert rows["expert"]["ep"] == "expert" and rows["expert"]["folded"] == "expert*tensor"
    assert rows["heads"]["tp"] == "tensor" and rows["heads"]["ep"] == ""
    assert rows["embed"]["fsdp"] == "fsdp" and rows["batch"]["dp"] == "data"


@pytest.mark.parametrize("recipe,mesh", [("ep", {"data": 2, "expert": 4}), ("fsdp", {"data": 2, "fsdp": 4}),
                                         ("folded", {"data": 2, "tensor": 2, "expert": 2})])
def test_sharding_table_follows_the_rules(recipe, mesh):
    ex = _explorer(recipe=recipe, **mesh)
    assert ex.error is None, ex.error
    rows = ex.sharding_table()
    rules = recipe_rules(recipe)
    for r in rows:
        spec = logical_to_spec(r["logical"], rules) if r["logical"] else P()
        assert r["spec"] == spec_text(spec), r["path"]
        assert all(g % s == 0 for g, s in zip(r["shape"], r["shard"], strict=True))
    w_gate = _row(rows, "blocks.0.ffn.experts.w_gate")
    table = _row(rows, "embed.table")
    assert w_gate["shape"] == (8, 32, 32) and w_gate["logical"] == ("expert", "expert_embed", "expert_mlp")
    if recipe == "ep":        # whole experts per device, the rest replicated
        assert w_gate["spec"] == "P('expert', None, None)" and w_gate["shard"] == (2, 32, 32)
        assert table["split"] == 1 and table["shard"] == table["shape"]
    elif recipe == "fsdp":    # the model width split 4 ways
        assert w_gate["spec"] == "P(None, 'fsdp', None)" and w_gate["shard"] == (8, 8, 32)
        assert table["spec"] == "P('pipeline', 'fsdp')" and table["shard"] == (264, 8)
    else:                     # experts over expert x tensor, attention heads over tensor
        assert w_gate["spec"] == "P(('expert', 'tensor'), 'fsdp', None)" and w_gate["split"] == 4
        assert _row(rows, "blocks.0.attn.w_q")["shard"] == (32, 2, 8)
    assert "<td" in sharding_html(rows) and ex.sharding_table() is rows     # cached per config


def test_an_invalid_choice_leaves_validates_message():
    ex = _explorer(**TP_EP)
    ex.set(expert=3)
    assert ex.cfg is None and "parallel mesh (data=2,tensor=2,expert=3) has 12 devices" in ex.error
    assert ex.sharding_table() is None and ex.inspect() is None and ex.equivalence() is None
    assert "fix the config" in ex.summary()
    ex.set({"parallel.expert": 4, "parallel.tensor": 1, "parallel.recipe": "dp"})
    assert "parallel.recipe='dp' does not use mesh axis expert=4" in ex.error
    ex.set(recipe="ep")
    assert ex.error is None and ex.overrides() == ["parallel.data=2", "parallel.expert=4",
                                                   "parallel.recipe=ep"]
    assert ex.options("parallel.fsdp") == (-1, 1, 2, 4, 8)
    with pytest.raises(ValueError, match="'experts' is not a choice"):
        ex.set(experts=2)


def test_capacity_equivalence_on_the_mesh_and_one_device():
    # Capacity is per dispatch group: one device must dispatch in the mesh's 8 groups.
    ex = _explorer(data=2, expert=4, recipe="ep", dispatch="capacity", capacity_factor=1.0)
    assert ex.dispatch_groups() == 8 and ex.single_device_config().moe.dispatch_groups == 8
    result = ex.equivalence()
    assert result["loss_diff"] < 1e-5 and result["grad_diff"] < 1e-5, result
    assert result["dispatch_groups"] == result["single_dispatch_groups"] == 8
    assert len(result["grads"]) == len(ex.sharding_table())
    assert max(g["max_abs"] for g in result["grads"]) > 1e-3      # the gradients are not all 0
    assert ex.cached("equivalence") is result


def test_inspect_memory_and_communication(inspected):
    info = inspected.inspect()
    assert info["recipe"] == "fsdp_tp_ep" and info["mesh"] == "data=2,tensor=2,expert=2"
    assert info["param_bytes"] == sum(r["bytes"] for r in inspected.sharding_table())
    assert {"all-reduce", "all-gather", "reduce-scatter"} <= set(info["collectives"])
    rows = inspected.communication()
    assert {(r["kind"], r["what"].split()[0]) for r in rows} == {
        ("all-gather", "expert"), ("reduce-scatter", "expert"), ("all-reduce", "tensor")}
    for r in rows:
        assert r["measured_bytes"] == r["analytic_bytes"] > 0, r


def test_view_renders_cached_results_and_forwards(inspected):
    view = ParallelismExplorerView(inspected)
    assert set(view.panes) == set(VIEWS)
    assert "collectives in the compiled step" in view.panes["inspect"].value
    assert "tensor parallelism per dense layer" in view.panes["communication"].value
    assert "press <b>Check equivalence</b>" in view.panes["equivalence"].value    # not computed
    assert view.panes["sharding"].value.count("<tr>") == len(inspected.sharding_table()) + 1
    assert view.choices["moe.capacity_factor"].layout.display == "none"           # dropless
    view.choices["parallel.expert"].value = 4
    assert inspected.cfg is None and "has 16 devices" in view.error.value
    assert "fix the config" in view.panes["inspect"].value and view.inspect_button.disabled
    assert not view.start()
    view.choices["parallel.expert"].value = 2
    assert view.error.value == "" and "collectives" in view.panes["inspect"].value     # cached
    assert view.start(("inspect", "communication"))
    view.wait(60)
    assert view.failure is None and not view.inspect_button.disabled
    view.choices["moe.dispatch"].value = "capacity"
    assert inspected.cfg.moe.dispatch == "capacity" and "--set moe.dispatch=capacity" in view.status.value
    assert view.choices["moe.capacity_factor"].layout.display is None
    assert "press <b>Compile &amp; inspect</b>" in view.panes["inspect"].value
    view.choices["moe.dispatch"].value = "dropless"
    assert "collectives" in view.panes["inspect"].value

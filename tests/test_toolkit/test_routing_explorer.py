"""The routing explorer without a browser: its renderers as values, its state driven directly.

    .venv/bin/python -m pytest -q tests/test_toolkit/test_routing_explorer.py
"""

import re

import jax
import numpy as np
import pytest
from conftest import micro

from toolkit.analysis.routing import inter_layer_affinity, inter_layer_mutual_information
from toolkit.data import ByteTokenizer
from toolkit.data.tokenizer import BOS
from toolkit.training import Trainer
from toolkit.viz import (
    affinity_heatmap,
    byte_glyphs,
    colored_text_html,
    expert_colors,
    experts_per_token_bars,
    load_over_steps_heatmap,
    routing_series,
)
from toolkit.widgets import FIGURES, RoutingExplorer, RoutingExplorerView, expert_names, top_expert

ONE = jax.devices()[:1]


def _cfg(**moe):
    return micro(model={"seq_len": 32}, moe=moe,
                 train={"steps": 6, "warmup_steps": 1, "eval_batches": 1})


def _expert_of_spans(html_text: str) -> list:
    return [int(e) for e in re.findall(r'<span class="tok" data-expert="(-?\d+)"', html_text)]


# -- renderers, as values ------------------------------------------------------------------
def test_top_expert_is_the_first_valid_slot():
    ids_lbsk = np.array([[[[2, 0], [-1, 3], [-1, -1]]]])       # [L=1, B=1, S=3, k=2]
    np.testing.assert_array_equal(top_expert(ids_lbsk), [[[2, 3, -1]]])


def test_expert_names_follow_the_routed_ids():
    cfg = micro(moe={"num_experts": 2, "zero_experts": 1, "copy_experts": 1, "constant_experts": 1})
    assert expert_names(cfg) == ["E0", "E1", "Z0", "C0", "K0"]


def test_byte_glyphs_make_every_byte_visible():
    tokens = ByteTokenizer().encode("a\n\t\x01é€", bos=True)
    assert byte_glyphs(tokens) == ["␂", "a", "↵", "→", "·", "é", "", "€", "", ""]
    assert byte_glyphs([0xC3, 0x41]) == ["·", "A"]      # a cut UTF-8 sequence


def test_colored_text_has_one_span_per_byte_on_its_expert():
    tokens_s = np.concatenate([[BOS], ByteTokenizer().encode('<b>&"\nx')])
    top_ls = np.array([[0, 1, 2, 3, 0, 1, 2, -1], [3, 3, 3, 3, 3, 3, 3, 3]])
    html_text = colored_text_html(tokens_s, top_ls, layer_names=["L0", "L1"],
                                  expert_names=["E0", "E1", "E2", "E3"], title="prose")
    assert _expert_of_spans(html_text) == top_ls.reshape(-1).tolist()
    glyphs = re.findall(r'<span class="tok"[^>]*>(.*?)</span>', html_text)
    assert glyphs[:8] == ["␂", "&lt;", "b", "&gt;", "&amp;", "&quot;", "↵", "x"]   # escaped
    colors = expert_colors(4)
    first = re.search(r'<span class="tok" data-expert="0" style="background:(#[0-9a-f]{6})"', html_text)
    assert first.group(1) == colors[0]
    assert html_text.count("<br>") == 2                 # the newline, once per layer
    assert "no expert" in html_text and "prose" in html_text and ">L1<" in html_text
    with pytest.raises(ValueError, match=r"expected \[layers, 8\]"):
        colored_text_html(tokens_s, top_ls[:, :5])
    with pytest.raises(ValueError, match="expert_names has 2 entries"):
        colored_text_html(tokens_s, top_ls, expert_names=["E0", "E1"])


def test_expert_colors_are_distinct_hex():
    for n in (4, 12, 30):
        colors = expert_colors(n)
        assert len(set(colors)) == n and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors)


def test_figures_show_their_data():
    counts_sle = np.array([[[3, 1], [2, 2]], [[4, 0], [1, 3]], [[2, 2], [0, 4]]], np.float64)
    fig = load_over_steps_heatmap(counts_sle, steps=[10, 20, 30], layer_names=["L0", "L1"])
    shown_es = fig.axes[1].images[0].get_array()        # layer 1: [experts, steps] shares
    np.testing.assert_allclose(shown_es.sum(0), 1.0)
    np.testing.assert_allclose(shown_es[:, 0], [0.5, 0.5])
    hist_lk = np.array([[0.0, 0.7, 0.3], [0.1, 0.5, 0.4]])
    bars = [p.get_height() for p in experts_per_token_bars(hist_lk).axes[0].patches]
    np.testing.assert_allclose(bars, hist_lk.reshape(-1))
    p_lij = np.stack([np.eye(3), np.full((3, 3), 1 / 3)])
    assert len(affinity_heatmap(p_lij).axes[0].images) == 1
    assert len([a for a in affinity_heatmap(p_lij).axes if a.images]) == 2
    series = routing_series([1, 2], np.zeros((2, 2)), np.array([[2.0, 1.5], [1.8, 1.2]]))
    np.testing.assert_allclose(series.axes[1].lines[1].get_ydata(), [1.5, 1.2])
    with pytest.raises(ValueError, match="train at least one step"):
        load_over_steps_heatmap(np.zeros((0, 2, 4)))


# -- the state: knobs and config -------------------------------------------------------------
def test_knobs_follow_the_router_and_the_config():
    ex = RoutingExplorer(_cfg(), devices=ONE)
    keys = lambda: {k.key for k in ex.knobs()}
    assert "moe.top_p" not in keys() and "moe.aux_loss_weight" in keys()
    ex.set_router("top_p")
    assert {"moe.top_p", "moe.entropy_loss_weight"} <= keys()
    ex.set_router("expert_choice")
    assert "moe.aux_loss_weight" not in keys()       # balanced by construction
    assert "moe.zc_tau" not in keys() and "moe.capacity_factor" not in keys()
    ex.set_knob("moe.zero_experts", 1)
    ex.set_knob("moe.dispatch", "capacity")
    assert {"moe.zc_tau", "moe.capacity_factor"} <= keys()
    assert ex.overrides() == ["moe.router=expert_choice", "moe.zero_experts=1", "moe.dispatch=capacity"]
    assert ex.cfg.moe.num_routed == 5 and ex.error is None


def test_a_bad_knob_is_a_message_in_the_state():
    ex = RoutingExplorer(_cfg(), devices=ONE)
    ex.set_knob("moe.top_k", 9)
    assert "moe.top_k=9 exceeds moe.num_experts=4; use 1..4" in ex.error
    assert ex.cfg is None and ex.step() is None and ex.trainer is None
    assert ex.status == "fix the config to train"
    ex.set_knob("moe.top_k", 2)
    assert ex.error is None and ex.cfg.moe.top_k == 2
    ex.set_knob("moe.top_k", 1.5)
    assert "moe.top_k=1.5 is not a valid int" in ex.error and ex.values["moe.top_k"] == 2
    ex.set_knob("moe.dispatch", "fast")
    assert "use one of ('dropless', 'capacity')" in ex.error
    ex.set_router("switch")
    assert "moe.router='switch' is unknown" in ex.error
    with pytest.raises(ValueError, match="not a knob"):
        ex.set_knob("model.d_model", 64)
    assert "moe.top_p=2.0 must be in (0, 1]" in RoutingExplorer(
        _cfg(), router="top_p", knobs={"moe.top_p": 2.0}, devices=ONE).error
    assert "unknown config key" in RoutingExplorer(_cfg(), overrides=["moe.topk=2"], devices=ONE).error


def test_view_without_a_run_says_so():
    view = RoutingExplorerView(RoutingExplorer(_cfg(), devices=ONE))
    assert all(view.figure(name) is None for name in FIGURES)
    assert "train a step or load a run" in view.render("load").data
    assert "two MoE layers" in view.render("affinity").data
    assert "train a step or load a run" in view.render("text").data
    assert "no run yet" in view.status.value and view.error.value == ""
    with pytest.raises(ValueError, match="figure 'loss' is unknown"):
        view.figure("loss")


# -- the state: a run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    ex = RoutingExplorer(_cfg(), router="top_p", knobs={"moe.top_p": 0.6}, devices=ONE)
    seen = []
    assert ex.train(10, stop=lambda: len(seen) >= 3, on_step=seen.append) == 3
    assert [r["step"] for r in seen] == [1, 2, 3]
    return ex


def test_series_over_steps(trained):
    s = trained.trainer.step_num
    counts_sle = trained.load_over_steps()
    assert counts_sle.shape == (s, 2, 4) and trained.drop_rate().shape == (s, 2)
    np.testing.assert_array_equal(trained.steps(), np.arange(1, s + 1))
    tokens = 8 * 32
    # every routed assignment is counted once: tokens x mean experts per token, per layer
    np.testing.assert_allclose(counts_sle.sum(-1), tokens * trained.experts_per_token(), rtol=1e-6)
    assert (trained.experts_per_token() >= 1).all() and (trained.experts_per_token() <= 2).all()
    np.testing.assert_array_equal(trained.drop_rate(), 0.0)     # dropless


def test_probe_histogram_and_top_experts(trained):
    probed = trained.probe()
    assert set(probed) == {"prose", "code"}
    ids_lbsk = probed["code"]["expert_ids"]
    assert ids_lbsk.shape == (2, 8, 32, 2) and ids_lbsk.max() < 4
    hist_lk = trained.experts_per_token_histogram()
    assert hist_lk.shape == (2, 3)
    np.testing.assert_allclose(hist_lk.sum(-1), 1.0)
    assert (hist_lk[:, 0] == 0).all()                  # top-p keeps at least one expert
    all_ids = np.concatenate([p["expert_ids"] for p in probed.values()], axis=1)
    np.testing.assert_allclose(hist_lk @ np.arange(3), (all_ids >= 0).sum(-1).mean((1, 2)))
    tokens_s, top_ls = trained.top_experts(rows=2)["prose"]
    assert tokens_s.shape == (64,) and top_ls.shape == (2, 64)
    np.testing.assert_array_equal(top_ls[:, :32], probed["prose"]["expert_ids"][:, 0, :, 0])
    assert trained.probe() is probed                   # cached until the next step


def test_affinity_rows_are_distributions(trained):
    p_lij = trained.affinity()
    assert p_lij.shape == (1, 4, 4)
    assert trained.trainer.val_history[-1]["step"] == trained.trainer.step_num
    counts = np.asarray(trained.trainer.val_history[-1]["affinity_counts"])[0]
    np.testing.assert_allclose(p_lij[0].sum(-1)[counts.sum(-1) > 0], 1.0)


def test_one_moe_layer_has_no_layer_pairs():
    # the end-of-run report reads these from the JSON record, where [0, E, E] becomes []
    assert inter_layer_affinity([]).shape == (0, 0, 0)
    assert inter_layer_mutual_information([]).shape == (0,)
    assert inter_layer_mutual_information(np.zeros((0, 4, 4))).shape == (0,)


def test_view_renders_and_forwards(trained):
    view = RoutingExplorerView(trained, every=1)
    for name in FIGURES:
        assert bytes(view.images[name].value).startswith(b"\x89PNG"), name
    spans = _expert_of_spans(view.text.value)
    assert len(spans) == 2 * 2 * 32                    # 2 domains x 2 layers x 32 bytes
    assert view.knobs["moe.top_p"].layout.display is None
    view.router.value = "topk_softmax"
    assert trained.router == "topk_softmax" and trained.pending
    assert view.knobs["moe.top_p"].layout.display == "none" and "new run" in view.status.value
    view.router.value = "top_p"
    view.knobs["moe.top_k"].value = 8
    assert "moe.top_k=8 exceeds" in view.error.value and trained.cfg is None
    view.knobs["moe.top_k"].value = 2
    assert view.error.value == "" and not trained.pending
    before = trained.trainer.step_num
    assert view.start(1)
    view.wait(120)
    assert view.failure is None and trained.trainer.step_num == before + 1
    assert not view.train_button.disabled and view.stop_button.disabled


def test_training_stops_at_train_steps(trained):
    trained.train(100)
    assert trained.trainer.step_num == 6 and trained.step() is None
    assert "the run is done" in trained.status


def test_load_run_explores_a_saved_run(tmp_path):
    cfg = _cfg(router="sigmoid_bias")
    run = Trainer(cfg, out_dir=tmp_path / "run", devices=ONE, progress=False)
    run.advance()
    run.advance()
    run.save_checkpoint()
    ex = RoutingExplorer("tiny", devices=ONE)
    assert not ex.load_run(tmp_path / "nothing") and "no config.json" in ex.error
    assert ex.load_run(tmp_path / "run")
    assert ex.error is None and not ex.pending and ex.trainer.step_num == 2
    assert ex.router == "sigmoid_bias" and ex.values["moe.num_experts"] == 4
    assert ex.overrides() == ["moe.router=sigmoid_bias"]
    np.testing.assert_array_equal(ex.load_over_steps(), [h["expert_counts"] for h in run.history])
    tokens_s, top_ls = ex.top_experts()["code"]       # the probe runs on the restored weights
    assert top_ls.shape == (2, 32) and ((top_ls >= 0) & (top_ls < 4)).all()

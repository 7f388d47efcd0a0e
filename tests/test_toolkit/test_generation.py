"""KV-cached generation: equal to full recomputation, sampling, routing traces, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolkit.cli import main
from toolkit.config import apply_overrides, tiny
from toolkit.generation import (
    generate,
    generate_uncached,
    generation_config,
    generation_model,
    sample_logits,
    top_k_filter,
    top_p_filter,
)
from toolkit.models.transformer import Transformer
from toolkit.moe.layer import MoELayer

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.head_dim=8", "model.d_ff=64", "model.seq_len=32", "moe.num_experts=4", "moe.top_k=2",
         "moe.d_expert=32"]
MODELS = {
    # a dense block, then an MoE block with a shared expert; GQA (4 query, 2 kv heads);
    # trained with capacity dispatch, which generation replaces by dropless
    "moe_shared_gqa": ["moe.first_dense_layers=1", "moe.num_shared_experts=1",
                       "moe.dispatch=capacity", "moe.capacity_factor=1.0"],
    # router state between layers, routing before attention, q/k/v biases and q/k norm
    "stateful_router": ["moe.router=recurrent", "moe.recurrent_dim=16", "moe.gating_residual=true",
                        "moe.router_placement=pre_attention", "model.attention_bias=true",
                        "model.qk_norm=head"],
}
PROMPT = np.random.default_rng(0).integers(0, 256, (2, 5))


def _model(name, *extra):
    model = Transformer(apply_overrides(tiny(), SMALL + MODELS[name] + list(extra)), rngs=nnx.Rngs(0))
    for i, (path, var) in enumerate(nnx.iter_graph(model)):
        if path and path[-1] in ("b_q", "b_k", "b_v") and var is not None:   # zero at init: use them
            var.set_value(0.3 * jax.random.normal(jax.random.key(i), var.get_value().shape))
    return model


@pytest.fixture(scope="module")
def moe_model():
    return _model("moe_shared_gqa")


def _routing_of_full_forward(model, tokens_bt, monkeypatch):
    """(ids, weights) [L, B, S, k] every MoE layer's router chose in the ordinary forward."""
    seen, route = [], MoELayer.route

    def spy(self, x_btd, state=None):
        seen.append(route(self, x_btd, state))
        return seen[-1]

    graphdef, state = nnx.split(generation_model(model))
    monkeypatch.setattr(MoELayer, "route", spy)

    @jax.jit
    def forward(state, tokens_bt):
        seen.clear()
        nnx.merge(graphdef, state)(tokens_bt)
        b, s = tokens_bt.shape
        return (jnp.stack([jnp.where(r.valid, r.expert_ids, -1).reshape(b, s, -1) for r in seen]),
                jnp.stack([r.weights.reshape(b, s, -1) for r in seen]))

    return forward(state, jnp.asarray(tokens_bt))


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_cached_generation_equals_full_recomputation(name, moe_model, monkeypatch):
    model = moe_model if name == "moe_shared_gqa" else _model(name)
    cached = generate(model, PROMPT, 6)
    full = generate_uncached(model, PROMPT, 6)
    np.testing.assert_array_equal(cached.tokens_bt, full.tokens_bt)
    np.testing.assert_array_equal(cached.tokens_bt[:, :5], PROMPT)
    np.testing.assert_allclose(cached.logits_bnv, full.logits_bnv, atol=2e-5, rtol=1e-5)
    # the routing of every position, prompt (prefill) and generated, is the full forward's
    assert cached.expert_ids_lbsk.shape == cached.weights_lbsk.shape == (2 if name != "moe_shared_gqa"
                                                                        else 1, 2, 11, 2)
    np.testing.assert_array_equal(cached.expert_ids_lbsk, full.expert_ids_lbsk)
    if name != "moe_shared_gqa":
        return
    ids, weights = _routing_of_full_forward(model, cached.tokens_bt, monkeypatch)
    np.testing.assert_array_equal(cached.expert_ids_lbsk, ids)
    np.testing.assert_allclose(cached.weights_lbsk, weights, atol=1e-5)
    np.testing.assert_allclose(cached.weights_lbsk.sum(-1), 1.0, atol=1e-5)     # renormalised top-2


def test_a_pipeline_stacked_model_is_converted_to_listed_blocks():
    listed = ["moe.num_shared_experts=1"]
    twin = generation_model(Transformer(apply_overrides(tiny(), SMALL + listed), rngs=nnx.Rngs(0)))
    pipeline = ["parallel.pipeline=2", "parallel.data=1"]
    stacked = Transformer(apply_overrides(tiny(), SMALL + listed + pipeline), rngs=nnx.Rngs(0))
    assert stacked.stages is not None
    converted = generation_model(stacked)
    assert converted.stages is None and converted.cfg == twin.cfg
    assert converted.cfg.parallel.pipeline == 1 and converted.cfg.moe.dispatch == "dropless"
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(converted)),
                 nnx.to_pure_dict(nnx.state(twin)))


def test_sampling_is_deterministic_per_seed_and_top_k_1_is_greedy(moe_model):
    greedy = generate(moe_model, PROMPT, 6)
    draw = dict(temperature=1.0, top_p=0.95)
    one = generate(moe_model, PROMPT, 6, seed=3, **draw)
    again = generate(moe_model, PROMPT, 6, seed=3, **draw)
    np.testing.assert_array_equal(one.tokens_bt, again.tokens_bt)
    other = generate(moe_model, PROMPT, 6, seed=4, **draw)
    assert (one.new_tokens_bn != other.new_tokens_bn).any()
    assert (one.new_tokens_bn != greedy.new_tokens_bn).any()
    top1 = generate(moe_model, PROMPT, 6, temperature=1.5, top_k=1, seed=5)
    np.testing.assert_array_equal(top1.tokens_bt, greedy.tokens_bt)


def test_top_p_keeps_the_smallest_set_reaching_p_and_top_k_the_k_largest():
    probs = np.array([0.15, 0.5, 0.05, 0.2, 0.1])
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p))[0])))
    assert kept(0.5) == {1}                        # 0.5 alone reaches 0.5
    assert kept(0.6) == {1, 3}                     # 0.5 + 0.2
    assert kept(0.7) == {1, 3}
    assert kept(0.71) == {1, 3, 0}                 # 0.85
    assert kept(1.0) == {0, 1, 2, 3, 4}
    assert set(np.flatnonzero(np.isfinite(np.asarray(top_k_filter(logits, 2))[0]))) == {1, 3}
    keys = [jax.random.key(i) for i in range(20)]
    draws = {int(sample_logits(logits, k, temperature=1.0, top_p=0.6)[0]) for k in keys}
    assert draws <= {1, 3} and len(draws) == 2
    assert int(sample_logits(logits, keys[0])[0]) == 1          # temperature 0: argmax


def test_refused_models_and_inputs(moe_model):
    with pytest.raises(ValueError, match="expert_choice' cannot generate"):
        generation_config(apply_overrides(tiny(), SMALL + ["moe.router=expert_choice"]))
    with pytest.raises(ValueError, match="moe.gru_experts=1: GRU experts run a recurrence"):
        generation_config(apply_overrides(tiny(), SMALL + ["moe.gru_experts=1"]))
    with pytest.raises(ValueError, match="= 33 exceeds model.seq_len=32.*use max_new_tokens <= 27"):
        generate(moe_model, PROMPT, 28)
    with pytest.raises(ValueError, match="shorten the prompt to at most 31 tokens"):
        generate(moe_model, np.zeros((1, 32), np.int32), 1)
    with pytest.raises(ValueError, match="top_p=0 must be in"):
        generate(moe_model, PROMPT, 2, top_p=0)
    with pytest.raises(ValueError, match="prompt ids must lie in"):
        generate(moe_model, PROMPT + 300, 2)


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generates_from_a_trained_run_and_refuses_bad_input(tmp_path, capsys):
    run = tmp_path / "run"
    train = ["model.num_layers=1", "train.steps=2", "train.warmup_steps=1", "train.batch_size=8",
             "train.eval_batches=1", "data.max_code_bytes=300000"]
    code, _, err = _run(["train", "--preset", "tiny", "--out", str(run), "--no-progress"]
                        + ["--set=" + s for s in SMALL + train], capsys)
    assert code == 0, err[-2000:]
    code, out, err = _run(["generate", "--run", str(run), "--prompt", "def ", "--max-new-tokens", "6",
                           "--trace"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    head = lines.index("routing of each generated token (per MoE layer, expert:weight):")
    rows = lines[head + 1:]
    assert 1 <= len(rows) <= 6 and rows[0].split()[0] == "5"       # BOS + 4 prompt bytes first
    assert all(len(r.split(" L0: ")[1].split()) == 2 for r in rows), rows      # top-2 in layer 0
    bad = {
        "no run dir": (["--run", str(tmp_path / "nope"), "--prompt", "a"], "does not exist"),
        "no config": (["--run", str(tmp_path), "--prompt", "a"], "holds no run (no config.json)"),
        "empty prompt": (["--run", str(run), "--prompt", ""], "--prompt is empty"),
        "top_p=0": (["--run", str(run), "--prompt", "a", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
        "temperature<0": (["--run", str(run), "--prompt", "a", "--temperature", "-1"],
                          "temperature=-1.0 must be a number >= 0"),
        "temperature nan": (["--run", str(run), "--prompt", "a", "--temperature", "nan"],
                            "temperature=nan must be a number >= 0"),
        "top_k<0": (["--run", str(run), "--prompt", "a", "--top-k", "-2"], "top_k=-2 must be"),
        "no new tokens": (["--run", str(run), "--prompt", "a", "--max-new-tokens", "0"],
                          "max_new_tokens=0 must be a whole number >= 1"),
        "too long": (["--run", str(run), "--prompt", "a" * 30, "--max-new-tokens", "4"],
                     "= 35 exceeds model.seq_len=32"),
    }
    no_ckpt = tmp_path / "untrained"
    no_ckpt.mkdir()
    (no_ckpt / "config.json").write_text(json.dumps(json.loads((run / "config.json").read_text())))
    bad["no checkpoint"] = (["--run", str(no_ckpt), "--prompt", "a"], "holds no checkpoint")
    for what, (argv, message) in bad.items():
        code, out, err = _run(["generate", *argv], capsys)
        assert code == 2 and err.startswith("error: ") and message in err, (what, err)
        assert "Traceback" not in err and out == "", what
    assert not (no_ckpt / "checkpoints").exists()


def test_imported_hugging_face_model_generates_as_recomputation_and_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="builds the reference with torch (pip install -e '.[hf]')")
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[hf]')")
    from toolkit.interop import load_hf

    # Qwen2-MoE: a dense first layer, a gated shared expert, q/k/v biases; GQA
    hf = transformers.Qwen2MoeConfig(vocab_size=272, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_experts_per_tok=2, max_position_embeddings=64, num_experts=4,
                                     moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                     mlp_only_layers=[0])
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(hf).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():                  # O(1) random weights, so routing and biases matter
        for name, p in reference.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise if p.ndim == 1
                    else noise / np.sqrt(p.shape[-1]))
    reference.save_pretrained(tmp_path)
    _, model = load_hf(tmp_path)
    cached, full = generate(model, PROMPT, 5), generate_uncached(model, PROMPT, 5)
    np.testing.assert_array_equal(cached.tokens_bt, full.tokens_bt)
    np.testing.assert_allclose(cached.logits_bnv, full.logits_bnv, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(cached.expert_ids_lbsk, full.expert_ids_lbsk)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor(PROMPT), max_new_tokens=5, do_sample=False,
                                    pad_token_id=0).numpy()
    np.testing.assert_array_equal(cached.tokens_bt, theirs)

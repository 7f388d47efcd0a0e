"""Hugging Face MoE checkpoints in and out, against `transformers` itself (torch, CPU, fp32).

Tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models are built with transformers and
written with `save_pretrained`; the toolkit's import must give their logits, export must
round-trip bit-exactly and load back in transformers, and bad directories must be refused.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolkit.interop import HFError, check_hf, hf_config, load_hf, load_hf_params, save_hf

torch = pytest.importorskip("torch", reason="the parity tests build reference models with torch "
                                            "(pip install -e '.[hf]')")
transformers = pytest.importorskip("transformers", reason="the parity tests need transformers "
                                                          "(pip install -e '.[hf]')")

VOCAB = 272                 # >= the byte tokenizer's 259 ids, so the models can be fine-tuned
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
              max_position_embeddings=64)


def _hf_config(arch):
    if arch == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, head_dim=8, **COMMON)
    if arch == "qwen2_moe":      # layer 0 dense (mlp_only_layers), shared expert, q/k/v biases
        return transformers.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=24, mlp_only_layers=[0],
                                           **COMMON)
    if arch == "qwen3_moe":      # head_dim != hidden / heads, renormalised top-k
        return transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=16, head_dim=16,
                                           norm_topk_prob=True, **COMMON)
    return transformers.OlmoeConfig(num_experts=4, **COMMON)


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 12))


def _randomize(model):
    """Every weight random and O(1)-scaled (norm scales around 1, biases non-zero), so that
    routing, norms and biases all matter to the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]))


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (directory written by save_pretrained, the transformers model)."""
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch)).eval()
        _randomize(model)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        out[arch] = path, model
    return out


@nnx.jit
def _forward(model, tokens_bt):
    return model(tokens_bt)[0]


def _params(model):
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert np.array_equal(pa[key], pb[key]), key


def test_derived_configs(checkpoints):
    mixtral, qwen2, qwen3, olmoe = (hf_config(checkpoints[a][0]) for a in ARCHS)
    assert (mixtral.model.rope_theta, mixtral.moe.renormalize, mixtral.moe.num_experts,
            mixtral.moe.d_expert, mixtral.model.head_dim) == (1e6, True, 4, 48, 8)
    assert (qwen2.model.attention_bias, qwen2.moe.num_shared_experts, qwen2.moe.d_shared_expert,
            qwen2.moe.shared_expert_gate, qwen2.moe.first_dense_layers, qwen2.moe.renormalize,
            qwen2.moe.d_expert, qwen2.model.d_ff) == (True, 1, 24, True, 1, False, 16, 48)
    assert (qwen3.model.qk_norm, qwen3.model.head_dim, qwen3.moe.renormalize) == ("head", 16, True)
    assert (olmoe.model.qk_norm, olmoe.moe.renormalize, olmoe.model.norm_eps) == ("full", False, 1e-5)
    for cfg in (mixtral, qwen2, qwen3, olmoe):
        assert (cfg.model.dtype, cfg.moe.dispatch, cfg.moe.top_k) == ("float32", "dropless", 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_import_export_match_transformers(checkpoints, arch, tmp_path):
    path, hf_model = checkpoints[arch]
    expected = _logits(hf_model)
    cfg, model = load_hf(path)
    np.testing.assert_allclose(np.asarray(_forward(model, jnp.asarray(TOKENS))), expected, atol=1e-4,
                               rtol=1e-4)
    save_hf(model, cfg, tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["architectures"] == json.loads((path / "config.json").read_text())["architectures"]
    _, again = load_hf(tmp_path / "export")
    _assert_same_params(model, again)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    np.testing.assert_allclose(_logits(back), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fused_and_sharded_layouts_load(checkpoints, arch, tmp_path):
    from safetensors.numpy import save_file
    path, hf_model = checkpoints[arch]
    reference = load_hf_params(path, hf_config(path))
    # What transformers 5.x holds in memory: experts fused as gate_up_proj [E, 2I, H] and
    # down_proj [E, H, I] (Mixtral's block under `mlp`); save_pretrained splits them.
    fused = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(path / "config.json", tmp_path / "fused")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    cfg, model = load_hf(path)
    save_hf(model, cfg, tmp_path / "ours_fused", fused=True)
    for layout in ("fused", "sharded", "ours_fused"):
        got = load_hf_params(tmp_path / layout, cfg)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference), strict=True):
            assert np.array_equal(a, b), layout
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours_fused").eval()
    np.testing.assert_allclose(_logits(back), _logits(hf_model), atol=1e-4, rtol=1e-4)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _drop_tensor(path, name):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"))


def _reshape_tensor(path, name):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    tensors[name] = np.zeros((3, 32), np.float32)
    save_file(tensors, str(path / "model.safetensors"))


def _pickle_only(path):
    (path / "model.safetensors").rename(path / "pytorch_model.bin")


BAD = {
    "missing_dir": (lambda p: shutil.rmtree(p), "is not a directory"),
    "no_config": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "bad_json": (lambda p: (p / "config.json").write_text("{nope"), "is not valid JSON"),
    "unknown_arch": (lambda p: _edit_config(p, architectures=["LlamaForCausalLM"]),
                     "architectures=['LlamaForCausalLM'] (model_type='mixtral') is not supported"),
    "deepseek_mla": (lambda p: _edit_config(p, architectures=["DeepseekV3ForCausalLM"],
                                            q_lora_rank=1536, kv_lora_rank=512),
                     "DeepseekV3ForCausalLM uses multi-head latent attention (MLA"),
    "sliding_window": (lambda p: _edit_config(p, sliding_window=16),
                       "sliding_window=16 is not supported"),
    "rope_scaling": (lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                "rope_theta": 1e6}),
                     "rope scaling {'rope_type': 'yarn'"),
    "gelu": (lambda p: _edit_config(p, hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    "missing_shard": (lambda p: (p / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})),
        "lists shards that are not in"),
    "no_weights": (_pickle_only, "only safetensors are read, never pickled torch files"),
    "missing_tensor": (lambda p: _drop_tensor(p, "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
                       "lacks 1 tensor the config needs: "
                       "['model.layers.1.block_sparse_moe.experts.3.w2.weight']"),
    "wrong_shape": (lambda p: _reshape_tensor(p, "model.layers.0.self_attn.k_proj.weight"),
                    "tensor model.layers.0.self_attn.k_proj.weight has shape [3, 32], "
                    "expected [16, 32]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_are_refused(checkpoints, case, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints["mixtral"][0], path)
    spoil, message = BAD[case]
    spoil(path)
    with pytest.raises(HFError) as info:
        check_hf(path)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("arch,changes,message", [
    ("qwen2_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1] with decoder_sparse_step=1 makes "
                                            "layers [0] MoE"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0 (OLMoE's q/k/v clamping) is not supported"),
    ("qwen3_moe", {"attention_bias": True}, "also biases the output projection"),
])
def test_unexpressible_features_are_refused(checkpoints, arch, changes, message, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(checkpoints[arch][0], path)
    _edit_config(path, **changes)
    with pytest.raises(HFError, match=re.escape(message)):
        hf_config(path)


def test_export_refuses_what_the_architecture_cannot_hold(checkpoints, tmp_path):
    import dataclasses
    cfg, model = load_hf(checkpoints["mixtral"][0])
    sigmoid = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router="sigmoid_bias"))
    with pytest.raises(HFError, match="MixtralForCausalLM cannot hold this config: "
                                      "moe.router='sigmoid_bias' \\(needs 'topk_softmax'\\)"):
        save_hf(model, sigmoid, tmp_path, architecture="MixtralForCausalLM")
    with pytest.raises(HFError, match="Qwen2MoeForCausalLM cannot hold this config"):
        save_hf(model, cfg, tmp_path, architecture="Qwen2MoeForCausalLM")


def test_cli_inspect_and_fine_tune(checkpoints, tmp_path, capsys):
    import optax

    from toolkit.cli import main
    from toolkit.config import from_dict
    from toolkit.data import Batches, load_corpus
    path = checkpoints["qwen2_moe"][0]
    assert main(["inspect", "--hf", str(path)]) == 0
    out = capsys.readouterr().out
    assert "moe.d_shared_expert" in out and "parameters:" in out
    assert main(["inspect", "--hf", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    flags = ["--set", "train.steps=2", "--set", "train.batch_size=8", "--set", "model.seq_len=16",
             "--set", "train.warmup_steps=1", "--set", "train.eval_every=0",
             "--set", "data.max_code_bytes=300000", "--mesh", "data=2,fsdp=4", "--no-progress"]
    assert main(["train", "--init-from-hf", str(path), "--out", str(tmp_path / "run")] + flags) == 0
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # The first step's loss is the imported model's cross-entropy on that batch.
    cfg = from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    batch = Batches(load_corpus(cfg.data), seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size,
                    seed=cfg.train.seed, domain_weights=cfg.data.domain_weights).train(0)
    _, model = load_hf(path)
    logits = _forward(model, jnp.asarray(batch["tokens"]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["targets"])).mean()
    assert first["ce"] == pytest.approx(float(ce), rel=1e-5)


def test_pipelined_state_exports_as_listed_layers(checkpoints, tmp_path):
    import dataclasses

    from toolkit.models.transformer import stacked_blocks_state
    cfg, model = load_hf(checkpoints["qwen3_moe"][0])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    piped = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pipeline=2))
    save_hf(stacked_blocks_state(params, 1, 2), piped, tmp_path / "out")
    got = load_hf_params(tmp_path / "out", cfg)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        assert np.array_equal(a, np.asarray(b))
    with pytest.raises(HFError, match="already holds a sharded checkpoint"):
        (tmp_path / "out" / "model.safetensors.index.json").write_text("{}")
        save_hf(model, cfg, tmp_path / "out")

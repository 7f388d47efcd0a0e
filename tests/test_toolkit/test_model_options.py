"""Model options that Hugging Face MoE checkpoints need: q/k/v biases, q/k RMSNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro
from flax import nnx

from toolkit.analysis import count_params
from toolkit.config import ConfigError, ModelConfig, validate
from toolkit.models import Attention
from toolkit.models.layers import rope
from toolkit.models.transformer import Transformer
from toolkit.training.inspect import loss_and_grads


def _rms(x, axes, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=axes, keepdims=True) + eps) * scale


@pytest.mark.parametrize("qk_norm", ["", "head", "full"])
def test_attention_with_bias_and_qk_norm_matches_naive(qk_norm):
    cfg = ModelConfig(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                      qk_norm=qk_norm)
    attn = Attention(cfg, rngs=nnx.Rngs(1))
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    for key, name in zip(keys, ("b_q", "b_k", "b_v", "q_norm", "k_norm"), strict=False):
        if getattr(attn, name) is not None:      # non-trivial biases and scales
            v = getattr(attn, name)
            v.set_value(1 + jax.random.normal(key, v.get_value().shape))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 16))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    q = jnp.einsum("btd,dnh->btnh", x, attn.w_q[...]) + attn.b_q[...]
    k = jnp.einsum("btd,dkh->btkh", x, attn.w_k[...]) + attn.b_k[...]
    v = jnp.einsum("btd,dkh->btkh", x, attn.w_v[...]) + attn.b_v[...]
    if qk_norm:
        axes = -1 if qk_norm == "head" else (-2, -1)
        q, k = (_rms(q, axes, attn.q_norm[...], cfg.norm_eps),
                _rms(k, axes, attn.k_norm[...], cfg.norm_eps))
    q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(8)
    s = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), s, -jnp.inf)
    o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v)
    expect = jnp.einsum("btnh,nhd->btd", o, attn.w_o[...])
    np.testing.assert_allclose(attn(x, pos), expect, rtol=1e-5, atol=1e-5)


def test_defaults_add_no_parameters():
    attn = Attention(ModelConfig(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8),
                     rngs=nnx.Rngs(1))
    assert {p[0] for p, _ in nnx.to_flat_state(nnx.state(attn, nnx.Param))} == {
        "w_q", "w_k", "w_v", "w_o"}


def test_options_on_a_mesh_equal_single_device():
    # The "full" norm spans all heads, which tensor parallelism splits: the sum of squares
    # must be added over the tensor axis. The gated shared expert's width is split too.
    model = {"num_layers": 1, "qk_norm": "full", "attention_bias": True}
    moe = {"num_shared_experts": 1, "d_shared_expert": 48, "shared_expert_gate": True}
    one = loss_and_grads(micro(model=model, moe=moe), jax.devices()[:1])
    mesh = {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}
    tp = loss_and_grads(micro(model=model, moe=moe, parallel=mesh), jax.devices())
    assert tp[0] == pytest.approx(one[0], rel=1e-6, abs=1e-6)
    for a, b in zip(jax.tree.leaves(tp[1]), jax.tree.leaves(one[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("model,parallel,message", [
    ({"qk_norm": "layer"}, {}, "model.qk_norm='layer' is unknown"),
    ({"qk_norm": "full"}, {"data": 4, "tensor": 2, "recipe": "tp", "sequence_parallel": True},
     "model.qk_norm='full' with parallel.sequence_parallel"),
    ({"moe": {"shared_expert_gate": True}}, {}, "need a shared expert; set moe.num_shared_experts=1"),
    ({"moe": {"num_shared_experts": 1, "d_shared_expert": -4}}, {}, "moe.d_shared_expert=-4 must be >= 0"),
    ({"moe": {"num_shared_experts": 1, "d_shared_expert": 33}}, {"data": 4, "tensor": 2, "recipe": "tp"},
     "moe.d_shared_expert=33 is not divisible by mesh axis tensor=2"),
])
def test_bad_model_options_are_refused(model, parallel, message):
    moe = model.pop("moe", {})
    cfg = micro(model=model, moe=moe, parallel=parallel)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(cfg, num_devices=8)


@pytest.mark.parametrize("model,moe", [
    ({"attention_bias": True, "qk_norm": "head"}, {}),
    ({"qk_norm": "full"}, {"num_shared_experts": 1, "d_shared_expert": 48, "shared_expert_gate": True}),
    ({}, {"num_shared_experts": 2, "shared_expert_gate": True}),
], ids=["bias_head", "full_shared_width_gate", "gate"])
def test_param_count_covers_the_options(model, moe):
    cfg = micro(model=model, moe=moe)
    net = Transformer(cfg, rngs=nnx.Rngs(0))
    assert count_params(cfg)[0] == sum(x.size for x in jax.tree.leaves(nnx.state(net, nnx.Param)))
    shared = net.blocks[0].ffn.shared
    width = 0 if shared is None else shared.w_up.get_value().shape[1]
    assert width == cfg.moe.shared_width(cfg.model.d_ff)


def test_shared_expert_gate_scales_the_shared_output():
    cfg = micro(moe={"num_shared_experts": 1, "d_shared_expert": 48, "shared_expert_gate": True})
    layer = Transformer(cfg, rngs=nnx.Rngs(0)).blocks[0].ffn
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, cfg.model.d_model))
    y, _, _ = layer(x)
    gate = jax.nn.sigmoid(x @ layer.w_shared_gate[...])
    layer.w_shared_gate = None
    shared = layer.shared(x)
    layer.shared = None
    np.testing.assert_allclose(y, layer(x)[0] + gate * shared, rtol=1e-5, atol=1e-6)

"""The transformer: parameter counts, logical axes, attention, causality, layer pattern."""



import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro
from flax import nnx

from toolkit.analysis import count_params
from toolkit.config import ModelConfig, dense_twin
from toolkit.models import Attention
from toolkit.models.layers import rope
from toolkit.models.transformer import Transformer, moe_layer_indices
from toolkit.sharding import LOGICAL_AXES


@pytest.mark.parametrize("cfg", [
    micro(), micro(moe={"num_shared_experts": 2}), micro(moe={"moe_every": 2}),
    micro(model={"tie_embeddings": True, "num_layers": 3}, moe={"first_dense_layers": 1}),
    dense_twin(micro()),
], ids=["base", "shared", "every2", "tied_firstdense", "dense"])
def test_param_count_matches_the_model(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count_params(cfg)[0] == actual


def test_dense_twin_matches_active_params():
    cfg = micro()
    _, active = count_params(cfg)
    total_dense, active_dense = count_params(dense_twin(cfg))
    assert total_dense == active_dense
    router = cfg.model.d_model * cfg.moe.num_experts * cfg.model.num_layers
    assert active - active_dense == router


def test_every_parameter_carries_known_logical_axes():
    model = Transformer(micro(moe={"num_shared_experts": 1}), rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata()["logical_axes"]
        assert len(names) == var.get_value().ndim, path
        assert all(n is None or n in LOGICAL_AXES for n in names), (path, names)


def test_moe_layer_pattern():
    cfg = micro(model={"num_layers": 6}, moe={"moe_every": 2, "first_dense_layers": 2})
    assert moe_layer_indices(cfg) == [3, 5]
    assert moe_layer_indices(dense_twin(cfg)) == []
    _, aux = Transformer(cfg, rngs=nnx.Rngs(0))(jnp.zeros((2, 8), jnp.int32))
    assert aux.expert_counts.shape == (2, 4)


def test_attention_matches_naive_gqa():
    cfg = ModelConfig(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8)
    attn = Attention(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 16))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    q = rope(jnp.einsum("btd,dnh->btnh", x, attn.w_q[...]), pos, cfg.rope_theta)
    k = rope(jnp.einsum("btd,dkh->btkh", x, attn.w_k[...]), pos, cfg.rope_theta)
    v = jnp.einsum("btd,dkh->btkh", x, attn.w_v[...])
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(8)
    s = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), s, -jnp.inf)
    o = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v)
    expect = jnp.einsum("btnh,nhd->btd", o, attn.w_o[...])
    np.testing.assert_allclose(attn(x, pos), expect, rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_relative_position():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
    a = rope(x, jnp.array([[3]]), 10000.0)
    np.testing.assert_allclose(jnp.linalg.norm(a), jnp.linalg.norm(x), rtol=1e-6)
    q, k = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 1, 1, 8))
    dot = lambda i, j: float(jnp.sum(rope(q, jnp.array([[i]]), 1e4) * rope(k, jnp.array([[j]]), 1e4)))
    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_model_is_causal(dispatch):
    # Capacity dropping couples tokens through the shared slots, so use a roomy capacity.
    cfg = micro(moe={"dispatch": dispatch, "capacity_factor": 8.0})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 256)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
    a, _ = model(tokens)
    b, _ = model(changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_bfloat16_compute_keeps_float32_params():
    cfg = micro(model={"dtype": "bfloat16"})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(jnp.zeros((2, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_kernel_config_reaches_the_kernels():
    """`kernels.gmm`/`kernels.attention` pick the backends: the Pallas kernels (interpreted
    on CPU) appear in the program and give the XLA path's logits."""
    base = micro(model={"num_layers": 1, "seq_len": 16, "head_dim": 16})
    pallas = micro(model={"num_layers": 1, "seq_len": 16, "head_dim": 16},
                   kernels={"gmm": "pallas_gpu", "attention": "pallas_gpu"})
    tokens_bt = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    logits = {}
    for name, cfg in (("xla", base), ("pallas", pallas)):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        jaxpr = str(jax.make_jaxpr(lambda t, m=model: m(t)[0])(tokens_bt))
        # attention once, gmm twice (gate|up, down) in the one MoE layer
        assert jaxpr.count("pallas_call") == (3 if name == "pallas" else 0)
        logits[name] = model(tokens_bt)[0]
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-4, atol=1e-4)

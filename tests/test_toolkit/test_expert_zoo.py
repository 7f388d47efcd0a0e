"""Experts and layer structure: each variant's defining property against its definition.

MoE++ zero-computation experts and gating residuals, big/small, GRU and ReGLU experts,
BigMac, the sequence-level balance loss, and the multi-token-prediction head.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import micro
from flax import nnx

import toolkit.moe.layer as layer_module
from toolkit.config import ConfigError, MoEConfig, apply_overrides, tiny, validate
from toolkit.models.transformer import Transformer
from toolkit.moe import MoELayer, Routing, load_balance_loss
from toolkit.moe.experts import Experts
from toolkit.training import Trainer
from toolkit.training.step import mtp_loss

D = 24


def _layer(**kw):
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "d_expert": 16, **kw})
    return MoELayer(D, cfg, rngs=nnx.Rngs(0))


def _x(shape=(2, 10, D), seed=7):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _ffn(x_td, w_gate, w_up, w_down, act=jax.nn.silu):
    return (act(x_td @ w_gate) * (x_td @ w_up)) @ w_down


def _definition(layer, x_btd):
    """The layer by its definition: every expert on every token, weighed by the router."""
    cfg, (b, s, d) = layer.cfg, x_btd.shape
    x_td = x_btd.reshape(b * s, d)
    r = layer.router(x_td)
    act = jax.nn.relu if cfg.expert_activation == "reglu" else jax.nn.silu
    h_td = x_td @ layer.w_descend[...] if cfg.bigmac_ratio else x_td
    e = layer.experts
    weights = [(e.w_gate[i], e.w_up[i], e.w_down[i]) for i in range(cfg.num_experts)]
    if cfg.small_experts:
        weights += [tuple(w[i] for w in e.small) for i in range(cfg.small_experts)]
    gate = lambda i: jnp.sum(jnp.where((r.expert_ids == i) & r.valid, r.weights, 0.0), -1)[:, None]
    y_td = sum(gate(i) * _ffn(h_td, *w, act=act) for i, w in enumerate(weights))
    if cfg.bigmac_ratio:
        y_td = y_td @ layer.w_ascend[...]
    first = cfg.num_ffn_experts
    for j in range(cfg.copy_experts):
        y_td = y_td + gate(first + cfg.zero_experts + j) * x_td
    for j in range(cfg.constant_experts):
        a_t2 = jax.nn.softmax(x_td @ layer.local.w_cd2[j], -1)
        const_td = a_t2[:, :1] * x_td + a_t2[:, 1:] * layer.local.v_cd[j]
        y_td = y_td + gate(first + cfg.zero_experts + cfg.copy_experts + j) * const_td
    return y_td.reshape(b, s, d)


@pytest.mark.parametrize("kw", [
    {},
    {"zero_experts": 1, "copy_experts": 1, "constant_experts": 2},
    {"small_experts": 3, "d_small_expert": 8},
    {"small_experts": 3, "d_small_expert": 8, "dispatch": "capacity", "capacity_factor": 8.0},
    {"expert_activation": "reglu", "zero_experts": 2},
    {"bigmac_ratio": 0.25, "d_expert": 32},
], ids=["topk", "moe++", "big_small", "big_small_capacity", "reglu_skip", "bigmac"])
def test_layer_equals_its_definition(kw):
    layer, x = _layer(**kw), _x()
    y, aux, _ = layer(x)
    np.testing.assert_allclose(y, _definition(layer, x), rtol=1e-5, atol=1e-5)
    assert float(aux.dropped_fraction) == 0.0
    assert aux.expert_counts.shape == (layer.cfg.num_routed,)


def test_zero_computation_experts_are_never_dispatched(monkeypatch):
    """Tokens routed to zero/copy/constant experts reach no grouped matmul: the FFN rows are
    exactly the FFN assignments, and a router that only picks local experts computes none."""
    layer = _layer(zero_experts=1, copy_experts=1, constant_experts=1)
    seen, compute = [], Experts.compute
    monkeypatch.setattr(Experts, "compute", lambda self, xs, group_sizes, *a, **kw: seen.append(
        group_sizes) or compute(self, xs, group_sizes, *a, **kw))
    x = _x()
    _, aux, _ = layer(x)
    ids = np.asarray(aux.expert_ids)
    ffn_assignments = int(np.sum((ids >= 0) & (ids < 4)))
    assert 0 < ffn_assignments < ids.size
    assert int(seen[-1].sum()) == ffn_assignments
    np.testing.assert_allclose(float(aux.computed_counts[:4].sum()), ffn_assignments)
    layer.router.w_de[...] = layer.router.w_de[...].at[:, :4].set(0.0).at[:, 4:].add(
        jnp.full((D, 3), 5.0))                       # push every token to the local experts
    y, aux, _ = layer(jnp.abs(x))
    assert int(seen[-1].sum()) == 0
    np.testing.assert_allclose(y, _definition(layer, jnp.abs(x)), rtol=1e-5, atol=1e-5)


def test_gating_residual_adds_the_previous_layers_logits_and_starts_as_the_plain_model():
    cfg = micro(moe={"num_experts": 4, "zero_experts": 1, "copy_experts": 1})
    with_res = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, gating_residual=True))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    plain, gated = Transformer(cfg, rngs=nnx.Rngs(0)), Transformer(with_res, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain(tokens)[0], gated(tokens)[0])   # W_g starts at zero
    router = gated.blocks[1].ffn.router
    router.w_ee[...] = jax.random.normal(jax.random.key(1), router.w_ee.shape)
    x_td = jax.random.normal(jax.random.key(2), (5, 32))
    prev = {"logits": jax.random.normal(jax.random.key(3), (5, 6))}
    np.testing.assert_allclose(router(x_td, prev).logits,
                               x_td @ router.w_de[...] + prev["logits"] @ router.w_ee[...], rtol=1e-5)
    assert not np.allclose(plain(tokens)[0], gated(tokens)[0])


def _zc_share(tau: float) -> float:
    """Train only the router on the (heterogeneous) balance loss; return the share of
    assignments that go to zero-computation experts."""
    layer = _layer(zero_experts=2, copy_experts=2, zc_tau=tau)
    x = _x((4, 32, D))
    opt = nnx.Optimizer(layer, optax.adam(5e-2), wrt=nnx.Param)

    @nnx.jit
    def step(layer, opt):
        loss, grads = nnx.value_and_grad(lambda m: m(x)[1].load_balance_loss)(layer)
        opt.update(layer, grads)
        return loss

    for _ in range(60):
        step(layer, opt)
    counts = np.asarray(layer(x)[1].expert_counts)
    return counts[4:].sum() / counts.sum()


def test_lower_tau_sends_more_tokens_to_zero_computation_experts():
    shares = [_zc_share(tau) for tau in (1.0, 0.5, 0.1)]
    assert 0.3 < shares[0] < 0.7, shares          # tau = 1: about their 4 / 8 of the experts
    assert shares[0] < shares[1] < shares[2], shares
    assert shares[2] > shares[0] + 0.2, shares


def test_heterogeneous_balance_loss_weighs_zero_computation_terms_by_tau():
    ids = jnp.array([[0, 4], [1, 5], [4, 5]])
    probs = jnp.full((3, 6), 1 / 6)
    r = Routing(weights=jnp.ones((3, 2)), expert_ids=ids, valid=jnp.ones((3, 2), bool),
                probs=probs, logits=jnp.zeros((3, 6)))
    eta = layer_module.balance_weights(MoEConfig(num_experts=4, zero_experts=1, copy_experts=1,
                                                 zc_tau=0.25))
    np.testing.assert_allclose(eta, [1, 1, 1, 1, 0.25, 0.25])
    f = np.array([1, 1, 0, 0, 2, 2]) / 6
    np.testing.assert_allclose(load_balance_loss(r, 6, eta), 6 * np.sum(np.asarray(eta) * f / 6),
                               rtol=1e-6)


def test_reglu_experts_report_their_activation_sparsity():
    x = _x()
    reglu = _layer(expert_activation="reglu")
    _, aux, _ = reglu(x)
    r = reglu.router(x.reshape(-1, D))
    e, zeros, total = reglu.experts, 0, 0
    for i in range(4):  # the definition: zeros of relu(x W_g) (x W_u) over routed tokens only
        rows = np.asarray(jnp.any(r.expert_ids == i, -1))
        h = jax.nn.relu(x.reshape(-1, D) @ e.w_gate[i]) * (x.reshape(-1, D) @ e.w_up[i])
        zeros, total = zeros + int(np.sum(np.asarray(h)[rows] == 0)), total + rows.sum() * 16
    np.testing.assert_allclose(float(aux.activation_zeros), zeros / total, rtol=1e-6)
    assert 0.3 < float(aux.activation_zeros) < 0.7      # about half at initialisation
    assert float(_layer()(x)[1].activation_zeros) == 0.0  # SwiGLU has no exact zeros


def test_gru_expert_is_causal_and_runs_the_gru_along_the_sequence():
    layer = _layer(gru_experts=1, d_gru_expert=8)
    local = layer.local
    x = _x((2, 6, D))
    w_bsk, ids_bsk = jnp.ones((2, 6, 1)), jnp.full((2, 6, 1), 4)     # every token -> GRU expert
    y = local(x, w_bsk, ids_bsk, jnp.ones((2, 6, 1), bool))
    gru, h = local.grus[0], jnp.zeros((2, 8))
    for t in range(6):
        h = gru(x[:, t], h)
        np.testing.assert_allclose(y[:, t], h @ local.w_out[0][...], rtol=1e-5, atol=1e-6)
    changed = x.at[:, 4:].set(0.0)
    np.testing.assert_array_equal(local(changed, w_bsk, ids_bsk, jnp.ones((2, 6, 1), bool))[:, :4],
                                  y[:, :4])
    _, aux, _ = layer(x)   # and the layer routes to it like any expert
    assert aux.expert_counts.shape == (5,)


def test_bigmac_dispatches_narrow_tokens(monkeypatch):
    layer = _layer(bigmac_ratio=0.25, d_expert=32)
    widths = []
    compute = Experts.compute
    monkeypatch.setattr(Experts, "compute", lambda self, xs, *a, **kw: widths.append(
        xs.shape[-1]) or compute(self, xs, *a, **kw))
    y, _, _ = layer(_x())
    assert widths == [D // 4] and y.shape == (2, 10, D)
    assert layer.experts.w_gate.shape == (4, D // 4, 32)   # up to d_expert, then down: inverted


def test_sequence_level_balance_loss_sees_per_sequence_imbalance():
    layer = _layer(num_experts=2, top_k=1)
    layer.router.w_de[...] = jnp.zeros((D, 2)).at[0].set(jnp.array([4.0, -4.0]))
    x = jnp.zeros((2, 8, D)).at[0, :, 0].set(1.0).at[1, :, 0].set(-1.0)  # seq 0 -> e0, seq 1 -> e1
    _, aux, _ = layer(x)
    r = layer.router(x.reshape(-1, D))
    per_seq = [float(load_balance_loss(jax.tree.map(lambda a, i=i: a[i * 8:(i + 1) * 8], r), 2))
               for i in range(2)]
    np.testing.assert_allclose(float(aux.seq_balance_loss), np.mean(per_seq), rtol=1e-6)
    assert float(aux.load_balance_loss) < 1.01 < 1.9 < float(aux.seq_balance_loss)


def test_pre_attention_routes_from_the_raw_block_input():
    cfg = micro(moe={"router_placement": "pre_attention"}, model={"num_layers": 1})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    _, aux = model(tokens)
    x_td = model.embed(tokens, jnp.float32).reshape(-1, 32)
    expected = model.blocks[0].ffn.router(x_td).expert_ids.reshape(2, 16, 2)
    np.testing.assert_array_equal(aux.expert_ids[0], expected)
    post = Transformer(dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, router_placement="post_attention")), rngs=nnx.Rngs(0))
    assert not np.array_equal(post(tokens)[1].expert_ids[0], expected)


def test_mtp_head_predicts_two_ahead_from_the_next_token_only():
    cfg = micro(model={"mtp_layers": 1})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    targets = jnp.roll(tokens, -1, axis=1)
    logits, _, mtp = model(tokens, mtp_tokens_bt=targets)
    assert mtp.shape == (1, 2, 16, cfg.model.vocab_size)
    np.testing.assert_array_equal(logits, model(tokens)[0])   # the main head is unchanged
    changed = targets.at[:, 9:].set(7)   # tokens t+2 and later, for positions t <= 7
    _, _, mtp2 = model(tokens, mtp_tokens_bt=changed)
    np.testing.assert_allclose(mtp2[0, :, :8], mtp[0, :, :8], rtol=1e-5, atol=1e-5)
    ce = optax.softmax_cross_entropy_with_integer_labels(mtp[0, :, :15], targets[:, 1:])
    np.testing.assert_allclose(mtp_loss(mtp, targets), [ce.mean()], rtol=1e-5)


@pytest.mark.parametrize("overrides,message", [
    (["moe.zero_experts=-1"], r"moe.zero_experts=-1 must be >= 0"),
    (["moe.zc_tau=0"], r"moe.zc_tau=0.0 must be > 0"),
    (["moe.bigmac_ratio=2"], r"moe.bigmac_ratio=2.0 must be in \[0, 1\]"),
    (["moe.expert_activation=gelu"], r"moe.expert_activation='gelu' is unknown"),
    (["moe.router_placement=before"], r"moe.router_placement='before' is unknown"),
    (["moe.expert_fraction=0.3", "parallel.tensor=2", "parallel.data=4"],
     r"moe.expert_fraction=0.3 \(width 77\) is not divisible by mesh axis tensor=2"),
    (["model.mtp_layers=-1"], r"model.mtp_layers=-1 must be in"),
    (["moe.top_k=12", "moe.zero_experts=2"], r"moe.top_k=12 exceeds the 10 routed experts"),
])
def test_expert_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(tiny(), overrides), num_devices=8)


VARIANTS = {
    "recurrent": {"router": "recurrent", "recurrent_dim": 16},
    "tsallis": {"router": "tsallis", "top_p": 0.75, "tsallis_loss_weight": 0.01},
    "jitter_pre_attention": {"router_jitter": 0.01, "router_placement": "pre_attention"},
    "moe++": {"zero_experts": 1, "copy_experts": 1, "constant_experts": 2, "gating_residual": True,
              "zc_tau": 0.5},
    "hetero": {"small_experts": 2, "d_small_expert": 16, "zero_experts": 1, "gru_experts": 1,
               "d_gru_expert": 8, "expert_activation": "reglu"},
    "bigmac": {"bigmac_ratio": 0.25, "expert_fraction": 0.5, "seq_aux_loss_weight": 0.01},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_on_a_mesh(tmp_path, name):
    """One step of each variant on a data=2, fsdp=2, tensor=2 mesh: finite, and logged."""
    cfg = micro(moe=VARIANTS[name], model={"mtp_layers": 1 if name == "bigmac" else 0},
                parallel={"data": 2, "fsdp": 2, "tensor": 2})
    trainer = Trainer(cfg, out_dir=tmp_path / name, progress=False)
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"]) and len(rec["expert_counts"]) == 2
    assert len(rec["expert_counts"][0]) == cfg.moe.num_routed
    assert ("mtp_ce" in rec) == (name == "bigmac")

"""Routers: each one's defining property, and that it trains through the whole stack."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro
from flax import nnx

from toolkit.config import ConfigError, MoEConfig, apply_overrides, tiny, validate
from toolkit.models.transformer import Transformer
from toolkit.moe import RouterBias, SigmoidBiasRouter, make_router, update_bias
from toolkit.moe.recurrent import GRU
from toolkit.moe.router import tsallis_entropy
from toolkit.training import Trainer


def test_update_bias_raises_underloaded_experts_and_sums_to_zero():
    bias = update_bias(jnp.zeros(4), jnp.array([10.0, 30.0, 0.0, 40.0]), 0.1)
    np.testing.assert_allclose(bias, [0.1, -0.1, 0.1, -0.1], atol=1e-7)  # mean load is 20
    np.testing.assert_allclose(update_bias(jnp.ones(3), jnp.ones(3), 0.5), jnp.ones(3))


def test_bias_steers_selection_toward_balance_without_any_loss():
    """Route fixed tokens with a router skewed toward a few experts; the bias update alone
    (no gradient, no aux loss) drives the max/mean load toward 1."""
    router = SigmoidBiasRouter(16, 8, 2, rngs=nnx.Rngs(0))
    router.w_de[...] = router.w_de[...] + jnp.array([2.0, 1.5, 0, 0, 0, 0, 0, 0]) * 0.3
    x_td = jax.random.normal(jax.random.key(1), (2048, 16)) + 1.0

    def imbalance():
        counts = jnp.bincount(router(x_td).expert_ids.reshape(-1), length=8)
        return float(counts.max() / counts.mean()), counts

    before, counts = imbalance()
    for _ in range(300):
        router.bias[...] = update_bias(router.bias[...], counts.astype(jnp.float32), 1e-2)
        _, counts = imbalance()
    after, _ = imbalance()
    assert before > 1.8 and after < 1.25, (before, after)
    assert abs(float(jnp.sum(router.bias[...]))) < 1e-4  # updates are mean-zero


def test_group_limited_routing_picks_inside_the_best_groups():
    router = SigmoidBiasRouter(8, 8, 2, num_groups=4, topk_groups=1, rngs=nnx.Rngs(0))
    x_td = jax.random.normal(jax.random.key(2), (64, 8))
    ids = np.asarray(router(x_td).expert_ids)
    assert np.all(ids[:, 0] // 2 == ids[:, 1] // 2)  # one group of two experts per token
    scores = np.asarray(jax.nn.sigmoid(x_td @ router.w_de[...]))
    group_score = scores.reshape(64, 4, 2).sum(-1)  # top-2 of a 2-expert group is the sum
    np.testing.assert_array_equal(ids[:, 0] // 2, group_score.argmax(-1))


def test_sigmoid_weights_renormalise_and_scale():
    cfg = MoEConfig(num_experts=8, top_k=3, router="sigmoid_bias", routed_scaling=2.5)
    r = make_router(16, cfg, rngs=nnx.Rngs(0))(jax.random.normal(jax.random.key(3), (5, 16)))
    np.testing.assert_allclose(jnp.sum(r.weights, -1), 2.5, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(r.probs, -1), 1.0, rtol=1e-6)


def test_training_updates_the_bias_outside_the_optimizer(tmp_path):
    cfg = micro(moe={"router": "sigmoid_bias", "aux_loss_weight": 0.0, "bias_update_rate": 1e-2},
                train={"steps": 3})
    trainer = Trainer(cfg, out_dir=tmp_path / "run", devices=jax.devices()[:1], progress=False)
    model, optimizer = nnx.merge(trainer.graphdef, trainer.state)
    assert not jax.tree.leaves(nnx.state(optimizer, RouterBias))  # no optimizer state for it
    rec = trainer.train_step()
    model, _ = nnx.merge(trainer.graphdef, trainer.state)
    biases = [np.asarray(b.ffn.router.bias[...]) for b in model.blocks if b.is_moe]
    for bias, counts in zip(biases, rec["expert_counts"], strict=True):  # one step from zero
        np.testing.assert_allclose(bias, update_bias(jnp.zeros(4), jnp.asarray(counts), 1e-2),
                                   atol=1e-7)
        assert np.any(bias != 0)
    frozen = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, bias_update_rate=0.0))
    t2 = Trainer(frozen, out_dir=tmp_path / "frozen", devices=jax.devices()[:1], progress=False)
    t2.train_step()
    m2, _ = nnx.merge(t2.graphdef, t2.state)
    assert all(np.all(np.asarray(b.ffn.router.bias[...]) == 0) for b in m2.blocks if b.is_moe)


@pytest.mark.parametrize("overrides,message", [
    (["moe.router=switch"], r"moe.router='switch' is unknown"),
    (["moe.router=sigmoid_bias", "moe.router_groups=3"], r"moe.router_groups=3 must divide"),
    (["moe.router_groups=2"], r"applies to moe.router='sigmoid_bias' only"),
    (["moe.router=sigmoid_bias", "moe.router_groups=4", "moe.router_topk_groups=1", "moe.top_k=3"],
     r"moe.top_k=3 exceeds the 2 experts"),
    (["moe.bias_update_rate=-1"], r"moe.bias_update_rate=-1.0 must be >= 0"),
])
def test_router_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(tiny(), overrides), num_devices=8)


def test_top_p_gives_uncertain_tokens_more_experts():
    cfg = MoEConfig(num_experts=8, top_k=8, router="top_p", top_p=0.4, renormalize=False)
    router = make_router(8, cfg, rngs=nnx.Rngs(0))
    router.w_de[...] = jnp.eye(8)
    x_td = jnp.stack([8.0 * jnp.eye(8)[3], jnp.zeros(8), jnp.array([2.0, 2.0, 0, 0, 0, 0, 0, 0])])
    r = router(x_td)
    np.testing.assert_array_equal(jnp.sum(r.valid, -1), [1, 4, 2])  # peaked, uniform (0.4*8), two
    assert set(np.asarray(r.expert_ids[2][r.valid[2]]).tolist()) == {0, 1}
    np.testing.assert_allclose(r.weights, jnp.where(r.valid, jnp.take_along_axis(
        r.probs, r.expert_ids, -1), 0.0))  # raw probabilities, zero in unused slots


def _experts_per_token(tmp_path, name, entropy_weight):
    cfg = micro(moe={"router": "top_p", "top_k": 4, "top_p": 0.5, "entropy_loss_weight": entropy_weight},
                train={"steps": 12, "learning_rate": 1e-2})
    trainer = Trainer(cfg, out_dir=tmp_path / name, devices=jax.devices()[:1], progress=False)
    recs = [trainer.train_step() for _ in range(cfg.train.steps)]
    return np.mean(recs[-1]["experts_per_token"]), recs[0]["experts_per_token"]


def test_top_p_entropy_loss_lowers_the_experts_per_token(tmp_path):
    free, start = _experts_per_token(tmp_path, "free", 0.0)
    sharp, _ = _experts_per_token(tmp_path, "sharp", 0.5)
    assert all(1.0 <= k <= 4.0 for k in start)
    assert sharp < free - 0.2, (free, sharp)


def test_expert_choice_never_exceeds_capacity_and_balances_exactly():
    cfg = MoEConfig(num_experts=4, top_k=2, router="expert_choice")
    router = make_router(16, cfg, rngs=nnx.Rngs(0))
    x_td = jax.random.normal(jax.random.key(4), (10, 16))
    r = router(x_td)
    per_expert = np.asarray(jnp.sum(r.valid, axis=0))
    np.testing.assert_array_equal(per_expert, [5, 5, 5, 5])  # ceil(2 * 10 / 4) each
    probs = np.asarray(r.probs)
    for e in range(4):  # each expert took its best-scoring tokens
        chosen = np.asarray(r.valid[:, e])
        assert probs[chosen, e].min() >= probs[~chosen, e].max()
    np.testing.assert_allclose(r.weights, jnp.where(r.valid, r.probs, 0.0))


def test_expert_choice_trains_through_the_layer(tmp_path):
    cfg = micro(moe={"router": "expert_choice"})
    trainer = Trainer(cfg, out_dir=tmp_path / "ec", devices=jax.devices()[:1], progress=False)
    rec = trainer.train_step()
    assert np.isfinite(rec["loss"]) and rec["drop_rate"] == [0.0, 0.0]
    np.testing.assert_allclose(rec["experts_per_token"], 2.0)  # top_k on average, exactly


def test_tsallis_entropy_tends_to_shannon_and_is_one_at_uniform():
    p = jax.nn.softmax(jax.random.normal(jax.random.key(5), (6, 8)) * 2, -1)
    shannon = -jnp.sum(p * jnp.log(p), -1)
    for q, tol in ((1.1, 0.2), (1.01, 0.02), (1.0001, 2e-4)):
        np.testing.assert_allclose(tsallis_entropy(p, q, normalize=False), shannon, atol=tol)
    np.testing.assert_allclose(tsallis_entropy(jnp.full((1, 8), 1 / 8), 1.1), [1.0], rtol=1e-6)
    np.testing.assert_allclose(tsallis_entropy(jnp.eye(8)[:1], 1.1), [0.0], atol=1e-7)


def test_tsallis_router_activates_all_experts_when_unsure_and_keeps_top_k():
    cfg = MoEConfig(num_experts=8, top_k=2, router="tsallis", top_p=0.75, tsallis_q=1.1,
                    tsallis_threshold=0.9, renormalize=False)
    router = make_router(8, cfg, rngs=nnx.Rngs(0))
    router.w_de[...] = jnp.eye(8)
    x_td = jnp.stack([jnp.zeros(8),                      # uniform: S = 1 > 0.9, all experts
                      12.0 * jnp.eye(8)[3],               # sure: top-p keeps 1, top_k keeps 2
                      jnp.array([3.0, 3.0, 3.0, 0, 0, 0, 0, 0])])  # three of ~0.32: p <= 0.75 keeps 2
    r = router(x_td)
    np.testing.assert_array_equal(jnp.sum(r.valid, -1), [8, 2, 2])
    assert int(r.expert_ids[1, 0]) == 3
    np.testing.assert_allclose(r.weights, jnp.where(r.valid, jnp.take_along_axis(
        r.probs, r.expert_ids, -1), 0.0))  # not renormalised, as in DynMoLE


def _all_experts_share(tmp_path, name, weight):
    cfg = micro(moe={"router": "tsallis", "top_k": 1, "top_p": 0.5, "tsallis_threshold": 0.9,
                     "tsallis_loss_weight": weight}, train={"steps": 12, "learning_rate": 1e-2})
    trainer = Trainer(cfg, out_dir=tmp_path / name, devices=jax.devices()[:1], progress=False)
    recs = [trainer.train_step() for _ in range(cfg.train.steps)]
    return np.mean(recs[-1]["experts_per_token"]), np.mean(recs[-1]["tsallis_entropy"])


def test_tsallis_loss_lowers_entropy_and_the_experts_used(tmp_path):
    free_k, free_s = _all_experts_share(tmp_path, "free", 0.0)
    sharp_k, sharp_s = _all_experts_share(tmp_path, "sharp", 1.0)
    assert sharp_s < free_s - 0.05 and sharp_k < free_k - 0.2, (free_k, free_s, sharp_k, sharp_s)


def test_recurrent_router_gradients_reach_the_gru_from_every_layer():
    """Three layers' routers sharing one GRU: the logits of each layer depend on the GRU, and
    the last layer's logits reach the first layer's projection through the recurrence."""
    cfg = MoEConfig(num_experts=4, top_k=2, router="recurrent", recurrent_dim=8)
    gru = GRU(8, 8, rngs=nnx.Rngs(0))
    routers = [make_router(16, cfg, shared_gru=gru, rngs=nnx.Rngs(i)) for i in range(3)]
    xs = jax.random.normal(jax.random.key(6), (3, 5, 16))

    def logits_of(layer, routers):
        state = {}
        for x, router in zip(xs[:layer + 1], routers[:layer + 1], strict=True):
            routing = router(x, state)
            state = routing.state
        return jnp.sum(jnp.sin(routing.logits))

    for layer in range(3):
        grads = nnx.grad(logits_of, argnums=1)(layer, nnx.List(routers))
        gru = grads[0].gru        # a shared module appears once, under its first owner
        assert float(jnp.abs(gru.w_x[...]).sum()) > 0, layer
        # h_0 = 0 gives U no gradient at the first layer; from the second on it has one
        assert (float(jnp.abs(gru.w_h[...]).sum()) > 0) == (layer > 0), layer
        first = float(jnp.abs(grads[0].w_dp[...]).sum())
        assert first > 0, layer                      # layer 0's projection: via the recurrence
    assert routers[0].gru is routers[2].gru


def test_recurrent_router_layers_share_one_gru_in_the_model():
    cfg = micro(moe={"router": "recurrent", "recurrent_dim": 8}, model={"num_layers": 3})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert all(b.ffn.router.gru is model.router_gru for b in model.blocks)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    grads = nnx.grad(lambda m: jnp.sum(m(tokens)[0][:, -1, :3]))(model)
    w_h = [v for path, v in nnx.to_flat_state(grads) if path[-1] == "w_h"]
    assert len(w_h) == 1 and float(jnp.abs(w_h[0].get_value()).sum()) > 0  # one GRU, trained


def test_router_jitter_only_in_training():
    cfg = MoEConfig(num_experts=4, top_k=2, router_jitter=0.1)
    router = make_router(16, cfg, rngs=nnx.Rngs(0))
    x_td = jax.random.normal(jax.random.key(7), (32, 16))
    clean = x_td @ router.w_de[...]
    a, b = router(x_td).logits, router(x_td).logits
    assert not np.allclose(a, b) and not np.allclose(a, clean)   # fresh noise every call
    lo = ((x_td * 0.9) @ router.w_de[...]) - ((x_td * 1.1) @ router.w_de[...])
    assert float(jnp.max(jnp.abs(a - clean))) <= float(jnp.max(jnp.abs(lo)))
    router.eval()
    np.testing.assert_allclose(router(x_td).logits, clean, rtol=1e-6)


def test_top_k_under_a_mesh_keeps_tokens_split():
    # XLA's SPMD top_k gathers a token-split operand; sharded_top_k sorts instead
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from toolkit.moe.router import sharded_top_k
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x = jax.random.normal(jax.random.key(0), (64, 8)).at[0, 5].set(9.0).at[0, 2].set(9.0)
    x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda x: sharded_top_k(x, 2))
        hlo = fn.lower(x).compile().as_text()
        values, ids = fn(x)
    assert "all-gather" not in hlo
    ref_values, ref_ids = jax.lax.top_k(x, 2)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))        # ties: lower index
    np.testing.assert_array_equal(np.asarray(values), np.asarray(ref_values))
    assert list(np.asarray(ids[0])) == [2, 5]

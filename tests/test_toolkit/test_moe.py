"""The MoE layer: dispatch modes against a dense loop over experts, exact drops and counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolkit.config import MoEConfig
from toolkit.moe import (
    MoELayer,
    Routing,
    capacity,
    capacity_plan,
    combine,
    dispatch,
    dropless_plan,
    dropped_fraction,
    expert_counts,
    load_balance_loss,
)


def _layer(gmm_impl="", **kw):
    cfg = MoEConfig(num_experts=4, top_k=2, d_expert=16, **kw)
    return MoELayer(24, cfg, gmm_impl=gmm_impl, rngs=nnx.Rngs(0))


def _dense_loop(layer, x_btd):
    """Every expert on every token, combined with the router's top-k weights: the definition."""
    x_td = x_btd.reshape(-1, x_btd.shape[-1])
    r = layer.router(x_td)
    e = layer.experts
    out_td = jnp.zeros_like(x_td)
    for i in range(layer.cfg.num_experts):
        h = jax.nn.silu(x_td @ e.w_gate[i]) * (x_td @ e.w_up[i])
        w_t = jnp.sum(jnp.where(r.expert_ids == i, r.weights, 0.0), axis=-1)
        out_td = out_td + w_t[:, None] * (h @ e.w_down[i])
    if layer.shared is not None:
        out_td = out_td + layer.shared(x_td)
    return out_td.reshape(x_btd.shape)


def _x(shape=(2, 10, 24)):
    return jax.random.normal(jax.random.PRNGKey(7), shape)


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("gmm_impl", ["xla", "ragged_dot", "reference"])
def test_dropless_equals_dense_loop_forward_and_grads(shared, gmm_impl):
    layer = _layer(num_shared_experts=shared, gmm_impl=gmm_impl)
    x = _x()
    y, aux, _ = layer(x)
    np.testing.assert_allclose(y, _dense_loop(layer, x), rtol=1e-5, atol=1e-5)
    assert float(aux.dropped_fraction) == 0.0

    def loss(model, x, fn):
        return jnp.sum(jnp.tanh(fn(model, x)))
    sparse = nnx.grad(loss, argnums=(0, 1))(layer, x, lambda m, x: m(x)[0])
    dense = nnx.grad(loss, argnums=(0, 1))(layer, x, _dense_loop)
    for a, b in zip(jax.tree.leaves(sparse), jax.tree.leaves(dense), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_with_large_factor_equals_dropless():
    x = _x()
    dropless = _layer()
    cap = _layer(dispatch="capacity", capacity_factor=4.0)
    y0, aux0, _ = dropless(x)
    y1, aux1, _ = cap(x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    assert float(aux1.dropped_fraction) == 0.0
    np.testing.assert_array_equal(aux1.expert_counts, aux0.expert_counts)
    g0 = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(dropless)
    g1 = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(cap)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _routing(ids, num_experts):
    ids = jnp.asarray(ids, jnp.int32)
    probs = jax.nn.one_hot(ids[:, 0], num_experts) * 0.5 + 0.5 / num_experts
    return Routing(weights=jnp.full(ids.shape, 0.5), expert_ids=ids, valid=jnp.ones(ids.shape, bool),
                   probs=probs, logits=jnp.log(probs))


HAND_IDS = [[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [0, 2]]


def test_capacity_drops_exactly_by_priority():
    r = _routing(HAND_IDS, 3)
    assert capacity(6, 2, 3, 0.5) == 2
    plan = capacity_plan(r, 3, capacity_factor=0.5)
    # First choices fill slots before any second choice, each in token order.
    expect_kept = [[1, 1], [1, 1], [0, 0], [1, 0], [1, 0], [0, 0]]
    np.testing.assert_array_equal(plan.kept, np.array(expect_kept, bool))
    np.testing.assert_array_equal(plan.group_sizes, [2, 2, 2])
    assert float(dropped_fraction(plan, r)) == 0.5
    np.testing.assert_array_equal(expert_counts(r, 3), [6, 3, 3])
    # Expert 0's slots hold tokens 0 and 1; expert 1's hold tokens 3 and 0.
    np.testing.assert_array_equal(np.asarray(plan.token_of_row).reshape(3, 2)[:2], [[0, 1], [3, 0]])


def test_dropped_assignments_contribute_nothing():
    r = _routing(HAND_IDS, 3)
    plan = capacity_plan(r, 3, capacity_factor=0.5)
    x_td = jnp.arange(6, dtype=jnp.float32)[:, None] + 1.0
    ys = dispatch(x_td, plan)                      # identity "experts"
    y_td = combine(ys, plan, r)
    np.testing.assert_allclose(y_td[:, 0], [1.0, 2.0, 0.0, 2.0, 2.5, 0.0])


def test_dropless_plan_groups_by_expert():
    r = _routing(HAND_IDS, 3)
    plan = dropless_plan(r, 3)
    np.testing.assert_array_equal(plan.group_sizes, [6, 3, 3])
    rows = np.asarray(plan.token_of_row)
    np.testing.assert_array_equal(rows[:6], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(rows[6:9], [0, 2, 3])
    x_td = jnp.arange(6, dtype=jnp.float32)[:, None]
    np.testing.assert_allclose(combine(dispatch(x_td, plan), plan, r)[:, 0], np.arange(6))


def test_load_balance_loss_is_one_when_uniform_and_grows_with_skew():
    e, t = 4, 64
    ids = jnp.stack([jnp.arange(t) % e, (jnp.arange(t) + 1) % e], -1)
    uniform = Routing(weights=jnp.full((t, 2), 0.5), expert_ids=ids, valid=jnp.ones((t, 2), bool),
                      probs=jnp.full((t, e), 1 / e), logits=jnp.zeros((t, e)))
    assert float(load_balance_loss(uniform, e)) == pytest.approx(1.0)
    skewed = dataclasses.replace(uniform, expert_ids=jnp.zeros_like(ids).at[:, 1].set(1),
                                 probs=jnp.tile(jnp.array([0.7, 0.1, 0.1, 0.1]), (t, 1)))
    assert float(load_balance_loss(skewed, e)) > 1.5


def test_aux_reports_per_layer_values():
    layer = _layer(dispatch="capacity", capacity_factor=0.5)
    _, aux, _ = layer(_x())
    assert aux.expert_counts.shape == (4,) and float(aux.expert_counts.sum()) == 20 * 2
    assert 0.0 < float(aux.dropped_fraction) < 1.0
    assert aux.expert_ids.shape == (2, 10, 2)
    assert 0.0 < float(aux.entropy) <= np.log(4) + 1e-6


@pytest.mark.parametrize("gmm_impl", ["xla", "ragged_dot"])
def test_dropless_output_does_not_depend_on_dispatch_groups(gmm_impl):
    x = _x((4, 6, 24))
    whole = _layer(gmm_impl=gmm_impl, dispatch_groups=1)
    grouped = _layer(gmm_impl=gmm_impl, dispatch_groups=4)
    np.testing.assert_allclose(grouped(x)[0], whole(x)[0], rtol=1e-5, atol=1e-5)


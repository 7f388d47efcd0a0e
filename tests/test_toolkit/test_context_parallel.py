"""Context parallelism, Megatron sequence parallelism and vocabulary-parallel cross-entropy
equal their unsplit counterparts, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import micro
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from toolkit.config import validate
from toolkit.sharding.context_parallel import context_attention, reference_attention
from toolkit.sharding.vocab_parallel import vocab_parallel_cross_entropy
from toolkit.training.inspect import block_collectives, loss_and_grads


def _mesh(shape, names):
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                         devices=jax.devices()[:n])


def _qkv(b=2, s=16, n=4, k=2, h=8):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (b, s, n, h)), jax.random.normal(keys[1], (b, s, k, h)),
            jax.random.normal(keys[2], (b, s, k, h)))


def test_reference_attention_is_causal_softmax_attention():
    q, k, v = _qkv(k=4)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(reference_attention(q, k, v), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["ring", "all_gather"])
@pytest.mark.parametrize("n", [2, 4])
def test_context_attention_equals_full_causal_attention(mode, n):
    q, k, v = _qkv()
    mesh = _mesh((n,), ("sequence",))
    split = P(None, "sequence")
    fn = jax.jit(jax.shard_map(lambda q, k, v: context_attention(q, k, v, "sequence", mode),
                               mesh=mesh, in_specs=(split,) * 3, out_specs=split))
    np.testing.assert_allclose(fn(q, k, v), reference_attention(q, k, v), rtol=2e-5, atol=2e-5)
    w = jax.random.normal(jax.random.key(1), q.shape)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w)
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("shape,names", [((2,), ("tensor",)), ((4,), ("tensor",)),
                                         ((2, 2), ("pipeline", "tensor")),
                                         ((2, 4), ("pipeline", "tensor"))])
def test_vocab_parallel_cross_entropy_equals_unsharded(shape, names):
    v = 264
    logits = 3 * jax.random.normal(jax.random.key(0), (4, 6, v))
    targets = jax.random.randint(jax.random.key(1), (4, 6), 0, v)
    mesh = _mesh(shape, names)
    axes = names if len(names) > 1 else names[0]
    fn = jax.jit(jax.shard_map(lambda z, t: vocab_parallel_cross_entropy(z, t, axes), mesh=mesh,
                               in_specs=(P(None, None, axes), P()), out_specs=P()))
    want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(fn(logits, targets), want, rtol=1e-5, atol=1e-5)
    w = jax.random.uniform(jax.random.key(2), (4, 6))
    got_g = jax.grad(lambda z: jnp.sum(fn(z, targets) * w))(logits)
    want_g = jax.grad(lambda z: jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(z, targets) * w))(logits)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6)


CASES = {  # context and sequence parallelism composed with the other axes, on 8 devices
    "ring_seq4_data2": {"sequence": 4, "data": 2, "context": "ring"},
    "all_gather_seq2_tp2_ep2": {"sequence": 2, "tensor": 2, "expert": 2, "data": 1,
                                "context": "all_gather"},
    "ring_seq2_tp2_sp_data2": {"sequence": 2, "tensor": 2, "data": 2, "sequence_parallel": True},
}


@pytest.fixture(scope="module")
def single():
    loss, grads, _ = loss_and_grads(micro(model={"num_layers": 1}), jax.devices()[:1])
    return loss, grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_split_model_equals_single_device(single, case):
    cfg = validate(micro(model={"num_layers": 1}, parallel=CASES[case]), 8)
    loss, grads, _ = loss_and_grads(cfg)
    assert loss == pytest.approx(single[0], rel=1e-6, abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_sequence_parallel_reduce_scatters_instead_of_all_reducing():
    """Megatron SP: a dense block's two tensor-parallel all-reduces become reduce-scatters
    (and all-gathers at the block inputs), forward."""
    def kinds(sp):
        cfg = micro(parallel={"tensor": 2, "data": 4, "sequence_parallel": sp})
        return [c.kind for c in block_collectives(cfg, moe=False, backward=False)
                if c.group_size == 2 and c.shape]          # not the scalar sum of the output
    plain, sp = kinds(False), kinds(True)
    assert plain.count("all-reduce") == 2 and "reduce-scatter" not in plain
    assert sp.count("reduce-scatter") == 2 and "all-reduce" not in sp
    assert sp.count("all-gather") >= 2

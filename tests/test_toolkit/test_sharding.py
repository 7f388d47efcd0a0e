"""Every mesh gives the single-device loss, gradients and training trajectory (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro
from flax import nnx

from toolkit.config import ParallelConfig
from toolkit.data import Batches, load_corpus
from toolkit.sharding import batch_sharding, logical_to_spec, make_mesh
from toolkit.training import Trainer, init_state, loss_fn

MESHES = {
    "data8": ParallelConfig(data=8),
    "data2_fsdp4": ParallelConfig(data=2, fsdp=4),
    "fsdp2_tensor2_expert2": ParallelConfig(data=1, fsdp=2, tensor=2, expert=2),
    "expert4_data2": ParallelConfig(data=2, expert=4),
}


def _loss_and_grads(cfg, devices):
    mesh = make_mesh(cfg.parallel, devices)
    graphdef, state = init_state(cfg, mesh)
    corpus = load_corpus(cfg.data)
    batch = Batches(corpus, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size,
                    seed=0).train(0)
    batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}

    @jax.jit
    def f(state, batch):
        model, _ = nnx.merge(graphdef, state)
        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, cfg)
        return loss, grads

    with jax.set_mesh(mesh):
        loss, grads = f(state, batch)
    return float(loss), jax.tree.map(np.asarray, grads), state


@pytest.fixture(scope="module")
def single():
    return _loss_and_grads(micro(), jax.devices()[:1])


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_loss_and_grads_equal_single_device(single, name):
    cfg = micro(parallel=vars(MESHES[name]).copy())
    loss, grads, _ = _loss_and_grads(cfg, jax.devices())
    assert loss == pytest.approx(single[0], rel=1e-6, abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(single[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_parameters_are_sharded_by_the_rules():
    cfg = micro(parallel=vars(MESHES["fsdp2_tensor2_expert2"]).copy())
    _, _, state = _loss_and_grads(cfg, jax.devices())
    model_state = state[0]
    w_gate = model_state["blocks"][0]["ffn"]["experts"]["w_gate"].get_value()
    assert w_gate.sharding.spec == logical_to_spec(("expert", "embed", "mlp"))
    assert w_gate.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
    assert w_gate.addressable_shards[0].data.shape == (2, 16, 16)
    w_q = model_state["blocks"][0]["attn"]["w_q"].get_value()
    assert w_q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    mu = state[1]["opt_state"][1][0].mu["blocks"][0]["ffn"]["experts"]["w_gate"].get_value()
    assert mu.sharding.spec == w_gate.sharding.spec, "optimizer state follows its parameter"


def test_training_trajectory_matches_across_meshes():
    one = Trainer(micro(train={"steps": 4, "warmup_steps": 1}), devices=jax.devices()[:1],
                  progress=False)
    many = Trainer(micro(parallel={"data": 2, "fsdp": 4}, train={"steps": 4, "warmup_steps": 1}),
                   progress=False)
    for _ in range(4):
        a, b = one.train_step(), many.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-5)
    assert jnp.isfinite(a["loss"])


def test_capacity_on_the_mesh_equals_one_device_with_the_same_groups():
    # On 8 batch shards each device dispatches its own tokens (8 groups, capacity per group);
    # one device with moe.dispatch_groups=8 computes exactly that.
    cap = {"dispatch": "capacity", "capacity_factor": 0.5}   # tight: many drops
    loss1, grads1, _ = _loss_and_grads(micro(moe={**cap, "dispatch_groups": 8}), jax.devices()[:1])
    loss8, grads8, _ = _loss_and_grads(micro(moe=cap, parallel={"data": 8}), jax.devices())
    assert loss8 == pytest.approx(loss1, rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    loss_one_group, _, _ = _loss_and_grads(micro(moe=cap), jax.devices()[:1])
    assert abs(loss_one_group - loss1) > 1e-4 * loss1, "groups change what is dropped"

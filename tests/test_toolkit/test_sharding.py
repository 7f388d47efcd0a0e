"""Every mesh gives the single-device loss, gradients and training trajectory (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro

from toolkit.sharding import logical_to_spec
from toolkit.training import Trainer
from toolkit.training.inspect import loss_and_grads

# Every recipe on the 8-device mesh; the dispatch groups (one per device of the MoE token
# split) that capacity dispatch fills. Tensor parallelism stops at 2: micro has 2 kv heads.
RECIPES = {
    "dp": ({"data": 8, "recipe": "dp"}, 8),
    "fsdp": ({"data": 2, "fsdp": 4, "recipe": "fsdp"}, 8),
    "tp": ({"data": 4, "tensor": 2, "recipe": "tp"}, 4),
    "ep": ({"data": 2, "expert": 4, "recipe": "ep"}, 8),
    "fsdp_ep": ({"data": 1, "fsdp": 2, "expert": 4, "recipe": "fsdp_ep"}, 8),
    "fsdp_tp_ep": ({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}, 4),
    "folded": ({"data": 2, "tensor": 2, "expert": 2, "recipe": "folded"}, 8),
}
MOE = {"num_experts": 8}
ONE_LAYER = {"num_layers": 1}     # one MoE block: every collective of interest, half the compile
CAPACITY = {"dispatch": "capacity", "capacity_factor": 1.0}     # drops some assignments


def _loss_and_grads(cfg, devices):
    loss, grads, state = loss_and_grads(cfg, devices)
    return loss, jax.tree.map(np.asarray, grads), state


@pytest.fixture(scope="module")
def single():
    """Single-device results, cached by (dispatch, groups, extra MoE options)."""
    cache = {}

    def get(moe):
        key = tuple(sorted(moe.items()))
        if key not in cache:
            cache[key] = _loss_and_grads(micro(moe=moe, model=ONE_LAYER), jax.devices()[:1])
        return cache[key]
    return get


def _assert_same(result, expected):
    loss, grads, _ = result
    assert loss == pytest.approx(expected[0], rel=1e-6, abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_loss_and_grads_equal_single_device(single, recipe, dispatch):
    mesh, groups = RECIPES[recipe]
    # Capacity is per dispatch group (each device fills its own buffers, as in GShard): one
    # device computes the same with moe.dispatch_groups = the mesh's groups.
    moe = {**MOE, **(CAPACITY if dispatch == "capacity" else {})}
    expected = single({**moe, "dispatch_groups": groups} if dispatch == "capacity" else moe)
    cfg = micro(moe=moe, parallel=mesh, model=ONE_LAYER)
    _assert_same(_loss_and_grads(cfg, jax.devices()), expected)


@pytest.mark.parametrize("name,mesh,moe", [
    ("bigmac_ep_capacity", RECIPES["ep"][0], {**CAPACITY, "bigmac_ratio": 0.5,
                                              "dispatch_groups": 8}),
    ("bigmac_folded_dropless", RECIPES["folded"][0], {"bigmac_ratio": 0.5}),
    ("ragged_exchange", {**RECIPES["fsdp_ep"][0], "dropless_exchange": "ragged_all_to_all"}, {}),
    ("overlap_capacity", {**RECIPES["ep"][0], "overlap_chunks": 3}, {**CAPACITY,
                                                                      "dispatch_groups": 8}),
    ("overlap_dropless_and_tensor", {**RECIPES["folded"][0], "overlap_chunks": 2}, {}),
    ("zero_computation_experts", RECIPES["ep"][0], {"zero_experts": 1, "copy_experts": 1}),
])
def test_expert_parallel_variants_equal_single_device(single, name, mesh, moe):
    moe = {**MOE, **moe}
    cfg = micro(moe=moe, parallel=mesh, model=ONE_LAYER)
    _assert_same(_loss_and_grads(cfg, jax.devices()), single(moe))


def test_capacity_drops_and_groups_matter(single):
    # The capacity tests above are not dropless in disguise: tokens are dropped, and the
    # grouping changes which.
    dropless = single(MOE)[0]
    grouped = single({**MOE, **CAPACITY, "dispatch_groups": 8})[0]
    one_group = single({**MOE, **CAPACITY})[0]
    assert abs(grouped - dropless) > 1e-4 and abs(grouped - one_group) > 1e-5


def test_parameters_are_sharded_by_the_rules():
    cfg = micro(parallel=RECIPES["fsdp_tp_ep"][0])
    _, _, state = _loss_and_grads(cfg, jax.devices())
    model_state = state[0]
    w_gate = model_state["blocks"][0]["ffn"]["experts"]["w_gate"].get_value()
    assert w_gate.sharding.spec == logical_to_spec(("expert", "expert_embed", "expert_mlp"))
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


def test_pallas_kernels_run_on_local_shards_inside_shard_map():
    # The Pallas GPU kernels (interpreted on CPU) cannot be split by the partitioner: under
    # tensor and expert parallelism they must see each device's heads and experts and still
    # give the single-device result.
    kernels = {"attention": "pallas_gpu", "gmm": "pallas_gpu"}
    model = {**ONE_LAYER, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16}
    one = _loss_and_grads(micro(moe=MOE, model=model, kernels=kernels), jax.devices()[:1])
    mesh = {"data": 2, "tensor": 2, "expert": 2, "recipe": "folded"}
    _assert_same(_loss_and_grads(micro(moe=MOE, model=model, kernels=kernels, parallel=mesh),
                                 jax.devices()), one)

"""Test setup: 8 simulated CPU devices (before JAX loads) and small shared configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from toolkit.config import Config, DataConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def micro(**sections) -> Config:
    """A model small enough that a train step compiles in a few seconds on CPU."""
    base = Config(
        name="micro",
        model=ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          d_ff=64, seq_len=16),
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=32),
        parallel=ParallelConfig(data=1),
        train=TrainConfig(steps=8, batch_size=8, learning_rate=3e-3, warmup_steps=2,
                          eval_every=0, eval_batches=1, checkpoint_every=0),
        data=DataConfig(max_code_bytes=300_000),
    )
    for name, changes in sections.items():
        base = dataclasses.replace(base, **{name: dataclasses.replace(getattr(base, name), **changes)})
    return base


@pytest.fixture
def micro_cfg():
    return micro()




def pytest_collection_modifyitems(config, items):
    platform = jax.default_backend()
    for item in items:
        if "gpu" in item.keywords and platform != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (run on the GPU machine)"))
        if "tpu" in item.keywords and platform != "tpu":
            item.add_marker(pytest.mark.skip(reason="needs a TPU"))

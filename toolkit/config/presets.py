"""Presets are functions returning a `Config`; `PRESETS` maps names to them.

`tiny` and `small` train on a CPU; the real-model presets carry published shapes for
analysis (cost models, planning) and are far too large to train here. Where a model uses
a mechanism the toolkit does not model yet (DeepSeek's MLA attention and sigmoid router,
Ling's sigmoid router), the preset keeps the tensor shapes and the top-k softmax router.
"""

import dataclasses

from toolkit.config.schema import (
    Config,
    ConfigError,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
)


def tiny() -> Config:
    """1.8M parameters, 0.66M active per token; trains in a few minutes on a 2-core CPU."""
    return Config(
        name="tiny",
        model=ModelConfig(d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                          head_dim=32, d_ff=256, seq_len=128),
        moe=MoEConfig(num_experts=8, top_k=2, d_expert=128, moe_every=1),
        train=TrainConfig(steps=300, batch_size=32, learning_rate=3e-3, warmup_steps=30),
    )


def small() -> Config:
    """21M parameters, 4.9M active; about an hour on a CPU, minutes on one GPU."""
    return Config(
        name="small",
        model=ModelConfig(d_model=256, num_layers=6, num_heads=8, num_kv_heads=4,
                          head_dim=32, d_ff=1024, seq_len=256),
        moe=MoEConfig(num_experts=16, top_k=2, d_expert=256, num_shared_experts=1),
        train=TrainConfig(steps=2000, batch_size=32, learning_rate=1e-3, warmup_steps=100),
    )


def _analysis(name, model, moe) -> Config:
    return Config(name=name, model=model, moe=moe, parallel=ParallelConfig(),
                  train=TrainConfig(batch_size=1024, learning_rate=3e-4))


def mixtral_8x7b() -> Config:
    """Mixtral 8x7B: 32 layers, 8 experts, top-2, every layer MoE."""
    return _analysis(
        "mixtral_8x7b",
        ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                    head_dim=128, d_ff=14336, seq_len=4096, rope_theta=1e6, dtype="bfloat16"),
        MoEConfig(num_experts=8, top_k=2, d_expert=14336),
    )


def mixtral_8x22b() -> Config:
    """Mixtral 8x22B: 56 layers, 8 experts of width 16384, top-2, every layer MoE."""
    return _analysis(
        "mixtral_8x22b",
        ModelConfig(vocab_size=32768, d_model=6144, num_layers=56, num_heads=48, num_kv_heads=8,
                    head_dim=128, d_ff=16384, seq_len=4096, rope_theta=1e6, dtype="bfloat16"),
        MoEConfig(num_experts=8, top_k=2, d_expert=16384),
    )


def deepseek_v3() -> Config:
    """DeepSeek-V3 shapes: 61 layers (3 dense), 256 routed + 1 shared expert, top-8."""
    return _analysis(
        "deepseek_v3",
        ModelConfig(vocab_size=129280, d_model=7168, num_layers=61, num_heads=128,
                    num_kv_heads=128, head_dim=128, d_ff=18432, seq_len=4096, dtype="bfloat16"),
        MoEConfig(num_experts=256, top_k=8, d_expert=2048, num_shared_experts=1,
                  first_dense_layers=3, renormalize=True),
    )


def ling_mini_2() -> Config:
    """Ling-mini-2.0: 20 layers (1 dense), 256 routed + 1 shared expert of width 512, top-8."""
    return _analysis(
        "ling_mini_2",
        ModelConfig(vocab_size=157184, d_model=2048, num_layers=20, num_heads=16, num_kv_heads=4,
                    head_dim=128, d_ff=5120, seq_len=4096, dtype="bfloat16"),
        MoEConfig(num_experts=256, top_k=8, d_expert=512, num_shared_experts=1,
                  first_dense_layers=1),
    )


def qwen3_30b_a3b() -> Config:
    """Qwen3-30B-A3B: 48 layers, 128 experts of width 768, top-8, no shared expert."""
    return _analysis(
        "qwen3_30b_a3b",
        ModelConfig(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                    head_dim=128, d_ff=6144, seq_len=4096, rope_theta=1e6, dtype="bfloat16"),
        MoEConfig(num_experts=128, top_k=8, d_expert=768),
    )


def dense_twin(cfg: Config) -> Config:
    """A dense model with the MoE model's active parameters per token.

    Each MoE layer becomes a dense SwiGLU of width `top_k * d_expert` plus the shared
    experts' width, so per-token FLOPs match (the router's E x d matmul aside).
    """
    shared = cfg.moe.d_shared_expert or cfg.moe.num_shared_experts * cfg.moe.d_expert
    width = cfg.moe.top_k * cfg.moe.d_expert + shared
    return dataclasses.replace(
        cfg, name=cfg.name + "_dense",
        model=dataclasses.replace(cfg.model, d_ff=width),
        moe=dataclasses.replace(cfg.moe, num_experts=0, num_shared_experts=0, d_shared_expert=0,
                                shared_expert_gate=False),
    )


def _linear_layers(weights: str, acts: str, grads: str) -> PrecisionConfig:
    """One format set on the attention, dense MLP and expert matmuls; router and LM head
    stay in full precision (as DeepSeek-V3 and Ling 2.0 keep them)."""
    return PrecisionConfig.on(("attention", "mlp", "experts"), weights=weights, acts=acts,
                              grads=grads)


# Whole precision policies, set with the override `precision=<name>`.
RECIPES = {
    "none": PrecisionConfig,
    # DeepSeek-V3 / Ling 2.0: E4M3 everywhere, 128x128 weight blocks, 1x128 activation and
    # gradient tiles, FP32 scales.
    "fp8": lambda: _linear_layers("fp8_e4m3_128x128", "fp8_e4m3_1x128", "fp8_e4m3_1x128"),
    # The classic hybrid: E5M2's range for gradients.
    "fp8_e5m2_grads": lambda: _linear_layers("fp8_e4m3_128x128", "fp8_e4m3_1x128", "fp8_e5m2_1x128"),
    # INT v.s. FP's training runs: one MX format for weights, activations and gradients.
    "mxfp8": lambda: _linear_layers("mxfp8", "mxfp8", "mxfp8"),
    "mxint8": lambda: _linear_layers("mxint8", "mxint8", "mxint8"),
}


def precision_recipe(name: str) -> PrecisionConfig:
    """The `PrecisionConfig` of recipe `name` (a key of `RECIPES`)."""
    if name not in RECIPES:
        raise ConfigError(f"precision={name!r} is not a recipe; use one of {sorted(RECIPES)}, "
                          f"or set fields such as precision.experts_weights=mxint8")
    return RECIPES[name]()


PRESETS = {f.__name__: f for f in (tiny, small, mixtral_8x7b, mixtral_8x22b, deepseek_v3, ling_mini_2,
                                    qwen3_30b_a3b)}


def preset(name: str) -> Config:
    """The preset called `name`; an unknown name lists the known ones."""
    if name not in PRESETS:
        from toolkit.config.overrides import suggest
        raise ConfigError(f"unknown preset {name!r}{suggest(name, PRESETS)}; presets: {sorted(PRESETS)}")
    return PRESETS[name]()

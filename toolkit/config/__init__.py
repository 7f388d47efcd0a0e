"""Frozen configuration: every design choice of a run is a value here.

A `Config` holds one dataclass per concern. Configs are frozen and hashable, so a
compiled step is cached per config, and they are built from presets plus dotted
overrides, the same way from the CLI, a notebook or a widget:

    from toolkit.config import apply_overrides, tiny, validate
    cfg = apply_overrides(tiny(), ["moe.num_experts=16", "train.steps=300"])
    validate(cfg, num_devices=8)   # raises ConfigError naming field, value and a fix
"""

from toolkit.config.overrides import all_keys, apply_overrides, config_file_overrides, describe
from toolkit.config.presets import (
                                    PRESETS,
                                    RECIPES,
                                    deepseek_v3,
                                    dense_twin,
                                    ling_mini_2,
                                    mixtral_8x7b,
                                    precision_recipe,
                                    preset,
                                    qwen3_30b_a3b,
                                    small,
                                    tiny,
)
from toolkit.config.schema import (
                                    Config,
                                    ConfigError,
                                    DataConfig,
                                    KernelConfig,
                                    ModelConfig,
                                    MoEConfig,
                                    ParallelConfig,
                                    PrecisionConfig,
                                    TrainConfig,
                                    from_dict,
)
from toolkit.config.validate import config_or_error, validate

__all__ = [
    "PRESETS", "RECIPES", "Config", "ConfigError", "DataConfig", "KernelConfig", "MoEConfig", "ModelConfig",
    "config_file_overrides", "config_or_error",
    "ParallelConfig", "PrecisionConfig", "TrainConfig", "all_keys", "apply_overrides",
    "deepseek_v3", "dense_twin", "describe",
    "from_dict", "ling_mini_2", "mixtral_8x7b", "precision_recipe", "preset", "qwen3_30b_a3b", "small",
    "tiny", "validate",
]

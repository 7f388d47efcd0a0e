"""moe-toolkit: sparse Mixture-of-Experts language models in JAX, every choice a config value.

    import toolkit as tk
    cfg = tk.apply_overrides(tk.tiny(), ["moe.num_experts=16"])
    summary = tk.Trainer(cfg, out_dir="runs/tiny16").run()
"""

from toolkit.config import (
                            PRESETS,
                            Config,
                            ConfigError,
                            DataConfig,
                            ModelConfig,
                            MoEConfig,
                            ParallelConfig,
                            TrainConfig,
                            apply_overrides,
                            dense_twin,
                            describe,
                            preset,
                            small,
                            tiny,
                            validate,
)
from toolkit.data import Batches, ByteTokenizer, load_corpus
from toolkit.generation import Generation, generate, generate_uncached
from toolkit.models.transformer import Transformer
from toolkit.moe import MoEAux, MoELayer, Routing
from toolkit.sharding import make_mesh
from toolkit.training import Trainer

__all__ = ["PRESETS", "Batches", "ByteTokenizer", "Config", "ConfigError", "DataConfig", "Generation",
           "MoEAux", "MoEConfig", "MoELayer", "ModelConfig", "ParallelConfig", "Routing", "TrainConfig",
           "Trainer", "Transformer", "apply_overrides", "dense_twin", "describe", "generate",
           "generate_uncached", "load_corpus", "make_mesh", "preset", "small", "tiny", "validate"]

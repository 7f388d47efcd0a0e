"""Checkpoints of other libraries in and out; `hf`: Hugging Face MoE models.

    from toolkit.interop import load_hf, save_hf
    cfg, model = load_hf("Qwen3-30B-A3B/")       # a local checkpoint directory
    save_hf(model, cfg, "export/")                # loads in transformers with the same logits
"""

from toolkit.interop.hf import (
    check_hf,
    hf_config,
    load_hf,
    load_hf_params,
    model_from_params,
    save_hf,
)
from toolkit.interop.hf_config import (
    ARCHITECTURES,
    HFError,
    config_from_hf,
    infer_architecture,
    read_hf_config,
    to_hf_config,
)

__all__ = ["ARCHITECTURES", "HFError", "check_hf", "config_from_hf", "hf_config", "infer_architecture",
           "load_hf", "load_hf_params", "model_from_params", "read_hf_config", "save_hf", "to_hf_config"]

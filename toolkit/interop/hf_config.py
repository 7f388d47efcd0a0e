"""Hugging Face MoE configs <-> toolkit `Config`.

A Hugging Face checkpoint directory holds a `config.json` whose `architectures` names the
model class. Four MoE families map onto the toolkit's `Transformer` exactly:

    MixtralForCausalLM     softmax -> top-k -> renormalise, every layer MoE
    Qwen2MoeForCausalLM    q/k/v biases, a gated shared expert of its own width,
                           decoder_sparse_step / mlp_only_layers (as moe_every / first_dense_layers)
    Qwen3MoeForCausalLM    q/k RMSNorm per head (model.qk_norm="head")
    OlmoeForCausalLM       q/k RMSNorm over the whole projection (model.qk_norm="full")

    cfg = config_from_hf(read_hf_config("ckpt/"))     # a Config: float32, dropless dispatch
    hf = to_hf_config(cfg, "Qwen3MoeForCausalLM")     # the config.json that `save_hf` writes

What does not map (DeepSeek's MLA attention, sliding windows, scaled RoPE, OLMoE's clip_qkv,
output-projection biases, a pattern of MoE layers that is not "every n-th past the first
few") raises `HFError` (a `ConfigError`, so the CLI prints `error: ...`) naming the field,
the value seen and what is supported.
"""

import json
from pathlib import Path

from toolkit.config import Config, ConfigError, ModelConfig, MoEConfig
from toolkit.models.transformer import moe_layer_indices


class HFError(ConfigError):
    """A Hugging Face checkpoint (or an export request) the toolkit cannot take as it is."""


ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe"}
"""Supported `architectures` entry -> `model_type`."""

_MLA = {"DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3"}
_DEFAULT_THETA = {"mixtral": 1e6}          # transformers' default when config.json has none
_SUPPORTED = ", ".join(ARCHITECTURES)
_QK_NORM = {"qwen3_moe": "head", "olmoe": "full"}


def read_hf_config(path) -> dict:
    """The parsed `config.json` of checkpoint directory `path`."""
    path = Path(path)
    if not path.is_dir():
        raise HFError(f"Hugging Face checkpoint {str(path)!r} is not a directory; give a local "
                      f"directory holding config.json and *.safetensors (e.g. from "
                      f"save_pretrained or huggingface-cli download)")
    file = path / "config.json"
    if not file.is_file():
        raise HFError(f"{str(path)!r} has no config.json, so it is not a Hugging Face checkpoint "
                      f"directory; it holds {sorted(p.name for p in path.iterdir())[:8]}")
    try:
        hf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise HFError(f"{file} holds a JSON {type(hf).__name__}, not an object of config keys")
    return hf


def architecture_of(hf: dict) -> str:
    """The supported architecture `hf` describes (from `architectures`, else `model_type`)."""
    archs = hf.get("architectures") or [a for a, t in {**ARCHITECTURES, **_MLA}.items()
                                        if t == hf.get("model_type")]
    for arch in archs:
        if arch in _MLA or hf.get("q_lora_rank") is not None or "kv_lora_rank" in hf:
            raise HFError(f"architectures={archs}: {arch} uses multi-head latent attention (MLA: "
                          f"q_lora_rank={hf.get('q_lora_rank')}, kv_lora_rank="
                          f"{hf.get('kv_lora_rank')}), which the toolkit's attention does not "
                          f"implement; supported architectures: {_SUPPORTED}")
        if arch in ARCHITECTURES:
            return arch
    raise HFError(f"architectures={archs} (model_type={hf.get('model_type')!r}) is not supported; "
                  f"supported architectures: {_SUPPORTED}")


def _rope_theta(hf: dict, model_type: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = params.get("rope_type", "default")
    if kind != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise HFError(f"rope scaling {scaling or params} is not supported (the toolkit's RoPE is "
                      f"the default rope_type); use a checkpoint with rope_type 'default'")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFError("partial_rotary_factor != 1 is not supported; the toolkit rotates whole heads")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else _DEFAULT_THETA.get(model_type, 10000.0))


def _moe_pattern(hf: dict, num_layers: int, num_experts: int) -> tuple:
    """(moe_every, first_dense_layers) giving Qwen's MoE layers: i not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0."""
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or [])
    want = [i for i in range(num_layers) if num_experts and i not in only and (i + 1) % step == 0]
    for first in range(num_layers):
        probe = Config(model=ModelConfig(num_layers=num_layers),
                       moe=MoEConfig(num_experts=num_experts, moe_every=step, first_dense_layers=first))
        if moe_layer_indices(probe) == want:
            return step, first
    raise HFError(f"mlp_only_layers={sorted(only)} with decoder_sparse_step={step} makes layers "
                  f"{want} MoE; the toolkit expresses MoE layers only as every moe_every-th layer "
                  f"past the first first_dense_layers (set mlp_only_layers to a prefix like "
                  f"[0, 1])")


def _refuse_unsupported(hf: dict, arch: str, model_type: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"hidden_act={hf['hidden_act']!r} is not supported; the toolkit's experts are "
                      f"SwiGLU (hidden_act 'silu')")
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", model_type == "mixtral") and window:
        raise HFError(f"sliding_window={window} is not supported (the toolkit attends over the whole "
                      f"causal prefix); use a checkpoint with sliding_window null / "
                      f"use_sliding_window false")
    if hf.get("clip_qkv") is not None:
        raise HFError(f"clip_qkv={hf['clip_qkv']} (OLMoE's q/k/v clamping) is not supported; "
                      f"use clip_qkv null")
    if model_type in ("qwen3_moe", "olmoe") and hf.get("attention_bias"):
        raise HFError(f"attention_bias=true in {arch} also biases the output projection, which "
                      f"the toolkit does not have; use attention_bias false")


def config_from_hf(hf: dict) -> Config:
    """The toolkit `Config` of a Hugging Face config dict (float32, dropless dispatch)."""
    arch = architecture_of(hf)
    model_type = ARCHITECTURES[arch]
    _refuse_unsupported(hf, arch, model_type)
    try:
        d, n, layers = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        vocab, d_ff = int(hf["vocab_size"]), int(hf["intermediate_size"])
    except KeyError as e:
        raise HFError(f"config.json of {arch} lacks {e.args[0]!r}") from None
    head_dim = int(hf.get("head_dim") or d // n)
    if model_type == "olmoe" and n * head_dim != d:
        raise HFError(f"OLMoE's q_norm spans hidden_size={d}, but num_attention_heads * head_dim = "
                      f"{n} * {head_dim}; use head_dim = hidden_size / num_attention_heads")
    experts = int(hf.get("num_local_experts" if model_type == "mixtral" else "num_experts",
                         hf.get("num_local_experts", hf.get("num_experts", 0))) or 0)
    moe_every, first_dense = (_moe_pattern(hf, layers, experts)
                              if model_type in ("qwen2_moe", "qwen3_moe") else (1, 0))
    qwen2 = model_type == "qwen2_moe"
    model = ModelConfig(
        vocab_size=vocab, d_model=d, num_layers=layers, num_heads=n,
        num_kv_heads=int(hf.get("num_key_value_heads") or n), head_dim=head_dim, d_ff=d_ff,
        seq_len=min(128, int(hf.get("max_position_embeddings", 128))),
        rope_theta=_rope_theta(hf, model_type), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        dtype="float32", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("qkv_bias", True)) if qwen2 else False,
        qk_norm=_QK_NORM.get(model_type, ""))
    moe = MoEConfig(
        num_experts=experts, top_k=int(hf.get("num_experts_per_tok", 2)),
        d_expert=int(hf["moe_intermediate_size"]) if "moe_intermediate_size" in hf else d_ff,
        num_shared_experts=1 if qwen2 else 0,
        d_shared_expert=int(hf.get("shared_expert_intermediate_size", 0)) if qwen2 else 0,
        shared_expert_gate=qwen2, moe_every=moe_every, first_dense_layers=first_dense,
        router="topk_softmax", renormalize=(model_type == "mixtral"
                                            or bool(hf.get("norm_topk_prob", False))),
        router_jitter=float(hf.get("router_jitter_noise", 0.0) or 0.0),
        aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)), z_loss_weight=0.0,
        dispatch="dropless")
    return Config(name=f"hf-{model_type}", model=model, moe=moe)


def _export_problems(cfg: Config, arch: str) -> list:
    m, moe, kind = cfg.model, cfg.moe, ARCHITECTURES[arch]
    problems = []
    if moe.num_experts == 0:
        problems.append("moe.num_experts=0 (a dense model)")
    for key, value, ok in (("moe.router", moe.router, "topk_softmax"),
                           ("moe.router_placement", moe.router_placement, "post_attention"),
                           ("moe.expert_activation", moe.expert_activation, "swiglu"),
                           ("moe.small_experts", moe.small_experts, 0),
                           ("moe.num_local_experts", moe.num_local_experts, 0),
                           ("moe.bigmac_ratio", moe.bigmac_ratio, 0.0),
                           ("moe.gating_residual", moe.gating_residual, False),
                           ("model.mtp_layers", m.mtp_layers, 0),
                           ("model.qk_norm", m.qk_norm, _QK_NORM.get(kind, ""))):
        if value != ok:
            problems.append(f"{key}={value!r} (needs {ok!r})")
    if m.attention_bias and kind != "qwen2_moe":
        problems.append("model.attention_bias=True (only Qwen2MoeForCausalLM has q/k/v biases)")
    gated_shared = moe.num_shared_experts > 0 and moe.shared_expert_gate
    if kind == "qwen2_moe" and not gated_shared:
        problems.append(f"moe.num_shared_experts={moe.num_shared_experts}, moe.shared_expert_gate="
                        f"{moe.shared_expert_gate} (Qwen2-MoE has one gated shared expert)")
    if kind != "qwen2_moe" and moe.num_shared_experts:
        problems.append(f"moe.num_shared_experts={moe.num_shared_experts} (no shared experts)")
    if kind in ("mixtral", "olmoe") and (moe.moe_every != 1 or moe.first_dense_layers):
        problems.append(f"moe.moe_every={moe.moe_every}, moe.first_dense_layers="
                        f"{moe.first_dense_layers} (every layer is MoE)")
    if kind == "mixtral" and not moe.renormalize:
        problems.append("moe.renormalize=False (Mixtral renormalises the top-k weights)")
    if kind == "olmoe" and m.num_heads * m.head_dim != m.d_model:
        problems.append(f"model.num_heads * head_dim = {m.num_heads * m.head_dim} != d_model="
                        f"{m.d_model} (OLMoE's q_norm spans hidden_size)")
    return problems


def infer_architecture(cfg: Config) -> str:
    """The architecture whose features `cfg` uses: q/k norm picks Qwen3-MoE ("head") or
    OLMoE ("full"), a gated shared expert Qwen2-MoE, otherwise Mixtral."""
    if cfg.model.qk_norm:
        return "Qwen3MoeForCausalLM" if cfg.model.qk_norm == "head" else "OlmoeForCausalLM"
    if cfg.moe.num_shared_experts or cfg.model.attention_bias:
        return "Qwen2MoeForCausalLM"
    return "MixtralForCausalLM"


def to_hf_config(cfg: Config, architecture: str) -> dict:
    """The `config.json` dict of `cfg` as `architecture`; HFError when it cannot hold cfg."""
    if architecture not in ARCHITECTURES:
        raise HFError(f"architecture={architecture!r} cannot be written; use one of {_SUPPORTED}")
    problems = _export_problems(cfg, architecture)
    if problems:
        raise HFError(f"{architecture} cannot hold this config: " + "; ".join(problems))
    m, moe, kind = cfg.model, cfg.moe, ARCHITECTURES[architecture]
    hf = {"architectures": [architecture], "model_type": kind, "vocab_size": m.vocab_size,
          "hidden_size": m.d_model, "num_hidden_layers": m.num_layers,
          "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
          "head_dim": m.head_dim, "hidden_act": "silu", "rms_norm_eps": m.norm_eps,
          "tie_word_embeddings": m.tie_embeddings, "max_position_embeddings": m.seq_len,
          "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
          "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_weight,
          "dtype": "float32", "use_cache": True}
    width = moe.expert_width(m.d_ff)
    if kind == "mixtral":
        hf.update(num_local_experts=moe.num_experts, intermediate_size=width, sliding_window=None,
                  router_jitter_noise=moe.router_jitter)
    elif kind == "olmoe":
        hf.update(num_experts=moe.num_experts, intermediate_size=width, clip_qkv=None,
                  attention_bias=False, norm_topk_prob=moe.renormalize)
    else:
        hf.update(num_experts=moe.num_experts, moe_intermediate_size=width, intermediate_size=m.d_ff,
                  decoder_sparse_step=moe.moe_every, mlp_only_layers=list(range(moe.first_dense_layers)),
                  norm_topk_prob=moe.renormalize, use_sliding_window=False)
        if kind == "qwen2_moe":
            hf.update(qkv_bias=m.attention_bias,
                      shared_expert_intermediate_size=moe.shared_width(m.d_ff))
        else:
            hf.update(attention_bias=False)
    return hf

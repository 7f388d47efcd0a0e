"""The config dataclasses: one per concern, frozen, keyword-only, documented field by field."""

import dataclasses
import json
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, value and a fix."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The transformer around the MoE layers.

    Attributes:
      vocab_size: embedding rows; the byte tokenizer needs at least 259 (256 bytes + 3 specials).
      d_model: residual stream width.
      num_layers: transformer blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (grouped-query attention); divides num_heads.
      head_dim: width of one attention head.
      d_ff: hidden width of the dense SwiGLU MLP in non-MoE layers.
      seq_len: tokens per training sequence.
      rope_theta: RoPE base frequency.
      norm_eps: RMSNorm epsilon.
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      tie_embeddings: reuse the input embedding as the output projection.
      mtp_layers: multi-token-prediction depth (DeepSeek-V3, Ling 2.0 use 1): module j
        combines the previous depth's hidden state with the embedding of token t+j, runs one
        more dense block, and predicts token t+j+1 through the shared output projection.
      mtp_loss_weight: weight of the mean MTP cross-entropy added to the loss (0.1 in Ling 2.0).
      attention_bias: add learned biases to the q, k and v projections (Qwen2-MoE).
      qk_norm: RMS-normalise queries and keys before RoPE: "" (off), "head" (each head over
        head_dim, one scale per head_dim entry shared by the heads; Qwen3-MoE) or "full" (the
        whole q and k projections over heads * head_dim, one scale per entry; OLMoE).
    """

    vocab_size: int = 264
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 512
    seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"
    tie_embeddings: bool = False
    mtp_layers: int = 0
    mtp_loss_weight: float = 0.1
    attention_bias: bool = False
    qk_norm: str = ""


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """The sparse layers: router -> dispatch -> experts -> combine.

    Attributes:
      num_experts: routed experts per MoE layer; 0 makes every layer dense.
      top_k: experts chosen per token.
      d_expert: hidden width of one routed expert (SwiGLU).
      num_shared_experts: always-on experts of width d_expert, added to the routed output.
      d_shared_expert: when > 0, the hidden width of the shared experts together instead of
        num_shared_experts * d_expert (Qwen2-MoE's shared_expert_intermediate_size).
      shared_expert_gate: scale the shared experts' output per token by sigmoid(x W_s), W_s
        `[d_model, 1]` (Qwen2-MoE).
      moe_every: every n-th layer is MoE (layers n-1, 2n-1, ...); 1 makes every layer MoE.
      first_dense_layers: this many leading layers stay dense whatever moe_every says.
      expert_fraction: when > 0, d_expert is this fraction of model.d_ff instead (fine-grained
        experts: 0.25 with 4x the experts keeps FLOPs and parameters of 1x at full width).
      expert_activation: "swiglu" (silu(x W_g) * x W_u) or "reglu" (relu(x W_g) * x W_u;
        SmallThinker), whose exact zeros are measured as activation sparsity.
      small_experts: extra routed experts of width d_small_expert (Duo-LLM big/small
        experts); ids num_experts .. num_experts + small_experts - 1.
      d_small_expert: hidden width of a small expert.
      zero_experts: MoE++ zero-computation experts E(x) = 0 (Duo-LLM's "skip"); never dispatched.
      copy_experts: MoE++ copy experts E(x) = x.
      constant_experts: MoE++ constant experts E(x) = a1 x + a2 v, [a1, a2] = softmax(W_c x).
      gru_experts: Hecto-style experts of another kind: a causal GRU of width d_gru_expert
        over the sequence, projected back to d_model (computed for every token, like
        attention, and weighed in only where routed).
      d_gru_expert: hidden width of a GRU expert.
      zc_tau: MoE++ tau: the balance loss weighs the zero, copy and constant experts' terms by
        tau and the others' by 1; smaller tau sends more tokens to the cheap experts (MoE++
        uses 0.75 at 7B and sweeps 0.1 to 1).
      gating_residual: MoE++ gating residuals: add W_g (previous MoE layer's router logits)
        to this layer's logits.
      bigmac_ratio: BigMac (DCCA) when > 0: a shared down-projection to bigmac_ratio * d_model
        before dispatch and an up-projection after combine; experts work at that width.
      router: routing rule: "topk_softmax" (softmax, top-k; Switch/GShard/Mixtral),
        "sigmoid_bias" (sigmoid scores, aux-loss-free bias balancing; DeepSeek-V3/Ling 2.0),
        "top_p" (experts until their probability reaches moe.top_p; at most top_k),
        "expert_choice" (each expert takes its best top_k * T / E tokens of the batch),
        "recurrent" (RMoE: a GRU shared across layers carries routing state from layer to
        layer) or "tsallis" (DynMoLE: top-p with at least top_k experts, all experts when
        the normalised Tsallis entropy exceeds tsallis_threshold).
      router_placement: "post_attention" (route the normed FFN input) or "pre_attention"
        (route the raw block input before attention, SmallThinker; the decision is known one
        attention block early).
      router_jitter: multiply the router input by U(1 - eps, 1 + eps) in training (Switch
        uses 1e-2); 0 = off. Evaluation never jitters.
      top_p: "top_p" and "tsallis": probability mass a token's experts must reach (0.4 in
        the top-p paper, 0.75 in DynMoLE).
      renormalize: rescale the chosen experts' weights to sum to one.
      routed_scaling: factor on the routed experts' combine weights ("sigmoid_bias"; 2.5 in
        Ling 2.0, 2.5 in DeepSeek-V3).
      router_groups: "sigmoid_bias": split the experts into this many groups and pick experts
        only from each token's `router_topk_groups` best groups (a group scores the sum of
        its two best experts); 1 = no grouping.
      router_topk_groups: groups kept per token when `router_groups` > 1.
      bias_update_rate: "sigmoid_bias": step u of the aux-loss-free bias update after every
        training step (1e-3 in DeepSeek-V3 / Ling 2.0); 0 freezes the bias.
      recurrent_dim: "recurrent": width p of the per-layer projection and the shared GRU
        (128 in RMoE).
      tsallis_q: "tsallis": entropic index q of S_q(p) = (1 - sum p^q) / (q - 1) (1.1).
      tsallis_threshold: "tsallis": normalised entropy above which a token takes all experts (0.9).
      aux_loss_weight: weight of the Switch load-balancing loss E * sum_i f_i P_i.
      z_loss_weight: weight of the router z-loss mean(logsumexp(logits)^2).
      seq_aux_loss_weight: weight of the sequence-level balance loss (DeepSeek-V3): the
        Switch loss computed within each sequence, averaged over sequences; 0 = off.
      entropy_loss_weight: weight of the mean router entropy -sum_i p_i log p_i (the
        "dynamic loss" of top-p routing; 1e-4 in public configs); 0 = off.
      tsallis_loss_weight: weight of the mean normalised Tsallis entropy of the router
        (DynMoLE, 0.01); 0 = off.
      dispatch: "dropless" (sort by expert, grouped matmul) or "capacity" (fixed slots).
      capacity_factor: capacity dispatch slots per expert = ceil(cf * tokens * top_k / E),
        tokens counted per dispatch group.
      dispatch_groups: split the batch into this many groups of whole sequences, each
        dispatched on its own; 0 = one group per batch shard of the mesh (local dispatch).
    """

    num_experts: int = 8
    top_k: int = 2
    d_expert: int = 256
    num_shared_experts: int = 0
    d_shared_expert: int = 0
    shared_expert_gate: bool = False
    moe_every: int = 1
    first_dense_layers: int = 0
    expert_fraction: float = 0.0
    expert_activation: str = "swiglu"
    small_experts: int = 0
    d_small_expert: int = 64
    zero_experts: int = 0
    copy_experts: int = 0
    constant_experts: int = 0
    gru_experts: int = 0
    d_gru_expert: int = 64
    zc_tau: float = 1.0
    gating_residual: bool = False
    bigmac_ratio: float = 0.0
    router: str = "topk_softmax"
    router_placement: str = "post_attention"
    router_jitter: float = 0.0
    top_p: float = 0.4
    renormalize: bool = True
    routed_scaling: float = 1.0
    router_groups: int = 1
    router_topk_groups: int = 1
    bias_update_rate: float = 1e-3
    recurrent_dim: int = 128
    tsallis_q: float = 1.1
    tsallis_threshold: float = 0.9
    aux_loss_weight: float = 0.01
    seq_aux_loss_weight: float = 0.0
    z_loss_weight: float = 1e-3
    entropy_loss_weight: float = 0.0
    tsallis_loss_weight: float = 0.0
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    dispatch_groups: int = 0

    @property
    def num_ffn_experts(self) -> int:
        """Dispatched experts: big (num_experts) then small; ids 0 .. num_ffn_experts - 1."""
        return self.num_experts + self.small_experts

    @property
    def num_local_experts(self) -> int:
        """Experts computed where the token is: zero, copy, constant, then GRU (ids after FFN)."""
        return self.zero_experts + self.copy_experts + self.constant_experts + self.gru_experts

    @property
    def num_routed(self) -> int:
        """Every expert the router chooses among: FFN experts, then the local ones."""
        return self.num_ffn_experts + self.num_local_experts

    def expert_width(self, d_ff: int) -> int:
        """Hidden width of a (big) routed expert: expert_fraction * d_ff, or d_expert."""
        return max(1, round(self.expert_fraction * d_ff)) if self.expert_fraction else self.d_expert

    def shared_width(self, d_ff: int) -> int:
        """Hidden width of the shared experts together (0 without any): d_shared_expert, or
        num_shared_experts routed-expert widths."""
        if not self.num_shared_experts:
            return 0
        return self.d_shared_expert or self.num_shared_experts * self.expert_width(d_ff)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Mesh axis sizes; their product must equal the device count. -1 takes what is left.

    Attributes:
      data: data-parallel replicas (batch split, parameters replicated).
      fsdp: fully-sharded data parallel (batch split, parameters sharded on `embed`).
      tensor: tensor parallel (heads, MLP hidden and vocab split).
      expert: expert parallel (experts split; the batch is split over it too).
      recipe: the rules table that maps logical axes onto these mesh axes
        (`toolkit.sharding.RECIPES`): dp, fsdp, tp, ep, fsdp_ep, fsdp_tp_ep (every axis
        takes its role; the default) or folded (MoE Parallel Folding: attention
        tensor-parallel over `tensor`, experts expert-parallel over `expert x tensor`).
        A mesh axis of size > 1 must be one the recipe uses.
      dropless_exchange: how dropless dispatch moves tokens between expert-parallel devices:
        "ragged_all_to_all" (each token row to the device of its expert; GPU/TPU),
        "all_gather" (every device gathers the group's tokens, computes its own experts'
        rows, and a reduce-scatter returns the sums: the "ring of experts"; any backend),
        or "auto" (ragged_all_to_all on GPU/TPU, all_gather on CPU where XLA lacks it).
        Capacity dispatch always uses fixed-size all-to-alls.
      overlap_chunks: split each device's communication into this many independent
        pieces so one piece's communication can overlap another's compute: the expert
        exchange by capacity slots or tokens (Tutel-style pipelining), and the tensor-parallel
        all-reduces by sequences (TokenWeave-style token split). Results are identical.
      pipeline: pipeline stages (`toolkit.sharding.pipeline`). The layers are split into
        `pipeline * virtual_stages` equal chunks of identical structure; the embedding and
        output layer are split over vocabulary across the pipeline (and tensor) devices
        (vocabulary parallelism). Each step runs `train.microbatches` micro-batches.
      sequence: context parallelism: each sequence is split into this many contiguous
        pieces; attention exchanges keys and values (`context`), everything else is per token.
      schedule: pipeline schedule (`toolkit.sharding.schedules`): "gpipe" (all forwards,
        then all backwards), "1f1b" (PipeDream-Flush: at most p micro-batches in flight)
        or "interleaved" (1F1B over `virtual_stages` chunks per device; Megatron).
      virtual_stages: model chunks per pipeline device (v); > 1 needs "interleaved".
      pipeline_remat: keep only each stage's input per in-flight micro-batch and recompute
        the stage forward in its backward (GPipe's re-materialisation); False keeps the
        stage's autodiff residuals instead (more memory, no recompute).
      context: how context-parallel attention sees other pieces' keys and values: "ring"
        (ring attention: K/V blocks passed around the `sequence` axis with `ppermute`,
        online softmax) or "all_gather" (gather all K/V, attend to the causal prefix).
      sequence_parallel: Megatron sequence parallelism: with tensor > 1, activations
        outside attention and MLPs (norms, residual adds, routers) are split over `tensor`
        along the sequence; the tensor-parallel all-reduce becomes a reduce-scatter, and an
        all-gather precedes each tensor-parallel block.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    recipe: str = "fsdp_tp_ep"
    dropless_exchange: str = "auto"
    overlap_chunks: int = 1
    pipeline: int = 1
    sequence: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    pipeline_remat: bool = True
    context: str = "ring"
    sequence_parallel: bool = False

    def axis_sizes(self, num_devices: int) -> dict:
        """Axis name -> size with a -1 resolved against `num_devices`."""
        sizes = {a: getattr(self, a) for a in ("pipeline", "data", "fsdp", "sequence", "tensor",
                                               "expert")}
        known = 1
        for v in sizes.values():
            known *= v if v > 0 else 1
        return {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation and the loop around it.

    Attributes:
      steps: optimizer steps.
      batch_size: sequences per step (global, split over data, fsdp and expert axes).
      learning_rate: peak AdamW learning rate.
      warmup_steps: linear warmup before cosine decay.
      min_lr_ratio: final learning rate as a fraction of the peak.
      weight_decay: AdamW decoupled weight decay.
      b1: Adam beta1.
      b2: Adam beta2.
      grad_clip: global-norm gradient clipping (0 disables).
      seed: parameter initialisation and batch sampling seed.
      eval_every: steps between validation passes (0: only at the end).
      eval_batches: validation batches per domain per pass.
      checkpoint_every: steps between checkpoints (0: only at the end).
      keep_checkpoints: how many recent checkpoints to keep.
      log_every: steps between metric lines in metrics.jsonl.
      microbatches: split each batch into this many micro-batches whose gradients are
        accumulated into one optimizer step (the loss is their mean); with
        `parallel.pipeline > 1` these are the pipeline's micro-batches (m).
      nonfinite: what a step whose loss or gradient norm is NaN or infinite does. Either
        way that step changes neither parameters nor optimizer state and is logged as
        skipped. "skip" (default: one bad batch or spike costs one step, not the run)
        continues; "stop" ends the run with an error naming the step and the value,
        keeping the last checkpoint (a checkpoint is never saved holding NaN).
      max_skipped_steps: with "skip", end the run like "stop" after this many skipped
        steps in a row (a diverged run skips every step).
    """

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    microbatches: int = 1
    nonfinite: str = "skip"
    max_skipped_steps: int = 10


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where tokens come from.

    Attributes:
      corpus: "python_docs" (built in: documentation prose + stdlib code) or "paths".
      paths: text files or folders, one domain each, when corpus == "paths".
      max_code_bytes: bytes of standard-library source read for the code domain.
      val_fraction: share of documents held out for validation (by document).
      domain_weights: sampling weight per domain; empty means equal weights.
    """

    corpus: str = "python_docs"
    paths: tuple = ()
    max_code_bytes: int = 3_000_000
    val_fraction: float = 0.05
    domain_weights: tuple = ()


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Which backend runs the hot paths (`pallas_kernels`); "" picks the best for the platform.

    Attributes:
      gmm: grouped matmul of the experts: "pallas_gpu", "pallas_tpu", "xla", "ragged_dot",
        "reference", or "" (Pallas on GPU/TPU, "xla" on CPU, with a fixed fallback order).
        A Pallas backend on CPU runs in the interpreter: correct, for checking, and slow.
      attention: "pallas_gpu", "pallas_tpu", "xla", "cudnn" (NVIDIA GPUs), "reference", or
        "" (Pallas flash attention on GPU/TPU, "xla" on CPU).
    """

    gmm: str = ""
    attention: str = ""


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """Number formats of the matmuls (fake-quant training and inference; `toolkit.precision`).

    Each matmul class has a format for its weights, its input activations and its output
    gradient (the cotangent, quantized once and used for both the input and the weight
    gradient). A format is a name from `toolkit.precision.FORMATS` ("fp8_e4m3_1x128",
    "mxint8", "nvfp4", "int4", ...) or "" for full precision. Whole recipes:
    `toolkit.config.RECIPES` ("fp8", "mxfp8", "mxint8"), set with `precision=fp8`.

    Attributes:
      attention_weights: q, k, v and output projection weights.
      attention_acts: inputs of those projections.
      attention_grads: gradients of their outputs.
      mlp_weights: dense SwiGLU layers (non-MoE layers).
      mlp_acts: inputs of the dense SwiGLU matmuls.
      mlp_grads: gradients of their outputs.
      experts_weights: routed and shared experts' matmuls.
      experts_acts: inputs of the experts' matmuls.
      experts_grads: gradients of their outputs.
      router_weights: the router projection (full precision by default, as in DeepSeek-V3).
      router_acts: the router's input.
      router_grads: the gradient of the router logits.
      head_weights: the output projection (LM head).
      head_acts: its input.
      head_grads: the gradient of the logits.
      kv_cache: format of the cached keys and values (per token and head, along head_dim),
        "" for none; applied wherever attention runs under this config (meant for eval).
      rotation: random Hadamard rotation block applied to both operands of every quantized
        matmul along the contraction axis before quantizing (0: none; 16, 32, ...).
      mode: "fake" (quantize-dequantize in float32, any backend), "native" (a real fp8 dot
        with float32 accumulation for every class whose weights and activations are both FP8,
        except the experts, whose grouped matmul takes float operands), or "auto" (native
        on GPUs with FP8 units, fake elsewhere).
    """

    attention_weights: str = ""
    attention_acts: str = ""
    attention_grads: str = ""
    mlp_weights: str = ""
    mlp_acts: str = ""
    mlp_grads: str = ""
    experts_weights: str = ""
    experts_acts: str = ""
    experts_grads: str = ""
    router_weights: str = ""
    router_acts: str = ""
    router_grads: str = ""
    head_weights: str = ""
    head_acts: str = ""
    head_grads: str = ""
    kv_cache: str = ""
    rotation: int = 0
    mode: str = "auto"

    @classmethod
    def on(cls, classes, *, weights: str = "", acts: str = "", grads: str = "", **rest):
        """One format set on each matmul class in `classes`, the rest full precision;
        `rest` sets kv_cache, rotation or mode."""
        roles = {"weights": weights, "acts": acts, "grads": grads}
        return cls(**{f"{c}_{r}": f for c in classes for r, f in roles.items()}, **rest)


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run. `name` labels the run directory."""

    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# Keys that moved between sections, and values renamed; configs saved before still load.
MOVED_KEYS = {("moe", "gmm_impl"): ("kernels", "gmm")}
RENAMED_VALUES = {("moe", "router"): {"topk": "topk_softmax"}}


def from_dict(d: dict) -> Config:
    """Inverse of `Config.to_dict` (lists become tuples); also reads configs saved before a
    key moved (`MOVED_KEYS`). An unknown key raises ConfigError naming it."""
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    classes = dict(model=ModelConfig, moe=MoEConfig, parallel=ParallelConfig,
                   train=TrainConfig, data=DataConfig, kernels=KernelConfig,
                   precision=PrecisionConfig)
    d = {k: dict(v) if k in classes else v for k, v in d.items()}
    for (sec, key), (new_sec, new_key) in MOVED_KEYS.items():
        if key in d.get(sec, {}):
            d.setdefault(new_sec, {}).setdefault(new_key, d[sec].pop(key))
    for (sec, key), renames in RENAMED_VALUES.items():
        if d.get(sec, {}).get(key) in renames:
            d[sec][key] = renames[d[sec][key]]
    kw = {}
    for key, value in d.items():
        if key in classes:
            known = {f.name for f in dataclasses.fields(classes[key])}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"config has unknown keys {[f'{key}.{k}' for k in unknown]} "
                                  f"(saved by another version?); known {key} keys: {sorted(known)}")
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            kw[key] = classes[key](**value)
        elif key in kinds:
            kw[key] = value
    return Config(**kw)

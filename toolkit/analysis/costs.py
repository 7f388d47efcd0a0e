"""What one training step of a config costs each device: FLOPs, memory and bytes moved.

Everything comes from the config alone, in closed form, so a 671B-parameter preset costs
no more to analyse than `tiny`. The same numbers are read off compiled programs in the
tests (`toolkit.analysis.compiled`), which is what keeps these formulas honest:

    c = estimate_costs(preset("mixtral_8x7b"), num_devices=64)
    c.flops["experts"]             # forward dot FLOPs per token spent in routed experts
    c.device_flops                 # dot FLOPs one device runs per step (backward, recompute)
    c.memory["optimizer"]          # bytes of AdamW state one device holds
    c.communication                # [{"axis", "collective", "what", "bytes"}] per step

**FLOPs** count dots only, 2 per multiply-add (the MFU convention), per token of the
forward pass, split as `attention` (q, k, v and output projections), `attention_scores`
(QK^T and PV over the full square, as the XLA path computes it; `causal=True` halves it,
the flash kernels' saving), `dense` MLPs, `shared` experts, `router`, routed `experts` (k
full-width experts per token: the dropless work; capacity dispatch computes E*C padded
rows instead), `head` and `mtp`. A training step runs 3x the forward (the backward
multiplies each dot twice), plus one more forward of the blocks under rematerialisation.
Each component is divided over the mesh axes that split its work (tokens over the
`batch`/`seq` axes, weights over `heads`/`mlp`/`expert`/`vocab`, layers over `pipeline`);
what a rules table leaves unsplit runs redundantly, e.g. the router over `tensor`.

**Memory** per device: parameters, AdamW's two moments and the gradients (float32, sharded
as the rules table says, read from the model's own logical axes), the activations the
backward keeps (without and with per-layer rematerialisation, Korthikanti et al. 2022's
accounting adapted to the toolkit's layers) and an inference KV cache.

**Communication** per device per step, bytes sent on a ring (`toolkit.analysis.collectives`):
FSDP all-gathers of weights and reduce-scatters of gradients, data-parallel gradient
all-reduces, tensor-parallel activation all-reduces, the expert exchange, pipeline sends
and the context-parallel K/V ring. `toolkit.analysis.step_time` turns these into seconds.
"""

import dataclasses
import functools
import math

import numpy as np

from toolkit.analysis.params import count_params
from toolkit.config import Config
from toolkit.models.transformer import moe_layer_indices
from toolkit.moe.dispatch import capacity
from toolkit.sharding.expert_parallel import comm_bytes
from toolkit.sharding.mesh import rules_for
from toolkit.sharding.rules import logical_to_spec, mesh_axes_of
from toolkit.sharding.schedules import timeline

_ITEMSIZE = {"float32": 4, "bfloat16": 2}
PARAM_BYTES = 4          # parameters, gradients and AdamW moments stay float32
OPTIMIZER_BYTES = 8      # AdamW: mu and nu


@dataclasses.dataclass(frozen=True)
class Costs:
    """One training step of a config on a mesh, per device unless named otherwise.

    Attributes:
      params_total / params_active: parameters, all and per token (`count_params`).
      flops: forward dot FLOPs per token by component (see the module docstring).
      model_flops: 3 x forward FLOPs x tokens per step, all devices: the MFU numerator.
      device_flops: dot FLOPs one device runs per step, recompute and redundancy included.
      device_component_flops: the same split by component.
      tokens: tokens per step (global).
      memory: bytes per device: params, optimizer, gradients, activations (what this
        config keeps), activations_no_remat, activations_remat, kv_cache (inference, one
        batch of `train.batch_size` x `seq_len`), total (params + optimizer + gradients +
        activations).
      communication: rows {"axis", "collective", "what", "bytes"}: bytes one device sends
        per step on a ring, "count": collectives per step, and "beside_compute": whether a
        framework can run it beside the compute (weight gathers, gradient reductions).
      sizes: mesh axis sizes.
    """

    params_total: int
    params_active: int
    flops: dict
    model_flops: float
    device_flops: float
    device_component_flops: dict
    tokens: int
    memory: dict
    communication: list
    sizes: dict


def forward_flops(cfg: Config, *, causal: bool = False) -> dict:
    """Forward dot FLOPs per token by component (averaged over layers: summed, not per layer)."""
    m, moe = cfg.model, cfg.moe
    d, s, hd = m.d_model, m.seq_len, m.head_dim
    n_moe = len(moe_layer_indices(cfg))
    n_dense = m.num_layers - n_moe
    attn_proj = 2 * d * hd * (2 * m.num_heads + 2 * m.num_kv_heads)
    scores = 2 * 2 * s * m.num_heads * hd * (0.5 if causal else 1.0)
    width = moe.expert_width(m.d_ff)
    d_in = max(1, round(moe.bigmac_ratio * m.d_model)) if moe.bigmac_ratio else d
    router = 2 * d * moe.num_routed if n_moe else 0
    if n_moe and moe.router == "recurrent":
        r = moe.recurrent_dim
        router = 2 * (d * r + r * moe.num_routed) + 2 * (r * 3 * r + r * 3 * r)
    if n_moe and moe.gating_residual:
        router += 2 * moe.num_routed * moe.num_routed
    experts = moe.top_k * 2 * 3 * d_in * width + (2 * 2 * d * d_in if moe.bigmac_ratio else 0)
    mlp = 2 * 3 * d * m.d_ff
    mtp = m.mtp_layers * (2 * 2 * d * d + attn_proj + scores + mlp + 2 * d * m.vocab_size)
    return {"attention": m.num_layers * attn_proj, "attention_scores": m.num_layers * scores,
            "dense": n_dense * mlp, "shared": n_moe * 2 * 3 * d * moe.shared_width(m.d_ff),
            "router": n_moe * router, "experts": n_moe * experts, "head": 2 * d * m.vocab_size,
            "mtp": mtp}


@functools.cache
def _ticks(schedule: str, stages: int, microbatches: int, virtual: int) -> int:
    """Ticks of a pipeline schedule's timeline (cached: the planner asks for the same ones)."""
    return int(timeline(schedule, stages, microbatches, virtual).length)


def capacity_padding(cfg: Config, sizes: dict) -> float:
    """Expert rows computed per useful row: E*C / (T*k) under capacity dispatch (every slot
    is multiplied, filled or not), 1 when dropless. T: one dispatch group's tokens."""
    moe = cfg.moe
    if moe.dispatch != "capacity" or not moe.num_experts:
        return 1.0
    groups = moe.dispatch_groups or math.prod(sizes[a] for a in _axes("moe_batch", _rules(cfg)))
    t = cfg.train.batch_size * cfg.model.seq_len // cfg.train.microbatches // groups
    return moe.num_ffn_experts * capacity(t, moe.top_k, moe.num_ffn_experts, moe.capacity_factor) / (
        t * moe.top_k)


def _axes(name: str, rules) -> set:
    return set(mesh_axes_of(name, rules))


def _rules(cfg: Config):
    return rules_for(cfg.parallel)


def work_split(cfg: Config, sizes: dict) -> dict:
    """Devices each component's work is divided over (the rest of the mesh repeats it)."""
    rules = _rules(cfg)
    tokens = _axes("batch", rules) | _axes("seq", rules)
    block = {"pipeline"}
    groups = {
        "attention": tokens | _axes("heads", rules) | block,
        "attention_scores": tokens | _axes("heads", rules) | block,
        "dense": tokens | _axes("mlp", rules) | block,
        "shared": tokens | _axes("mlp", rules) | block,
        "router": tokens | block,
        # not split over `sequence`: a dispatch group holds whole sequences, so context
        # parallelism gathers each group's tokens and every piece computes them all.
        "experts": (_axes("moe_batch", rules) | _axes("expert", rules) | _axes("expert_mlp", rules)
                    | block),
        "head": tokens | _axes("vocab", rules),
        "mtp": tokens,
    }
    return {c: math.prod(sizes[a] for a in axes) for c, axes in groups.items()}


@functools.cache
def param_table(model, moe, pipeline: bool) -> tuple:
    """((path, shape, logical axes, in a transformer block, copies), ...) of every parameter,
    read from the model itself (`nnx.eval_shape`: no memory) built with one block of each
    kind (dense, MoE), each counted as often as the real model has it. Cached."""
    import dataclasses

    import jax
    from flax import nnx

    from toolkit.config import Config as _Config
    from toolkit.training.step import _build
    full = _Config(model=model, moe=moe)
    n_moe = len(moe_layer_indices(full))
    n_dense = model.num_layers - n_moe
    kinds = ([n_dense] if n_dense else []) + ([n_moe] if n_moe else [])
    small = dataclasses.replace(full, model=dataclasses.replace(model, num_layers=len(kinds)),
                                moe=dataclasses.replace(moe, first_dense_layers=1 if n_dense else 0,
                                                        moe_every=1))
    _, abstract = nnx.split(nnx.eval_shape(lambda: _build(small, 0)))
    rows = []
    flat = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in flat[0]:
        keys = jax.tree_util.keystr(path)
        if "opt_state" in keys or not isinstance(var, nnx.Param):
            continue
        names = var.get_metadata().get("logical_axes") or (None,) * len(var.get_value().shape)
        block = keys.split("['blocks'][")[1].split("]")[0] if "['blocks']" in keys else None
        copies = kinds[int(block)] if block is not None else 1
        rows.append((keys, tuple(var.get_value().shape), tuple(names), block is not None, copies))
    return tuple(rows)


def _params(cfg: Config, sizes: dict):
    """(path, values per device, mesh axes it is split over, in a block) per parameter."""
    rules = _rules(cfg)
    for path, shape, names, in_block, copies in param_table(cfg.model, cfg.moe, cfg.parallel.pipeline > 1):
        axes = [a for part in logical_to_spec(names, rules)
                for a in ((part,) if isinstance(part, str) else (part or ()))]
        if in_block and sizes["pipeline"] > 1:
            axes.append("pipeline")
        yield path, copies * math.prod(shape) / math.prod(sizes[a] for a in axes), set(axes), in_block


def param_bytes_per_device(cfg: Config, sizes: dict, itemsize: int = PARAM_BYTES) -> float:
    """Bytes of one device's parameter shards (blocks split over `pipeline` as stacked stages)."""
    return sum(n for _, n, _, _ in _params(cfg, sizes)) * itemsize


def _gradient_sync(cfg: Config, sizes: dict, remat: bool) -> list:
    """FSDP gathers and gradient reductions, parameter by parameter.

    A weight split over `fsdp` is all-gathered before use: once per step (XLA hoists the
    gather out of the micro-batch loop; the backward reuses it), twice with
    rematerialisation. Its gradient is
    reduce-scattered back over `fsdp` when the weight lives in a transformer block's own
    sharded matmuls; the embedding, output layer and routers are left to XLA, which
    all-reduces their full gradient and slices it. Every other token axis (`data`, and
    `expert` or `sequence` where they split tokens but not the weight) all-reduces the
    gradient shard. Gradient accumulation (`train.microbatches` without a pipeline) reduces
    each micro-batch's gradients inside its loop: m times. A pipeline gathers a stage's
    weights in every forward (and rematerialised backward) of a micro-batch and
    reduce-scatters each backward's gradients, m times; it all-reduces its accumulated
    gradients once.
    """
    rules = _rules(cfg)
    token_axes = _axes("batch", rules) | _axes("seq", rules) | _axes("moe_batch", rules)
    f, m = sizes["fsdp"], cfg.train.microbatches
    piped = sizes["pipeline"] > 1
    gathers = (2 if remat else 1) * (m if piped else 1)      # per step
    scatters, reduces = m, (1 if piped else m)
    gather = reduce_scatter = 0.0
    reduce = {}
    for path, n, axes, in_block in _params(cfg, sizes):
        nbytes = n * PARAM_BYTES
        rest = tuple(sorted(a for a in token_axes - axes - {"fsdp"} if sizes[a] > 1))
        if "fsdp" in axes and f > 1:
            gather += nbytes * (f - 1) * gathers
            if in_block and "router" not in path:
                reduce_scatter += nbytes * (f - 1) * scatters
            else:
                rest = tuple(sorted(rest + ("fsdp",)))
                nbytes *= f
        if rest:
            reduce[rest] = reduce.get(rest, 0.0) + nbytes * reduces
    rows = []
    if gather:
        rows.append(("fsdp", "all-gather", "weights" + (", forward and backward" if remat else ""), gather,
                     gathers))
    if reduce_scatter:
        rows.append(("fsdp", "reduce-scatter", "gradients", reduce_scatter, scatters))
    for axes, nbytes in sorted(reduce.items()):
        n = math.prod(sizes[a] for a in axes)
        rows.append((",".join(axes), "all-reduce", "gradients", 2 * nbytes * (n - 1) / n, reduces))
    return rows


def activation_bytes(cfg: Config, sizes: dict, *, remat: bool, platform: str = "gpu",
                     in_flight: bool = True) -> float:
    """Bytes of activations the backward keeps on one device at the peak of a step.

    Per token and layer, in the compute dtype: without remat, the inputs of every matmul
    and nonlinearity (norm inputs and outputs, q/k/v, attention probabilities over the
    sequence, the MLP's gate, up and product, the router's logits, k dispatched rows with
    their hidden activations); with remat, each layer's input plus one layer's working set.
    Tokens are one micro-batch's share of the device; a pipeline keeps the micro-batches in
    flight its schedule allows (all m for GPipe, p for 1F1B) unless `in_flight=False`.
    """
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    rules = _rules(cfg)
    b = _ITEMSIZE[m.dtype]
    tok_split = math.prod(sizes[a] for a in _axes("batch", rules) | _axes("seq", rules))
    tokens = cfg.train.batch_size * m.seq_len / cfg.train.microbatches / tok_split
    tp = math.prod(sizes[a] for a in _axes("heads", rules))
    d, hd, s = m.d_model, m.head_dim, m.seq_len
    # XLA's attention (CPU) keeps the scores and probabilities against all S keys (in c
    # blocks under context parallelism); the flash kernels (GPU/TPU) keep one log-sum-exp
    # per query and head.
    scores = 2 * m.num_heads * s if platform == "cpu" else m.num_heads
    attn = 2 * d + (2 * m.num_heads * hd + 2 * m.num_kv_heads * hd + scores) / tp
    mlp = 2 * d + 3 * m.d_ff / tp
    width = moe.expert_width(m.d_ff)
    # The all-gather exchange sorts every gathered assignment into one buffer per device;
    # rows of other devices' experts stay zero but take space (ep times the local rows).
    ep = math.prod(sizes[a] for a in _axes("expert", rules))
    rows = ep if ep > 1 and moe.dispatch != "capacity" and _exchange(par, platform) == "all_gather" else 1
    if moe.dispatch == "capacity":
        rows = moe.capacity_factor
    moe_act = (2 * d + moe.num_routed + rows * moe.top_k * (2 * d + 3 * width)
               + 3 * moe.shared_width(m.d_ff) / tp)
    moe_act *= sizes["sequence"]     # a dispatch group gathers whole sequences (see work_split)
    n_moe = len(moe_layer_indices(cfg))
    layers = [attn + mlp] * (m.num_layers - n_moe) + [attn + moe_act] * n_moe
    p = sizes["pipeline"]
    if remat:
        per_token = m.num_layers / p * d + max(layers)
    else:
        per_token = sum(layers) / p
    kept = 1
    if p > 1 and in_flight:
        kept = cfg.train.microbatches if par.schedule == "gpipe" else min(p, cfg.train.microbatches)
    head = m.vocab_size / math.prod(sizes[a] for a in _axes("vocab", rules)) * 4   # float32 logits
    return tokens * (per_token * b * kept + head)


def gathered_bytes(cfg: Config, sizes: dict, *, remat: bool, platform: str = "gpu") -> float:
    """Bytes of gathered copies kept for the backward: FSDP's full weights (every layer's
    without remat, one layer's with it) and, for the all-gather expert exchange, every
    MoE layer's gathered tokens (`ep` devices' worth)."""
    f = sizes["fsdp"]
    weights = sum(n * (f - 1) for _, n, axes, _ in _params(cfg, sizes) if "fsdp" in axes) * PARAM_BYTES
    if remat:
        weights /= cfg.model.num_layers
    m, moe, rules = cfg.model, cfg.moe, _rules(cfg)
    ep = math.prod(sizes[a] for a in _axes("expert", rules))
    n_moe = len(moe_layer_indices(cfg)) / sizes["pipeline"]
    tokens = 0.0
    if ep > 1 and n_moe and moe.dispatch != "capacity" and _exchange(cfg.parallel, platform) == "all_gather":
        per = cfg.train.batch_size * m.seq_len / cfg.train.microbatches / math.prod(
            sizes[a] for a in _axes("moe_batch", rules) | _axes("seq", rules))
        tokens = (ep - 1) * per * m.d_model * _ITEMSIZE[m.dtype] * (1 if remat else n_moe)
    return weights + tokens


def _exchange(par, platform: str) -> str:
    if par.dropless_exchange != "auto":
        return par.dropless_exchange
    return "all_gather" if platform == "cpu" else "ragged_all_to_all"


def kv_cache_bytes(cfg: Config, sizes: dict, batch: int | None = None, context: int | None = None) -> float:
    """Keys and values of every layer for `batch` sequences of `context` tokens, per device."""
    m = cfg.model
    rules = _rules(cfg)
    batch = batch or cfg.train.batch_size
    context = context or m.seq_len
    split = math.prod(sizes[a] for a in _axes("batch", rules) | _axes("seq", rules)
                      | _axes("kv_heads", rules))
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * batch * context * _ITEMSIZE[m.dtype] / split


def communication(cfg: Config, sizes: dict, platform: str = "gpu", remat: bool = False) -> list:
    """Bytes one device sends per step, by mesh axis and collective (see the module docstring).
    `platform` resolves `parallel.dropless_exchange="auto"` as the toolkit does there."""
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    rules = _rules(cfg)
    b = _ITEMSIZE[m.dtype]
    rows = []

    def add(axis, collective, what, nbytes, count, beside_compute=False):
        if nbytes > 0:
            rows.append({"axis": axis, "collective": collective, "what": what, "bytes": float(nbytes),
                         "count": count, "beside_compute": beside_compute})
    mb = cfg.train.microbatches
    n_moe = len(moe_layer_indices(cfg))
    p = sizes["pipeline"]
    layers = m.num_layers / p
    tok_split = math.prod(sizes[a] for a in _axes("batch", rules) | _axes("seq", rules))
    tokens = cfg.train.batch_size * m.seq_len / tok_split          # per device per step
    for axis, kind, what, nbytes, count in _gradient_sync(cfg, sizes, remat):
        add(axis, kind, what, nbytes, count, beside_compute=True)
    # Expert parallelism over the groups that hold different experts.
    ep = math.prod(sizes[a] for a in _axes("expert", rules))
    if n_moe and ep > 1:
        exchange = _exchange(par, platform)
        moe_tokens = cfg.train.batch_size * m.seq_len / math.prod(
            sizes[a] for a in _axes("moe_batch", rules) | _axes("seq", rules))
        d_in = max(1, round(moe.bigmac_ratio * m.d_model)) if moe.bigmac_ratio else m.d_model
        t = moe_tokens / mb
        per = comm_bytes(moe, int(t), d_in, ep, b, exchange)
        axis = ",".join(a for a in ("expert", "tensor") if a in _axes("expert", rules) and sizes[a] > 1)
        layers_here = n_moe / p
        if moe.dispatch != "capacity" and exchange == "all_gather":
            # forward: gather tokens, routing weights, ids and masks; reduce-scatter outputs.
            # backward: the transposes: gather output grads, reduce-scatter token and weight grads.
            routing = (ep - 1) * t * moe.top_k
            per = {"all-gather": 2 * (ep - 1) * t * d_in * b + routing * (4 + 4 + 1),
                   "reduce-scatter": 2 * (ep - 1) * t * d_in * b + routing * 4}
        else:                              # all-to-alls: the backward moves what the forward did
            per = {k: 2 * v for k, v in per.items()}
        for kind, nbytes in per.items():
            add(axis, kind, "expert exchange", nbytes * mb * layers_here, 2 * mb * layers_here)
    # Tensor parallelism: the residual stream summed after each split matmul, forward and
    # backward: attention, dense MLPs and shared experts once each way, split routed experts
    # over their k rows per token, the vocabulary-split embedding and output layer once.
    tp = math.prod(sizes[a] for a in _axes("heads", rules))
    if tp > 1:
        etp = math.prod(sizes[a] for a in _axes("expert_mlp", rules))
        # split experts: their k output rows summed forward, their input rows backward, and
        # the token gradient once more before the dispatch's transpose
        per_moe = 2 + (2 if moe.num_shared_experts else 0) + (2 * moe.top_k + 1 if etp > 1 else 0)
        units = (m.num_layers - n_moe) / p * 4 + n_moe / p * per_moe + 2
        kind = "reduce-scatter + all-gather" if par.sequence_parallel else "all-reduce"
        unit = tokens * m.d_model * b * (tp - 1) / tp
        add("tensor", kind, "attention, MLP and expert outputs", units * unit * 2, units * mb)
        if par.recipe == "folded" and n_moe:
            # folded experts split the tokens over `tensor` too: their outputs are gathered
            # back (forward and backward) and the input gradient summed once
            add("tensor", "all-gather", "folded MoE outputs", 2 * unit * n_moe / p, 2 * n_moe / p * mb)
            add("tensor", "all-reduce", "folded MoE input gradients", 2 * unit * n_moe / p, n_moe / p * mb)
    # Pipeline: every tick of the schedule sends one micro-batch activation each way (zeros
    # on idle ticks: the program is the same on every device).
    if p > 1:
        ticks = _ticks(par.schedule, p, mb, par.virtual_stages)
        act = tokens / mb * m.d_model * b
        add("pipeline", "collective-permute", "stage activations, every tick", 2 * ticks * act, 2 * ticks)
    # Context parallelism: each layer passes K/V pieces around the ring (or gathers them) in
    # the forward and again in the backward; MoE layers gather their groups' whole sequences.
    c = sizes["sequence"]
    if c > 1:
        kv = tokens * 2 * m.num_kv_heads * m.head_dim * b / tp
        kind = "collective-permute" if par.context == "ring" else "all-gather"
        add("sequence", kind, "keys and values", 2 * kv * (c - 1) * layers, 2 * (c - 1) * layers * mb)
        add("sequence", "all-gather", "MoE tokens (whole sequences per group)",
            2 * tokens * m.d_model * b * (c - 1) * n_moe / p, 2 * n_moe / p * mb)
    return rows


def estimate_costs(cfg: Config, num_devices: int | None = None, *, causal: bool = False,
                   remat: bool | None = None, platform: str = "gpu") -> Costs:
    """The costs of `cfg` on `num_devices` (default: the product of its mesh axes).

    `remat`: count per-layer rematerialisation (one more forward, the smaller activation
    footprint); default: what `cfg` does (`parallel.pipeline_remat` inside a pipeline).
    `platform`: "cpu", "gpu" or "tpu", for what `parallel.dropless_exchange="auto"` picks.
    """
    par = cfg.parallel
    if num_devices is None:
        if -1 in (par.data, par.fsdp, par.tensor, par.expert, par.pipeline, par.sequence):
            raise ValueError("estimate_costs: the mesh has a -1 axis; pass num_devices=")
        num_devices = par.data * par.fsdp * par.tensor * par.expert * par.pipeline * par.sequence
    sizes = par.axis_sizes(num_devices)
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices, not {num_devices}")
    if remat is None:
        remat = par.pipeline > 1 and par.pipeline_remat
    total, active = count_params(cfg)
    fwd = forward_flops(cfg, causal=causal)
    tokens = cfg.train.batch_size * cfg.model.seq_len
    split = work_split(cfg, sizes)
    blocks = {"attention", "attention_scores", "dense", "shared", "router", "experts"}
    per_device = {c: tokens * f / split[c] * (4 if remat and c in blocks else 3)
                  for c, f in fwd.items()}
    per_device["experts"] *= capacity_padding(cfg, sizes)
    params = param_bytes_per_device(cfg, sizes)
    act_remat = activation_bytes(cfg, sizes, remat=True, platform=platform)
    act_full = activation_bytes(cfg, sizes, remat=False, platform=platform)
    grads = params * (2 if cfg.train.microbatches > 1 else 1)
    memory = {"params": params, "optimizer": params * OPTIMIZER_BYTES / PARAM_BYTES,
              "gradients": grads, "activations_no_remat": act_full,
              "activations_remat": act_remat, "activations": act_remat if remat else act_full,
              "gathered": gathered_bytes(cfg, sizes, remat=remat, platform=platform),
              "kv_cache": kv_cache_bytes(cfg, sizes)}
    memory["total"] = sum(memory[k] for k in ("params", "optimizer", "gradients", "activations",
                                             "gathered"))
    return Costs(params_total=total, params_active=active, flops=fwd,
                 model_flops=3 * tokens * float(np.sum(list(fwd.values()))),
                 device_flops=float(sum(per_device.values())), device_component_flops=per_device,
                 tokens=tokens, memory=memory, sizes=sizes,
                 communication=communication(cfg, sizes, platform, remat))

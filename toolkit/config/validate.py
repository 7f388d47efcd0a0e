"""`validate(cfg, num_devices)`: reject an inconsistent config before anything compiles.

Every error names the field, the value seen and values that would work:

    >>> validate(apply_overrides(tiny(), ["moe.top_k=9"]), num_devices=8)
    ConfigError: moe.top_k=9 exceeds moe.num_experts=8; use 1..8
"""

import math

from toolkit.config.schema import Config, ConfigError

_DTYPES = ("float32", "bfloat16")
_DISPATCH = ("dropless", "capacity")
_ROUTERS = ("topk_softmax", "sigmoid_bias", "top_p", "expert_choice", "recurrent", "tsallis")
_PLACEMENTS = ("post_attention", "pre_attention")
_ACTIVATIONS = ("swiglu", "reglu")
_CORPORA = ("python_docs", "paths")
MIN_VOCAB = 259


def _divisors_near(n: int, base: int, count: int = 3) -> str:
    """Multiples of `base` near `n`, for messages like 'use 4, 8, 12'."""
    lo = max(base, (n // base) * base)
    vals = sorted({v for v in (lo - base, lo, lo + base, lo + 2 * base) if v > 0})
    return ", ".join(str(v) for v in vals[:count])


def _positive(errors, key, value):
    if not isinstance(value, int) or value < 1:
        errors.append(f"{key}={value!r} must be a positive integer")


def _mesh_errors(cfg: Config, num_devices) -> list:
    p, errors = cfg.parallel, []
    sizes = {"pipeline": p.pipeline, "data": p.data, "fsdp": p.fsdp, "sequence": p.sequence,
             "tensor": p.tensor, "expert": p.expert}
    fill = [k for k, v in sizes.items() if v == -1]
    for k, v in sizes.items():
        if v != -1 and (not isinstance(v, int) or v < 1):
            errors.append(f"parallel.{k}={v!r} must be a positive integer or -1 (take the rest)")
    if len(fill) > 1:
        errors.append(f"parallel: only one axis may be -1, got {', '.join(fill)}; set the others")
    if errors or num_devices is None:
        return errors
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill and num_devices % fixed:
        errors.append(f"parallel.{fill[0]}=-1 cannot fill {num_devices} devices: the other axes "
                      f"multiply to {fixed}, which does not divide {num_devices}; make them multiply "
                      f"to one of {[d for d in range(1, num_devices + 1) if num_devices % d == 0]}")
    elif not fill and fixed != num_devices:
        shape = ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1) or "all 1"
        errors.append(f"parallel mesh ({shape}) has {fixed} devices but {num_devices} are "
                      f"available; make the axes multiply to {num_devices} (e.g. --mesh "
                      f"data={num_devices}) or set one axis to -1")
    return errors


def _expert_errors(moe, m) -> list:
    """Expert kinds and layer structure: fine-grained, small, local, BigMac."""
    errors = []
    if moe.expert_activation not in _ACTIVATIONS:
        errors.append(f"moe.expert_activation={moe.expert_activation!r} is unknown; use one of "
                      f"{_ACTIVATIONS}")
    if not 0 <= moe.expert_fraction <= 1:
        errors.append(f"moe.expert_fraction={moe.expert_fraction} must be in [0, 1] (0 = use "
                      f"moe.d_expert); use e.g. 0.25 for experts a quarter of model.d_ff")
    for key in ("small_experts", "zero_experts", "copy_experts", "constant_experts", "gru_experts"):
        if getattr(moe, key) < 0:
            errors.append(f"moe.{key}={getattr(moe, key)} must be >= 0")
    if moe.small_experts:
        _positive(errors, "moe.d_small_expert", moe.d_small_expert)
    if moe.gru_experts:
        _positive(errors, "moe.d_gru_expert", moe.d_gru_expert)
    if moe.zc_tau <= 0:
        errors.append(f"moe.zc_tau={moe.zc_tau} must be > 0; use 0.75 as in MoE++ 7B, or 1.0")
    if not 0 <= moe.bigmac_ratio <= 1:
        errors.append(f"moe.bigmac_ratio={moe.bigmac_ratio} must be in [0, 1] (0 = off); use 0.25")
    elif moe.bigmac_ratio and round(moe.bigmac_ratio * m.d_model) < 1:
        errors.append(f"moe.bigmac_ratio={moe.bigmac_ratio} leaves no width of model.d_model="
                      f"{m.d_model}; use at least {1 / m.d_model:.3g}")
    if moe.router_placement not in _PLACEMENTS:
        errors.append(f"moe.router_placement={moe.router_placement!r} is unknown; use one of "
                      f"{_PLACEMENTS}")
    if moe.router_jitter < 0 or moe.router_jitter >= 1:
        errors.append(f"moe.router_jitter={moe.router_jitter} must be in [0, 1); use 0.01 as in "
                      f"Switch, or 0")
    return errors


def _router_errors(moe) -> list:
    errors = []
    if moe.router == "recurrent":
        _positive(errors, "moe.recurrent_dim", moe.recurrent_dim)
    if moe.tsallis_q <= 0:
        errors.append(f"moe.tsallis_q={moe.tsallis_q} must be > 0; use 1.1 as in DynMoLE")
    if not 0 < moe.tsallis_threshold <= 1:
        errors.append(f"moe.tsallis_threshold={moe.tsallis_threshold} must be in (0, 1] (normalised "
                      f"entropy); use 0.9 as in DynMoLE")
    for key in ("seq_aux_loss_weight", "tsallis_loss_weight"):
        if getattr(moe, key) < 0:
            errors.append(f"moe.{key}={getattr(moe, key)} must be >= 0 (0 = off)")
    if not 0 < moe.top_p <= 1:
        errors.append(f"moe.top_p={moe.top_p} must be in (0, 1]; use 0.4 as in the paper")
    if moe.entropy_loss_weight < 0:
        errors.append(f"moe.entropy_loss_weight={moe.entropy_loss_weight} must be >= 0; use 1e-4")
    if moe.routed_scaling <= 0:
        errors.append(f"moe.routed_scaling={moe.routed_scaling} must be > 0; use 1.0 (or 2.5 "
                      f"as in DeepSeek-V3)")
    if moe.bias_update_rate < 0:
        errors.append(f"moe.bias_update_rate={moe.bias_update_rate} must be >= 0; use 1e-3 "
                      f"(0 freezes the bias)")
    g, kg, n = moe.router_groups, moe.router_topk_groups, moe.num_routed
    if g < 1 or n % g:
        errors.append(f"moe.router_groups={g} must divide the {n} routed experts (moe.num_experts "
                      f"plus small and local experts); use one of "
                      f"{[d for d in range(1, n + 1) if n % d == 0]}")
    elif g > 1 and moe.router != "sigmoid_bias":
        errors.append(f"moe.router_groups={g} applies to moe.router='sigmoid_bias' only, "
                      f"got {moe.router!r}; use router_groups=1")
    elif not 1 <= kg <= g:
        errors.append(f"moe.router_topk_groups={kg} must be in 1..moe.router_groups={g}")
    elif g > 1 and moe.top_k > kg * (n // g):
        errors.append(f"moe.top_k={moe.top_k} exceeds the {kg * (n // g)} experts "
                      f"in moe.router_topk_groups={kg} groups of {n // g}; keep more groups")
    return errors


def _kernel_errors(kernels, m) -> list:
    import jax

    from pallas_kernels import ATTENTION_IMPLS, GMM_IMPLS
    errors = []
    if kernels.gmm and kernels.gmm not in GMM_IMPLS:
        errors.append(f"kernels.gmm={kernels.gmm!r} is unknown; use '' (by platform) or one of "
                      f"{GMM_IMPLS}")
    if kernels.attention and kernels.attention not in ATTENTION_IMPLS:
        errors.append(f"kernels.attention={kernels.attention!r} is unknown; use '' (by platform) "
                      f"or one of {ATTENTION_IMPLS}")
    platform = jax.default_backend()
    if kernels.attention == "cudnn" and platform != "gpu":
        errors.append(f"kernels.attention='cudnn' needs an NVIDIA GPU, this platform is {platform}; "
                      f"use '' or 'xla'")
    if kernels.attention == "cudnn" and m.dtype != "bfloat16":
        errors.append(f"kernels.attention='cudnn' needs model.dtype='bfloat16', got {m.dtype!r}")
    if kernels.attention == "pallas_gpu" and (m.head_dim < 16 or m.head_dim & (m.head_dim - 1)):
        errors.append(f"kernels.attention='pallas_gpu' needs a power-of-two model.head_dim >= 16, "
                      f"got {m.head_dim}; use 64 or 128, or kernels.attention=''")
    return errors


def validate(cfg: Config, num_devices: int | None = None, domain_tokens: dict | None = None) -> Config:
    """Return `cfg` unchanged if it can run, else raise `ConfigError` listing every problem.

    Args:
      cfg: the config to check.
      num_devices: devices the mesh must cover (None skips the device-count check).
      domain_tokens: `{"train/prose": n_tokens, ...}` to check seq_len against the corpus.
    """
    m, moe, t, d = cfg.model, cfg.moe, cfg.train, cfg.data
    errors = []
    for key in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "seq_len"):
        _positive(errors, f"model.{key}", getattr(m, key))
    for key in ("steps", "batch_size", "eval_batches", "keep_checkpoints", "log_every",
                "microbatches", "max_skipped_steps"):
        _positive(errors, f"train.{key}", getattr(t, key))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

    if m.vocab_size < MIN_VOCAB:
        errors.append(f"model.vocab_size={m.vocab_size} is below the byte tokenizer's "
                      f"{MIN_VOCAB} ids; use 264")
    if m.num_heads % m.num_kv_heads:
        ok = [k for k in range(1, m.num_heads + 1) if m.num_heads % k == 0]
        errors.append(f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads="
                      f"{m.num_kv_heads}; use num_kv_heads in {ok}")
    if m.head_dim % 2:
        errors.append(f"model.head_dim={m.head_dim} must be even for RoPE; use {m.head_dim + 1}")
    if m.mtp_layers < 0 or m.mtp_layers >= m.seq_len:
        errors.append(f"model.mtp_layers={m.mtp_layers} must be in 0..{m.seq_len - 1}; use 1 as in "
                      f"Ling 2.0, or 0")
    if m.mtp_loss_weight < 0:
        errors.append(f"model.mtp_loss_weight={m.mtp_loss_weight} must be >= 0; use 0.1")
    if m.dtype not in _DTYPES:
        errors.append(f"model.dtype={m.dtype!r} is not supported; use one of {_DTYPES}")
    if m.qk_norm not in ("", "head", "full"):
        errors.append(f"model.qk_norm={m.qk_norm!r} is unknown; use '' (off), 'head' (Qwen3-MoE) "
                      f"or 'full' (OLMoE)")
    if m.qk_norm == "full" and cfg.parallel.sequence_parallel and cfg.parallel.tensor > 1:
        errors.append("model.qk_norm='full' with parallel.sequence_parallel and parallel.tensor="
                      f"{cfg.parallel.tensor} is not supported (the norm spans heads split over "
                      "tensor); use qk_norm='head' or parallel.sequence_parallel=false")

    if moe.num_experts < 0:
        errors.append(f"moe.num_experts={moe.num_experts} must be >= 0 (0 = dense model)")
    if moe.num_experts > 0:
        n = moe.num_routed
        pool = (f"moe.num_experts={n}" if n == moe.num_experts else
                f"the {n} routed experts (moe.num_experts={moe.num_experts} plus small and "
                f"local experts)")
        if not 1 <= moe.top_k <= n:
            errors.append(f"moe.top_k={moe.top_k} exceeds {pool}; use 1..{n}" if moe.top_k > 0
                          else f"moe.top_k={moe.top_k} must be >= 1; use 1..{n}")
        errors += _expert_errors(moe, m)
        _positive(errors, "moe.d_expert", moe.d_expert)
        _positive(errors, "moe.moe_every", moe.moe_every)
        if moe.router not in _ROUTERS:
            errors.append(f"moe.router={moe.router!r} is unknown; use one of {_ROUTERS}")
        errors += _router_errors(moe)
        if moe.dispatch not in _DISPATCH:
            errors.append(f"moe.dispatch={moe.dispatch!r} is unknown; use one of {_DISPATCH}")
        if moe.dispatch_groups < 0 or (moe.dispatch_groups and t.batch_size % moe.dispatch_groups):
            errors.append(f"moe.dispatch_groups={moe.dispatch_groups} must be 0 (one per batch "
                          f"shard) or divide train.batch_size={t.batch_size}")
        if moe.capacity_factor <= 0:
            errors.append(f"moe.capacity_factor={moe.capacity_factor} must be > 0; use e.g. 1.25")
        if moe.first_dense_layers < 0 or moe.first_dense_layers >= m.num_layers:
            errors.append(f"moe.first_dense_layers={moe.first_dense_layers} must be in "
                          f"0..{m.num_layers - 1} so that some layer is MoE")
        elif moe.moe_every >= 1 and not any(
                i >= moe.first_dense_layers and (i + 1) % moe.moe_every == 0
                for i in range(m.num_layers)):
            errors.append(f"moe.moe_every={moe.moe_every} with moe.first_dense_layers="
                          f"{moe.first_dense_layers} leaves no MoE layer among model.num_layers="
                          f"{m.num_layers}; use moe_every <= {m.num_layers}")
    if moe.num_shared_experts < 0:
        errors.append(f"moe.num_shared_experts={moe.num_shared_experts} must be >= 0")
    if moe.d_shared_expert < 0:
        errors.append(f"moe.d_shared_expert={moe.d_shared_expert} must be >= 0 (0 = "
                      f"num_shared_experts * d_expert)")
    if (moe.d_shared_expert > 0 or moe.shared_expert_gate) and moe.num_shared_experts < 1:
        errors.append(f"moe.d_shared_expert={moe.d_shared_expert} and moe.shared_expert_gate="
                      f"{moe.shared_expert_gate} need a shared expert; set moe.num_shared_experts=1")
    if moe.aux_loss_weight < 0 or moe.z_loss_weight < 0:
        errors.append(f"moe.aux_loss_weight={moe.aux_loss_weight} and moe.z_loss_weight="
                      f"{moe.z_loss_weight} must be >= 0")

    errors += _kernel_errors(cfg.kernels, m)
    errors += _precision_errors(cfg)
    mesh_errors = _mesh_errors(cfg, num_devices)
    errors += _parallel_option_errors(cfg.parallel)
    errors += mesh_errors
    if not mesh_errors and not _parallel_option_errors(cfg.parallel):
        errors += _recipe_errors(cfg, cfg.parallel.axis_sizes(num_devices or 1), num_devices)

    if t.warmup_steps < 0 or t.warmup_steps >= t.steps:
        errors.append(f"train.warmup_steps={t.warmup_steps} must be in 0..{t.steps - 1} "
                      f"(below train.steps={t.steps})")
    if t.grad_clip < 0:
        errors.append(f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    if t.seed < 0:
        errors.append(f"train.seed={t.seed} must be >= 0")
    if not (0 <= t.b1 < 1 and 0 <= t.b2 < 1):
        errors.append(f"train.b1={t.b1} and train.b2={t.b2} must be in [0, 1); use 0.9 and 0.95")
    if t.weight_decay < 0:
        errors.append(f"train.weight_decay={t.weight_decay} must be >= 0")
    if t.learning_rate <= 0:
        errors.append(f"train.learning_rate={t.learning_rate} must be > 0; use e.g. 1e-3")
    if not 0 <= t.min_lr_ratio <= 1:
        errors.append(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    for key in ("eval_every", "checkpoint_every"):
        if getattr(t, key) < 0:
            errors.append(f"train.{key}={getattr(t, key)} must be >= 0 (0 = only at the end)")
    if t.nonfinite not in ("skip", "stop"):
        errors.append(f"train.nonfinite={t.nonfinite!r} is unknown; use 'skip' or 'stop'")

    if d.corpus not in _CORPORA:
        errors.append(f"data.corpus={d.corpus!r} is unknown; use one of {_CORPORA}")
    if d.corpus == "paths" and not d.paths:
        errors.append("data.corpus='paths' needs data.paths, e.g. --set data.paths=notes/,book.txt")
    if d.max_code_bytes < 1:
        errors.append(f"data.max_code_bytes={d.max_code_bytes} must be >= 1; use e.g. 3000000")
    if not 0 < d.val_fraction < 1:
        errors.append(f"data.val_fraction={d.val_fraction} must be in (0, 1); use e.g. 0.05")
    if domain_tokens:
        need = m.seq_len + 1
        for name, n in sorted(domain_tokens.items()):
            if n < need:
                errors.append(f"model.seq_len={m.seq_len} is beyond the corpus: {name} has only "
                              f"{n} tokens; use model.seq_len <= {max(1, n - 1)} or add text")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def _precision_errors(cfg: Config) -> list:
    from toolkit.precision.fake_quant import CLASSES, MODES
    from toolkit.precision.formats import get_format

    pc, errors = cfg.precision, []
    keys = [f"{c}_{r}" for c in CLASSES for r in ("weights", "acts", "grads")] + ["kv_cache"]
    for key in keys:
        name = getattr(pc, key)
        try:
            fmt = get_format(name) if name else None
        except ValueError as e:
            errors.append(f"precision.{key}={name!r}: {e}; or '' for full precision")
            continue
        if fmt is not None and fmt.scaling == "block2d" and not key.endswith("_weights"):
            errors.append(f"precision.{key}={name!r} tiles two axes, which only weights have; "
                          f"use a 1x128 tile format such as 'fp8_e4m3_1x128'")
    if pc.mode not in MODES:
        errors.append(f"precision.mode={pc.mode!r} is unknown; use one of {MODES}")
    g = pc.rotation
    widths = {"model.d_model": cfg.model.d_model, "model.head_dim": cfg.model.head_dim,
              "model.d_ff": cfg.model.d_ff}
    if cfg.moe.num_experts:
        widths["expert width"] = cfg.moe.expert_width(cfg.model.d_ff)
    t = max(cfg.parallel.tensor, 1)          # hidden widths are rotated per tensor-parallel slice
    if t > 1:
        widths.update({f"{k} / parallel.tensor": w // t for k, w in list(widths.items())
                       if k in ("model.d_ff", "expert width")})
    if g < 0 or (g and (g & (g - 1) or any(w % g for w in widths.values()))):
        fits = [b for b in (8, 16, 32, 64, 128) if all(w % b == 0 for w in widths.values())]
        errors.append(f"precision.rotation={g} must be 0 or a power of two dividing {widths}; "
                      f"use 0 or one of {fits}")
    return errors


_EXCHANGES = ("auto", "ragged_all_to_all", "all_gather")


def _parallel_option_errors(p) -> list:
    from toolkit.sharding.rules import RECIPES
    from toolkit.sharding.schedules import SCHEDULES
    errors = []
    if p.recipe not in RECIPES:
        errors.append(f"parallel.recipe={p.recipe!r} is not a recipe; use one of {sorted(RECIPES)}")
    if p.dropless_exchange not in _EXCHANGES:
        errors.append(f"parallel.dropless_exchange={p.dropless_exchange!r}; use one of {_EXCHANGES}")
    if not isinstance(p.overlap_chunks, int) or p.overlap_chunks < 1:
        errors.append(f"parallel.overlap_chunks={p.overlap_chunks!r} must be a positive integer "
                      f"(1: no chunking)")
    if p.schedule not in SCHEDULES:
        errors.append(f"parallel.schedule={p.schedule!r} is unknown; use one of {SCHEDULES}")
    if not isinstance(p.virtual_stages, int) or p.virtual_stages < 1:
        errors.append(f"parallel.virtual_stages={p.virtual_stages!r} must be a positive integer")
    elif p.virtual_stages > 1 and p.schedule != "interleaved":
        errors.append(f"parallel.virtual_stages={p.virtual_stages} needs parallel.schedule="
                      f"'interleaved' (got {p.schedule!r}); or set virtual_stages=1")
    if p.context not in _CONTEXT:
        errors.append(f"parallel.context={p.context!r} is unknown; use one of {_CONTEXT}")
    return errors


_CONTEXT = ("ring", "all_gather")


def _pipeline_errors(cfg: Config, sizes: dict) -> list:
    """Pipeline and context parallelism: stages, micro-batches, sequence pieces."""
    from toolkit.models.transformer import moe_layer_indices
    m, moe, t, par, errors = cfg.model, cfg.moe, cfg.train, cfg.parallel, []
    p, v, mb = sizes["pipeline"], par.virtual_stages, t.microbatches
    if t.batch_size % mb:
        ok = [k for k in range(1, t.batch_size + 1) if t.batch_size % k == 0]
        errors.append(f"train.batch_size={t.batch_size} is not divisible by train.microbatches="
                      f"{mb}; use microbatches in {ok}")
    if v > 1 and p == 1:
        errors.append(f"parallel.virtual_stages={v} needs parallel.pipeline > 1")
    if p > 1 or v > 1:
        chunks = p * v
        if m.num_layers % chunks:
            errors.append(f"model.num_layers={m.num_layers} cannot be split into parallel.pipeline"
                          f"*virtual_stages={p}*{v}={chunks} equal stages; use num_layers in "
                          f"{_divisors_near(m.num_layers, chunks)} or fewer stages")
        else:
            per, moe_at = m.num_layers // chunks, set(moe_layer_indices(cfg))
            pattern = [tuple(c * per + j in moe_at for j in range(per)) for c in range(chunks)]
            if len(set(pattern)) > 1:
                errors.append(f"pipeline stages must have identical layers, but moe.first_dense_"
                              f"layers={moe.first_dense_layers} and moe.moe_every={moe.moe_every} "
                              f"make stages differ (MoE layers per stage: {pattern}); set "
                              f"first_dense_layers=0 and a moe_every that divides {per}")
        if par.schedule == "interleaved" and mb % p:
            errors.append(f"train.microbatches={mb} must be a multiple of parallel.pipeline={p} "
                          f"for the interleaved schedule; use {_divisors_near(mb, p)}")
        if m.mtp_layers:
            errors.append(f"model.mtp_layers={m.mtp_layers} is not supported with pipeline "
                          f"parallelism; set it to 0 or parallel.pipeline=1")
        if moe.num_experts and (moe.router == "recurrent" or moe.gating_residual):
            errors.append("moe.router='recurrent' and moe.gating_residual carry router state from "
                          "layer to layer, which pipeline stages do not pass; use another router "
                          "or parallel.pipeline=1")
        if moe.num_experts and moe.router_jitter:
            errors.append(f"moe.router_jitter={moe.router_jitter} is not supported with pipeline "
                          f"parallelism (its counter is state); set it to 0")
    if p > 1 and sizes["sequence"] > 1 and par.context == "ring":
        errors.append("parallel.context='ring' with pipeline parallelism is not supported: the "
                      "ring's ppermute would run inside the stages' per-tick branches, which "
                      "XLA:CPU's collective-permute cannot do (it waits for every device); use "
                      "parallel.context=all_gather with parallel.pipeline > 1")
    seq_split = sizes["sequence"] * (sizes["tensor"] if par.sequence_parallel else 1)
    if m.seq_len % seq_split:
        what = ("parallel.sequence*tensor" if par.sequence_parallel else "parallel.sequence")
        errors.append(f"model.seq_len={m.seq_len} is not divisible by {what}={seq_split} (each "
                      f"device holds an equal piece); use seq_len in "
                      f"{_divisors_near(m.seq_len, seq_split)}")
    if par.sequence_parallel and sizes["tensor"] == 1:
        errors.append("parallel.sequence_parallel=true splits activations over the tensor axis, "
                      "which has size 1; set parallel.tensor > 1 or sequence_parallel=false")
    return errors


def _recipe_errors(cfg: Config, sizes: dict, num_devices) -> list:
    """What the recipe's table asks of the mesh: every split dimension divisible by its axes."""
    from toolkit.sharding.rules import mesh_axes_of, recipe_axes, recipe_rules
    m, moe, t, errors = cfg.model, cfg.moe, cfg.train, []
    rules, recipe = recipe_rules(cfg.parallel.recipe), cfg.parallel.recipe
    unused = [f"{a}={n}" for a, n in sizes.items() if n > 1 and a not in recipe_axes(recipe)]
    if unused:
        users = sorted(r for r in _recipes_using({a.split("=")[0] for a in unused}))
        errors.append(f"parallel.recipe={recipe!r} does not use mesh axis {', '.join(unused)} "
                      f"(it would hold identical copies); set it to 1 or use a recipe that does: "
                      f"{users}")
        return errors

    def split(name):
        axes = mesh_axes_of(name, rules)
        return math.prod(sizes[a] for a in axes), "*".join(axes) or "none"

    ep, ep_axes = split("expert")
    if moe.num_experts > 0 and moe.num_experts % ep:
        errors.append(f"moe.num_experts={moe.num_experts} is not divisible by mesh axis "
                      f"{ep_axes}={ep} (the expert-parallel group of recipe {recipe!r}); use "
                      f"{_divisors_near(moe.num_experts, ep)}")
    if moe.num_experts > 0 and moe.small_experts and ep > 1:
        errors.append(f"moe.small_experts={moe.small_experts} with expert parallelism ({ep_axes}="
                      f"{ep}) is not supported: set moe.small_experts=0 or the expert axis to 1")
    for key, value, name in (("model.num_heads", m.num_heads, "heads"),
                             ("model.num_kv_heads", m.num_kv_heads, "kv_heads"),
                             ("model.d_ff", m.d_ff, "mlp"), ("model.vocab_size", m.vocab_size, "vocab"),
                             ("moe.d_shared_expert", moe.d_shared_expert, "mlp")):
        n, axes = split(name)
        if value % n:
            errors.append(f"{key}={value} is not divisible by mesh axis {axes}={n}; "
                          f"use {_divisors_near(value, n)}")
    etp, etp_axes = split("expert_mlp")
    width = moe.expert_width(m.d_ff)
    if moe.num_experts > 0 and width % etp:
        key = (f"moe.expert_fraction={moe.expert_fraction} (width {width})"
               if moe.expert_fraction else f"moe.d_expert={width}")
        errors.append(f"{key} is not divisible by mesh axis {etp_axes}={etp}; "
                      f"use a width in {_divisors_near(width, etp)}")
    if moe.num_experts > 0 and moe.small_experts and moe.d_small_expert % etp:
        errors.append(f"moe.d_small_expert={moe.d_small_expert} is not divisible by mesh axis "
                      f"{etp_axes}={etp}; use {_divisors_near(moe.d_small_expert, etp)}")
    for name, key in (("embed", "model.d_model"), ("expert_embed", "model.d_model")):
        n, axes = split(name)
        if m.d_model % n:
            errors.append(f"{key}={m.d_model} is not divisible by mesh axis {axes}={n}; "
                          f"use {_divisors_near(m.d_model, n)}")
            break
    errors += _pipeline_errors(cfg, sizes)
    if num_devices is not None and not t.batch_size % t.microbatches:
        micro = t.batch_size // t.microbatches
        for name in ("batch", "moe_batch"):
            n, axes = split(name)
            if micro % n:
                what = (f"train.batch_size={t.batch_size}" if t.microbatches == 1 else
                        f"the micro-batch train.batch_size/microbatches={micro}")
                errors.append(f"{what} is not divisible by mesh axes {axes}={n} (the {name} split "
                              f"of recipe {recipe!r}); use {_divisors_near(micro, n)}")
                break
        if moe.num_experts > 0 and moe.dispatch_groups and micro % moe.dispatch_groups:
            errors.append(f"moe.dispatch_groups={moe.dispatch_groups} must divide the micro-batch "
                          f"train.batch_size/microbatches={micro}")
        groups, (n, axes) = moe.dispatch_groups, split("moe_batch")
        if moe.num_experts > 0 and groups and groups % n:
            errors.append(f"moe.dispatch_groups={groups} is not divisible by mesh axes {axes}={n}, "
                          f"which split the dispatch groups; use a multiple of {n} or 0 (one group "
                          f"per device)")
    return errors


def _recipes_using(axes: set) -> list:
    from toolkit.sharding.rules import RECIPES, recipe_axes
    return [r for r in RECIPES if axes <= recipe_axes(r)]


def config_or_error(base: Config, overrides, num_devices=None) -> tuple:
    """`(validated config, None)` for `base` with dotted `overrides`, or `(None, message)`
    when they are invalid: what a widget shows instead of raising."""
    from toolkit.config.overrides import apply_overrides
    try:
        return validate(apply_overrides(base, list(overrides)), num_devices), None
    except ConfigError as e:
        return None, str(e)

"""How much compute sparsity buys: Ling's efficiency-leverage law, and configs at equal
active compute.

Efficiency leverage (EL; Tian et al. 2025, "Towards Greater Leverage", the law behind Ling
2.0) is the compute a dense model needs over what an MoE needs to reach the same loss.
It depends on the activation ratio A (active over total experts, a shared expert counted
on both sides), the granularity G = 2 d_model / d_expert, and the training compute C:

    EL(A, G, C) = Â ^ (α + γ (log G)^2 + β log G),    α = a + d log C
    1/Â = 1 / (A + (1/A_start - 1/A_max)^-1) + 1/A_max        (Clark et al.'s saturation)

with the paper's Table 2 fit: a = 1.23, d = -7.61e-2, γ = 1.67e-2, β = -1.17e-1,
A_start = 1.63e-2, A_max = 5.28e16. The paper does not name its logarithms; log10 for C
and log2 for G reproduce its own statements (EL > 7 at A = 3.1%, G = 12, C = 1e22; the
best granularity "around 12", 2^(-β / 2γ) = 11.3; EL(A = 1) = 0.99, no leverage for a
dense model), so those are the bases here.

Designs are compared at equal active compute: `at_active_compute` changes the expert
counts and picks d_expert so that (top_k + shared) x d_expert, the FFN width a token
multiplies through, stays the base's. Granularity then follows from top_k + shared;
`segmented` makes experts finer at a fixed activation ratio (DeepSeekMoE's fine-grained
segmentation: every count x m, d_expert / m).

    efficiency_leverage(0.031, 12, 1e22)          # 7.24
    leverage_of(preset("ling_mini_2"), 1e22)      # the config's A and G at that budget
    at_active_compute(cfg, num_experts=32, top_k=4)   # same active FFN width, more experts
    segmented(cfg, 4)                             # 4x the experts and top-k, 1/4 the width
"""

import dataclasses

import numpy as np

from toolkit.analysis.costs import forward_flops
from toolkit.config import Config

LING_FIT = {"a": 1.23, "d": -7.61e-2, "gamma": 1.67e-2, "beta": -1.17e-1, "a_start": 1.63e-2,
            "a_max": 5.28e16}


def activation_ratio(cfg: Config) -> float:
    """(top_k + shared) / (routed FFN experts + shared): the share of expert parameters a
    token uses (1.0 for a dense model)."""
    moe = cfg.moe
    if not moe.num_experts:
        return 1.0
    return (moe.top_k + moe.num_shared_experts) / (moe.num_ffn_experts + moe.num_shared_experts)


def granularity(cfg: Config) -> float:
    """G = 2 d_model / d_expert (Ling's definition; 1.0 for a dense model)."""
    if not cfg.moe.num_experts:
        return 1.0
    return 2 * cfg.model.d_model / cfg.moe.expert_width(cfg.model.d_ff)


def efficiency_leverage(activation, granularity, compute, fit=None):
    """EL for activation ratio(s) A in (0, 1], granularity G >= 1 and compute C in FLOPs
    (numbers or arrays, broadcast)."""
    f = fit or LING_FIT
    a = np.asarray(activation, np.float64)
    if np.any(a <= 0) or np.any(a > 1):
        raise ValueError(f"activation ratio {activation!r} must lie in (0, 1]")
    if np.any(np.asarray(compute) <= 0) or np.any(np.asarray(granularity) <= 0):
        raise ValueError(f"compute {compute!r} and granularity {granularity!r} must be positive")
    shift = 1.0 / (1.0 / f["a_start"] - 1.0 / f["a_max"])
    a_hat = 1.0 / (1.0 / (a + shift) + 1.0 / f["a_max"])
    log_g = np.log2(granularity)
    alpha = f["a"] + f["d"] * np.log10(compute)
    out = a_hat ** (alpha + f["gamma"] * log_g**2 + f["beta"] * log_g)
    return float(out) if np.ndim(out) == 0 else out


def optimal_granularity(fit=None) -> float:
    """The G that maximises EL at any A < 1 and C: 2^(-β / 2γ)."""
    f = fit or LING_FIT
    return 2 ** (-f["beta"] / (2 * f["gamma"]))


def leverage_of(cfg: Config, compute: float) -> float:
    """EL of `cfg`'s activation ratio and granularity at `compute` FLOPs."""
    return efficiency_leverage(activation_ratio(cfg), granularity(cfg), compute)


def at_active_compute(cfg: Config, *, num_experts: int | None = None, top_k: int | None = None,
                      num_shared_experts: int | None = None) -> Config:
    """`cfg` with other expert counts and the expert width chosen so that the active FFN
    width per token, (top_k + shared) x d_expert, stays what `cfg` has: the same FLOPs per
    token, more or fewer parameters. The width is rounded to a multiple of 8, at least 8, so
    the active width is exact when (top_k + shared) divides it into multiples of 8. Shared
    experts take the routed width (`d_shared_expert` is cleared); their gate stays if any do."""
    moe = cfg.moe
    if not moe.num_experts:
        raise ValueError(f"{cfg.name}: moe.num_experts=0 is dense; start from an MoE config")
    e = moe.num_experts if num_experts is None else num_experts
    k = moe.top_k if top_k is None else top_k
    s = moe.num_shared_experts if num_shared_experts is None else num_shared_experts
    if k < 1 or k > e:
        raise ValueError(f"top_k={k} must be in 1..num_experts={e}")
    if s < 0:
        raise ValueError(f"num_shared_experts={s} must be >= 0")
    active = moe.top_k * moe.expert_width(cfg.model.d_ff) + moe.shared_width(cfg.model.d_ff)
    width = int(round(active / (k + s) / 8)) * 8
    if width < 8:
        raise ValueError(f"top_k + shared = {k + s} leaves experts {active / (k + s):.1f} wide (the active "
                         f"width {active} shared out); use top_k + shared <= {active // 8}")
    return dataclasses.replace(
        cfg, name=f"{cfg.name}_e{e}k{k}s{s}",
        moe=dataclasses.replace(moe, num_experts=e, top_k=k, num_shared_experts=s, d_expert=width,
                                expert_fraction=0.0, d_shared_expert=0,
                                shared_expert_gate=moe.shared_expert_gate and s > 0))


def segmented(cfg: Config, factor: float) -> Config:
    """`cfg` with every expert split into `factor` finer ones (a factor below 1 merges them):
    routed experts, top-k and shared experts x factor, d_expert / factor. The activation
    ratio and the active width stay; the granularity G grows by `factor`."""
    moe = cfg.moe
    counts = {"num_experts": moe.num_experts, "top_k": moe.top_k,
              "num_shared_experts": moe.num_shared_experts}
    scaled = {k: v * factor for k, v in counts.items()}
    if factor <= 0 or any(abs(v - round(v)) > 1e-9 for v in scaled.values()):
        whole = [m for m in (1 / 8, 1 / 4, 1 / 2, 2, 4, 8)
                 if all(float(v * m).is_integer() for v in counts.values())]
        raise ValueError(f"factor={factor}: experts, top-k and shared ({counts['num_experts']}, "
                         f"{counts['top_k']}, {counts['num_shared_experts']}) must stay whole numbers; "
                         f"use one of {[f'{m:g}' for m in whole]}")
    return at_active_compute(cfg, **{k: int(round(v)) for k, v in scaled.items()})


def training_compute(cfg: Config, tokens: float) -> float:
    """C = 3 x forward FLOPs per token (attention and experts included) x tokens."""
    return 3 * sum(forward_flops(cfg, causal=True).values()) * tokens

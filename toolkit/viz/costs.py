"""Figures of what designs and layouts cost: plain functions from numbers to matplotlib figures.

    leverage_curve(compute=1e22, mark=(0.25, 2.0))       # Ling's EL against activation ratio
    design_bars(explorer.sweep(designs))                 # params, memory, bytes per design
    plan_breakdown(plans[0])                             # memory and step time of one plan
"""

import matplotlib.pyplot as plt
import numpy as np

from toolkit.analysis.scaling import efficiency_leverage, optimal_granularity


def leverage_curve(compute: float = 1e22, granularities=(2, 4, 8, 12, 16, 32), mark=None):
    """EL against the activation ratio, one line per granularity; `mark` = (A, G) dots a design."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    a = np.logspace(np.log10(0.01), 0, 100)
    for g in granularities:
        ax.plot(a, efficiency_leverage(a, g, compute), label=f"G = {g}")
    if mark is not None:
        ax.plot([mark[0]], [efficiency_leverage(mark[0], mark[1], compute)], "ko", label="this design")
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("activation ratio A (active / total experts)")
    ax.set_ylabel("efficiency leverage")
    ax.set_title(f"Ling's EL law at C = {compute:.0e} FLOPs (best G about {optimal_granularity():.0f})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def design_bars(rows):
    """Total and active parameters, memory per device and bytes per step of each design row
    (`SparsityExplorer.row`), side by side."""
    names = [r["design"] for r in rows]
    panels = [("parameters (M)", [(r["params_total"] / 1e6, r["params_active"] / 1e6) for r in rows]),
              ("memory per device (MB)", [(r["memory_per_device"] / 1e6,) for r in rows]),
              ("bytes sent per step (MB)", [(r["comm_per_step"] / 1e6,) for r in rows])]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    x = np.arange(len(rows))
    for ax, (title, values) in zip(axes, panels, strict=True):
        width = 0.8 / len(values[0])
        for j in range(len(values[0])):
            ax.bar(x + j * width, [v[j] for v in values], width,
                   label=("total", "active")[j] if len(values[0]) > 1 else None)
        ax.set_xticks(x + 0.4 - width / 2, names, rotation=30, fontsize=7)
        ax.set_title(title, fontsize=9)
        if len(values[0]) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plan_breakdown(plan):
    """Two bars for one `toolkit.analysis.planner.Plan`: memory per device by kind, and
    step time by part (compute, exposed collectives per axis, bubble)."""
    mem = plan.time.costs.memory
    kinds = ("params", "optimizer", "gradients", "activations", "gathered")
    parts = {k: v for k, v in plan.time.breakdown.items() if v > 0 and not k.startswith("overlapped_")}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 2.6))
    left = 0.0
    for k in kinds:
        a1.barh([0], [mem[k] / 1e9], left=left, label=k)
        left += mem[k] / 1e9
    a1.set_yticks([])
    a1.set_xlabel("GB per device")
    a1.legend(fontsize=7, ncol=3)
    left = 0.0
    for k, v in parts.items():
        a2.barh([0], [v], left=left, label=k)
        left += v
    a2.set_yticks([])
    a2.set_xlabel("seconds per step")
    a2.legend(fontsize=7, ncol=3)
    fig.suptitle(plan.label, fontsize=9)
    fig.tight_layout()
    return fig

"""Figures of what designs and layouts cost: plain functions from numbers to matplotlib figures.

    leverage_curve(compute=1e22, mark=(0.25, 2.0))       # Ling's EL against activation ratio
    design_bars(explorer.sweep(designs))                 # params, FLOPs, memory, bytes per design
    plan_breakdown(explorer.breakdown(), "e8 t2 ...")   # memory, bytes and step time of one plan
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


def _bars(ax, names, series, title):
    """Grouped bars: `series` is [(label, values per name)], one bar per label and name."""
    x, width = np.arange(len(names)), 0.8 / len(series)
    for j, (label, values) in enumerate(series):
        ax.bar(x + j * width, values, width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=30, fontsize=7)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)


def design_bars(rows):
    """Four panels over design rows (`SparsityExplorer.row`): total and active parameters,
    FLOPs per token (all and in the experts), memory per device, bytes sent per step."""
    names = [r["design"] for r in rows]
    col = lambda key, scale: [r[key] / scale for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    _bars(axes[0], names, [("total", col("params_total", 1e6)), ("active", col("params_active", 1e6))],
          "parameters (M)")
    _bars(axes[1], names, [("all", col("flops_per_token", 1e6)),
                           ("experts", col("expert_flops_per_token", 1e6))], "forward FLOPs per token (M)")
    _bars(axes[2], names, [("", col("memory_per_device", 1e6))], "memory per device (MB)")
    _bars(axes[3], names, [("", col("comm_per_step", 1e6))], "bytes sent per step (MB)")
    fig.tight_layout()
    return fig


def _stacked(ax, parts: dict, xlabel: str) -> None:
    left = 0.0
    for k, v in parts.items():
        ax.barh([0], [v], left=left, label=k)
        left += v
    ax.set_yticks([])
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=6, ncol=2)


def plan_breakdown(parts: dict, title: str = ""):
    """Three stacked bars of one plan's `parts` (`PlanningExplorer.breakdown`): memory per
    device by kind (GB), bytes one device sends per step by axis and collective (GB), and
    step time by part (s)."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.8))
    _stacked(axes[0], parts["memory"], "GB per device")
    _stacked(axes[1], parts["communication"], "GB sent per device per step")
    _stacked(axes[2], parts["time"], "seconds per step")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig

"""Figures as values: each builder takes plain data and returns a matplotlib Figure.

The trainer saves them as PNG; notebooks display or redraw them live.

    fig = loss_curves(history, val_history)
    fig = expert_load_heatmap(counts_le)
    save(fig, run_dir / "loss.png")
"""

import matplotlib.pyplot as plt
import numpy as np

from toolkit.analysis.routing import load_fractions


def loss_curves(history: list, val_history: list, *, ax=None):
    """Train CE per step and validation loss per domain (nats/token)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    if history:
        steps = [h["step"] for h in history]
        ax.plot(steps, [h["ce"] for h in history], lw=1, label="train CE")
    for dom in (val_history[0]["val_loss"] if val_history else {}):
        ax.plot([v["step"] for v in val_history], [v["val_loss"][dom] for v in val_history],
                marker="o", label=f"val {dom}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def expert_load_heatmap(counts_le, *, layer_names=None, ax=None, title="expert load"):
    """Share of each MoE layer's assignments per expert; 1/E everywhere is balanced."""
    frac_le = load_fractions(counts_le)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(
        figsize=(max(4, 0.45 * frac_le.shape[1] + 2), max(2, 0.45 * frac_le.shape[0] + 1.2)))
    im = ax.imshow(frac_le, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(frac_le.shape[0]), layer_names or list(range(frac_le.shape[0])))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of assignments")
    fig.tight_layout()
    return fig


def domain_preference_heatmap(domain_counts_lde, domains, *, layer_names=None):
    """Per domain, the lift of each expert (share for the domain / share overall), per layer."""
    c = np.asarray(domain_counts_lde, np.float64)
    overall_le = c.sum(1) / np.maximum(c.sum((1, 2))[:, None], 1e-12)
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 0.45 * c.shape[0] + 1.6),
                             squeeze=False)
    for d, name in enumerate(domains):
        share_le = c[:, d] / np.maximum(c[:, d].sum(-1, keepdims=True), 1e-12)
        lift_le = share_le / np.maximum(overall_le, 1e-12)
        im = axes[0, d].imshow(np.log2(np.maximum(lift_le, 1e-3)), aspect="auto", cmap="RdBu_r",
                               vmin=-2, vmax=2)
        axes[0, d].set_title(f"{name}: log2 lift")
        axes[0, d].set_xlabel("expert")
        axes[0, d].set_yticks(range(c.shape[0]), layer_names or list(range(c.shape[0])))
    axes[0, 0].set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes[0, -1])
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Quantization pictures: values against a format's grid, and QSNR tables.

    h = explorer.histogram("acts", "experts")      # values in element units, the element grid
    fig = quantization_histogram(h["scaled"], h["grid"], title=h["title"])

Values are shown divided by their group's scale, so the x axis is the element's own units:
each vertical line is a value the format can store, and the histogram shows where the
data falls between them (dense grid near zero for FP elements, even spacing for INT).
"""

import matplotlib.pyplot as plt
import numpy as np


def quantization_histogram(scaled, grid, *, title: str = "", ax=None, bins: int = 121):
    """Histogram of `scaled` values with the element grid (`grid`, non-negative values,
    mirrored) as vertical lines; log-scaled counts."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3))
    grid = np.asarray(grid)
    full = np.unique(np.concatenate([-grid, grid]))
    lim = float(grid.max()) * 1.05
    ax.hist(np.clip(np.asarray(scaled), -lim, lim), bins=bins, range=(-lim, lim), color="tab:blue",
            alpha=0.8, log=True)
    for g in full:
        ax.axvline(g, color="tab:red", linewidth=0.5, alpha=0.45)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel(f"value / block scale (element units; {len(full)} grid values in red)")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig

"""Pipeline schedules as Gantt charts: one row per stage, one box per operation.

    tl = timeline("interleaved", stages=4, microbatches=8, virtual=2)
    fig = schedule_gantt(tl)       # F boxes solid, B boxes hatched, colour = micro-batch

Works for unit-tick timelines and for replays with measured op times
(`timeline(..., forward_time=tf, backward_time=tb)`); idle time is the white space, and
the title gives the bubble fraction read off the chart.
"""

import matplotlib.pyplot as plt


def schedule_gantt(tl, *, ax=None, title=None):
    """Gantt chart of a `toolkit.sharding.schedules.Timeline`."""
    width = max(6.0, min(16.0, 0.28 * tl.length + 2)) if tl.length > 8 else 6.0
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(
        figsize=(width, 0.45 * tl.stages + 1.3))
    cmap = plt.get_cmap("tab10" if tl.microbatches <= 10 else "tab20")
    unit = all(float(op.start).is_integer() and op.end - op.start == 1 for op in tl.ops)
    for op in tl.ops:
        color = cmap(op.microbatch % cmap.N)
        ax.barh(op.stage, op.end - op.start, left=op.start, height=0.8, color=color,
                alpha=1.0 if op.kind == "F" else 0.55, hatch=None if op.kind == "F" else "//",
                edgecolor="black", linewidth=0.4)
        if unit:
            label = f"{op.kind}{op.microbatch}" + (f".{op.chunk}" if tl.virtual > 1 else "")
            ax.text(op.start + 0.5, op.stage, label, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(tl.stages), [f"stage {s}" for s in range(tl.stages)])
    ax.invert_yaxis()
    ax.set_xlim(0, tl.length)
    ax.set_xlabel("tick" if unit else "seconds")
    v = f", v={tl.virtual}" if tl.virtual > 1 else ""
    ax.set_title(title or f"{tl.schedule}: p={tl.stages}, m={tl.microbatches}{v}; bubble "
                 f"{tl.bubble_fraction():.1%} of the time ({tl.bubble_ratio():.3f} x ideal)",
                 fontsize=9)
    fig.tight_layout()
    return fig

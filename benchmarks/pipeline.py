"""Pipeline schedules: bubbles against theory, activation memory, wall-clock bubbles.

    .venv/bin/python benchmarks/pipeline.py          # tiny preset, 8 simulated devices, ~3 min

1. Bubble fractions read off each schedule's timeline (unit-time ops) for a grid of
   (p, m, v), against (p-1)/(m+p-1) (GPipe, 1F1B) and Megatron's (1/v)(p-1)/m.
2. Activation memory: the compiled train step's temporaries per device (XLA memory
   analysis) for GPipe and 1F1B at p=4, m=8 (pipeline=4 x data=2), with and without
   re-materialisation, and the stash the executor allocates (slots x slot bytes).
3. Wall-clock bubbles: one chunk's forward and backward timed on one device
   (`pipeline_stage_times`), the schedule replayed with those times.
Writes `benchmarks/results/pipeline.json` and `.md`.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
from common import environment, write_results  # noqa: E402

from toolkit.config import apply_overrides, tiny  # noqa: E402
from toolkit.sharding.pipeline import plan  # noqa: E402
from toolkit.sharding.schedules import (  # noqa: E402
    theory_bubble_fraction,
    theory_bubble_ratio,
    timeline,
)
from toolkit.training.inspect import inspect_train_step, pipeline_stage_times  # noqa: E402

GRID = [("gpipe", 4, 8, 1), ("1f1b", 2, 4, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 16, 1),
        ("1f1b", 8, 32, 1), ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2),
        ("interleaved", 4, 16, 2), ("interleaved", 4, 8, 4), ("interleaved", 8, 16, 2)]
PIPE = ["parallel.pipeline=4", "parallel.data=2", "train.microbatches=8"]


def bubbles():
    rows = []
    for schedule, p, m, v in GRID:
        tl = timeline(schedule, p, m, v)
        rows.append({"schedule": schedule, "p": p, "m": m, "v": v, "ticks": tl.length,
                     "fraction": tl.bubble_fraction(), "fraction_theory": (
                         theory_bubble_fraction(p, m * v) if v > 1 else theory_bubble_fraction(p, m)),
                     "ratio": tl.bubble_ratio(), "ratio_theory": theory_bubble_ratio(p, m, v),
                     "peak_in_flight": tl.peak_in_flight()})
    return rows


def memory():
    rows = []
    base = tiny()
    slot = (base.train.batch_size // 8 // 2) * base.model.seq_len * base.model.d_model * 4
    for schedule in ("gpipe", "1f1b"):
        for remat in (True, False):
            cfg = apply_overrides(base, PIPE + [f"parallel.schedule={schedule}",
                                                f"parallel.pipeline_remat={str(remat).lower()}"])
            info = inspect_train_step(cfg)
            slots = plan(timeline(schedule, 4, 8)).stash
            rows.append({"schedule": schedule, "remat": remat, "temp_bytes": info["temp_bytes"],
                         "stash_slots": slots, "stash_input_bytes": slots * slot})
    return rows


def wall_clock():
    rows = []
    for schedule, v, layers in (("gpipe", 1, 4), ("1f1b", 1, 4), ("interleaved", 2, 8)):
        cfg = apply_overrides(tiny(), PIPE + [f"parallel.schedule={schedule}",
                                              f"parallel.virtual_stages={v}",
                                              f"model.num_layers={layers}"])
        tf, tb = pipeline_stage_times(cfg, repeats=7)
        tl = timeline(schedule, 4, 8, v, forward_time=tf, backward_time=tb)
        rows.append({"schedule": schedule, "p": 4, "m": 8, "v": v, "layers": layers,
                     "forward_ms": 1e3 * tf, "backward_ms": 1e3 * tb,
                     "makespan_ms": 1e3 * tl.length, "fraction": tl.bubble_fraction(),
                     "ratio": tl.bubble_ratio(), "ratio_theory": theory_bubble_ratio(4, 8, v)})
    return rows


def main():
    b, mem, wall = bubbles(), memory(), wall_clock()
    lines = ["## Bubbles from the emitted timelines (unit-time ops)", "",
             "| schedule | p | m | v | ticks | bubble fraction | theory | bubble ratio | theory | "
             "peak in flight per stage |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in b:
        lines.append(f"| {r['schedule']} | {r['p']} | {r['m']} | {r['v']} | {r['ticks']:.0f} | "
                     f"{r['fraction']:.4f} | {r['fraction_theory']:.4f} | {r['ratio']:.4f} | "
                     f"{r['ratio_theory']:.4f} | {r['peak_in_flight']} |")
    lines += ["", "## Activation memory, tiny preset, pipeline=4 x data=2, m=8 (per device)", "",
              "| schedule | remat | XLA temporaries (MiB) | stash slots | stashed stage inputs (MiB) |",
              "|---|---|---|---|---|"]
    for r in mem:
        stashed = f"{r['stash_input_bytes'] / 2**20:.2f}" if r["remat"] else "(autodiff residuals)"
        lines.append(f"| {r['schedule']} | {r['remat']} | {r['temp_bytes'] / 2**20:.2f} | "
                     f"{r['stash_slots']} | {stashed} |")
    lines += ["", "## Wall-clock bubbles: measured chunk times replayed (p=4, m=8)", "",
              "| schedule | v | layers | forward ms | backward ms | makespan ms | bubble fraction | "
              "bubble ratio | unit-time theory |", "|---|---|---|---|---|---|---|---|---|"]
    for r in wall:
        lines.append(f"| {r['schedule']} | {r['v']} | {r['layers']} | {r['forward_ms']:.2f} | "
                     f"{r['backward_ms']:.2f} | {r['makespan_ms']:.1f} | {r['fraction']:.4f} | "
                     f"{r['ratio']:.4f} | {r['ratio_theory']:.4f} |")
    write_results("pipeline", {"environment": environment(), "bubbles": b, "memory": mem,
                               "wall_clock": wall, "devices": len(jax.devices())},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

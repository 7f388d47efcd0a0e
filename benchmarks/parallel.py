"""Every parallelism recipe on the simulated 8-device mesh against one device: step time,
tokens/s, memory and bytes moved per device.

    .venv/bin/python benchmarks/parallel.py                    # every row, tiny preset, ~10 min
    .venv/bin/python benchmarks/parallel.py --rows single ep_capacity --repeats 2 \\
        --set model.num_layers=2                               # a quick look, ~1 min

Each row is the `tiny` preset with a mesh and recipe (`ROWS`), trained with the same seed
and batches; steps are timed interleaved (rows take turns, so background load hits all
alike) after compile and warmup. Columns: train-step time (median) and tokens/s, the ratio
to the single-device step measured in the same run; per device, parameter and parameter +
optimizer bytes, XLA's temporaries, and the bytes its collectives send in one step, by
kind (read from the compiled HLO by `inspect_train_step`); and for the expert exchange of
one MoE layer, the HLO bytes against the formula (`communication_check`).

On a 2-core CPU the 8 "devices" share two cores, so a ratio above 1 measures the overhead
of partitioning and collectives (and smaller per-device matmuls), not a speedup; the
bytes columns are what would cross the interconnect on real accelerators.
Writes `benchmarks/results/parallel.json` and `.md`.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
from common import environment, time_interleaved, write_results  # noqa: E402

from toolkit.config import apply_overrides, tiny, validate  # noqa: E402
from toolkit.training import Trainer  # noqa: E402
from toolkit.training.inspect import communication_check, inspect_train_step  # noqa: E402

_CAP = ["moe.dispatch=capacity", "moe.capacity_factor=1.25"]
ROWS = {
    "single": ["parallel.data=1"],
    "dp": ["parallel.data=8", "parallel.recipe=dp"],
    "fsdp": ["parallel.data=2", "parallel.fsdp=4", "parallel.recipe=fsdp"],
    "tp": ["parallel.data=4", "parallel.tensor=2", "parallel.recipe=tp"],
    "tp_overlap2": ["parallel.data=4", "parallel.tensor=2", "parallel.recipe=tp",
                    "parallel.overlap_chunks=2"],
    "ep_dropless": ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep"],
    "ep_capacity": ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep", *_CAP],
    "ep_capacity_overlap2": ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep",
                             "parallel.overlap_chunks=2", *_CAP],
    "ep_dropless_overlap2": ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep",
                             "parallel.overlap_chunks=2"],
    "ep_ragged_emulated": ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep",
                           "parallel.dropless_exchange=ragged_all_to_all"],
    "fsdp_ep": ["parallel.data=1", "parallel.fsdp=2", "parallel.expert=4", "parallel.recipe=fsdp_ep"],
    "fsdp_tp_ep": ["parallel.data=1", "parallel.fsdp=2", "parallel.tensor=2", "parallel.expert=2"],
    "folded": ["parallel.data=2", "parallel.tensor=2", "parallel.expert=2", "parallel.recipe=folded"],
    "folded_capacity": ["parallel.data=2", "parallel.tensor=2", "parallel.expert=2",
                        "parallel.recipe=folded", *_CAP],
    "bigmac_ep_capacity": ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep",
                           "moe.bigmac_ratio=0.25", *_CAP],
}


def _mib(b):
    return b / 2**20


def run(rows, extra, warmup, repeats) -> dict:
    trainers, out = {}, {}
    tmp = tempfile.mkdtemp(prefix="parallel-bench-")
    for name in rows:
        cfg = apply_overrides(tiny(), ["train.eval_every=0", "train.checkpoint_every=0",
                                       *extra, *ROWS[name]])
        devices = jax.devices()[:1] if name == "single" else jax.devices()
        cfg = validate(cfg, num_devices=len(devices))
        info = inspect_train_step(cfg, devices)
        comm = communication_check(cfg, devices) if name != "single" else []
        out[name] = {
            "overrides": ROWS[name], "mesh": info["mesh"], "recipe": cfg.parallel.recipe,
            "param_mib": _mib(info["param_bytes"]), "state_mib": _mib(info["state_bytes"]),
            "temp_mib": _mib(info["temp_bytes"]),
            "sent_mib": {k: _mib(v["sent_bytes"]) for k, v in info["collectives"].items()},
            "ops": {k: v["count"] for k, v in info["collectives"].items()},
            "exchange_check": [{k: r[k] for k in ("kind", "measured_bytes", "analytic_bytes")}
                               for r in comm if r["what"].startswith("expert")],
        }
        trainers[name] = Trainer(cfg, out_dir=f"{tmp}/{name}", devices=devices, progress=False)
        tokens = cfg.train.batch_size * cfg.model.seq_len
        out[name]["tokens_per_step"] = tokens
        print(f"{name}: built on {info['mesh']}", flush=True)
    times = time_interleaved({n: t.train_step for n, t in trainers.items()}, warmup, repeats)
    base = times.get("single", {}).get("median_ms")
    for name, t in times.items():
        out[name].update(step_ms=t["median_ms"], min_ms=t["min_ms"], max_ms=t["max_ms"],
                         first_call_s=t["first_call_s"],
                         tokens_per_s=out[name]["tokens_per_step"] / (t["median_ms"] / 1e3),
                         vs_single=(t["median_ms"] / base) if base else None)
    return out


def table(out: dict) -> str:
    kinds = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")
    lines = ["| row | mesh | recipe | step ms | tokens/s | time vs 1 device | params MiB/dev | "
             "params+opt MiB/dev | temp MiB | " + " | ".join(f"{k} MiB sent" for k in kinds) +
             " | exchange per MoE layer fwd: HLO / formula KiB |",
             "|" + "---|" * (9 + len(kinds) + 1)]
    for name, r in out.items():
        check = ", ".join(f"{c['kind']} {c['measured_bytes'] / 1024:,.0f} / "
                          f"{c['analytic_bytes'] / 1024:,.0f}" for c in r["exchange_check"]) or "-"
        ratio = f"{r['vs_single']:.2f}x" if r.get("vs_single") else "-"
        lines.append(f"| {name} | {r['mesh']} | {r['recipe']} | {r['step_ms']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {ratio} | {r['param_mib']:.2f} | "
                     f"{r['state_mib']:.2f} | {r['temp_mib']:.1f} | " +
                     " | ".join(f"{r['sent_mib'].get(k, 0):.2f}" for k in kinds) + f" | {check} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every row, e.g. model.num_layers=2")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    out = run(args.rows, args.set, args.warmup, args.repeats)
    note = ("\nOn this machine the 8 devices are simulated on 2 CPU cores: the time ratios "
            "measure partitioning and collective overhead, not speedup. Bytes are per device "
            "per train step, read from the compiled HLO (ring algorithms).\n")
    write_results("parallel", {"environment": environment(), "extra_overrides": args.set,
                               "rows": out}, table(out) + note)


if __name__ == "__main__":
    main()

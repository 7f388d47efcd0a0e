"""Train the tiny MoE and its dense twin (same active parameters) on the same tokens; compare.

    .venv/bin/python benchmarks/moe_vs_dense.py                       # 300 steps each, 1 device
    .venv/bin/python benchmarks/moe_vs_dense.py --steps 20 --set train.eval_batches=1 \
        --name moe_vs_dense_tiny                                      # tiny CPU check, 1-2 min
    .venv/bin/python benchmarks/moe_vs_dense.py --mesh data=8         # 8 simulated CPU devices

The MoE model is `toolkit.config.tiny()`; the dense model is `dense_twin(tiny())`, whose MLPs
have width `top_k * d_expert`, so both multiply each token through the same number of
parameters (the router's `d x E` aside). Both see the same batches for the same steps, through
`toolkit.training.Trainer`, and the table puts side by side: validation bits per byte per
domain (with the byte-unigram baseline), overall validation loss, final train CE, parameters
total and active, and tokens/s.

`--set KEY=VALUE` overrides both configs (before the dense twin is derived); `--mesh` picks
mesh axis sizes, e.g. `data=2,fsdp=4`, and on CPU simulates that many devices. Without
`--mesh` both run on one device. If `train.warmup_steps` is not below the step count, it is
lowered to a tenth of the steps. Results: `benchmarks/results/<name>.json` and `.md`
(default name `moe_vs_dense`); `--runs` also keeps each run directory (metrics, plots,
report) under `benchmarks/results/runs/` (gitignored).
"""

import argparse
import math
import os
import time

AXES = ("pipeline", "data", "fsdp", "sequence", "tensor", "expert")


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="mesh axis sizes, e.g. data=8 (default: one device)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to both models, e.g. train.batch_size=16")
    p.add_argument("--name", default="moe_vs_dense", help="results file stem (default moe_vs_dense)")
    p.add_argument("--runs", action="store_true",
                   help="keep run directories under benchmarks/results/runs/")
    p.add_argument("--log-every", type=int, default=50, help="print a line every N steps (0: never)")
    return p


def _mesh_sizes(text) -> dict:
    """`"data=2,fsdp=4"` -> {"data": 2, "fsdp": 4}; sizes must be explicit positive ints."""
    sizes = {}
    for part in (text or "").split(","):
        axis, _, size = part.partition("=")
        axis = axis.strip()
        if axis not in AXES or not size.strip().isdigit() or int(size) < 1:
            raise SystemExit(f"--mesh {text!r}: write axis=size pairs with axes in {AXES} and "
                             f"positive sizes, e.g. --mesh data=2,fsdp=4")
        sizes[axis] = int(size)
    return sizes


def _configs(args, mesh_sizes):
    from toolkit.config import apply_overrides, dense_twin, tiny, validate

    parallel = ["parallel.data=1"] + [f"parallel.{a}={n}" for a, n in mesh_sizes.items()]
    cfg = apply_overrides(tiny(), parallel + list(args.set))
    if args.steps is not None:
        cfg = apply_overrides(cfg, [f"train.steps={args.steps}"])
    if cfg.train.warmup_steps >= cfg.train.steps:
        warmup = cfg.train.steps // 10
        print(f"train.warmup_steps={cfg.train.warmup_steps} is not below train.steps="
              f"{cfg.train.steps}; using {warmup}")
        cfg = apply_overrides(cfg, [f"train.warmup_steps={warmup}"])
    num_devices = math.prod(mesh_sizes.values())
    twin = dense_twin(cfg)
    for c in (cfg, twin):
        validate(c, num_devices)
    return cfg, twin, num_devices


def _train(cfg, devices, out_dir, log_every):
    from toolkit.training import Trainer

    def log(trainer, rec):
        if log_every and (rec["step"] % log_every == 0 or rec["step"] == 1):
            print(f"  {cfg.name} step {rec['step']:4d}/{cfg.train.steps}  ce {rec['ce']:.3f}  "
                  f"{rec['tokens_per_s']:,.0f} tok/s", flush=True)

    t0 = time.perf_counter()
    trainer = Trainer(cfg, out_dir=out_dir, progress=False, devices=devices)
    summary = trainer.run(callback=log)
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


def _markdown(moe, dense) -> str:
    rows = [("params total", "params_total", "{:,}"), ("params active", "params_active", "{:,}")]
    rows += [(f"val bits/byte: {d}", ("val_bits_per_byte", d), "{:.4f}") for d in moe["domains"]]
    rows += [(f"unigram bits/byte: {d} (reference)", ("unigram_bits_per_byte", d), "{:.4f}")
             for d in moe["domains"]]
    rows += [("val loss (nats/token)", "final_val_loss", "{:.4f}"),
             ("final train CE (last 10 steps)", "final_train_ce", "{:.4f}"),
             ("tokens/s (train steps)", "tokens_per_s", "{:,.0f}"),
             ("compile s", "compile_seconds", "{:.1f}"),
             ("wall s (incl. data, eval)", "wall_seconds", "{:.1f}")]

    def get(s, key):
        return s[key[0]][key[1]] if isinstance(key, tuple) else s[key]

    out = f"| metric | MoE ({moe['name']}) | dense twin ({dense['name']}) | MoE - dense |\n"
    out += "|---|---:|---:|---:|\n"
    for label, key, fmt in rows:
        a, b = get(moe, key), get(dense, key)
        diff = fmt.format(a - b) if label.startswith(("val", "final")) else ""
        out += f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {diff} |\n"
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    mesh_sizes = _mesh_sizes(args.mesh) if args.mesh else {}
    num_devices = math.prod(mesh_sizes.values())
    flags = os.environ.get("XLA_FLAGS", "")
    if num_devices > 1 and "xla_force_host_platform_device_count" not in flags:
        # Only the CPU backend reads this; on GPU/TPU the accelerators are the devices.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}"
    import jax
    from common import RESULTS, environment, write_results

    from toolkit.config import ConfigError

    try:
        cfg, twin, num_devices = _configs(args, mesh_sizes)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if jax.device_count() < num_devices:
        raise SystemExit(f"--mesh {args.mesh} needs {num_devices} devices, "
                         f"{jax.device_count()} are available")
    devices = jax.devices()[:num_devices]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    summaries = {}
    for c in (cfg, twin):
        out_dir = RESULTS / "runs" / f"{args.name}-{stamp}" / c.name if args.runs else None
        print(f"training {c.name}: {c.train.steps} steps x {c.train.batch_size} x "
              f"{c.model.seq_len} tokens on {num_devices} {jax.default_backend()} device(s)",
              flush=True)
        summaries[c.name] = _train(c, devices, out_dir, args.log_every)
    moe, dense = summaries[cfg.name], summaries[twin.name]

    dev = jax.devices()[0]
    result = {"benchmark": "moe_vs_dense", "steps": cfg.train.steps,
              "tokens_per_model": moe["tokens_seen"], "mesh": moe["mesh"],
              "overrides": list(args.set), **environment(), "num_devices": num_devices,
              "configs": {cfg.name: cfg.to_dict(), twin.name: twin.to_dict()},
              "moe": moe, "dense": dense}
    table = (f"MoE vs dense twin: {cfg.train.steps} steps, {moe['tokens_seen']:,} tokens each, "
             f"mesh {moe['mesh']}, {jax.default_backend()} ({dev.device_kind}), "
             f"jax {jax.__version__}\n\n" + _markdown(moe, dense))
    print()
    write_results(args.name, result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

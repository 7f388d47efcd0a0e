"""Train the tiny model once per router on the same tokens and compare them in one table.

    .venv/bin/python benchmarks/routers.py                 # every router, 300 steps, ~18 min
    .venv/bin/python benchmarks/routers.py --steps 20 --variants topk_softmax top_p   # ~1 min

Each variant is the `tiny` preset with a few `--set` overrides (`VARIANTS`), trained with
the same seed, batches and mesh (data=2, fsdp=4 on 8 simulated CPU devices). Columns:
validation bits per byte per domain; load imbalance (max/mean expert load) and its
coefficient of variation over the last 10% of steps, averaged over layers; drop rate;
routed experts per token; FFN FLOPs per token actually spent (routed experts times their
SwiGLU FLOPs, plus shared experts and dense layers); tokens per second after compile.
Writes `benchmarks/results/routers.json` and `.md`.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import numpy as np  # noqa: E402
from common import environment, write_results  # noqa: E402  benchmarks/ is on sys.path

from toolkit.config import apply_overrides, tiny, validate  # noqa: E402
from toolkit.models.transformer import moe_layer_indices  # noqa: E402
from toolkit.training import Trainer  # noqa: E402

VARIANTS = {
    "topk_softmax": [],  # the preset: softmax top-2, Switch aux loss 0.01
    "sigmoid_bias": ["moe.router=sigmoid_bias", "moe.aux_loss_weight=0"],
    "sigmoid_bias_grouped": ["moe.router=sigmoid_bias", "moe.aux_loss_weight=0",
                             "moe.router_groups=4", "moe.router_topk_groups=2",
                             "moe.routed_scaling=2.5"],
    "top_p": ["moe.router=top_p", "moe.top_k=8", "moe.top_p=0.4", "moe.renormalize=false",
              "moe.entropy_loss_weight=1e-4"],
    "expert_choice": ["moe.router=expert_choice", "moe.aux_loss_weight=0"],
}


def ffn_flops_per_token(cfg, experts_per_token_l) -> float:
    """Forward FFN FLOPs per token: 3 matmuls of d x width, 2 FLOPs per multiply-add."""
    d, m = cfg.model.d_model, cfg.model
    moe = set(moe_layer_indices(cfg))
    flops, j = 0.0, 0
    for i in range(m.num_layers):
        if i in moe:
            width = (experts_per_token_l[j] + cfg.moe.num_shared_experts) * cfg.moe.d_expert
            j += 1
        else:
            width = m.d_ff
        flops += 6 * d * width
    return flops


def run(name, overrides, steps):
    cfg = apply_overrides(tiny(), [*overrides, f"train.steps={steps}", "train.eval_every=0",
                                   "train.checkpoint_every=0", f"train.warmup_steps={min(30, steps // 10)}",
                                   "parallel.data=2",
                                   "parallel.fsdp=4", f"name={name}"])
    cfg = validate(cfg, num_devices=8)
    trainer = Trainer(cfg, progress=False)
    for _ in range(steps):
        trainer.train_step()
    s = trainer.summary()
    tail = trainer.history[-max(10, steps // 10):]
    k_l = np.mean([h["experts_per_token"] for h in tail], axis=0)
    load_le = np.asarray(s["expert_load"])
    return {"variant": name, "overrides": overrides,
            **{f"bits_per_byte_{d}": b for d, b in s["val_bits_per_byte"].items()},
        "load_imbalance": float(np.mean(s["load_imbalance"])),
        "load_cv": float(np.mean(load_le.std(axis=1) / load_le.mean(axis=1))),
        "drop_rate": float(np.mean(s["drop_rate"])), "experts_per_token": float(np.mean(k_l)),
        "ffn_flops_per_token": ffn_flops_per_token(cfg, k_l), "tokens_per_s": s["tokens_per_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per variant (300)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--name", default="routers", help="results file stem (default routers)")
    args = p.parse_args(argv)
    rows = []
    for name in args.variants:
        rows.append(run(name, VARIANTS[name], args.steps))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()},
              flush=True)
    domains = [k.removeprefix("bits_per_byte_") for k in rows[0] if k.startswith("bits_per_byte_")]
    head = ("| variant | " + " | ".join(f"{d} bits/byte" for d in domains) +
            " | load max/mean | load CV | drop rate | experts/token | FFN MFLOP/token | tokens/s |")
    lines = [f"Routers on the tiny preset, {args.steps} steps each (same seed and batches), "
             f"mesh data=2,fsdp=4 on 8 simulated CPU devices.\n", head,
             "|---|" + "---:|" * (len(domains) + 6)]
    for r in rows:
        lines.append(f"| {r['variant']} | " +
                     " | ".join(f"{r[f'bits_per_byte_{d}']:.3f}" for d in domains) +
                     f" | {r['load_imbalance']:.2f} | {r['load_cv']:.3f} | {r['drop_rate']:.3f} | "
                     f"{r['experts_per_token']:.2f} | {r['ffn_flops_per_token'] / 1e6:.2f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    lines.append("\nOverrides: " + "; ".join(f"`{r['variant']}`: {' '.join(r['overrides']) or '-'}"
                                             for r in rows))
    write_results(args.name, {"benchmark": "routers", "steps": args.steps, **environment(),
                              "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the tiny model once per router on the same tokens and compare them in one table.

    .venv/bin/python benchmarks/routers.py                 # every variant, 300 steps, ~45 min
    .venv/bin/python benchmarks/routers.py --steps 20 --variants topk_softmax top_p   # ~1 min

Each variant (every router, and the MoE++, heterogeneous, fine-grained, BigMac and MTP
variants) is the `tiny` preset with a few `--set` overrides (`VARIANTS`), trained with
the same seed, batches and mesh (data=2, fsdp=4 on 8 simulated CPU devices). Columns:
validation bits per byte per domain; load imbalance (max/mean expert load) and its
coefficient of variation over the last 10% of steps, averaged over layers; drop rate;
routed experts per token (zero-computation experts included); the share of expert hidden
activations that are exactly zero; FFN-side FLOPs per token actually spent
(`toolkit.analysis.flops_per_token`: computed assignments times each expert's FLOPs, plus
routers, shared experts, BigMac projections, GRU experts and dense layers); tokens per
second after compile.
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
    "topk_softmax": [],  # the preset: softmax top-2 (GShard), Switch aux loss 0.01
    "switch_top1": ["moe.top_k=1", "moe.router_jitter=0.01", "moe.dispatch=capacity",
                    "moe.capacity_factor=1.25"],
    "sigmoid_bias": ["moe.router=sigmoid_bias", "moe.aux_loss_weight=0"],
    "sigmoid_bias_grouped": ["moe.router=sigmoid_bias", "moe.aux_loss_weight=0",
                             "moe.router_groups=4", "moe.router_topk_groups=2",
                             "moe.routed_scaling=2.5"],
    "seq_aux": ["moe.aux_loss_weight=0", "moe.seq_aux_loss_weight=0.01"],
    "top_p": ["moe.router=top_p", "moe.top_k=8", "moe.top_p=0.4", "moe.renormalize=false",
              "moe.entropy_loss_weight=1e-4"],
    "expert_choice": ["moe.router=expert_choice", "moe.aux_loss_weight=0"],
    "recurrent": ["moe.router=recurrent", "moe.recurrent_dim=128"],
    "tsallis": ["moe.router=tsallis", "moe.top_p=0.75", "moe.renormalize=false",
                "moe.tsallis_loss_weight=0.01"],
    "pre_attention": ["moe.router_placement=pre_attention"],
    "reglu": ["moe.expert_activation=reglu"],
    "moe++": ["moe.zero_experts=1", "moe.copy_experts=1", "moe.constant_experts=2",
              "moe.gating_residual=true", "moe.zc_tau=0.75"],
    "duo_big_small_skip": ["moe.num_experts=4", "moe.small_experts=4", "moe.d_small_expert=16",
                           "moe.zero_experts=1"],
    "hecto_gru": ["moe.num_experts=7", "moe.gru_experts=1", "moe.d_gru_expert=64"],
    "fine_grained": ["moe.num_experts=32", "moe.top_k=8", "moe.d_expert=32"],
    "bigmac": ["moe.num_experts=32", "moe.top_k=8", "moe.d_expert=128", "moe.bigmac_ratio=0.25"],
    "mtp": ["model.mtp_layers=1", "model.mtp_loss_weight=0.1"],
}


def ffn_flops_per_token(cfg, summary) -> float:
    """Forward FFN-side FLOPs per token over all layers: what the MoE layers actually spent
    (`toolkit.analysis.flops_per_token`) plus the dense layers' SwiGLU."""
    dense_layers = cfg.model.num_layers - len(moe_layer_indices(cfg))
    dense = dense_layers * 6.0 * cfg.model.d_model * cfg.model.d_ff
    return float(np.sum(summary["ffn_flops_per_token"])) + dense


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
    return {"variant": name, "overrides": overrides,
            **{f"bits_per_byte_{d}": b for d, b in s["val_bits_per_byte"].items()},
            "load_imbalance": float(np.mean(s["load_imbalance"])),
            "load_cv": float(np.mean(s["load_cv"])),
            "drop_rate": float(np.mean(s["drop_rate"])),
            "experts_per_token": float(np.mean(s["experts_per_token"])),
            "activation_zeros": float(np.mean(s["activation_zeros"])),
            "ffn_flops_per_token": ffn_flops_per_token(cfg, s), "tokens_per_s": s["tokens_per_s"]}


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
            " | load max/mean | load CV | drop rate | experts/token | act. zeros | FFN MFLOP/token |"
            " tokens/s |")
    lines = [f"Routers on the tiny preset, {args.steps} steps each (same seed and batches), "
             f"mesh data=2,fsdp=4 on 8 simulated CPU devices.\n", head,
             "|---|" + "---:|" * (len(domains) + 7)]
    for r in rows:
        lines.append(f"| {r['variant']} | " +
                     " | ".join(f"{r[f'bits_per_byte_{d}']:.3f}" for d in domains) +
                     f" | {r['load_imbalance']:.2f} | {r['load_cv']:.3f} | {r['drop_rate']:.3f} | "
                     f"{r['experts_per_token']:.2f} | {r['activation_zeros']:.2f} | "
                     f"{r['ffn_flops_per_token'] / 1e6:.2f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    lines.append("\nOverrides: " + "; ".join(f"`{r['variant']}`: {' '.join(r['overrides']) or '-'}"
                                             for r in rows))
    write_results(args.name, {"benchmark": "routers", "steps": args.steps, **environment(),
                              "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

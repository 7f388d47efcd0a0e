"""Expert placement on a trained tiny model: tokens that cross devices between MoE layers under
the toolkit's layout, round robin, greedy and the MILP, and speculative token shuffling.

    .venv/bin/python benchmarks/placement.py                 # about 3 minutes on a 2-core CPU
    .venv/bin/python benchmarks/placement.py --steps 20      # a quick look

Trains the `tiny` preset (8 experts, top-2, 4 MoE layers) on one device, records its
routing (`toolkit.analysis.placement.routing_trace`) on `--fit-batches` training batches
(fit) and on the validation batches of both domains (held out), places each layer's 8
experts on `--devices` devices from the fit trace, and measures on the held-out trace: the
share of tokens whose top-1 expert changes device between consecutive layers, the busiest
device's load over the mean, the solver's time, and speculative shuffling's device-prediction
accuracy and all-to-all bytes (one hop = d_model x 4 bytes, fp32). For reference: a random
placement crosses (D-1)/D, and no placement can cross fewer tokens than if every expert
shared its device with its E/D most frequent successors ("bound").
Writes benchmarks/results/placement.{json,md}.
"""

import argparse

import jax
import numpy as np
from common import environment, write_results

from toolkit.analysis.placement import (
    contiguous_placement,
    cross_device_fraction,
    device_load_imbalance,
    place_experts,
    round_robin_placement,
    routing_trace,
    top1_pair_counts,
)
from toolkit.analysis.routing import inter_layer_mutual_information
from toolkit.analysis.speculation import speculative_shuffle
from toolkit.config import apply_overrides, tiny
from toolkit.training import Trainer


def train(steps: int):
    cfg = apply_overrides(tiny(), [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                                   "train.eval_every=0", "train.checkpoint_every=0"])
    trainer = Trainer(cfg, devices=jax.devices()[:1], progress=False)
    summary = trainer.run()
    print(f"trained {steps} steps: val loss {summary['final_val_loss']:.4f}", flush=True)
    return cfg, trainer, summary


def crossing_bound(trace, num_devices: int) -> float:
    """Fewest crossings any placement allows: each expert co-locates with at most E/D experts
    of the next layer, at best its most frequent successors (and predecessors)."""
    pairs_lij = top1_pair_counts(trace)
    b = trace.num_experts // num_devices
    top_rows = np.sort(pairs_lij, -1)[..., -b:].sum((1, 2))
    top_cols = np.sort(pairs_lij, -2)[:, -b:, :].sum((1, 2))
    return float(1 - np.minimum(top_rows, top_cols).sum() / pairs_lij.sum())


def measure(fit, held_out, device_le) -> dict:
    frac_l, overall = cross_device_fraction(held_out, device_le)
    return {"device_le": np.asarray(device_le).tolist(), "cross_fraction": frac_l.tolist(),
            "cross_overall": overall, "fit_cross_overall": cross_device_fraction(fit, device_le)[1],
            "load_imbalance": device_load_imbalance(held_out, device_le).tolist()}


def plain(d: dict) -> dict:
    """Arrays to lists, nan to None (JSON)."""
    return {k: np.where(np.isnan(v), None, v).tolist() if np.ndim(v) else v for k, v in d.items()}


def table(res: dict) -> str:
    n_tr = len(res["layouts"]["contiguous (toolkit EP)"]["cross_fraction"])
    d = res["devices"]
    lines = [f"## Tokens crossing devices between MoE layers: tiny, {res['steps']} steps, {d} devices", "",
             f"Held-out trace: {res['held_out_tokens']} validation tokens (fit: {res['fit_tokens']} training "
             f"tokens). Top-1 inter-layer mutual information (bits): "
             f"{', '.join(f'{x:.2f}' for x in res['mutual_information_bits'])}.", "",
             "| placement | " + " | ".join(f"L{i}->L{i + 1}" for i in range(n_tr))
             + " | overall | fit overall | device load max/mean per layer | solve s | optimal |",
             "|---" * (n_tr + 6) + "|"]
    for name, r in res["layouts"].items():
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in r["cross_fraction"])
                     + f" | {r['cross_overall']:.3f} | {r['fit_cross_overall']:.3f} | "
                     + " ".join(f"{x:.2f}" for x in r["load_imbalance"])
                     + f" | {r.get('seconds', 0):.2f} | {r.get('optimal', '-')} |")
    blank = " | ".join([""] * n_tr)
    lines += [f"| random (expected) | {blank} | {(d - 1) / d:.3f} | {(d - 1) / d:.3f} | | | |",
              f"| bound | {blank} | {res['bound_held_out']:.3f} | {res['bound_fit']:.3f} | | | |"]
    lines += ["", f"## Speculative token shuffling (hop = {res['hop_bytes']} bytes)", "",
              "| placement | accuracy per layer | token table | context table | context chosen | "
              "all-to-all MB without | with | saved |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda xs: " ".join("-" if x is None else f"{x:.2f}" for x in xs)
    for name, s in res["speculative"].items():
        base, spec = sum(s["baseline_bytes"]) / 1e6, sum(s["speculative_bytes"]) / 1e6
        lines.append(f"| {name} | {fmt(s['accuracy'])} | {fmt(s['token_accuracy'])} | "
                     f"{fmt(s['context_accuracy'])} | {fmt(s['context_share'])} | {base:.2f} | {spec:.2f} | "
                     f"{100 * s['bytes_saved_fraction']:.0f}% |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=tiny().train.steps)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--fit-batches", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=120.0)
    args = ap.parse_args()
    cfg, trainer, summary = train(args.steps)
    model = trainer.model()
    fit = routing_trace(model, [trainer.batches.train(s)["tokens"] for s in range(args.fit_batches)])
    val = trainer.batches.validation(cfg.train.eval_batches)
    held_out = routing_trace(model, [b["tokens"] for _, b in val])
    e, d, n_layers = fit.num_experts, args.devices, fit.num_layers
    layouts = {"contiguous (toolkit EP)": measure(fit, held_out, contiguous_placement(e, d, n_layers)),
               "round robin": measure(fit, held_out, round_robin_placement(e, d, n_layers))}
    placed = {}
    for method in ("greedy", "milp"):
        p = place_experts(fit, d, method=method, time_limit=args.time_limit)
        placed[method] = p.device_le
        layouts[method] = {**measure(fit, held_out, p.device_le), "seconds": p.seconds,
                           "optimal": p.optimal, "found_by": p.method}
        print(method, layouts[method]["cross_overall"], flush=True)
    itemsize = np.dtype(cfg.model.dtype).itemsize
    spec = {name: plain(speculative_shuffle(fit, held_out, device_le, d_model=cfg.model.d_model,
                                            bytes_per_element=itemsize))
            for name, device_le in (("contiguous (toolkit EP)", contiguous_placement(e, d, n_layers)),
                                    ("milp", placed["milp"]))}
    res = {"environment": environment(), "steps": args.steps, "devices": d,
           "val_loss": summary["final_val_loss"],
           "fit_tokens": int(fit.token_ids_n.size), "held_out_tokens": int(held_out.token_ids_n.size),
           "mutual_information_bits": inter_layer_mutual_information(top1_pair_counts(held_out)).tolist(),
           "bound_held_out": crossing_bound(held_out, d), "bound_fit": crossing_bound(fit, d),
           "hop_bytes": cfg.model.d_model * itemsize, "layouts": layouts, "speculative": spec}
    write_results("placement", res, table(res))


if __name__ == "__main__":
    main()

"""Low-bit formats: QSNR on Gaussian data and on a trained model, and QAT loss gaps.

    .venv/bin/python benchmarks/precision.py                 # about 30 minutes on a 2-core CPU
    .venv/bin/python benchmarks/precision.py --steps 30      # a quick look

1. QSNR (dB) of every MX/NV format (and the FP8 recipe's) on i.i.d. Gaussian data, with
   and without a random Hadamard rotation of the format's block size, next to Theorem 1
   of INT v.s. FP and the INT-vs-FP winner its crossover crest factors predict.
2. The tiny preset trained at equal steps in full precision (fp32; again with another seed
   for the noise floor) and under the FP8 (E4M3 or E5M2 gradients), MXINT8 and MXFP8
   recipes (fake-quant of weights, activations and gradients of the attention, MLP and
   expert matmuls): validation loss and relative gap.
3. On the fp32-trained model: QSNR per tensor class of its real weights and activations,
   with and without rotation; the validation loss under direct-cast inference policies
   and quantized KV caches; COMET's INT8-block fraction before and after permutation.
Writes benchmarks/results/precision.{json,md}.
"""

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import environment, write_results  # noqa: E402

from toolkit.analysis.precision import (  # noqa: E402
    inference_policy,
    model_tensors,
    policy_losses,
    qsnr_table,
)
from toolkit.config import apply_overrides, tiny  # noqa: E402
from toolkit.precision import (  # noqa: E402
    CROSSOVER_CREST,
    MX_NV,
    crest_factor,
    get_format,
    qsnr,
    qsnr_theory,
)
from toolkit.precision.mixed import int8_fraction_needed, outlier_permutation  # noqa: E402
from toolkit.training import Trainer  # noqa: E402

GAUSSIAN_FORMATS = MX_NV + ("fp8_e4m3", "fp8_e4m3_1x128", "fp8_e4m3_128x128", "fp8_e5m2_1x128")


def gaussian(seed: int = 0) -> dict:
    x = jax.random.normal(jax.random.key(seed), (4096, 512))
    rows = []
    for name in GAUSSIAN_FORMATS:
        fmt = get_format(name)
        g = fmt.block if fmt.scaling == "block" else 32
        crest = crest_factor(x, g)
        rows.append({"format": name, "qsnr_db": qsnr(x, fmt),
                     "qsnr_rot_db": qsnr(x, fmt, rotation=min(g, 128)),
                     "theory_db": qsnr_theory(fmt, crest), "crest": crest})
    by = {r["format"]: r for r in rows}
    pairs = []
    for (i, f), cross in CROSSOVER_CREST.items():
        crest = by[i]["crest"]
        pairs.append({"int": i, "fp": f, "crest": crest, "crossover": cross,
                      "predicted": i if crest < cross else f,
                      "measured": i if by[i]["qsnr_db"] > by[f]["qsnr_db"] else f})
    return {"rows": rows, "pairs": pairs}


# label -> overrides; "fp32, seed 1" (other initialisation and batches) is the noise floor.
RUNS = {"fp32": ["precision=none"], "fp32, seed 1": ["precision=none", "train.seed=1"],
        "fp8": ["precision=fp8"], "fp8_e5m2_grads": ["precision=fp8_e5m2_grads"],
        "mxint8": ["precision=mxint8"], "mxfp8": ["precision=mxfp8"]}


def train(steps: int) -> tuple:
    runs, model, val = {}, None, None
    for label, overrides in RUNS.items():
        cfg = apply_overrides(tiny(), [*overrides, f"train.steps={steps}",
                                       f"train.warmup_steps={max(1, steps // 10)}",
                                       "train.eval_every=0", "train.checkpoint_every=0"])
        trainer = Trainer(cfg, devices=jax.devices()[:1], progress=False)
        summary = trainer.run()
        runs[label] = {"val_loss": summary["final_val_loss"], "tokens_per_s": summary["tokens_per_s"],
                       "mode": summary["precision_mode"]}
        print(label, runs[label], flush=True)
        if label == "fp32":
            model = trainer.model()
            val = [b for _, b in trainer.batches.validation(cfg.train.eval_batches)]
    base = runs["fp32"]["val_loss"]
    for r in runs.values():
        r["gap_rel"] = (r["val_loss"] - base) / base
    return runs, model, val


def on_model(model, val) -> dict:
    tensors = model_tensors(model, val[0]["tokens"])
    rows = [r for fmt in MX_NV for g in (0, get_format(fmt).block)
            for r in qsnr_table(tensors, [fmt], rotations=(g,))]
    policies = {f"W+A {f}": inference_policy(f) for f in MX_NV}
    policies.update({f"W+A {f} + rotation {get_format(f).block}": inference_policy(
        f, rotation=get_format(f).block) for f in ("mxint4", "mxfp4", "nvint4", "nvfp4")})
    policies.update({f"KV {f}": inference_policy("", (), kv_cache=f) for f in ("int8", "int4", "fp8_e4m3")})
    losses = policy_losses(model, val, policies)
    kv = {f: qsnr(np.concatenate([a.reshape(-1, a.shape[-1]) for a in tensors["acts"]["kv"]]), f)
          for f in ("int8", "int4", "fp8_e4m3")}
    fmpq = {}
    for cls in ("attention", "experts"):
        x = np.concatenate(tensors["acts"][cls])
        perm = outlier_permutation(x[: len(x) // 2])
        test = x[len(x) // 2:]
        fmpq[cls] = {str(t): {"in_order": int8_fraction_needed(test, t, block=16),
                              "permuted": int8_fraction_needed(test[:, perm], t, block=16)}
                     for t in (20.0, 25.0)}
    return {"qsnr": rows, "losses": losses, "kv_qsnr": kv, "fmpq_block16": fmpq}


def table(res: dict) -> str:
    g = res["gaussian"]
    lines = ["## QSNR on i.i.d. Gaussian data (4096 x 512), dB", "",
             "| format | QSNR | with Hadamard (block) | Theorem 1 | block crest |", "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['qsnr_db']:.2f} | {r['qsnr_rot_db']:.2f} | {r['theory_db']:.2f} | "
              f"{r['crest']:.2f} |" for r in g["rows"]]
    lines += ["", "| INT vs FP | crest | crossover | predicted winner | measured winner |",
              "|---|---|---|---|---|"]
    lines += [f"| {p['int']} vs {p['fp']} | {p['crest']:.2f} | {p['crossover']} | {p['predicted']} | "
              f"{p['measured']} |" for p in g["pairs"]]
    t = res["training"]
    lines += ["", f"## tiny preset, {res['steps']} steps, one device", "",
              "| recipe | val loss | gap vs fp32 | tokens/s | mode |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['val_loss']:.4f} | {100 * r['gap_rel']:+.2f}% | {r['tokens_per_s']:.0f} | "
              f"{', '.join(f'{c}: {m}' for c, m in r['mode'].items() if m != 'full precision') or '-'} |"
              for k, r in t.items()]
    m = res["model"]
    lines += ["", "## QSNR on the fp32-trained tiny model (dB): format / rotation", ""]
    keys = sorted({(r["kind"], r["class"]) for r in m["qsnr"]})
    cols = [(f, g) for f in MX_NV for g in (0, get_format(f).block)]
    lines += ["| tensors | " + " | ".join(f"{f}{' rot' if g else ''}" for f, g in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for kind, cls in keys:
        vals = {(r["format"], r["rotation"]): r["qsnr_db"] for r in m["qsnr"]
                if r["kind"] == kind and r["class"] == cls}
        lines.append(f"| {kind} {cls} | " + " | ".join(
            f"{vals[c]:.1f}" if c in vals else "-" for c in cols) + " |")
    base = m["losses"]["full precision"]
    lines += ["", "## Validation loss under inference policies (no retraining)", "",
              "| policy | val loss | change |", "|---|---|---|"]
    lines += [f"| {k} | {v:.4f} | {100 * (v - base) / base:+.2f}% |" for k, v in m["losses"].items()]
    lines += ["", "KV cache QSNR (dB): " + ", ".join(f"{k} {v:.1f}" for k, v in m["kv_qsnr"].items()), "",
              "## COMET FMPQ: INT8-block share for a target QSNR (blocks of 16 channels)", "",
              "| activations | target dB | in channel order | after permutation |", "|---|---|---|---|"]
    for cls, by_t in m["fmpq_block16"].items():
        for t, r in by_t.items():
            lines.append(f"| {cls} | {t} | {r['in_order'][0]:.2f} ({r['in_order'][1]:.1f} dB) | "
                         f"{r['permuted'][0]:.2f} ({r['permuted'][1]:.1f} dB) |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    res = {"environment": environment(), "steps": args.steps, "gaussian": gaussian()}
    print(res["gaussian"]["pairs"], flush=True)
    res["training"], model, val = train(args.steps)
    res["model"] = on_model(model, val)
    write_results("precision", res, table(res))


if __name__ == "__main__":
    main()

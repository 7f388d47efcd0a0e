"""The cost model checked three ways: against compiled programs, published runs, and plans.

    .venv/bin/python benchmarks/costs.py                # about 10 minutes on a 2-core CPU
    .venv/bin/python benchmarks/costs.py --quick        # two recipes, one plan

1. The tiny preset's train step compiled on 8 simulated devices under each parallelism
   recipe: dot FLOPs, argument and temporary bytes and bytes per collective kind, the
   compiled program's (`toolkit.analysis.compiled`) beside the cost model's.
2. Published MoE training runs (MaxText Mixtral 8x7B on v5p-128, Megatron-Core Mixtral
   8x22B on 128 H100): estimated MFU beside the published one.
3. The planner's top layouts for published model shapes on a few clusters (one of them
   heterogeneous), with their estimated step time, MFU and memory.
4. This CPU, measured: matmul FLOP/s and memory bandwidth.
Writes benchmarks/results/costs.{json,md}.
"""

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from common import environment, write_results  # noqa: E402

from toolkit.analysis import compare_published, explain, get_cluster, measure_cpu, parse_tokens, plan  # noqa: E402
from toolkit.config import apply_overrides, preset  # noqa: E402
from toolkit.training.cost_check import cost_check  # noqa: E402

RECIPES = {
    "dp (data=8)": ["parallel.data=8", "parallel.recipe=dp"],
    "fsdp (fsdp=8)": ["parallel.fsdp=8", "parallel.recipe=fsdp"],
    "tp (data=4, tensor=2)": ["parallel.data=4", "parallel.tensor=2", "parallel.recipe=tp"],
    "ep dropless (data=2, expert=4)": ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep"],
    "fsdp_ep capacity (data=2, fsdp=2, expert=2)": ["parallel.data=2", "parallel.fsdp=2", "parallel.expert=2",
                                                    "parallel.recipe=fsdp_ep", "moe.dispatch=capacity"],
    "folded (data=2, tensor=2, expert=2)": ["parallel.data=2", "parallel.tensor=2", "parallel.expert=2",
                                            "parallel.recipe=folded"],
    "context ring (data=4, sequence=2)": ["parallel.data=4", "parallel.sequence=2", "parallel.recipe=dp"],
    "pipeline 1f1b (pipeline=2, data=4, m=4)": ["parallel.pipeline=2", "parallel.data=4",
                                                "train.microbatches=4"],
}
PLANS = [("mixtral_8x7b", "h100x64", "4M"), ("mixtral_8x7b", "v5p-128", "4M"),
         ("mixtral_8x22b", "h100x128", "1M"), ("qwen3_30b_a3b", "h100x32+a100x32", "2M")]


def compiled_vs_model(names) -> dict:
    out = {}
    for name in names:
        cfg = apply_overrides(preset("tiny"), ["parallel.data=1"] + RECIPES[name])
        t0 = time.perf_counter()
        out[name] = cost_check(cfg)
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
    return out


def plans(cases) -> dict:
    out = {}
    for model, cluster, batch in cases:
        t0 = time.perf_counter()
        ranked = plan(preset(model), get_cluster(cluster), parse_tokens(batch), top=5)
        out[f"{model} on {cluster}, {batch} tokens"] = {
            "seconds_to_plan": time.perf_counter() - t0,
            "plans": [{"layout": p.label, "mesh": p.mesh, "step_s": p.time.step_s, "mfu": p.time.mfu,
                       "memory_gb": p.memory_bytes / 1e9} for p in ranked],
            "explanation": explain(ranked, get_cluster(cluster))}
    return out


def table(result) -> str:
    lines = ["# Cost model checks", "", f"Commit {result['environment']['git']['commit'][:12]}, "
             f"{result['environment']['time']}; CPU measured at {result['cpu']['gflops']:.0f} GFLOP/s "
             f"(float32 matmul) and {result['cpu']['gbs']:.1f} GB/s (triad).", "",
             "## Compiled train step vs cost model (tiny preset, 8 simulated devices, per device)", "",
             "| recipe | figure | compiled | model | ratio |", "|---|---|---:|---:|---:|"]
    for name, rows in result["compiled_vs_model"].items():
        for r in rows:
            lines.append(f"| {name} | {r['what']} | {r['compiled']:.4g} | {r['model']:.4g} "
                         f"| {r['ratio']:.3f} |")
    lines += ["", "## Published runs", "", "| run | published MFU | estimated MFU | step s | memory GB "
              "(device) | fits the toolkit's layout |", "|---|---:|---:|---:|---:|---|"]
    for r in result["published"]:
        lines.append(f"| {r['name']} | {r['published_mfu']:.1%} | {r['estimated_mfu']:.1%} "
                     f"| {r['step_s']:.2f} | {r['memory_gb']:.0f} ({r['device_gb']:.0f}) "
                     f"| {'yes' if r['fits'] else 'no'} |")
    lines += [""] + [f"- {r['name']}: {r['source']}. Assumed: {r['assumptions']}."
                     for r in result["published"]]
    lines += ["", "## Planner", ""]
    for case, r in result["plans"].items():
        lines += [f"### {case} (planned in {r['seconds_to_plan']:.0f} s)", "", "```", r["explanation"],
                  "```", ""]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two recipes and one plan")
    args = ap.parse_args()
    names = list(RECIPES)[:2] if args.quick else list(RECIPES)
    cpu = measure_cpu()
    result = {"environment": environment(),
              "cpu": {"gflops": cpu.flops_bf16 / 1e9, "gbs": cpu.hbm_bandwidth / 1e9},
              "compiled_vs_model": compiled_vs_model(names),
              "published": compare_published(),
              "plans": plans(PLANS[2:3] if args.quick else PLANS)}
    write_results("costs" + ("-quick" if args.quick else ""), result, table(result))


if __name__ == "__main__":
    main()

"""Time one MoE layer's forward+backward against a dense SwiGLU with the same active FLOPs.

    .venv/bin/python benchmarks/moe_layer.py                     # T=4096 d=256 E=8 k=2 d_e=512
    .venv/bin/python benchmarks/moe_layer.py --tokens 256 --d-model 64 --d-expert 128 \
        --repeats 3 --name moe_layer_tiny                        # tiny CPU check, ~20 s

Each row times `jax.jit(value_and_grad(sum(layer(x))))` with respect to the parameters and
the input, blocked until ready, and reports the median of `--repeats` runs after warmup
(the rows take turns, so background load on a shared machine falls on all of them alike):

* `dense`: `toolkit.models.layers.SwiGLU` of width `top_k * d_expert`, the baseline that
  every ratio divides by (what `toolkit.config.dense_twin` puts in place of an MoE layer);
* `dropless/xla`: `MoELayer`, dispatch="dropless", gmm_impl="xla" (the CPU default);
* `capacity`: dispatch="capacity", capacity_factor=1.25 (padded `[E, C, d]` batched matmul,
  so 1.25x the dense rows are multiplied);
* `dropless/ragged_dot`: dropless through `jax.lax.ragged_dot`, the GPU/TPU default.

MoE rows also pay for the router (a `d x E` matmul, softmax, top-k) and for dispatch and
combine, so a ratio above 1 is the overhead of sparsity at equal active FLOPs. Results go
to `benchmarks/results/<name>.json` and `<name>.md` (default name: `moe_layer`); only the
default JAX device is used (no simulated device count).
"""

import argparse
import functools
import os

import jax
import jax.numpy as jnp
from common import environment, time_interleaved, write_results  # benchmarks/ is on sys.path
from flax import nnx

from toolkit.config import MoEConfig
from toolkit.models.layers import SwiGLU
from toolkit.moe import MoELayer


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens T per call (default 4096)")
    p.add_argument("--d-model", type=int, default=256, help="model width d (default 256)")
    p.add_argument("--experts", type=int, default=8, help="routed experts E (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token k (default 2)")
    p.add_argument("--d-expert", type=int, default=512, help="expert hidden width (default 512)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per row (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs after compiling (default 2)")
    p.add_argument("--name", default="moe_layer", help="results file stem (default moe_layer)")
    return p


def _fwd_bwd(module, has_aux: bool):
    """Jitted `(params, x) -> (sum(y), (d params, d x))` for an nnx module, plus its params."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x_btd):
        y = nnx.merge(graphdef, params, rest)(x_btd)
        return jnp.sum((y[0] if has_aux else y).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _markdown(rows) -> str:
    head = "| row | dispatch | gmm_impl | median ms | min ms | vs dense | active GFLOP/s | dropped |\n" \
           "|---|---|---|---:|---:|---:|---:|---:|\n"
    return head + "".join(
        f"| {r['row']} | {r['dispatch']} | {r['gmm_impl']} | {r['median_ms']:.2f} | "
        f"{r['min_ms']:.2f} | {r['ratio_vs_dense']:.2f}x | {r['gflop_per_s']:.1f} | "
        f"{r['dropped_fraction']:.3f} |\n"
        for r in rows)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.top_k > args.experts:
        raise SystemExit(f"--top-k={args.top_k} exceeds --experts={args.experts}; use 1..{args.experts}")
    x_btd = jax.random.normal(jax.random.key(1), (1, args.tokens, args.d_model), jnp.float32)
    width = args.top_k * args.d_expert
    # T tokens x k experts x 3 matmuls of d x d_e, 2 FLOPs each; backward is twice the forward.
    active_gflop = 3 * 2 * args.tokens * args.d_model * width * 3 / 1e9
    variants = [
        ("dense", "-", "-", None),
        ("dropless/xla", "dropless", "xla", dict(dispatch="dropless")),
        ("capacity", "capacity", "xla", dict(dispatch="capacity", capacity_factor=1.25)),
        ("dropless/ragged_dot", "dropless", "ragged_dot",
         dict(dispatch="dropless")),
    ]
    calls, rows = {}, []
    for row, dispatch, impl, moe_kw in variants:
        if moe_kw is None:
            module = SwiGLU(args.d_model, width, rngs=nnx.Rngs(0))
            dropped = 0.0
        else:
            cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_expert=args.d_expert,
                            **moe_kw)
            module = MoELayer(args.d_model, cfg, gmm_impl=impl, rngs=nnx.Rngs(0))
            dropped = float(module(x_btd)[1].dropped_fraction)
        fn, params = _fwd_bwd(module, has_aux=moe_kw is not None)
        calls[row] = functools.partial(fn, params, x_btd)
        rows.append({"row": row, "dispatch": dispatch, "gmm_impl": impl, "dropped_fraction": dropped})
    load_before = os.getloadavg()[0]
    timings = time_interleaved(calls, args.warmup, args.repeats)
    for r in rows:
        r.update(timings[r["row"]])
        r["gflop_per_s"] = active_gflop / (r["median_ms"] / 1e3)
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio_vs_dense"] = r["median_ms"] / base

    dev = jax.devices()[0]
    result = {"benchmark": "moe_layer", "shapes": {
                  "tokens": args.tokens, "d_model": args.d_model, "num_experts": args.experts,
                  "top_k": args.top_k, "d_expert": args.d_expert, "dense_width": width},
              "repeats": args.repeats, "warmup": args.warmup, "dtype": "float32",
              "active_gflop_fwd_bwd": active_gflop,
              **environment(), "num_devices": jax.device_count(),
              "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
              "rows": rows}
    table = (f"MoE layer forward+backward, T={args.tokens} d={args.d_model} E={args.experts} "
             f"k={args.top_k} d_expert={args.d_expert}, float32; {jax.default_backend()} "
             f"({dev.device_kind}), jax {jax.__version__}; median of {args.repeats} "
             f"interleaved runs\n\n"
             + _markdown(rows))
    print()
    write_results(args.name, result, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

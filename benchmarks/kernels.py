"""Time the kernels against their roofline: gmm vs a dense matmul of equal FLOPs, attention
vs `jax.nn.dot_product_attention`.

    .venv/bin/python benchmarks/kernels.py                  # CPU: preset + scaled shapes, ~3 min
    .venv/bin/python benchmarks/kernels.py --quick          # 2 shapes, 2 repeats, ~30 s
    python benchmarks/kernels.py --full                     # on a GPU/TPU: full-size shapes

gmm rows (per shape, with balanced and skewed group sizes) time forward and
forward+backward (the VJP for a fixed random cotangent, with respect to lhs and rhs) of:

* `dense`: `x[M, K] @ w[K, N]`, the same FLOPs as the grouped matmul, so its throughput is
  this device's roofline for the problem (cuBLAS on GPU, Eigen on CPU);
* `gmm/<impl>`: `pallas_kernels.gmm` with the platform's default backend ("xla" on CPU,
  "pallas_gpu" on GPU, "pallas_tpu" on TPU);
* `ragged_dot`: `jax.lax.ragged_dot` through the same door (`impl="ragged_dot"`).

`vs dense` is dense time / row time: the fraction of the roofline reached (1.0 = as fast
as one dense matmul); each contender takes turns with its own dense run. Shapes: the
gate|up matmul of one MoE layer for a training step of the `tiny` and `small` presets,
and Mixtral-like (8 experts, top-2, d_expert = 3.5 d) and DeepSeek-like (64+ fine-grained
experts, top-8, d_expert = d / 4) shapes, scaled down on CPU and full size with `--full`.
Skewed sizes follow a Zipf law with some empty groups.

Attention rows time `flash_attention` (default impl) against `jax.nn.dot_product_attention`
(XLA) and, on NVIDIA GPUs, its cuDNN implementation, causal, forward and forward+backward.
Results: `benchmarks/results/kernels-<device>.json` and `.md`.
"""

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
from common import environment, time_interleaved, write_results  # benchmarks/ is on sys.path

from pallas_kernels import choose_impl, default_attention_impl, flash_attention, gmm

# name: (tokens, top_k, experts, d_model, d_expert); rows M = tokens * top_k, K = d_model,
# N = 2 * d_expert (the fused gate|up projection).
GMM_SHAPES = {
    "tiny": (32 * 128, 2, 8, 128, 128),          # toolkit preset tiny, one training step
    "small": (32 * 256, 2, 16, 256, 256),        # toolkit preset small
    "mixtral_like_cpu": (1024, 2, 8, 512, 1792),
    "deepseek_like_cpu": (512, 8, 64, 512, 128),
    "mixtral_like": (8192, 2, 8, 4096, 14336),   # Mixtral 8x7B
    "deepseek_like": (8192, 8, 256, 7168, 2048),  # DeepSeek-V3
}
# name: (batch, seq, heads, kv_heads, head_dim)
ATTENTION_SHAPES = {
    "tiny": (32, 128, 4, 2, 32),
    "cpu_mid": (4, 512, 8, 2, 64),
    "llama_like": (8, 4096, 32, 8, 128),
}
CPU_SHAPES = (["tiny", "small", "mixtral_like_cpu", "deepseek_like_cpu"], ["tiny", "cpu_mid"])
FULL_SHAPES = (["tiny", "small", "mixtral_like", "deepseek_like"], ["tiny", "llama_like"])


def group_sizes(m: int, g: int, skew: str, seed: int = 0) -> np.ndarray:
    """`g` sizes summing to `m`: equal, or Zipf(1.2) over a shuffled order with ~g/8 empty."""
    if skew == "balanced":
        sizes = np.full(g, m // g)
        sizes[: m % g] += 1
        return sizes
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, g + 1) ** 1.2
    p[g - max(1, g // 8):] = 0.0  # the least popular experts get nothing
    sizes = np.floor(p / p.sum() * m).astype(int)
    sizes[0] += m - sizes.sum()
    return rng.permutation(sizes)


def _fwd_bwd(f, a, b):
    """`() -> forward and backward of f(a, b)` for a fixed random cotangent, as in training
    (the cotangent of a plain sum is constant, which XLA could fold into cheaper ops).
    Everything is an argument of the jitted function, so nothing is constant-folded."""
    out = jax.eval_shape(f, a, b)
    ct = jax.random.normal(jax.random.key(7), out.shape, out.dtype)

    def fb(a, b, ct):
        y, vjp = jax.vjp(f, a, b)
        return y, vjp(ct)

    fb = jax.jit(fb)
    return lambda: fb(a, b, ct)


def gmm_calls(name, skew, dtype):
    tokens, k, e, d, de = GMM_SHAPES[name]
    m, n = tokens * k, 2 * de
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, d), dtype)
    w_gkn = (jax.random.normal(kw, (e, d, n), jnp.float32) / d ** 0.5).astype(dtype)
    w_kn = w_gkn[0]
    gs = jnp.asarray(group_sizes(m, e, skew), jnp.int32)
    impl = choose_impl(x, w_gkn)
    fns = {"dense": (lambda a, b: a @ b, w_kn),
           f"gmm/{impl}": (lambda a, b: gmm(a, b, gs, impl=impl), w_gkn),
           "ragged_dot": (lambda a, b: gmm(a, b, gs, impl="ragged_dot"), w_gkn)}
    calls = {}
    for row, (f, w) in fns.items():
        fwd = jax.jit(f)
        calls[f"{row} fwd"] = lambda fwd=fwd, w=w: fwd(x, w)
        calls[f"{row} fwd+bwd"] = _fwd_bwd(f, x, w)
    flop_fwd = 2 * m * d * n
    return calls, dict(shape=name, skew=skew, M=m, K=d, N=n, G=e, impl=impl, gflop_fwd=flop_fwd / 1e9)


def attention_calls(name, dtype):
    b, t, h, kv, d = ATTENTION_SHAPES[name]
    kq, kk, kv_ = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (b, t, h, d), dtype)
    k = jax.random.normal(kk, (b, t, kv, d), dtype)
    v = jax.random.normal(kv_, (b, t, kv, d), dtype)
    impl = default_attention_impl()
    fns = {f"flash/{impl}": lambda q, kv: flash_attention(q, *kv, causal=True),
           "dot_product_attention/xla": lambda q, kv: jax.nn.dot_product_attention(
               q, *kv, is_causal=True, implementation="xla")}
    if jax.default_backend() == "gpu" and dtype != jnp.float32:
        fns["dot_product_attention/cudnn"] = lambda q, kv: jax.nn.dot_product_attention(
            q, *kv, is_causal=True, implementation="cudnn")
    calls = {}
    for row, f in fns.items():
        fwd = jax.jit(f)
        calls[f"{row} fwd"] = lambda fwd=fwd: fwd(q, (k, v))
        calls[f"{row} fwd+bwd"] = _fwd_bwd(f, q, (k, v))
    flop_fwd = 4 * b * h * t * t * d / 2  # QK^T and PV, causal half
    return calls, dict(shape=name, B=b, T=t, H=h, KV=kv, D=d, impl=impl, gflop_fwd=flop_fwd / 1e9)


def _ratios(timings, baseline_prefix):
    out = {}
    for row, t in timings.items():
        phase = row.rsplit(" ", 1)[1]
        base = timings[f"{baseline_prefix} {phase}"]["median_ms"]
        out[row] = dict(median_ms=t["median_ms"], min_ms=t["min_ms"],
                        vs_baseline=base / t["median_ms"])
    return out


def _table_rows(results, lead) -> list[str]:
    """Markdown rows `| lead | row | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio |`."""
    lines = []
    for r in results:
        for row in dict.fromkeys(k.rsplit(" ", 1)[0] for k in r["rows"]):
            f, fb = r["rows"][f"{row} fwd"], r["rows"][f"{row} fwd+bwd"]
            lines.append(f"| {lead(r)} | {row} | {f['median_ms']:.2f} | {f['vs_baseline']:.2f}x | "
                         f"{fb['median_ms']:.2f} | {fb['vs_baseline']:.2f}x |")
    return lines


def _device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="full-size shapes (GPU/TPU)")
    p.add_argument("--quick", action="store_true", help="two shapes, two repeats")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: f32 on CPU, bf16 else)")
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    dtype = jnp.dtype(args.dtype or ("float32" if cpu else "bfloat16"))
    gmm_names, attn_names = FULL_SHAPES if args.full else CPU_SHAPES
    repeats = args.repeats
    if args.quick:
        gmm_names, attn_names, repeats = gmm_names[:1], attn_names[:1], 2
    gmm_rows, attn_rows = [], []
    for name in gmm_names:
        for skew in ("balanced", "skewed"):
            calls, info = gmm_calls(name, skew, dtype)
            # ragged_dot on CPU allocates G times the output; timed beside the others it
            # would leave the allocator cold for whatever runs next, so each contender
            # takes turns with its own dense baseline.
            timings = {}
            for rival in dict.fromkeys(r.rsplit(" ", 1)[0] for r in calls if r[:5] != "dense"):
                pair = {r: c for r, c in calls.items() if r.startswith(("dense ", rival + " "))}
                t = _ratios(time_interleaved(pair, 1, repeats), "dense")
                timings.update(t if not timings else {r: v for r, v in t.items() if r in pair
                                                      and not r.startswith("dense")})
            gmm_rows.append({**info, "rows": timings})
            print(name, skew, {r: f"{t['vs_baseline']:.2f}x" for r, t in timings.items()})
    for name in attn_names:
        calls, info = attention_calls(name, dtype)
        timings = _ratios(time_interleaved(calls, 1, repeats), "dot_product_attention/xla")
        attn_rows.append({**info, "rows": timings})
        print(name, {r: f"{t['vs_baseline']:.2f}x" for r, t in timings.items()})

    env = environment()
    result = {"benchmark": "kernels", "dtype": str(dtype), "repeats": repeats, **env,
              "gmm": gmm_rows, "attention": attn_rows}
    lines = [f"Kernels on {env['backend']} ({env['device_kind']}), jax {env['jax_version']}, "
             f"{dtype}; median of {repeats} interleaved runs. `vs dense` = dense matmul time / "
             f"row time at equal FLOPs (1.0 = the roofline).\n",
             "| shape | skew | M x K x N, G | row | fwd ms | fwd vs dense | fwd+bwd ms | "
             "fwd+bwd vs dense |", "|---|---|---|---|---:|---:|---:|---:|"]
    lines += _table_rows(gmm_rows, lambda r: f"{r['shape']} | {r['skew']} | "
                                             f"{r['M']}x{r['K']}x{r['N']}, {r['G']}")
    lines += ["", "| attention shape | B, T, H/KV, D | row | fwd ms | fwd vs XLA | fwd+bwd ms | "
                  "fwd+bwd vs XLA |", "|---|---|---|---:|---:|---:|---:|"]
    lines += _table_rows(attn_rows, lambda r: f"{r['shape']} | {r['B']}, {r['T']}, "
                                              f"{r['H']}/{r['KV']}, {r['D']}")
    write_results(f"kernels-{_device_slug()}" + ("-quick" if args.quick else ""), result,
                  "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

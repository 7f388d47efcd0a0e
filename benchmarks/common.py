"""What every benchmark shares: where results go, and which code and machine made them."""

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def git_state() -> dict:
    """Commit and whether the library sources differ from it, so a result names its code."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "library_dirty": bool(git("status", "--porcelain", "toolkit", "pallas_kernels"))}


def environment() -> dict:
    """JAX version, backend, device kind, Python, time and git state, for a result's record."""
    return {"jax_version": jax.__version__, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "python": platform.python_version(),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git": git_state()}


def write_results(name: str, result: dict, table: str) -> None:
    """`results/<name>.json` and `results/<name>.md`, then print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    print(f"wrote {RESULTS / name}.json and .md")


def time_interleaved(calls: dict, warmup: int, repeats: int) -> dict:
    """Median-able wall times per call; rows take turns so background load hits all alike."""
    out = {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        out[name] = {"first_call_s": time.perf_counter() - t0, "times_ms": []}
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            out[name]["times_ms"].append((time.perf_counter() - t0) * 1e3)
    for r in out.values():
        r.update(median_ms=statistics.median(r["times_ms"]), min_ms=min(r["times_ms"]),
                 max_ms=max(r["times_ms"]))
    return out

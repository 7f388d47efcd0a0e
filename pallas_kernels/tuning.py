"""Block sizes per kernel, backend and device kind, kept as data.

A kernel's speed depends mostly on its tile shapes, and the best tiles differ between an
H100, an A100 and a TPU v5e. Instead of constants buried in kernels, every backend reads
its tiles from `TABLE`, keyed by `(kernel, impl, device kind)`; an entry for the most
specific matching kind wins, then the backend's default. `search` times candidates on the
current device and prints the entry to paste into the table:

    from pallas_kernels import tuning
    bs = tuning.block_sizes("gmm", "pallas_gpu")          # what gmm uses on this device
    best, times = tuning.search(lambda bs: run(bs), tuning.gmm_candidates("pallas_gpu"),
                                kernel="gmm", impl="pallas_gpu")

Device kinds are `jax.devices()[0].device_kind` strings ("NVIDIA H100 80GB HBM3", "TPU v5
lite", "cpu"); keys match them by prefix, so "NVIDIA H100" covers every H100 variant.
"""

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable

import jax


@dataclasses.dataclass(frozen=True, kw_only=True)
class GmmBlockSizes:
    """Tiles of the grouped matmul.

    Attributes:
      tm: rows of `lhs` per tile. Groups are visited tile by tile; a tile straddling two
        groups is computed once per group with the other group's rows masked.
      tk: contraction (K) elements per step of the inner loop.
      tn: output columns per tile.
      num_warps: GPU only: warps per program (None: the Triton default).
      num_stages: GPU only: software-pipelining stages (None: the Triton default).
    """

    tm: int = 128
    tk: int = 128
    tn: int = 128
    num_warps: int | None = None
    num_stages: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionBlockSizes:
    """Tiles of flash attention, forward and backward.

    Attributes:
      block_q: query rows per program in the forward pass.
      block_k: key/value rows per inner-loop step in the forward pass.
      block_q_bwd: query rows per step in the backward kernels.
      block_k_bwd: key/value rows per program in the backward kernels.
      num_warps: GPU only: warps per program (None: the Triton default).
      num_stages: GPU only: software-pipelining stages (None: the Triton default).
    """

    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int | None = None


# (kernel, impl, device-kind prefix) -> block sizes. "" matches every device. The "xla" gmm
# has no entry: it picks its row tile from the shapes (`xla.default_tile_rows`).
TABLE: dict[tuple[str, str, str], GmmBlockSizes | AttentionBlockSizes] = {
    ("gmm", "pallas_gpu", ""): GmmBlockSizes(tm=64, tk=64, tn=128, num_warps=4, num_stages=3),
    ("gmm", "pallas_gpu", "NVIDIA H100"): GmmBlockSizes(tm=128, tk=64, tn=128, num_warps=8,
                                                        num_stages=4),
    ("gmm", "pallas_gpu", "NVIDIA H200"): GmmBlockSizes(tm=128, tk=64, tn=128, num_warps=8,
                                                        num_stages=4),
    ("gmm", "pallas_tpu", ""): GmmBlockSizes(tm=128, tk=128, tn=128),
    ("gmm", "pallas_tpu", "TPU v5"): GmmBlockSizes(tm=512, tk=512, tn=512),
    ("gmm", "pallas_tpu", "TPU v6"): GmmBlockSizes(tm=512, tk=1024, tn=1024),
    ("attention", "pallas_gpu", ""): AttentionBlockSizes(block_q=64, block_k=64, block_q_bwd=32,
                                                         block_k_bwd=32, num_warps=4, num_stages=2),
    ("attention", "pallas_gpu", "NVIDIA H100"): AttentionBlockSizes(
        block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=2),
    ("attention", "pallas_gpu", "NVIDIA H200"): AttentionBlockSizes(
        block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=8, num_stages=2),
    ("attention", "pallas_tpu", ""): AttentionBlockSizes(block_q=128, block_k=128, block_q_bwd=128,
                                                         block_k_bwd=128),
    ("attention", "pallas_tpu", "TPU v5"): AttentionBlockSizes(block_q=512, block_k=512,
                                                               block_q_bwd=256, block_k_bwd=256),
    ("attention", "xla", ""): AttentionBlockSizes(),  # unused: XLA picks its own tiles
}


def device_kind() -> str:
    """The kind of the first default device, e.g. "NVIDIA H100 80GB HBM3" or "cpu"."""
    return jax.devices()[0].device_kind


def block_sizes(kernel: str, impl: str, kind: str | None = None):
    """The table entry for `(kernel, impl)` whose device prefix best matches `kind`.

    `kind` defaults to `device_kind()`. Raises KeyError naming the known keys when the
    table has no entry for the pair at all.
    """
    kind = device_kind() if kind is None else kind
    matches = [(len(prefix), bs) for (k, i, prefix), bs in TABLE.items()
               if k == kernel and i == impl and kind.startswith(prefix)]
    if not matches:
        known = sorted({(k, i) for k, i, _ in TABLE})
        raise KeyError(f"tuning: no block sizes for kernel={kernel!r} impl={impl!r}; known: {known}")
    return max(matches, key=lambda m: m[0])[1]


def gmm_candidates(impl: str) -> list[GmmBlockSizes]:
    """A small grid of gmm tiles worth timing for `impl`."""
    if impl == "xla":
        return [GmmBlockSizes(tm=tm, tk=0, tn=0) for tm in (32, 64, 128, 256, 512)]
    sizes = (64, 128) if impl == "pallas_gpu" else (128, 256, 512)
    warps = (4, 8) if impl == "pallas_gpu" else (None,)
    return [GmmBlockSizes(tm=tm, tk=tk, tn=tn, num_warps=w,
                          num_stages=3 if impl == "pallas_gpu" else None)
            for tm, tk, tn, w in itertools.product(sizes, sizes, sizes, warps)]


def attention_candidates(impl: str) -> list[AttentionBlockSizes]:
    """A small grid of attention tiles worth timing for `impl`."""
    sizes = (32, 64, 128) if impl == "pallas_gpu" else (128, 256, 512)
    warps = (4, 8) if impl == "pallas_gpu" else (None,)
    return [AttentionBlockSizes(block_q=q, block_k=k, block_q_bwd=min(q, k), block_k_bwd=min(q, k),
                                num_warps=w, num_stages=2 if impl == "pallas_gpu" else None)
            for q, k, w in itertools.product(sizes, sizes, warps)]


def search(run: Callable[[object], object], candidates: Iterable, *, kernel: str, impl: str,
           repeats: int = 5, verbose: bool = True):
    """Time `run(block_sizes)` for each candidate; return `(best, {candidate: seconds})`.

    `run` must return JAX arrays (it is blocked on). A candidate that fails to compile or
    run (e.g. too much shared memory) is reported and skipped. The printed line is a
    ready-made `TABLE` entry for this device.
    """
    times = {}
    for bs in candidates:
        try:
            jax.block_until_ready(run(bs))  # compile and warm up
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(run(bs))
                best = min(best, time.perf_counter() - t0)
            times[bs] = best
        except Exception as e:  # noqa: BLE001 - a failing candidate is data, not an error
            if verbose:
                print(f"  skip {bs}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if not times:
        raise RuntimeError(f"tuning.search: no candidate for {kernel}/{impl} ran on {device_kind()}")
    best = min(times, key=times.get)
    if verbose:
        print(f"    ({kernel!r}, {impl!r}, {device_kind()!r}): {best!r},  "
              f"# {times[best] * 1e3:.3f} ms")
    return best, times

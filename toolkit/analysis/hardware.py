"""What the machines can do: peak FLOP/s, memory, and the links between devices, as data.

A `Device` is one accelerator (or this CPU, measured). A `Cluster` is a list of
`DeviceGroup`s, each a number of identical devices with two link classes: `intra` inside
a node (NVLink, or the ICI torus of a TPU slice) and `inter` between nodes (InfiniBand,
or the data-centre network between TPU slices). Groups of different devices make a
heterogeneous cluster; traffic between groups uses `Cluster.between`.

    cluster = get_cluster("h100x64")                  # 8 nodes of 8 H100 SXM
    cluster.device.flops_bf16                         # 9.89e14 dense bf16 FLOP/s per GPU
    cluster.link_for(span=16)                         # a group of 16 devices crosses nodes
    get_cluster("v5p-128").num_devices                # 64 chips: v5p names count TensorCores
    get_cluster("h100x32+a100x32")                    # two groups, joined by InfiniBand
    cpu = measure_cpu()                               # this machine, measured now

Numbers are vendor datasheet peaks for dense math (no 2:4 sparsity). Link bandwidths are
bytes a device can send per second in one direction to the rest of its collective group:
NVLink's 900 GB/s bidirectional is 450e9 here; on a TPU torus a ring along one axis uses
two ICI links each way (2 x 90e9 on v5p/v6e, 2 x 45e9 on v5e); inter-node bandwidth is one
NIC per GPU (400 Gb/s = 50e9 B/s) and the data-centre network's share per TPU chip.
Latencies are per collective step, orders of magnitude rather than measurements. Sources:
NVIDIA datasheets, Google Cloud TPU pages and the JAX scaling book's hardware tables.
"""

import dataclasses
import functools
import os
import re
import time

import numpy as np

GB = 1e9


@dataclasses.dataclass(frozen=True, kw_only=True)
class Device:
    """One accelerator.

    Attributes:
      name: preset name, e.g. "h100".
      flops_bf16: peak dense bf16 FLOP/s.
      flops_fp8: peak dense fp8 FLOP/s (0: no fp8 units, fp8 matmuls run at bf16 speed).
      hbm_bytes: device memory.
      hbm_bandwidth: device memory bandwidth, bytes/s.
      kind: "gpu", "tpu" or "cpu".
      matmul_efficiency: the share of peak that large bf16 matmuls reach in practice (an
        assumption of the step-time estimate: about 0.75 for cuBLAS on Hopper, 0.85 on
        A100, 0.9 on TPU MXUs; 1.0 for the measured CPU, whose peak is a measured matmul).
    """

    name: str
    flops_bf16: float
    flops_fp8: float
    hbm_bytes: float
    hbm_bandwidth: float
    kind: str = "gpu"
    matmul_efficiency: float = 0.75

    def peak_flops(self, dtype: str = "bfloat16") -> float:
        """Peak FLOP/s for matmuls in `dtype` ("bfloat16", "float32", "fp8")."""
        return self.flops_fp8 if dtype == "fp8" and self.flops_fp8 else self.flops_bf16


@dataclasses.dataclass(frozen=True, kw_only=True)
class Link:
    """A class of connection: bytes/s one device sends in one direction, and latency in s."""

    bandwidth: float
    latency: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceGroup:
    """`count` identical devices, `per_node` of them sharing the fast `intra` link."""

    device: Device
    count: int
    per_node: int
    intra: Link
    inter: Link


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cluster:
    """Device groups; `between` joins different groups (defaults to the slowest `inter`)."""

    name: str
    groups: tuple
    between: Link | None = None

    @property
    def num_devices(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def device(self) -> Device:
        """The slowest device: a synchronous step waits for it."""
        return min((g.device for g in self.groups), key=lambda d: d.flops_bf16)

    @property
    def hbm_bytes(self) -> float:
        """The smallest device memory: every device must fit its share."""
        return min(g.device.hbm_bytes for g in self.groups)

    @property
    def heterogeneous(self) -> bool:
        return len({g.device.name for g in self.groups}) > 1

    def link_for(self, span: int) -> Link:
        """The link a collective over `span` consecutive devices is limited by: `intra` when
        the span fits in one node of every group, `inter` when it crosses nodes, `between`
        when it crosses groups."""
        if len(self.groups) > 1 and span > min(g.count for g in self.groups):
            return self.between or min((g.inter for g in self.groups), key=lambda k: k.bandwidth)
        links = [g.intra if span <= g.per_node else g.inter for g in self.groups]
        return min(links, key=lambda k: k.bandwidth)


def _gpu(name, bf16_tflops, fp8_tflops, hbm_gb, hbm_tbs, efficiency=0.75):
    return Device(name=name, flops_bf16=bf16_tflops * 1e12, flops_fp8=fp8_tflops * 1e12,
                  hbm_bytes=hbm_gb * GB, hbm_bandwidth=hbm_tbs * 1e12, kind="gpu",
                  matmul_efficiency=efficiency)


def _tpu(name, bf16_tflops, fp8_tflops, hbm_gb, hbm_tbs):
    return dataclasses.replace(_gpu(name, bf16_tflops, fp8_tflops, hbm_gb, hbm_tbs, 0.9), kind="tpu")


# name -> (device, devices per node, intra-node link, inter-node link)
DEVICES = {
    "h100": (_gpu("h100", 989.5, 1979, 80, 3.35), 8,
             Link(bandwidth=450 * GB, latency=3e-6), Link(bandwidth=50 * GB, latency=8e-6)),
    "h200": (_gpu("h200", 989.5, 1979, 141, 4.8), 8,
             Link(bandwidth=450 * GB, latency=3e-6), Link(bandwidth=50 * GB, latency=8e-6)),
    "b200": (_gpu("b200", 2250, 4500, 180, 8.0), 8,
             Link(bandwidth=900 * GB, latency=3e-6), Link(bandwidth=50 * GB, latency=8e-6)),
    "a100": (_gpu("a100", 312, 0, 80, 2.039, 0.85), 8,
             Link(bandwidth=300 * GB, latency=3e-6), Link(bandwidth=25 * GB, latency=8e-6)),
    # TPU slices: every chip of a slice is on the ICI torus (per_node = slice size).
    "v5e": (_tpu("v5e", 197, 0, 16, 0.819), 256,
            Link(bandwidth=90 * GB, latency=1e-6), Link(bandwidth=3.1 * GB, latency=2e-5)),
    "v5p": (_tpu("v5p", 459, 0, 95, 2.765), 8960,
            Link(bandwidth=180 * GB, latency=1e-6), Link(bandwidth=6.25 * GB, latency=2e-5)),
    "v6e": (_tpu("v6e", 918, 0, 32, 1.64), 256,
            Link(bandwidth=180 * GB, latency=1e-6), Link(bandwidth=12.5 * GB, latency=2e-5)),
}
# TPU generations whose slice names count TensorCores (two per chip) rather than chips.
_CORES_PER_CHIP = {"v5p": 2}


def device_names() -> tuple:
    return tuple(DEVICES) + ("cpu",)


def _group(name: str, count: int) -> DeviceGroup:
    if name == "cpu":
        cpu = measure_cpu()
        link = Link(bandwidth=cpu.hbm_bandwidth / 2, latency=1e-5)
        return DeviceGroup(device=cpu, count=count, per_node=count, intra=link, inter=link)
    device, per_node, intra, inter = DEVICES[name]
    return DeviceGroup(device=device, count=count, per_node=min(per_node, count), intra=intra,
                       inter=inter)


def get_cluster(spec: str) -> Cluster:
    """A cluster from a name: "h100x64" (64 GPUs), "v5p-128" (a TPU slice by Google's name:
    TensorCores for v5p, chips for v5e/v6e), "v6ex256", "cpux8" (this CPU, measured,
    split into simulated devices), or groups joined with "+": "h100x32+a100x32"."""
    groups = []
    for part in spec.lower().replace(" ", "").split("+"):
        m = re.fullmatch(r"([a-z0-9]+?)(?:x|-)(\d+)", part)
        if not m or m.group(1) not in device_names():
            raise ValueError(
                f"cluster {spec!r}: cannot read {part!r}; write DEVICExCOUNT (e.g. h100x64), a TPU "
                f"slice name (v5p-128, v5e-256) or groups joined by '+'; devices: "
                f"{', '.join(device_names())}")
        name, count = m.group(1), int(m.group(2))
        if "-" in part:
            cores = _CORES_PER_CHIP.get(name, 1)
            if count % cores:
                raise ValueError(f"cluster {spec!r}: a {name} slice name counts TensorCores, "
                                 f"{cores} per chip; {count} is not a multiple of {cores}")
            count //= cores
        if count < 1:
            raise ValueError(f"cluster {spec!r}: {part!r} has no devices; use a count >= 1")
        groups.append(_group(name, count))
    return Cluster(name=spec, groups=tuple(groups))


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@functools.cache
def measure_cpu(size: int = 1024, stream_mb: int = 64, repeats: int = 5) -> Device:
    """This CPU as a `Device`: a `size`-square float32 matmul through XLA for FLOP/s, and a
    STREAM-like triad `a = b + s * c` over `stream_mb` MiB arrays for memory bandwidth
    (three arrays' bytes moved per pass). Cached per process."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    x = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
    matmul = jax.jit(lambda a: a @ a)
    t_mm = _median_time(lambda: matmul(x).block_until_ready(), repeats)
    n = stream_mb * 2**20 // 4
    b, c = np.ones(n, np.float32), np.full(n, 2.0, np.float32)
    a = np.empty_like(b)

    def triad():
        np.multiply(c, np.float32(3.0), out=a)
        np.add(a, b, out=a)
    t_triad = _median_time(triad, repeats)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flops = 2 * size**3 / t_mm
    # the numpy triad makes two passes: read c, write a; read a and b, write a
    return Device(name="cpu", flops_bf16=flops, flops_fp8=0.0, hbm_bytes=float(memory),
                  hbm_bandwidth=5 * n * 4 / t_triad, kind="cpu", matmul_efficiency=1.0)

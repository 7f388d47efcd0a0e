"""Seconds per training step from the cost model and a cluster: where the time goes, and MFU.

`estimate_step_time(cfg, cluster)` prices each line of `estimate_costs` on the cluster's
hardware (`toolkit.analysis.hardware`) and combines them under stated overlap assumptions:

* **Compute.** Each matmul component takes the longer of its FLOPs at
  `matmul_efficiency x peak` and reading its weights from HBM (once per micro-batch and
  pass: forward, and twice in the backward): small expert batches are bandwidth-bound.
  Elementwise work (norms, activations, softmax, the optimizer) is priced as memory
  traffic: the kept activations written and read back twice, and AdamW's 28 bytes of
  reads and writes per local parameter.
* **Communication.** Each collective: `bytes / bandwidth + steps x latency`, on the link
  its mesh axis lands on. Axes are laid out as `MESH_AXES`, `expert` innermost: a group
  whose devices fit in one node uses the intra-node link, otherwise the inter-node one,
  and the slower link between device groups of a heterogeneous cluster when it spans them.
* **Overlap.** FSDP gathers, gradient reduce-scatters and data-parallel all-reduces run
  beside the compute (prefetched and bucketed, as MaxText and Megatron do) and only what
  exceeds it shows; tensor-, expert- and context-parallel collectives sit on the critical
  path (divided by `parallel.overlap_chunks` when the exchange is chunked). Pipeline
  bubbles stretch compute by Megatron's `(p - 1) / (v m)`; stage sends are exposed.

    t = estimate_step_time(preset_cfg, get_cluster("h100x64"))
    t.step_s, t.mfu, t.breakdown        # seconds, model FLOPs utilisation, seconds by part

MFU is model FLOPs (3 x forward, no recompute, causal attention counted at half) over step
time x devices x peak bf16 FLOP/s, the convention of PaLM, MaxText and Megatron.
"""

import dataclasses
import math

from toolkit.analysis.costs import Costs, estimate_costs
from toolkit.analysis.hardware import Cluster
from toolkit.config import Config

_AXIS_ORDER = ("pipeline", "data", "fsdp", "sequence", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class StepTime:
    """A step's estimated time on a cluster.

    Attributes:
      step_s: seconds per optimizer step.
      mfu: model FLOPs utilisation.
      tokens_per_s: tokens per second, all devices.
      breakdown: seconds by part: matmul, memory (elementwise and optimizer), exposed
        collectives by axis, overlapped collectives by axis (not added), bubble.
      costs: the `Costs` the estimate priced.
    """

    step_s: float
    mfu: float
    tokens_per_s: float
    breakdown: dict
    costs: Costs


def axis_span(axis: str, sizes: dict) -> int:
    """Consecutive devices a collective over `axis` (e.g. "expert,tensor") spans: its size
    times the sizes of the axes inside it in `MESH_AXES` order."""
    parts = axis.split(",")
    outer = min(_AXIS_ORDER.index(a) for a in parts)
    return math.prod(sizes[a] for a in _AXIS_ORDER[outer:])


def collective_seconds(row: dict, cluster: Cluster, sizes: dict) -> float:
    """Seconds one device spends in a `communication` row on `cluster`'s links."""
    span = axis_span(row["axis"], sizes)
    link = cluster.link_for(span)
    group = math.prod(sizes[a] for a in row["axis"].split(","))
    steps = row["count"] * max(group - 1, 1)
    return row["bytes"] / link.bandwidth + steps * link.latency


def estimate_step_time(cfg: Config, cluster: Cluster, *, remat: bool | None = None,
                       costs: Costs | None = None) -> StepTime:
    """Price `cfg` (its mesh filled to `cluster.num_devices`) on `cluster`."""
    n = cluster.num_devices
    platform = "cpu" if cluster.device.kind == "cpu" else "gpu"
    costs = costs or estimate_costs(cfg, n, causal=True, remat=remat, platform=platform)
    dev, m, par = cluster.device, cfg.model, cfg.parallel
    sizes = costs.sizes
    peak = dev.peak_flops("bfloat16") * dev.matmul_efficiency
    act_bytes = 2 if m.dtype == "bfloat16" else 4
    passes = 3 * cfg.train.microbatches
    weights = _weight_bytes_by_component(costs, cfg, act_bytes)
    matmul = sum(max(f / peak, weights.get(c, 0.0) * passes / dev.hbm_bandwidth)
                 for c, f in costs.device_component_flops.items())
    from toolkit.analysis.costs import activation_bytes
    one_microbatch = activation_bytes(cfg, sizes, remat=False, platform=platform, in_flight=False)
    memory = (3 * one_microbatch * cfg.train.microbatches + 7 * costs.memory["params"]) / dev.hbm_bandwidth
    compute = matmul + memory
    exposed, hidden = {}, {}
    for row in costs.communication:
        t = collective_seconds(row, cluster, sizes)
        if row["beside_compute"]:
            hidden[row["axis"]] = hidden.get(row["axis"], 0.0) + t
        else:
            if row["axis"] != "pipeline":
                t /= max(par.overlap_chunks, 1)
            exposed[row["axis"]] = exposed.get(row["axis"], 0.0) + t
    critical = compute + sum(t for a, t in exposed.items() if a != "pipeline")
    bubble = 0.0
    if sizes["pipeline"] > 1:
        bubble = critical * (sizes["pipeline"] - 1) / (par.virtual_stages * cfg.train.microbatches)
    overlap_excess = max(0.0, sum(hidden.values()) - compute)
    step = critical + bubble + exposed.get("pipeline", 0.0) + overlap_excess
    breakdown = {"matmul": matmul, "memory": memory, "bubble": bubble,
                 "overlap_excess": overlap_excess,
                 **{f"exposed_{a}": t for a, t in exposed.items()},
                 **{f"overlapped_{a}": t for a, t in hidden.items()}}
    mfu = costs.model_flops / (step * n * dev.peak_flops("bfloat16"))
    return StepTime(step_s=step, mfu=mfu, tokens_per_s=costs.tokens / step, breakdown=breakdown,
                    costs=costs)


def _weight_bytes_by_component(costs: Costs, cfg: Config, itemsize: int) -> dict:
    """Bytes of weights each matmul component reads per pass on one device (compute dtype)."""
    from toolkit.analysis.costs import _params
    out = {}
    for path, n, _, _ in _params(cfg, costs.sizes):
        if "experts" in path and "shared" not in path:
            c = "experts"
        elif "shared" in path:
            c = "shared"
        elif "attn" in path:
            c = "attention"
        elif "router" in path:
            c = "router"
        elif "embed" in path or "unembed" in path:
            c = "head"
        elif "mtp" in path:
            c = "mtp"
        else:
            c = "dense"
        out[c] = out.get(c, 0.0) + n * itemsize
    return out

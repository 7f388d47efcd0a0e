"""Which parallel layout to train a config with on a cluster: enumerate, check memory, rank.

`plan(cfg, cluster, global_batch_tokens)` tries every split of the cluster's devices into
the toolkit's mesh axes (pipeline, data, fsdp, sequence, tensor, expert) that the model's
shapes allow, with the MoE layers either sharing attention's layout or folded
(`parallel.recipe="folded"`: experts over `expert x tensor`, Tutel's and Megatron's choice
between expert and tensor layouts for the FFN), micro-batch counts, pipeline schedules
(1F1B, interleaved) and per-layer rematerialisation. Each candidate is priced by
`toolkit.analysis.step_time` (Pipette-style: an analytic 1F1B critical path on the links
each axis lands on, intra-node or inter-node, slower between the groups of a
heterogeneous cluster). Candidates whose memory estimate exceeds a device are dropped
before ranking, so a plan never recommends what its own memory model says cannot fit.
The toolkit itself rematerialises only inside pipelines (`parallel.pipeline_remat`); a
`remat` plan without a pipeline prices what a framework with per-layer activation
checkpointing (MaxText, Megatron) would run.

    plans = plan(preset("mixtral_8x7b"), get_cluster("h100x64"), global_batch_tokens=4 * 2**20)
    plans[0].mesh, plans[0].time.mfu     # "pipeline=1,data=1,fsdp=8,...", 0.52
    print(explain(plans))                # the ranked table and why the winner wins

`python -m toolkit plan --preset mixtral_8x7b --cluster h100x64 --global-batch 4M` prints
the same. Constraints (`fixed={"tensor": 2}`, `remat=(True,)`) narrow the search; one
that nothing satisfies is an error that says which constraint and why.
"""

import dataclasses
import math

from toolkit.analysis.hardware import Cluster
from toolkit.analysis.step_time import StepTime, estimate_step_time
from toolkit.config import Config, ConfigError, validate

AXES = ("pipeline", "data", "fsdp", "sequence", "tensor", "expert")
MEMORY_HEADROOM = 0.9        # plan to 90% of device memory: allocator, buffers, fragmentation


@dataclasses.dataclass(frozen=True)
class Plan:
    """One ranked candidate.

    Attributes:
      cfg: the config with its `parallel` and `train.microbatches` set.
      remat: whether the estimate rematerialises each layer in the backward.
      time: the step-time estimate (its `.costs` holds memory and communication).
      memory_bytes: the per-device memory estimate.
    """

    cfg: Config
    remat: bool
    time: StepTime
    memory_bytes: float

    @property
    def mesh(self) -> str:
        par = self.cfg.parallel
        return ",".join(f"{a}={getattr(par, a)}" for a in AXES)

    @property
    def label(self) -> str:
        par = self.cfg.parallel
        sizes = [f"{a[0] if a != 'sequence' else 'c'}{getattr(par, a)}" for a in AXES
                 if getattr(par, a) > 1]
        sched = (f" {par.schedule}" + (f"x{par.virtual_stages}" if par.virtual_stages > 1 else "")
                 if par.pipeline > 1 else "")
        return (f"{' '.join(sizes) or 'd1'} {par.recipe} m{self.cfg.train.microbatches}{sched}"
                f"{' remat' if self.remat else ''}")


class Plans(list):
    """The ranked plans, and in `alternatives` the fastest fitting plan of each expert layout
    (`expert_layout`), whether or not it made the top."""

    def __init__(self, plans=()):
        super().__init__(plans)
        self.alternatives = {}


def expert_layout(cfg: Config) -> str:
    """How a plan lays out the routed experts: expert-parallel, folded over expert x tensor,
    or replicated/sharded like the dense layers (data, FSDP, tensor)."""
    par = cfg.parallel
    if par.expert > 1:
        return "folded (expert x tensor)" if par.recipe == "folded" else "expert-parallel"
    return "tensor-parallel experts" if par.tensor > 1 else "data/FSDP experts"


def parse_tokens(text) -> int:
    """'4M' -> 4 * 2**20 tokens, '512K' -> 512 * 2**10, '1000000' -> 1000000."""
    s = str(text).strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
    try:
        value = float(s[:-1] if scale > 1 else s)
    except ValueError:
        raise ValueError(f"global batch {text!r}: write a token count such as 4M, 512K or 1048576") from None
    return int(value * scale)


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _axis_options(cfg: Config, cluster: Cluster, fixed: dict) -> dict:
    m, moe, n = cfg.model, cfg.moe, cluster.num_devices
    node = min(g.per_node for g in cluster.groups)
    opts = {
        "pipeline": [p for p in _divisors(m.num_layers) if p <= 16 and n % p == 0],
        "tensor": [t for t in (1, 2, 4, 8) if t <= node and m.num_heads % t == 0
                   and m.num_kv_heads % t == 0],
        "expert": [e for e in _divisors(max(moe.num_ffn_experts, 1)) if n % e == 0],
        "sequence": [c for c in (1, 2, 4, 8) if m.seq_len % c == 0 and m.seq_len // c >= 1024] or [1],
    }
    for axis, value in fixed.items():
        if axis not in AXES:
            raise ValueError(f"planner constraint {axis}={value}: unknown axis; use one of {AXES}")
        if axis in opts and value not in opts[axis]:
            raise ValueError(f"planner constraint {axis}={value} cannot hold for {cfg.name} on "
                             f"{cluster.name}: {axis} may be one of {opts[axis]} (it must divide the "
                             f"model's shapes and the {n} devices)")
        opts[axis] = [value]
    return opts


def candidates(cfg: Config, cluster: Cluster, batch: int, fixed: dict, remat_options, schedules):
    """Every (parallel config, microbatches, remat) the shapes allow, validated."""
    opts, n = _axis_options(cfg, cluster, fixed), cluster.num_devices
    for p in opts["pipeline"]:
        for t in opts["tensor"]:
            for e in opts["expert"]:
                for c in opts["sequence"]:
                    rest = n // (p * t * e * c) if n % (p * t * e * c) == 0 else 0
                    fsdps = [f for f in _divisors(rest)] if rest else []
                    for f in fsdps:
                        d = rest // f
                        if "fsdp" in fixed and f != fixed["fsdp"] or "data" in fixed and d != fixed["data"]:
                            continue
                        yield from _variants(cfg, batch, dict(pipeline=p, data=d, fsdp=f, sequence=c,
                                                              tensor=t, expert=e),
                                             remat_options, schedules)


def _variants(cfg, batch, sizes, remat_options, schedules):
    split = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if batch % split:
        return
    per_rank = batch // split
    p = sizes["pipeline"]
    recipes = ["fsdp_tp_ep"] + (["folded"] if sizes["tensor"] > 1 and sizes["expert"] > 1 else [])
    for recipe in recipes:
        for micro in (1, 2, 4, 8, 16):
            if per_rank % micro:
                continue
            mb = per_rank // micro
            if p > 1 and mb < p:
                continue
            scheds = [("1f1b", 1)]
            if p > 1:
                scheds += [("interleaved", v) for v in (2, 4) if cfg.model.num_layers % (p * v) == 0
                           and mb % p == 0]
            for schedule, v in scheds:
                if schedules and schedule not in schedules:
                    continue
                par = dataclasses.replace(cfg.parallel, recipe=recipe, schedule=schedule, virtual_stages=v,
                                          **sizes)
                new = dataclasses.replace(cfg, parallel=par,
                                          train=dataclasses.replace(cfg.train, batch_size=batch,
                                                                    microbatches=mb))
                try:
                    new = validate(new, num_devices=math.prod(sizes.values()))
                except ConfigError:
                    continue
                for remat in remat_options:
                    yield new, remat


def plan(cfg: Config, cluster: Cluster, global_batch_tokens: int | None = None, *, fixed=None,
         remat=(False, True), schedules=None, top: int = 10) -> list:
    """The `top` fitting plans for `cfg` on `cluster`, fastest first (see the module docstring).

    `global_batch_tokens`: tokens per step (default: `train.batch_size * seq_len`), rounded
    down to whole sequences. `fixed`: axis sizes to hold, e.g. {"tensor": 2}. `remat`: which
    rematerialisation settings to try. `schedules`: pipeline schedules to try (default all).
    """
    fixed = dict(fixed or {})
    seq = cfg.model.seq_len
    tokens = global_batch_tokens or cfg.train.batch_size * seq
    batch = tokens // seq
    if batch < 1:
        raise ValueError(f"global batch of {tokens} tokens is less than one sequence of {seq}; "
                         f"use at least {seq} tokens")
    limit = cluster.hbm_bytes * MEMORY_HEADROOM
    fits, smallest = [], None
    for cand, rm in candidates(cfg, cluster, batch, fixed, tuple(remat), tuple(schedules or ())):
        t = estimate_step_time(cand, cluster, remat=rm)
        mem = t.costs.memory["total"]
        if smallest is None or mem < smallest[0]:
            smallest = (mem, cand, rm)
        if mem <= limit:
            fits.append(Plan(cfg=cand, remat=rm, time=t, memory_bytes=mem))
    if smallest is None:
        raise ValueError(
            f"no mesh of {cluster.num_devices} devices suits {cfg.name} with a global batch of {batch} "
            f"sequences{' and ' + str(fixed) if fixed else ''}: the batch must split over the data, "
            f"fsdp and expert axes; try a batch that is a multiple of {cluster.num_devices} sequences")
    if not fits:
        need = smallest[0] / MEMORY_HEADROOM
        more = math.ceil(cluster.num_devices * need / cluster.hbm_bytes)
        raise ValueError(
            f"{cfg.name} does not fit on {cluster.name}: the most memory-frugal layout found "
            f"({Plan(smallest[1], smallest[2], None, smallest[0]).label}) needs "
            f"{smallest[0] / 1e9:,.1f} GB per device, the devices have {cluster.hbm_bytes / 1e9:,.0f} GB "
            f"({MEMORY_HEADROOM:.0%} usable); use about {more} or more devices or a smaller global "
            f"batch" + ("" if True in tuple(remat) else ", or allow rematerialisation"))
    fits.sort(key=lambda pl: pl.time.step_s)
    ranked = Plans(fits[:top])
    for pl in fits:                    # the best of each way to lay out the experts (Tutel's choice)
        ranked.alternatives.setdefault(expert_layout(pl.cfg), pl)
    return ranked


def explain(plans, cluster: Cluster | None = None) -> str:
    """A ranked table of `plans` and a few sentences on what makes the first one win."""
    gb = lambda b: f"{b / 1e9:,.1f}"
    lines = [f"  {'#':>2} {'layout':<44}{'step s':>9}{'MFU':>7}{'mem GB':>8}{'exposed comm s':>16}"]
    for i, pl in enumerate(plans, 1):
        br = pl.time.breakdown
        comm = sum(v for k, v in br.items() if k.startswith("exposed_")) + br["overlap_excess"]
        lines.append(f"  {i:>2} {pl.label:<44}{pl.time.step_s:>9.3f}{pl.time.mfu:>7.1%}"
                     f"{gb(pl.memory_bytes):>8}{comm:>16.3f}")
    best = plans[0]
    br = best.time.breakdown
    parts = sorted(((k, v) for k, v in br.items() if v > 0 and not k.startswith("overlapped_")),
                   key=lambda kv: -kv[1])
    lines.append("")
    lines.append(f"best: {best.mesh}, recipe {best.cfg.parallel.recipe}, "
                 f"{best.cfg.train.microbatches} micro-batches"
                 + (f", {best.cfg.parallel.schedule} schedule" if best.cfg.parallel.pipeline > 1 else "")
                 + (", rematerialising each layer" if best.remat else ""))
    lines.append("  time goes to: " + ", ".join(f"{k} {v:.3f} s" for k, v in parts[:5]))
    mem = best.time.costs.memory
    lines.append("  memory per device: " + ", ".join(
        f"{k} {gb(mem[k])} GB" for k in ("params", "optimizer", "gradients", "activations", "gathered")))
    if len(plans) > 1:
        nxt = plans[1]
        lines.append(f"  the runner-up ({nxt.label}) is {nxt.time.step_s / best.time.step_s - 1:.1%} slower")
    if cluster is not None:
        from toolkit.analysis.step_time import axis_span
        sizes = best.time.costs.sizes
        links = []
        for axis in AXES:
            if sizes[axis] > 1:
                span = axis_span(axis, sizes)
                link = cluster.link_for(span)
                where = "inside a node" if link in [g.intra for g in cluster.groups] else "across nodes"
                links.append(f"{axis}={sizes[axis]} spans {span} devices, {where} "
                             f"({link.bandwidth / 1e9:,.0f} GB/s)")
        if links:
            lines.append("  links: " + "; ".join(links))
    alternatives = getattr(plans, "alternatives", {})
    if len(alternatives) > 1:
        mine = expert_layout(best.cfg)
        others = [f"{name} at best {alt.time.step_s / best.time.step_s - 1:+.1%} ({alt.label})"
                  for name, alt in alternatives.items() if name != mine]
        lines.append(f"  experts laid out {mine}; " + "; ".join(others))
    return "\n".join(lines)

"""The planner's state: a model, a cluster and a batch in, the ranked layouts out.

A thin layer over `toolkit.analysis.planner.plan` that a widget (or a test) drives: set a
preset, a cluster (any `get_cluster` name: "h100x16", "v5p-128", "h100x32+a100x32"), a
global batch, axes to hold fixed and the rematerialisation to try, and read the ranked
plans, the explanation and the selected plan's memory, communication and time breakdown.
A bad choice (unknown device, a cluster too small for the model, a constraint nothing
meets) never raises: it becomes `error`, the message the planner gave, and no plans.

    pe = PlanningExplorer("qwen3_30b_a3b", cluster="h100x16", global_batch="256K")
    pe.rows()                     # [{"rank", "layout", "step_s", "mfu", "memory_gb", ...}]
    pe.set(fixed="tensor=2")      # or {"tensor": 2}: only layouts with that axis size
    pe.select(2); pe.breakdown()  # {"memory": GB by kind, "communication": GB by axis, "time": s}
    pe.set(cluster="h100x2")      # pe.error: "... does not fit on h100x2: ... use about N devices"
"""

from toolkit.analysis.hardware import get_cluster
from toolkit.analysis.planner import AXES, explain, parse_tokens, plan
from toolkit.config import ConfigError, preset

KNOBS = ("preset", "cluster", "global_batch", "fixed", "remat", "top")
MEMORY_KINDS = ("params", "optimizer", "gradients", "activations", "gathered")


def parse_fixed(text) -> dict:
    """"tensor=2, expert=8" (or a dict) -> {"tensor": 2, "expert": 8}; "" -> {}."""
    if isinstance(text, dict):
        return dict(text)
    fixed = {}
    for part in filter(None, (p.strip() for p in str(text).replace(";", ",").split(","))):
        axis, _, value = (s.strip() for s in part.partition("="))
        if axis not in AXES or not value.isdigit() or int(value) < 1:
            raise ValueError(f"fixed axes {text!r}: cannot read {part!r}; write AXIS=SIZE pairs such as "
                             f"'tensor=2, expert=8' with AXIS one of {', '.join(AXES)}")
        fixed[axis] = int(value)
    return fixed


class PlanningExplorer:
    """State: the planner's inputs, its ranked plans (or the error) and a selected plan.

    Attributes:
      inputs: the knobs' values ({"preset", "cluster", "global_batch", "fixed", "remat", "top"}).
      plans: the ranked `Plan`s, fastest first ([] when the planner refused).
      cluster: the `Cluster` planned for, or None when it could not be read.
      error: the planner's message when it refused, "" otherwise.
    """

    def __init__(self, preset_name: str = "qwen3_30b_a3b", *, cluster: str = "h100x16",
                 global_batch: str = "256K", fixed=None, remat=(True,), top: int = 8):
        self.inputs = {"preset": preset_name, "cluster": cluster, "global_batch": global_batch,
                       "fixed": fixed or {}, "remat": tuple(remat), "top": top}
        self.plans, self.cluster, self.error, self.selected = [], None, "", 0
        self._cache = {}
        self._run()

    def set(self, **changes) -> None:
        """Change any of `KNOBS` and plan again (inputs planned before come from a cache)."""
        unknown = set(changes) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown knob(s) {sorted(unknown)}; use {KNOBS}")
        self.inputs.update(changes)
        self._run()

    def _run(self) -> None:
        i = self.inputs
        fixed = i["fixed"] if isinstance(i["fixed"], str) else tuple(sorted(i["fixed"].items()))
        key = (i["preset"], i["cluster"], str(i["global_batch"]), fixed, tuple(i["remat"]), i["top"])
        if key not in self._cache:
            try:
                cluster = get_cluster(i["cluster"])
                plans = plan(preset(i["preset"]), cluster, parse_tokens(i["global_batch"]),
                             fixed=parse_fixed(i["fixed"]), remat=i["remat"], top=i["top"])
                self._cache[key] = (plans, cluster, "")
            except (ValueError, ConfigError) as e:
                self._cache[key] = ([], None, str(e.args[0] if e.args else e))
        self.plans, self.cluster, self.error = self._cache[key]
        self.selected = 0

    def select(self, rank: int) -> None:
        """Pick the plan of `rank` (1 = fastest) for `breakdown` and the figures."""
        if not 1 <= rank <= len(self.plans):
            raise ValueError(f"rank {rank}: choose 1..{len(self.plans)}")
        self.selected = rank - 1

    @property
    def plan(self):
        """The selected `Plan`, or None when there are none."""
        return self.plans[self.selected] if self.plans else None

    def rows(self) -> list:
        """The ranked table as rows of plain values."""
        return [{"rank": n, "layout": p.label, "step_s": p.time.step_s, "mfu": p.time.mfu,
                 "memory_gb": p.memory_bytes / 1e9, "tokens_per_s": p.time.tokens_per_s}
                for n, p in enumerate(self.plans, 1)]

    def breakdown(self) -> dict:
        """The selected plan's {"memory": GB per device by kind, "communication": GB one
        device sends per step by "axis collective", "time": seconds on the critical path by
        part (compute, memory, exposed collectives, bubble)}; {} when there is no plan."""
        p = self.plan
        if p is None:
            return {}
        mem, comm = p.time.costs.memory, {}
        for r in p.time.costs.communication:
            key = f"{r['axis']} {r['collective']}"
            comm[key] = comm.get(key, 0.0) + r["bytes"] / 1e9
        time = {k: v for k, v in p.time.breakdown.items() if v > 0 and not k.startswith("overlapped_")}
        return {"memory": {k: mem[k] / 1e9 for k in MEMORY_KINDS}, "communication": comm, "time": time}

    def explanation(self) -> str:
        """The planner's ranked table and why the first plan wins, or the error."""
        return explain(self.plans, self.cluster) if self.plans else self.error


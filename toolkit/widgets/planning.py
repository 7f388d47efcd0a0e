"""The planner's state: a model, a cluster and a batch in, the ranked layouts out.

A thin layer over `toolkit.analysis.planner.plan` that a widget (or a test) drives: set a
preset, a cluster (device and count, or any `get_cluster` name such as "h100x32+a100x32"),
a global batch and fixed axes, and read the ranked plans, the explanation and the selected
plan's memory and time breakdown. A bad choice (unknown device, a cluster too small for the
model, a constraint nothing meets) becomes `error`, the message the planner gave.

    pe = PlanningExplorer("qwen3_30b_a3b", cluster="h100x16", global_batch="256K")
    pe.rows()                     # [{"rank", "layout", "step_s", "mfu", "memory_gb", ...}]
    pe.set(cluster="h100x2")      # pe.error: "... does not fit on h100x2: ... use about N devices"
"""

from toolkit.analysis.hardware import get_cluster
from toolkit.analysis.planner import explain, parse_tokens, plan
from toolkit.config import ConfigError, preset

KNOBS = ("preset", "cluster", "global_batch", "fixed", "remat", "top")


class PlanningExplorer:
    """State: the planner's inputs, its ranked plans (or the error) and a selected plan."""

    def __init__(self, preset_name: str = "qwen3_30b_a3b", *, cluster: str = "h100x16",
                 global_batch: str = "256K", fixed=None, remat=(True,), top: int = 8):
        self.inputs = {"preset": preset_name, "cluster": cluster, "global_batch": global_batch,
                       "fixed": dict(fixed or {}), "remat": tuple(remat), "top": top}
        self.plans, self.error, self.selected = [], "", 0
        self._cache = {}
        self._run()

    def set(self, **changes) -> None:
        """Change any of `KNOBS` and plan again (a plan seen before comes from the cache)."""
        unknown = set(changes) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown knob(s) {sorted(unknown)}; use {KNOBS}")
        self.inputs.update(changes)
        self._run()

    def _run(self) -> None:
        i = self.inputs
        key = (i["preset"], i["cluster"], i["global_batch"], tuple(sorted(i["fixed"].items())),
               tuple(i["remat"]), i["top"])
        if key not in self._cache:
            try:
                cluster = get_cluster(i["cluster"])
                plans = plan(preset(i["preset"]), cluster, parse_tokens(i["global_batch"]),
                             fixed=i["fixed"], remat=i["remat"], top=i["top"])
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
        return self.plans[self.selected] if self.plans else None

    def rows(self) -> list:
        """The ranked table as rows of plain values."""
        return [{"rank": n, "layout": p.label, "step_s": p.time.step_s, "mfu": p.time.mfu,
                 "memory_gb": p.memory_bytes / 1e9, "tokens_per_s": p.time.tokens_per_s}
                for n, p in enumerate(self.plans, 1)]

    def breakdown(self) -> dict:
        """{"memory": GB by kind, "time": seconds by part} of the selected plan."""
        p = self.plan
        if p is None:
            return {}
        mem = p.time.costs.memory
        return {"memory": {k: mem[k] / 1e9 for k in ("params", "optimizer", "gradients", "activations",
                                                      "gathered")},
                "time": {k: v for k, v in p.time.breakdown.items() if v > 0}}

    def explanation(self) -> str:
        return explain(self.plans, self.cluster) if self.plans else self.error

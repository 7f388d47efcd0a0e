"""The sparsity explorer's state: one MoE design at a time, at fixed active compute.

Pick the total experts, the active experts (top-k) and the shared experts; the expert
width follows so that every token still multiplies through the same FFN width as the base
config, (top_k + shared) x d_expert (`toolkit.analysis.scaling.at_active_compute`):
FLOPs per token stay put while parameters, memory and the expert exchange move. The
granularity G = 2 d_model / d_expert therefore follows from top_k + shared; `refine(m)`
makes experts m times finer at the same activation ratio (experts, top-k and shared x m).

Each design is a row of numbers from the cost model on a cluster, laid out plainly (experts
split over as many devices as divide them, data over the rest; the planner in
`toolkit.widgets.planning` searches for the best layout): parameters, FLOPs per token,
memory per device and whether it fits, bytes sent per step, the step time, Ling's
efficiency leverage at a compute budget, and, once trained for a few steps on the embedded
corpus, its validation loss.
A design that cannot be built never raises: it leaves a message in `error` and the last
good design stays.

    ex = SparsityExplorer("tiny", cluster="h100x8")
    ex.set(num_experts=32, top_k=8)          # 4x finer experts, same active width
    ex.row()["params_total"], ex.row()["leverage"]
    ex.refine(2)                             # E64 k16: finer again, same activation ratio
    ex.sweep([(8, 2, 0), (16, 4, 0), (32, 8, 0), (32, 7, 1)])   # rows for a table
    ex.train(steps=50)                       # validation loss of this design (cached)
"""

import dataclasses
import math

import jax

from toolkit.analysis.costs import forward_flops
from toolkit.analysis.hardware import get_cluster
from toolkit.analysis.params import count_params
from toolkit.analysis.scaling import activation_ratio, at_active_compute, granularity, leverage_of, segmented
from toolkit.analysis.step_time import estimate_step_time
from toolkit.config import Config, ConfigError, ParallelConfig, apply_overrides, preset, validate
from toolkit.training import Trainer

DESIGN = ("num_experts", "top_k", "num_shared_experts")
KNOBS = DESIGN + ("cluster", "compute")
TRAINABLE_PARAMS = 100e6
"""`train` refuses designs with more parameters than this: they do not train in minutes here."""


def _message(error: Exception) -> str:
    return str(error.args[0] if error.args else error).replace("invalid config:\n  ", "")


class SparsityExplorer:
    """State: a base config, the knobs (design, cluster, compute budget) and trained losses.

    Attributes:
      base: the config whose active expert width every design keeps.
      knobs: {"num_experts", "top_k", "num_shared_experts", "cluster", "compute"}.
      cluster: the `Cluster` the costs are priced on (`knobs["cluster"]`, a `get_cluster` name).
      losses: {(experts, top_k, shared): {steps: validation loss}}.
      error: why the last change was refused, "" when it was taken.
    """

    def __init__(self, base: Config | str = "tiny", *, overrides=(), cluster: str = "h100x8",
                 compute: float = 1e22, **design):
        self.base = apply_overrides(preset(base) if isinstance(base, str) else base, list(overrides))
        moe = self.base.moe
        if not moe.num_experts:
            raise ValueError(f"{self.base.name} is dense (moe.num_experts=0); start from an MoE preset "
                             f"such as 'tiny'")
        self.knobs = {"num_experts": moe.num_experts, "top_k": moe.top_k,
                      "num_shared_experts": moe.num_shared_experts, "cluster": "", "compute": compute}
        self.cluster, self.losses, self.error = None, {}, ""
        self.set(cluster=cluster, **design)
        if self.error:
            raise ValueError(self.error)

    @property
    def design(self) -> tuple:
        """(experts, top_k, shared) of the current design."""
        return tuple(self.knobs[k] for k in DESIGN)

    def set(self, **knobs) -> bool:
        """Change any of `KNOBS`; a value that cannot be built keeps the old knobs and says
        why in `error`. Returns whether the change was taken."""
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown knob(s) {sorted(unknown)}; use {KNOBS}")
        new = dict(self.knobs, **knobs)
        try:
            if new["compute"] <= 0:
                raise ValueError(f"compute={new['compute']!r}: give training FLOPs > 0, e.g. 1e22")
            cluster = get_cluster(new["cluster"]) if new["cluster"] != self.knobs["cluster"] else self.cluster
            validate(self._config(tuple(new[k] for k in DESIGN), cluster.num_devices),
                     num_devices=cluster.num_devices)
        except (ValueError, ConfigError) as e:
            self.error = _message(e)
            return False
        self.knobs, self.cluster, self.error = new, cluster, ""
        return True

    def refine(self, factor: float) -> bool:
        """Split every expert into `factor` finer ones (below 1: merge): experts, top-k and
        shared x factor at the same activation ratio and active width (`segmented`)."""
        try:
            moe = segmented(self.cfg, factor).moe
        except ValueError as e:
            self.error = _message(e)
            return False
        return self.set(num_experts=moe.num_experts, top_k=moe.top_k,
                        num_shared_experts=moe.num_shared_experts)

    def _config(self, design: tuple, devices: int) -> Config:
        e, k, s = design
        cfg = at_active_compute(self.base, num_experts=e, top_k=k, num_shared_experts=s)
        expert = math.gcd(cfg.moe.num_ffn_experts, devices)
        return dataclasses.replace(cfg, parallel=ParallelConfig(data=devices // expert, expert=expert,
                                                                recipe="ep"))

    @property
    def cfg(self) -> Config:
        """The current design's config, its mesh laid over the cluster."""
        return self._config(self.design, self.cluster.num_devices)

    def row(self, design: tuple | None = None) -> dict:
        """The numbers of one design (default: the current one), `(experts, top_k, shared)`."""
        cfg = self._config(design or self.design, self.cluster.num_devices)
        step = estimate_step_time(cfg, self.cluster)
        costs, fwd, moe = step.costs, forward_flops(cfg), cfg.moe
        key = (moe.num_experts, moe.top_k, moe.num_shared_experts)
        trained = self.losses.get(key, {})
        steps = max(trained, default=None)
        return {"design": "E{} k{} s{}".format(*key), "num_experts": key[0], "top_k": key[1],
                "shared": key[2], "d_expert": moe.d_expert, "activation": activation_ratio(cfg),
                "granularity": granularity(cfg), "params_total": costs.params_total,
                "params_active": costs.params_active, "flops_per_token": sum(fwd.values()),
                "expert_flops_per_token": fwd["experts"] + fwd["shared"],
                "memory_per_device": costs.memory["total"],
                "fits": costs.memory["total"] <= self.cluster.hbm_bytes,
                "comm_per_step": sum(r["bytes"] for r in costs.communication),
                "step_s": step.step_s, "mfu": step.mfu,
                "leverage": leverage_of(cfg, self.knobs["compute"]),
                "val_loss": trained.get(steps), "val_steps": steps}

    def sweep(self, designs) -> list:
        """Rows for `designs`, each `(num_experts, top_k, num_shared_experts)`."""
        return [self.row(tuple(d)) for d in designs]

    def train(self, steps: int = 50, *, devices=None, stop=None, on_step=None) -> float:
        """Train the current design for `steps` on one device (or `devices`) and return its
        validation loss, cached per design and step count. `stop()` ends the run early (the
        loss is then recorded at the steps done); `on_step(record)` runs after each step."""
        cfg, key = self.cfg, self.design
        if steps in self.losses.get(key, {}):
            return self.losses[key][steps]
        total = count_params(cfg)[0]
        if total > TRAINABLE_PARAMS:
            raise ValueError(f"{cfg.name} has {total / 1e6:,.0f}M parameters; training here is for "
                             f"designs under {TRAINABLE_PARAMS / 1e6:.0f}M: start from preset 'tiny' "
                             f"or 'small'")
        cfg = apply_overrides(dataclasses.replace(cfg, parallel=ParallelConfig()),
                              [f"train.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
                               f"train.warmup_steps={max(1, steps // 10)}"])

        def callback(_trainer, rec):
            if on_step is not None:
                on_step(rec)
            return not (stop is not None and stop())

        summary = Trainer(cfg, devices=devices or jax.devices()[:1], progress=False).run(callback)
        self.losses.setdefault(key, {})[summary["steps"]] = float(summary["final_val_loss"])
        return self.losses[key][summary["steps"]]

"""The sparsity explorer's state: one MoE design at a time, at fixed active compute.

Pick the total experts, the active experts (top-k) and the shared experts; the expert
width follows so that every token still multiplies through the same FFN width
(`toolkit.analysis.scaling.at_active_compute`): FLOPs per token stay put while parameters,
memory and the expert exchange move. Each design is a row of numbers from the cost model
on a mesh of `devices` (experts split over as many devices as divide them, data over the
rest), with Ling's efficiency leverage at a compute budget, and, once trained for a few
steps on the embedded corpus, its validation loss.

    ex = SparsityExplorer("tiny", devices=8)
    ex.set(num_experts=32, top_k=8)          # 4x finer experts, same active width
    ex.row()["params_total"], ex.row()["leverage"]
    ex.sweep([(8, 2, 0), (16, 4, 0), (32, 8, 0), (32, 7, 1)])   # rows for a table
    ex.train(steps=50)                       # validation loss of this design (cached)
"""

import dataclasses
import math

from toolkit.analysis.costs import estimate_costs, forward_flops
from toolkit.analysis.scaling import activation_ratio, at_active_compute, granularity, leverage_of
from toolkit.config import Config, ConfigError, ParallelConfig, apply_overrides, preset, validate


class SparsityExplorer:
    """State: a base config, the current (experts, top_k, shared) design, trained losses."""

    def __init__(self, base: Config | str = "tiny", *, overrides=(), devices: int = 8,
                 compute: float = 1e22, **design):
        self.base = apply_overrides(preset(base) if isinstance(base, str) else base, list(overrides))
        self.devices, self.compute = devices, compute
        moe = self.base.moe
        self.design = {"num_experts": moe.num_experts, "top_k": moe.top_k,
                       "num_shared_experts": moe.num_shared_experts}
        self.losses, self.error = {}, ""
        self.set(**design)

    def set(self, **design) -> None:
        """Change `num_experts`, `top_k` and/or `num_shared_experts`; a design that cannot be
        built keeps the old one and says why in `error`."""
        unknown = set(design) - set(self.design)
        if unknown:
            raise ValueError(f"unknown knob(s) {sorted(unknown)}; use {sorted(self.design)}")
        new = dict(self.design, **design)
        try:
            cfg = self._config(**new)
            validate(cfg, num_devices=self.devices)
        except (ValueError, ConfigError) as e:
            self.error = str(e.args[0] if e.args else e)
            return
        self.design, self.error = new, ""

    def _config(self, **design) -> Config:
        cfg = at_active_compute(self.base, **design)
        e = math.gcd(cfg.moe.num_ffn_experts, self.devices)
        par = ParallelConfig(data=self.devices // e, expert=e, recipe="ep")
        return dataclasses.replace(cfg, parallel=par)

    @property
    def cfg(self) -> Config:
        return self._config(**self.design)

    def row(self, cfg: Config | None = None) -> dict:
        """Numbers of one design (default: the current one)."""
        cfg = cfg or self.cfg
        costs = estimate_costs(cfg, self.devices)
        fwd = forward_flops(cfg)
        moe = cfg.moe
        key = (moe.num_experts, moe.top_k, moe.num_shared_experts)
        return {"design": f"E{key[0]} k{key[1]} s{key[2]}", "num_experts": key[0], "top_k": key[1],
                "shared": key[2], "d_expert": moe.d_expert, "activation": activation_ratio(cfg),
                "granularity": granularity(cfg), "params_total": costs.params_total,
                "params_active": costs.params_active, "flops_per_token": sum(fwd.values()),
                "expert_flops_per_token": fwd["experts"] + fwd["shared"],
                "memory_per_device": costs.memory["total"],
                "comm_per_step": sum(r["bytes"] for r in costs.communication),
                "leverage": leverage_of(cfg, self.compute), "val_loss": self.losses.get(key)}

    def sweep(self, designs) -> list:
        """Rows for `designs`, each `(num_experts, top_k, num_shared_experts)`."""
        return [self.row(self._config(num_experts=e, top_k=k, num_shared_experts=s)) for e, k, s in designs]

    def train(self, steps: int = 50, devices=None) -> float:
        """Train the current design for `steps` on one device; its validation loss (cached)."""
        import jax

        from toolkit.training import Trainer
        cfg = self.cfg
        key = (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.num_shared_experts)
        if key not in self.losses:
            cfg = apply_overrides(dataclasses.replace(cfg, parallel=ParallelConfig()),
                                  [f"train.steps={steps}", "train.eval_every=0", "train.checkpoint_every=0",
                                   f"train.warmup_steps={max(1, steps // 10)}"])
            summary = Trainer(cfg, devices=devices or jax.devices()[:1], progress=False).run()
            self.losses[key] = float(summary["final_val_loss"])
        return self.losses[key]

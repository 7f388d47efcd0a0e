"""The routing explorer's state: a router and its knobs, one run, and the data of every view.

A `RoutingExplorer` is plain Python that tests drive without a browser; the widget
(`RoutingExplorerView`) only renders it and forwards knob changes. The config is a base
(a preset plus overrides, or a loaded run's config) with the router and the knobs that
matter for it applied on top, exactly as `--set` would. A bad value never raises here: it
leaves a message in `error` (field, value, a value that works) and nothing runs until fixed.

    ex = RoutingExplorer("tiny", overrides=["train.steps=60"], router="top_p")
    ex.set_knob("moe.top_p", 0.6)       # ex.overrides() -> ["moe.router=top_p", "moe.top_p=0.6", ...]
    ex.train(20)                        # 20 steps; a changed config starts a new run first
    ex.load_over_steps()                # [steps, L, E] routed assignments at each step
    ex.experts_per_token_histogram()    # [L, k+1] over validation text of every domain
    ex.affinity()                       # [L-1, E, E] P(expert j at layer l+1 | expert i at l)
    ex.top_experts()                    # {domain: (tokens [S], top expert [L, S])}
    ex.load_run("runs/tiny")            # explore (and continue) a saved run instead
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from toolkit.analysis import experts_per_token_histogram, inter_layer_affinity
from toolkit.config import Config, ConfigError, apply_overrides, config_or_error, from_dict, preset
from toolkit.sharding.mesh import batch_sharding, rules_for
from toolkit.training import Trainer


@dataclasses.dataclass(frozen=True)
class Knob:
    """One config field the explorer exposes, and when it matters.

    Attributes:
      key: the dotted config key, e.g. "moe.top_p"; its type comes from the config field.
      help: one line on what it does.
      lo: slider minimum (numbers).
      hi: slider maximum.
      step: slider step.
      options: the allowed values of a text field (a choice instead of a slider).
      routers: the routers it applies to; empty means every router.
      when: a further condition on the MoE config, e.g. capacity_factor needs capacity dispatch.
    """

    key: str
    help: str
    lo: float = 0.0
    hi: float = 1.0
    step: float = 0.01
    options: tuple = ()
    routers: tuple = ()
    when: Callable | None = None

    def applies(self, moe) -> bool:
        return (not self.routers or moe.router in self.routers) and (self.when is None or self.when(moe))


_BALANCED_BY_LOSS = ("topk_softmax", "sigmoid_bias", "top_p", "recurrent", "tsallis")

KNOBS = (
    Knob("moe.num_experts", "routed FFN experts per MoE layer", 2, 32, 1),
    Knob("moe.top_k", "experts per token (top_p: at most; tsallis: at least; expert_choice: on "
         "average)", 1, 8, 1),
    Knob("moe.top_p", "probability mass a token's experts must reach", 0.05, 1.0, 0.05,
         routers=("top_p", "tsallis")),
    Knob("moe.tsallis_threshold", "normalised Tsallis entropy above which a token takes every "
         "expert", 0.05, 1.0, 0.05, routers=("tsallis",)),
    Knob("moe.aux_loss_weight", "weight of the Switch load-balancing loss", 0.0, 0.1, 0.001,
         routers=_BALANCED_BY_LOSS),
    Knob("moe.bias_update_rate", "aux-loss-free bias step after each training step (0 freezes "
         "it)", 0.0, 0.01, 0.0005, routers=("sigmoid_bias",)),
    Knob("moe.entropy_loss_weight", "weight of the router entropy loss (sharpens top-p "
         "routing)", 0.0, 0.01, 0.0001, routers=("top_p",)),
    Knob("moe.tsallis_loss_weight", "weight of the Tsallis entropy loss", 0.0, 0.1, 0.005,
         routers=("tsallis",)),
    Knob("moe.zero_experts", "MoE++ zero experts: output 0, no compute", 0, 4, 1),
    Knob("moe.copy_experts", "MoE++ copy experts: output the input", 0, 4, 1),
    Knob("moe.constant_experts", "MoE++ constant experts: a learned vector mixed in", 0, 4, 1),
    Knob("moe.zc_tau", "balance-loss weight of the zero-computation experts (smaller: more "
         "tokens skip compute)", 0.05, 1.0, 0.05,
         when=lambda m: m.zero_experts + m.copy_experts + m.constant_experts > 0),
    Knob("moe.dispatch", "dropless, or capacity (fixed slots per expert; overflow is dropped)",
         options=("dropless", "capacity")),
    Knob("moe.capacity_factor", "slots per expert relative to a balanced load", 0.25, 3.0, 0.05,
         when=lambda m: m.dispatch == "capacity"),
)
KNOBS_BY_KEY = {k.key: k for k in KNOBS}


def top_expert(expert_ids_lbsk) -> np.ndarray:
    """[L, B, S] each token's top expert: its first valid slot, -1 where no expert took it.

    Every router but `expert_choice` fills its slots most probable first, so this is the
    expert with the largest router weight. `expert_choice` has one slot per expert id,
    valid where that expert chose the token: there it is the lowest-numbered expert that
    chose the token.
    """
    ids = np.asarray(expert_ids_lbsk)
    valid = ids >= 0
    first = np.take_along_axis(ids, np.argmax(valid, axis=-1)[..., None], axis=-1)[..., 0]
    return np.where(valid.any(-1), first, -1)


def expert_names(cfg: Config) -> list:
    """A label per routed expert id: E (FFN), S (small), Z (zero), C (copy), K (constant), G (GRU)."""
    m = cfg.moe
    kinds = (("E", m.num_experts), ("S", m.small_experts), ("Z", m.zero_experts),
             ("C", m.copy_experts), ("K", m.constant_experts), ("G", m.gru_experts))
    return [f"{prefix}{i}" for prefix, n in kinds for i in range(n)]


def _knob_value(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


class RoutingExplorer:
    """A router, its knobs and one run, as plain state.

    Attributes:
      base: the config the knobs apply to (a preset plus `base_overrides`, or a loaded run's).
      base_overrides: dotted overrides applied to `base` before the router and knobs.
      router: the chosen router (one of `toolkit.moe.ROUTERS`).
      values: knob key -> value, for every knob in `KNOBS`.
      cfg: the config the router and knobs describe, or None while `error` is set.
      error: why the config cannot run (field, value and a fix), or None.
      trainer: the current run, or None before the first step.
    """

    def __init__(self, base: Config | str = "tiny", *, overrides=(), router: str | None = None,
                 knobs: dict | None = None, devices=None):
        self.devices = list(devices if devices is not None else jax.devices())
        self.base = preset(base) if isinstance(base, str) else base
        self.base_overrides = list(overrides)
        self.trainer, self.error, self.cfg = None, None, None
        self._probe_fn, self._probe_cache = None, None
        try:
            self._start = apply_overrides(self.base, self.base_overrides)
        except ConfigError:
            self._start = self.base          # the error shows once the config is built below
        self.router = router or self._start.moe.router
        self.values = {key: _knob_value(self._start, key) for key in KNOBS_BY_KEY}
        if all(self._set_value(key, value) for key, value in (knobs or {}).items()):
            self._rebuild()

    # -- knobs and the config --------------------------------------------------------------
    def knobs(self) -> list:
        """The knobs that matter for the current router and knob values."""
        moe = dataclasses.replace(self._start.moe, router=self.router,
                                  **{k.split(".")[1]: v for k, v in self.values.items()})
        return [k for k in KNOBS if k.applies(moe)]

    def overrides(self) -> list:
        """The router and the relevant knobs that differ from the base, as `--set` strings
        (applied after `base_overrides`)."""
        changed = [k.key for k in self.knobs() if self.values[k.key] != _knob_value(self._start, k.key)]
        return [f"moe.router={self.router}"] + [f"{k}={self.values[k]}" for k in changed]

    def set_router(self, name: str) -> None:
        self.router = name
        self._rebuild()

    def set_knob(self, key: str, value) -> None:
        """Set one knob; a value of the wrong type or out of range leaves a message in `error`."""
        if self._set_value(key, value):
            self._rebuild()

    def _set_value(self, key: str, value) -> bool:
        if key not in KNOBS_BY_KEY:
            raise ValueError(f"{key!r} is not a knob of the routing explorer; knobs: "
                             f"{', '.join(KNOBS_BY_KEY)} (other fields go in `overrides`)")
        kind, knob = type(self.values[key]), KNOBS_BY_KEY[key]
        try:
            typed = kind(value)
            if kind is int and typed != float(value):
                raise ValueError
        except (TypeError, ValueError):
            self.error = f"{key}={value!r} is not a valid {kind.__name__}; the current value is " \
                         f"{self.values[key]!r}"
            self.cfg = None
            return False
        if knob.options and typed not in knob.options:
            self.error = f"{key}={typed!r} is not an option; use one of {knob.options}"
            self.cfg = None
            return False
        self.values[key] = typed
        return True

    def _rebuild(self) -> None:
        self.cfg, self.error = config_or_error(
            self.base, [*self.base_overrides, *self.overrides()], len(self.devices))

    @property
    def pending(self) -> bool:
        """Whether the knobs describe another config than the current run (the next step starts anew)."""
        return self.trainer is not None and self.cfg is not None and self.cfg != self.trainer.cfg

    @property
    def status(self) -> str:
        """One line on the run: its step, or why nothing runs."""
        if self.error:
            return "fix the config to train"
        if self.trainer is None:
            return f"no run yet: train to start one ({', '.join(self.overrides())})"
        t = self.trainer
        line = f"step {t.step_num}/{t.cfg.train.steps} of router {t.cfg.moe.router}"
        if t.history:
            line += f", train CE {t.history[-1]['ce']:.3f}"
        if self.pending:
            line += "; the knobs changed: the next step starts a new run"
        elif t.step_num >= t.cfg.train.steps:
            line += "; the run is done (raise train.steps for a longer one)"
        return line

    # -- runs --------------------------------------------------------------------------------
    def _ensure_run(self) -> bool:
        if self.cfg is None:
            return False
        if self.trainer is None or self.pending:
            try:
                self._set_trainer(Trainer(self.cfg, devices=self.devices, progress=False))
            except ConfigError as e:
                self.error = str(e)
                return False
        return True

    def _set_trainer(self, trainer: Trainer) -> None:
        self.trainer, self._probe_fn, self._probe_cache = trainer, None, None

    def step(self) -> dict | None:
        """One training step (a new run first if needed); its record, or None if nothing ran."""
        if not self._ensure_run() or self.trainer.step_num >= self.trainer.cfg.train.steps:
            return None
        return self.trainer.advance()

    def train(self, steps: int, *, stop: Callable | None = None,
              on_step: Callable | None = None) -> int:
        """Up to `steps` steps, never past `train.steps`; `stop()` ends it early, `on_step(record)`
        runs after each. Returns the steps done."""
        done = 0
        while done < steps and not (stop is not None and stop()):
            rec = self.step()
            if rec is None:
                break
            done += 1
            if on_step is not None:
                on_step(rec)
        return done

    def load_run(self, path) -> bool:
        """Explore the run saved in `path` (its config, checkpoint and metrics); training continues it."""
        path = Path(path)
        config_path = path / "config.json"
        if not config_path.exists():
            self.error = (f"{str(path)!r} holds no run (no config.json); give a directory written by "
                          f"`python -m toolkit train --out DIR`")
            return False
        try:
            cfg = from_dict(json.loads(config_path.read_text()))
            trainer = Trainer(cfg, out_dir=path, resume=True, devices=self.devices, progress=False)
        except ConfigError as e:
            self.error = f"cannot load {str(path)!r}: {e}"
            return False
        self.base, self._start, self.base_overrides, self.router = cfg, cfg, [], cfg.moe.router
        self.values = {key: _knob_value(cfg, key) for key in KNOBS_BY_KEY}
        self._set_trainer(trainer)
        self._rebuild()
        return True

    # -- the data of the views -----------------------------------------------------------------
    def layer_names(self) -> list:
        return [f"L{i}" for i in self.trainer.moe_layers] if self.trainer else []

    def expert_names(self) -> list:
        return expert_names(self.trainer.cfg) if self.trainer else []

    def _routed_history(self) -> list:
        return [h for h in (self.trainer.history if self.trainer else []) if "expert_counts" in h]

    def steps(self) -> np.ndarray:
        """[S] the step number of each entry of the per-step series."""
        return np.array([h["step"] for h in self._routed_history()], np.int64)

    def _series(self, key: str, *inner) -> np.ndarray:
        rows = [h[key] for h in self._routed_history()]
        if rows:
            return np.asarray(rows, np.float64)
        shape = (len(self.trainer.moe_layers), *inner) if self.trainer else (0, *inner)
        return np.zeros((0, *shape))

    def load_over_steps(self) -> np.ndarray:
        """[S, L, E] routed assignments to each expert of each MoE layer at each step."""
        return self._series("expert_counts", self.trainer.cfg.moe.num_routed if self.trainer else 0)

    def drop_rate(self) -> np.ndarray:
        """[S, L] share of assignments that found no slot (capacity dispatch)."""
        return self._series("drop_rate")

    def experts_per_token(self) -> np.ndarray:
        """[S, L] mean experts a token used."""
        return self._series("experts_per_token")

    def probe(self) -> dict:
        """{domain: {"tokens": int32 [B, S], "expert_ids": int32 [L, B, S, k]}} on the first
        validation batch of each domain, with the current weights (cached until the next step)."""
        t = self.trainer
        if t is None or not t.moe_layers:
            return {}
        if self._probe_cache is not None and self._probe_cache[0] == t.step_num:
            return self._probe_cache[1]
        if self._probe_fn is None:
            self._probe_fn = _make_probe(t)
        out = {}
        sharding = batch_sharding(t.mesh, rules_for(t.cfg.parallel))
        for domain, batch in t.batches.validation(1):
            with jax.set_mesh(t.mesh):
                ids = self._probe_fn(t.state, jax.device_put(batch["tokens"], sharding))
            out[domain] = {"tokens": batch["tokens"], "expert_ids": np.asarray(jax.device_get(ids))}
        self._probe_cache = (t.step_num, out)
        return out

    def experts_per_token_histogram(self) -> np.ndarray:
        """[L, k+1] share of probed tokens (every domain) that used 0, 1, ..., k experts."""
        probed = self.probe()
        if not probed:
            return np.zeros((0, 0))
        return experts_per_token_histogram(np.concatenate([p["expert_ids"] for p in probed.values()],
                                                          axis=1))

    def affinity(self) -> np.ndarray:
        """[L-1, E, E] P(expert j at MoE layer l+1 | expert i at l) on the validation batches
        (validating first if the last pass is older than the weights)."""
        t = self.trainer
        if t is None or not t.moe_layers:
            return np.zeros((0, 0, 0))
        if not t.val_history or t.val_history[-1]["step"] != t.step_num:
            t.evaluate()
        return inter_layer_affinity(t.val_history[-1]["affinity_counts"])

    def top_experts(self, rows: int = 1) -> dict:
        """{domain: (tokens [rows * S], top expert [L, rows * S])} for the first `rows` probed
        windows of each domain, joined; see `top_expert`."""
        out = {}
        for domain, p in self.probe().items():
            top_lbs = top_expert(p["expert_ids"][:, :rows])
            out[domain] = (p["tokens"][:rows].reshape(-1), top_lbs.reshape(top_lbs.shape[0], -1))
        return out


def _make_probe(trainer: Trainer):
    """Jitted `(state, tokens_bt) -> expert_ids [L, B, S, k]` in eval mode (no router jitter)."""
    state_sh = jax.tree.map(lambda x: x.sharding, trainer.state)
    graphdef = trainer.graphdef

    def probe(state, tokens_bt):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        return model(tokens_bt)[1].expert_ids

    batch_sh = batch_sharding(trainer.mesh, rules_for(trainer.cfg.parallel))
    return jax.jit(probe, in_shardings=(state_sh, batch_sh))

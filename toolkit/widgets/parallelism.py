"""The parallelism explorer's state: a mesh, a recipe, and what they do to one train step.

A `ParallelismExplorer` is plain Python that tests drive without a browser; the widget
(`ParallelismExplorerView`) only renders it and forwards knob changes. The config is a
base (a preset plus overrides) with the mesh axis sizes, the recipe and the dispatch
knobs applied on top, exactly as `--set` would. A bad choice never raises here: it leaves
`validate()`'s message in `error` (field, value, a value that works) and nothing compiles.

    ex = ParallelismExplorer("tiny", data=2, tensor=2, expert=2, recipe="folded")
    ex.set(dispatch="capacity")          # or ex.set({"moe.dispatch": "capacity"})
    ex.sharding_table()                  # per parameter: shape, logical axes, spec, shard shape
    ex.inspect()                         # compiles the train step: memory and collectives per device
    ex.communication()                   # HLO bytes of the expert exchange and TP vs the formulas
    ex.equivalence()                     # loss and gradients on the mesh vs one device
    ex.set(pipeline=4, data=2, microbatches=8); ex.schedule().bubble_fraction()   # 3/11
    ex.set(expert=3); ex.error           # "invalid config: ... parallel mesh ... has 12 devices ..."

Every result is cached per config (and device list), so returning to a setting is instant.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from toolkit.config import Config, ConfigError, apply_overrides, config_or_error, preset
from toolkit.data import load_corpus
from toolkit.models.transformer import stacked_blocks_state
from toolkit.sharding.mesh import MESH_AXES, make_mesh, rules_for
from toolkit.sharding.rules import LOGICAL_AXES, RECIPES, mesh_axes_of, recipe_rules
from toolkit.sharding.schedules import SCHEDULES, timeline
from toolkit.training.inspect import communication_check, inspect_train_step, loss_and_grads
from toolkit.training.step import abstract_state


@dataclasses.dataclass(frozen=True)
class Choice:
    """One config field the parallelism explorer exposes as a choice.

    Attributes:
      key: the dotted config key, e.g. "parallel.expert"; its type comes from the config field.
      help: one line on what it does.
      options: the values offered by the widget (`set` accepts any value the field takes;
        the mesh axes offer -1 and the divisors of the device count instead).
      when: whether it matters for a config, e.g. capacity_factor needs capacity dispatch.
    """

    key: str
    help: str
    options: tuple = ()
    when: Callable | None = None

    @property
    def name(self) -> str:
        return self.key.split(".")[1]

    def applies(self, cfg: Config) -> bool:
        return self.when is None or self.when(cfg)


CHOICES = (
    Choice("parallel.data", "data-parallel replicas: batch split, parameters replicated (-1: the rest)"),
    Choice("parallel.fsdp", "fully sharded data parallel: batch split, parameters split on embed"),
    Choice("parallel.tensor", "tensor parallel: heads, MLP hidden and vocab split"),
    Choice("parallel.expert", "expert parallel: whole experts per device, tokens split too"),
    Choice("parallel.pipeline", "pipeline stages: layers split into stages, micro-batches flow through"),
    Choice("parallel.sequence", "context parallel: each sequence split into pieces (ring attention)"),
    Choice("parallel.recipe", "the rules table from logical axes to mesh axes",
           options=tuple(RECIPES)),
    Choice("train.microbatches", "micro-batches per step (gradients accumulated; the pipeline's m)",
           options=(1, 2, 4, 8, 16)),
    Choice("parallel.schedule", "pipeline schedule: GPipe, 1F1B or interleaved 1F1B",
           options=SCHEDULES, when=lambda c: c.parallel.pipeline > 1),
    Choice("parallel.virtual_stages", "model chunks per pipeline device (interleaved schedule)",
           options=(1, 2, 4), when=lambda c: c.parallel.schedule == "interleaved"),
    Choice("parallel.pipeline_remat", "recompute each stage's forward in its backward",
           options=(True, False), when=lambda c: c.parallel.pipeline > 1),
    Choice("parallel.context", "how split sequences see earlier keys/values: ring or all_gather",
           options=("ring", "all_gather"), when=lambda c: c.parallel.sequence > 1),
    Choice("parallel.sequence_parallel", "Megatron sequence parallelism over the tensor axis",
           options=(False, True), when=lambda c: c.parallel.tensor > 1),
    Choice("moe.dispatch", "dropless, or capacity (fixed slots per expert and group)",
           options=("dropless", "capacity")),
    Choice("moe.capacity_factor", "slots per expert relative to a balanced load",
           options=(1.0, 1.25, 2.0), when=lambda c: c.moe.dispatch == "capacity"),
    Choice("parallel.dropless_exchange", "how dropless dispatch moves tokens between EP devices",
           options=("auto", "all_gather", "ragged_all_to_all"), when=lambda c: c.moe.dispatch == "dropless"),
    Choice("parallel.overlap_chunks", "pieces of each exchange/all-reduce, to overlap with compute",
           options=(1, 2, 4)),
    Choice("moe.bigmac_ratio", "BigMac: dispatch a ratio * d_model projection instead of d_model "
           "(0: off)", options=(0.0, 0.25, 0.5)),
)
CHOICES_BY_KEY = {c.key: c for c in CHOICES}
CHOICES_BY_NAME = {c.name: c for c in CHOICES}


def recipes_table(recipes=None) -> list:
    """One row per logical axis: its meaning and the mesh axes each recipe maps it to.

    Rows are `{"logical", "meaning", <recipe>: "expert*tensor" or "" (replicated), ...}`.
    """
    names = list(recipes or RECIPES)
    rows = []
    for logical, meaning in LOGICAL_AXES.items():
        row = {"logical": logical, "meaning": meaning}
        for r in names:
            row[r] = "*".join(mesh_axes_of(logical, recipe_rules(r)))
        rows.append(row)
    return rows


def _path(keys) -> str:
    return ".".join(str(k) for k in keys)


def spec_text(spec) -> str:
    """A PartitionSpec as text, e.g. "P(('expert', 'tensor'), 'fsdp', None)"."""
    return "P(" + ", ".join("None" if p is None else repr(p) if isinstance(p, str) else
                            "(" + ", ".join(repr(a) for a in p) + ")" for p in spec) + ")"


class ParallelismExplorer:
    """A mesh, a recipe and the dispatch knobs, as plain state; results cached per config.

    Attributes:
      base: the config the knobs apply to (a preset plus `base_overrides`).
      base_overrides: dotted overrides applied to `base` before the knobs.
      devices: the devices the mesh covers (all of them by default).
      values: choice key (`CHOICES`) -> value.
      cfg: the config the choices describe, or None while `error` is set.
      error: why the config cannot run (validate()'s message), or None.
    """

    def __init__(self, base: Config | str = "tiny", *, overrides=(), devices=None, **choices):
        self.devices = list(devices if devices is not None else jax.devices())
        self.base = preset(base) if isinstance(base, str) else base
        self.base_overrides = list(overrides)
        self.cfg, self.error = None, None
        self._cache, self._corpus = {}, {}
        try:
            self._start = apply_overrides(self.base, self.base_overrides)
        except ConfigError:
            self._start = self.base          # the error shows once the config is built below
        self.values = {key: self._field(self._start, key) for key in CHOICES_BY_KEY}
        self.set(**choices)

    # -- choices and the config ------------------------------------------------------------
    @staticmethod
    def _field(cfg: Config, key: str):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    def set(self, changes: dict | None = None, /, **choices) -> None:
        """Set choices by dotted key (`{"parallel.expert": 4}`) or short name (`expert=4`);
        an invalid combination leaves validate()'s message in `error`."""
        items = {**(changes or {}), **choices}
        for key, value in items.items():
            full = CHOICES_BY_NAME[key].key if key in CHOICES_BY_NAME else key
            if full not in CHOICES_BY_KEY:
                raise ValueError(f"{key!r} is not a choice of the parallelism explorer; choices: "
                                 f"{', '.join(CHOICES_BY_NAME)} (other fields go in `overrides`)")
            self.values[full] = value
        self._rebuild()

    def overrides(self) -> list:
        """The choices that differ from the base, as `--set` strings (after `base_overrides`)."""
        return [f"{k}={v}" for k, v in self.values.items() if v != self._field(self._start, k)]

    def _rebuild(self) -> None:
        self.cfg, self.error = config_or_error(
            self.base, [*self.base_overrides, *self.overrides()], len(self.devices))

    def choices(self) -> list:
        """The choices that matter for the current config (all of them while it is invalid)."""
        return [c for c in CHOICES if self.cfg is None or c.applies(self.cfg)]

    def options(self, key: str) -> tuple:
        """The values the widget offers for `key`: -1 and the divisors of the device count for
        a mesh axis, the choice's options otherwise; the current value is always among them."""
        n = len(self.devices)
        if key.split(".")[1] in MESH_AXES:
            opts = (-1, *(d for d in range(1, n + 1) if n % d == 0))
        else:
            opts = CHOICES_BY_KEY[key].options
        value = self.values[key]
        return opts if value in opts else (*opts, value)

    # -- the mesh ------------------------------------------------------------------------------
    def mesh_sizes(self) -> dict:
        """Mesh axis -> size (-1 resolved), or {} while the config is invalid."""
        return self.cfg.parallel.axis_sizes(len(self.devices)) if self.cfg else {}

    def split(self, logical: str) -> int:
        """How many ways the recipe splits logical axis `logical` on this mesh (1 if invalid)."""
        if self.cfg is None:
            return 1
        sizes = self.mesh_sizes()
        return math.prod(sizes[a] for a in mesh_axes_of(logical, rules_for(self.cfg.parallel)))

    def dispatch_groups(self) -> int:
        """The token groups an MoE layer dispatches: `moe.dispatch_groups`, or one per device
        of the `moe_batch` split (0 while the config is invalid)."""
        if self.cfg is None:
            return 0
        return self.cfg.moe.dispatch_groups or self.split("moe_batch")

    def summary(self) -> str:
        """One line on the mesh and what the recipe splits over it."""
        if self.cfg is None:
            return "fix the config to see its mesh"
        sizes = self.mesh_sizes()
        mesh = " x ".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "one device"
        parts = {"batch": "the batch", "embed": "model width (FSDP)", "heads": "heads (TP)",
                 "expert": "experts (EP)", "expert_mlp": "expert hidden (expert TP)",
                 "layers": "layers into stages (PP)", "seq": "sequences (CP/SP)",
                 "vocab": "the vocabulary"}
        split = ", ".join(f"{what} {self.split(name)} ways" for name, what in parts.items()
                          if self.split(name) > 1) or "nothing (every device holds everything)"
        return (f"mesh {mesh} ({len(self.devices)} devices), recipe {self.cfg.parallel.recipe}: "
                f"splits {split}; {self.dispatch_groups()} MoE dispatch groups")

    # -- results, cached per config -------------------------------------------------------------
    def cached(self, name: str):
        """A result already computed for the current config, or None (nothing is computed)."""
        return self._cache.get((name, self.cfg)) if self.cfg is not None else None

    def _memo(self, name: str, compute: Callable):
        if self.cfg is None:
            return None
        key = (name, self.cfg)
        if key not in self._cache:
            self._cache[key] = compute(self.cfg)
        return self._cache[key]

    def sharding_table(self) -> list | None:
        """Per model parameter: `{path, shape, logical, spec, shard, split, bytes}` where
        `shard` is one device's shape and `bytes` one device's bytes (None while invalid)."""
        def compute(cfg):
            mesh = make_mesh(cfg.parallel, self.devices)
            rows = []
            for keys, var in nnx.to_flat_state(abstract_state(cfg, mesh)[0]):
                x = var.get_value()
                shard = tuple(x.sharding.shard_shape(x.shape))
                names = var.get_metadata().get("logical_axes")
                rows.append({"path": _path(keys), "kind": type(var).__name__, "shape": tuple(x.shape),
                             "logical": tuple(names) if names is not None else (),
                             "spec": spec_text(x.sharding.spec), "shard": shard,
                             "split": math.prod(x.shape) // max(1, math.prod(shard)),
                             "bytes": math.prod(shard) * np.dtype(x.dtype).itemsize})
            return rows
        return self._memo("sharding_table", compute)

    def inspect(self) -> dict | None:
        """`inspect_train_step`: the compiled train step's memory and collectives per device."""
        return self._memo("inspect", lambda cfg: inspect_train_step(cfg, self.devices))

    def communication(self) -> list | None:
        """`communication_check` rows: HLO bytes of one block's exchange vs the formulas."""
        return self._memo("communication", lambda cfg: communication_check(cfg, self.devices))

    def single_device_config(self) -> Config:
        """The config whose one-device run must equal the mesh's: every axis 1, and with
        capacity dispatch, the mesh's dispatch groups (capacity is counted per group)."""
        cfg = self.cfg
        moe = cfg.moe
        if moe.dispatch == "capacity":
            moe = dataclasses.replace(moe, dispatch_groups=self.dispatch_groups())
        parallel = dataclasses.replace(cfg.parallel, data=1, fsdp=1, tensor=1, expert=1, pipeline=1,
                                       sequence=1, virtual_stages=1, sequence_parallel=False)
        return dataclasses.replace(cfg, moe=moe, parallel=parallel)

    def schedule(self):
        """The pipeline schedule's timeline for the current config (`toolkit.sharding.
        schedules.Timeline`: ops per tick, bubble fraction), or None without a pipeline."""
        if self.cfg is None or self.cfg.parallel.pipeline == 1:
            return None
        par = self.cfg.parallel
        return timeline(par.schedule, par.pipeline, self.cfg.train.microbatches, par.virtual_stages)

    def equivalence(self) -> dict | None:
        """Loss and gradients of the first train batch on the mesh and on one device:
        `{loss_mesh, loss_single, loss_diff, grad_diff, grads: [{path, max_abs_diff, max_abs}],
        dispatch_groups, single_dispatch_groups}` with the largest absolute differences (None
        while invalid); `single_dispatch_groups` is the one-device run's `moe.dispatch_groups`."""
        def compute(cfg):
            single = self.single_device_config()
            loss_m, grads_m = self._loss_and_grads(cfg, self.devices)
            loss_1, grads_1 = self._loss_and_grads(single, self.devices[:1], stack_as=cfg)
            grads = [{"path": path, "max_abs_diff": float(np.max(np.abs(g - grads_1[path]), initial=0)),
                      "max_abs": float(np.max(np.abs(grads_1[path]), initial=0))}
                     for path, g in grads_m.items()]
            return {"loss_mesh": loss_m, "loss_single": loss_1, "loss_diff": abs(loss_m - loss_1),
                    "grad_diff": max((g["max_abs_diff"] for g in grads), default=0.0),
                    "grads": grads, "dispatch_groups": self.dispatch_groups(),
                    "single_dispatch_groups": single.moe.dispatch_groups}
        return self._memo("equivalence", compute)

    def _loss_and_grads(self, cfg: Config, devices, stack_as: Config | None = None) -> tuple:
        """(loss, {parameter path: gradient}) of train batch 0, on `devices`; with `stack_as`
        a pipelined config, the blocks' gradients in its stacked layout."""
        if cfg.data not in self._corpus:
            self._corpus[cfg.data] = load_corpus(cfg.data)
        loss, grads, _ = loss_and_grads(cfg, devices, self._corpus[cfg.data])
        tree = nnx.to_pure_dict(grads)
        if stack_as is not None and stack_as.parallel.pipeline > 1:
            tree = stacked_blocks_state(tree, stack_as.parallel.virtual_stages, stack_as.parallel.pipeline)
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return loss, {_path(k.key for k in keys): np.asarray(v) for keys, v in flat}

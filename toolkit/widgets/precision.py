"""The precision explorer's state: a trained model's tensors under a chosen number format.

A `PrecisionExplorer` is plain Python that tests drive without a browser; the widget
(`PrecisionExplorerView`) renders it and forwards knob changes. Knobs pick a format by
name (`toolkit.precision.FORMATS`) and override its block size, UE8M0 scale rule and
integer clipping, plus a Hadamard rotation block. A bad knob never raises: it leaves a
message in `error` (knob, value, values that work) and the views keep the last good one.

    ex = PrecisionExplorer("tiny", overrides=["train.steps=100"])
    ex.train()                                   # trains, then captures weights and activations
    ex.set(format="nvint4", rotation=16)
    ex.histogram("acts", "experts")              # values / their block scale, and the element grid
    ex.qsnr_rows()                               # per tensor class, with and without rotation
    ex.loss_impact()                             # validation loss: full precision vs this format
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from toolkit.analysis.precision import inference_policy, model_tensors, policy_losses, qsnr_table
from toolkit.config import Config, ConfigError, apply_overrides, preset, validate
from toolkit.precision import FORMATS, get_format, quantize, rotate
from toolkit.precision.formats import ELEMENTS, grouped, round_to_element
from toolkit.training import Trainer

SCALE_RULES = ("ceil", "floor")
ROTATIONS = (0, 16, 32, 64, 128)


def element_grid(element: str) -> np.ndarray:
    """Every non-negative value of an element type, ascending."""
    kind, _, _, vmax, _ = ELEMENTS[element]
    if kind == "int":
        return np.arange(0, vmax + 1, dtype=np.float32)
    if element == "bf16":
        raise ValueError("bf16 has 2^15 values; pick an 8-bit or narrower format")
    fine = np.linspace(0, vmax, 1 << 16, dtype=np.float32)
    return np.unique(np.asarray(round_to_element(fine, element)))


@dataclasses.dataclass
class PrecisionExplorer:
    """Knobs and the captured tensors of one model.

    Attributes:
      cfg: the model's config (a preset plus overrides).
      format: a format name from `FORMATS`.
      block: values per scale; 0 keeps the format's own block.
      scale_rule: UE8M0 scale rounding, "ceil" or "floor" (OCP).
      symmetric: integer elements clip to +-(2^(b-1)-1).
      rotation: Hadamard block before quantizing (0: none).
      error: the last knob problem, "" when the knobs are valid.
    """

    cfg: Config
    format: str = "mxint8"
    block: int = 0
    scale_rule: str = "ceil"
    symmetric: bool = True
    rotation: int = 0
    error: str = ""
    model: object = None
    batches: list = dataclasses.field(default_factory=list)
    tensors: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_preset(cls, name: str = "tiny", overrides=(), **knobs) -> "PrecisionExplorer":
        ex = cls(cfg=apply_overrides(preset(name), list(overrides)))
        ex.set(**knobs)
        return ex

    def set(self, **knobs) -> bool:
        """Change knobs; on a bad value keep the old ones and explain in `error`."""
        trial = dataclasses.replace(self, **knobs)
        problem = trial._problem()
        if problem:
            self.error = problem
            return False
        for key, value in knobs.items():
            setattr(self, key, value)
        self.error = ""
        return True

    def _problem(self) -> str:
        if self.format not in FORMATS:
            return f"format={self.format!r} is unknown; use one of {', '.join(FORMATS)}"
        if self.scale_rule not in SCALE_RULES:
            return f"scale_rule={self.scale_rule!r} is unknown; use one of {SCALE_RULES}"
        if self.rotation not in ROTATIONS:
            return f"rotation={self.rotation} is not offered; use one of {ROTATIONS}"
        if self.block < 0 or (self.block and FORMATS[self.format].scaling not in ("block", "block2d")):
            return (f"block={self.block} applies to block formats only ({self.format!r} scales per "
                    f"{FORMATS[self.format].scaling}); use 0")
        try:                     # the policy `loss_impact` runs must fit the model's widths
            validate(dataclasses.replace(self.cfg, precision=inference_policy(
                self.spec(), rotation=self.rotation)))
        except ConfigError as e:
            return str(e).replace("invalid config:\n  ", "")
        return ""

    def spec(self) -> str:
        """The format the knobs describe, as a name `get_format` and configs accept."""
        base = get_format(self.format)
        changes = [f"block={self.block}"] if self.block and self.block != base.block else []
        if base.scale == "ue8m0" and self.scale_rule != base.scale_rule:
            changes.append(f"scale_rule={self.scale_rule}")
        if base.is_int and self.symmetric != base.symmetric:
            changes.append(f"symmetric={str(self.symmetric).lower()}")
        return ",".join([self.format, *changes])

    def number_format(self):
        """The `NumberFormat` the knobs describe."""
        return get_format(self.spec())

    # -- the model ------------------------------------------------------------------------
    def train(self, steps: int | None = None, devices=None) -> dict:
        """Train `cfg` (full precision) for `steps` and capture its tensors."""
        cfg = self.cfg if steps is None else apply_overrides(self.cfg, [f"train.steps={steps}"])
        trainer = Trainer(cfg, devices=devices or jax.devices()[:1], progress=False)
        summary = trainer.run()
        self.use_model(trainer.model(), [b for _, b in trainer.batches.validation(1)])
        return summary

    def use_model(self, model, batches) -> None:
        """Explore `model` (e.g. a trained `Transformer`) on validation `batches`."""
        self.model, self.batches = model, list(batches)
        self.cfg = model.cfg
        self.tensors = model_tensors(model, self.batches[0]["tokens"])

    # -- the views ------------------------------------------------------------------------
    def classes(self, kind: str = "acts") -> list:
        return sorted(self.tensors.get(kind, {}))

    def histogram(self, kind: str, cls: str) -> dict:
        """`{"scaled": values / their scale (element units), "grid": the element's
        non-negative values, "qmax"}` for the tensors of `kind` ("weights"/"acts") `cls`."""
        fmt = self.number_format()
        x = np.concatenate([a.reshape(-1, a.shape[-1]) for a in self.tensors[kind][cls]])
        if self.rotation:
            x = np.asarray(rotate(x, self.rotation))
        q = quantize(x, fmt)
        view = np.asarray(grouped(jnp.asarray(x), fmt, 1)[0])    # the groups the scales cover
        v = (view / np.asarray(q.scales)).reshape(-1)
        v = v[v != 0]                                              # block padding
        rotated = f", rotated {self.rotation}" if self.rotation else ""
        return {"scaled": v, "grid": element_grid(fmt.element), "qmax": fmt.qmax,
                "title": f"{kind} {cls} in {fmt.name}{rotated}"}

    def qsnr_rows(self) -> list:
        """QSNR per tensor class in the current format, without and with the rotation."""
        rotations = (0, self.rotation) if self.rotation else (0,)
        return qsnr_table(self.tensors, [self.number_format()], rotations=rotations)

    def loss_impact(self, kv_cache: str = "") -> dict:
        """Validation loss in full precision and with weights and activations of the
        attention, MLP and expert matmuls (and optionally the KV cache) in this format."""
        spec = self.spec()
        name = f"W+A {spec}" + (f", rotation {self.rotation}" if self.rotation else "")
        return policy_losses(self.model, self.batches,
                             {name: inference_policy(spec, rotation=self.rotation, kv_cache=kv_cache)})

"""How a trained model's real tensors survive low-bit formats, and what the loss says.

Weights come from the model's state, activations from running it on corpus tokens with
every matmul input captured (`toolkit.precision.capture_inputs`); both are grouped by
matmul class and laid out as rows along the contraction axis K, so any format quantizes
them as its matmul would:

    tensors = model_tensors(model, tokens_bt)                # {"weights": {cls: [..]}, "acts": ..}
    rows = qsnr_table(tensors, ["mxint8", "mxfp8", "nvfp4"], rotations=(0, 32))
    losses = policy_losses(model, batches, {"W8A8 mxint8": inference_policy("mxint8")})

`qsnr_table` reports, per class and format, the QSNR over all tensors of the class
(`10 log10(sum |x|^2 / sum |x - x_q|^2)`) and their mean block crest factor.
`policy_losses` evaluates the validation loss under each inference precision policy
(weights and activations cast directly, no retraining) next to full precision.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from toolkit.config import PrecisionConfig
from toolkit.precision.fake_quant import capture_inputs
from toolkit.precision.formats import crest_factor, get_format, quantize_dequantize
from toolkit.precision.rotation import rotate

_WEIGHT_CLASS = {"attn": "attention", "experts": "experts", "shared": "experts", "router": "router",
                 "unembed": "head"}


def _class_of(path) -> str | None:
    keys = [str(k) for k in path]
    for key, cls in _WEIGHT_CLASS.items():
        if key in keys:
            return cls
    if "ffn" in keys and keys[-1] in ("w_gate", "w_up", "w_down"):
        return "mlp"
    return None


def _rows_k(path, w) -> np.ndarray:
    """Weight as `[rows, K]`: K (the axis the matmul contracts) last."""
    w = np.asarray(w, np.float32)
    name = str(path[-1])
    if w.ndim == 3 and name in ("w_gate", "w_up", "w_down"):          # experts [E, K, N]
        return np.swapaxes(w, 1, 2).reshape(-1, w.shape[1])
    if name == "w_o":                                                 # [n, h, d]: K = n*h
        return w.reshape(-1, w.shape[-1]).T
    return w.reshape(w.shape[0], -1).T                                # [K, ...]


def weight_tensors(model) -> dict:
    """{class: [w `[rows, K]`]} for the model's matmul weights (listed layout); the tied
    embedding table counts as the head when there is no separate unembedding."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        cls = _class_of(path)
        if cls is not None and np.ndim(var[...]) >= 2:
            out.setdefault(cls, []).append(_rows_k(path, var[...]))
    if "head" not in out:
        out["head"] = [np.asarray(model.embed.table[...], np.float32)]
    return out


def activation_tensors(model, tokens_bt) -> dict:
    """{class: [x `[rows, K]`]}: the inputs of each matmul class (and "kv": keys and
    values per head) on `tokens_bt`, in full precision."""
    graphdef, state = nnx.split(model)
    with capture_inputs() as store:
        jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, jnp.asarray(tokens_bt))
        jax.effects_barrier()
    out = {}
    for cls, arrays in store.items():
        rows = [a.reshape(-1, a.shape[-1]) for a in arrays]
        out[cls] = [r[np.any(r != 0, axis=-1)] for r in rows]        # drop unrouted rows
    return out


def model_tensors(model, tokens_bt) -> dict:
    return {"weights": weight_tensors(model), "acts": activation_tensors(model, tokens_bt)}


@functools.partial(jax.jit, static_argnums=(1, 2))
def _sums(x, fmt, rotation: int):
    """(|x|^2, |x - x_q|^2) after an optional rotation, compiled once per shape and format."""
    if rotation:
        x = rotate(x, rotation, axis=-1)
    e = x - quantize_dequantize(x, fmt, -1)
    return jnp.sum(x * x), jnp.sum(e * e)


def _qsnr_of(arrays, fmt, rotation: int) -> tuple:
    sig = err = 0.0
    crests = []
    g = fmt.block if fmt.scaling == "block" else 32
    for x in arrays:
        s, e = _sums(jnp.asarray(x), fmt, rotation)
        sig, err = sig + float(s), err + float(e)
        if x.shape[-1] % g == 0:
            crests.append(crest_factor(rotate(x, rotation) if rotation else x, g))
    return 10 * np.log10(sig / max(err, 1e-30)), float(np.mean(crests)) if crests else float("nan")


def qsnr_table(tensors: dict, formats, rotations=(0,)) -> list:
    """Rows `{kind, class, format, rotation, qsnr_db, crest}` for every tensor class of
    `tensors` (from `model_tensors`), format (names or `NumberFormat`s) and rotation block
    (0: none). A rotation that does not divide a class's K is skipped for that class."""
    rows = []
    for kind, classes in tensors.items():
        for cls, arrays in sorted(classes.items()):
            for fmt in formats:
                fmt = get_format(fmt)
                for g in rotations:
                    if g and any(a.shape[-1] % g for a in arrays):
                        continue
                    db, crest = _qsnr_of(arrays, fmt, g)
                    rows.append({"kind": kind, "class": cls, "format": fmt.name, "rotation": g,
                                 "qsnr_db": float(db), "crest": crest})
    return rows


def inference_policy(fmt: str, classes=("attention", "mlp", "experts"), *, kv_cache: str = "",
                     rotation: int = 0) -> PrecisionConfig:
    """Weights and activations of `classes` in `fmt` (direct cast), gradients untouched."""
    return PrecisionConfig.on(classes, weights=fmt, acts=fmt, kv_cache=kv_cache, rotation=rotation,
                              mode="fake")


def policy_losses(model, batches, policies: dict) -> dict:
    """{name: validation CE (nats/token)} of `model` under each `PrecisionConfig` in
    `policies`, plus "full precision"; `batches` are dicts with "tokens" and "targets"."""
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    out = {}
    for name, pc in {"full precision": PrecisionConfig(), **policies}.items():
        view = nnx.merge(graphdef, state)
        view.cfg = dataclasses.replace(cfg, precision=pc)
        g, s = nnx.split(view)

        @jax.jit
        def ce(s, tokens, targets, g=g):
            logits = nnx.merge(g, s)(tokens)[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        out[name] = float(np.mean([ce(s, jnp.asarray(b["tokens"]), jnp.asarray(b["targets"]))
                                   for b in batches]))
    return out

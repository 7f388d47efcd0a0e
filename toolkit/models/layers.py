"""Building blocks: parameters with logical axis names, RMSNorm, embeddings, RoPE, SwiGLU.

Every parameter is created through `param`, which records its logical axis names as
Variable metadata; `toolkit.sharding.state_shardings` turns those into shardings.

    w = param(rngs, (d_model, d_ff), ("embed", "mlp"))    # nnx.Param, fan-in scaled normal
    y_btd = SwiGLU(d_model, d_ff, rngs=rngs)(x_btd)
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from toolkit.precision.fake_quant import linear, quantize_weight
from toolkit.sharding.rules import constrain
from toolkit.sharding.tensor_parallel import psum_if, tensor_parallel


def param(rngs: nnx.Rngs, shape, names, *, fan_in=None, scale=1.0) -> nnx.Param:
    """A float32 parameter ~ N(0, scale^2 / fan_in) carrying `logical_axes=names`."""
    fan_in = fan_in if fan_in is not None else shape[0]
    std = scale / jnp.sqrt(fan_in)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                     logical_axes=tuple(names))


def rms_norm(x, scale, eps: float):
    """x / rms(x) * scale over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(None,))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class Embed(nnx.Module):
    """Token embedding table `[vocab, d]` (its transpose is the output projection when
    `model.tie_embeddings`)."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.table = param(rngs, (vocab, dim), ("vocab", "embed"), fan_in=1)

    def __call__(self, ids_bt, dtype):
        table_vd = constrain(self.table[...].astype(dtype), ("vocab", None))  # gather FSDP shards
        return jnp.take(table_vd, ids_bt, axis=0)


def rope(x_bthk, positions_bt, theta: float):
    """Rotary position embedding over the last axis (split-half convention)."""
    half = x_bthk.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_bth = positions_bt[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_bth)[:, :, None, :], jnp.cos(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_bthk.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthk.dtype)


class SwiGLU(nnx.Module):
    """Dense gated MLP: (silu(x W_gate) * x W_up) W_down; on a mesh, column- then
    row-parallel over the tensor axis with one all-reduce (`tensor_parallel`)."""

    def __init__(self, d_model: int, d_ff: int, *, tp_chunks: int = 1, kind: str = "mlp",
                 rngs: nnx.Rngs):
        """`tp_chunks`: token pieces per device under tensor parallelism, each with its own
        all-reduce (`parallel.overlap_chunks`); `kind`: the matmul class whose precision
        formats apply ("mlp", or "experts" for shared experts)."""
        self.tp_chunks, self.kind = tp_chunks, kind
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"))
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"))
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"))

    def __call__(self, x):
        dt, kind = x.dtype, self.kind
        weights = [(quantize_weight(self.w_gate[...].astype(dt), kind), ("embed", "mlp")),
                   (quantize_weight(self.w_up[...].astype(dt), kind), ("embed", "mlp")),
                   (quantize_weight(self.w_down[...].astype(dt), kind), ("mlp", "embed"))]
        return tensor_parallel(functools.partial(_swiglu, kind=kind), x, weights, split="mlp",
                               chunks=self.tp_chunks)


def _swiglu(x, w_gate, w_up, w_down, *, kind, tensor_axis):
    """One device's hidden slice: w_gate, w_up `[d, F_local]`, w_down `[F_local, d]`."""
    h = jax.nn.silu(linear(x, w_gate, kind)) * linear(x, w_up, kind)
    return psum_if(linear(h, w_down, kind), tensor_axis)

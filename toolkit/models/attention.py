"""Causal grouped-query attention with RoPE.

`num_heads` query heads share `num_kv_heads` key/value heads (GQA); with equal counts
it is multi-head attention, with one kv head multi-query attention. The attention itself
goes through `pallas_kernels.flash_attention`: Pallas flash attention on GPU and TPU,
`jax.nn.dot_product_attention` on CPU, or the backend named by `impl`
(`KernelConfig.attention`).

Two projection options that Hugging Face MoE checkpoints use: `model.attention_bias` adds
biases to the q, k and v projections (Qwen2-MoE), and `model.qk_norm` RMS-normalises the
queries and keys before RoPE, either each head over head_dim ("head", Qwen3-MoE) or the
whole projection over heads * head_dim ("full", OLMoE). `_project_qkv` is the one place
where q, k and v are made.

    attn = Attention(cfg.model, rngs=nnx.Rngs(0))
    y_btd = attn(x_btd, positions_bt)

On a mesh the heads are split over the tensor-parallel axis (Megatron): each device
attends with its own query heads and their kv heads, and one all-reduce adds the output
projections (`toolkit.sharding.tensor_parallel`).

Generation (`toolkit.generation`) attends over a `KVCache` instead: `cached` projects the
new tokens with the same `_project_qkv`, writes their keys and values at their positions
into the preallocated cache `[B, max_len, K, h]`, and lets a query at position i see the
cached keys at positions <= i. Fixed shapes, so one compiled step serves every position;
it runs on one device (no mesh). `__call__` is untouched by it.

    cache = KVCache.zeros(batch, max_len, cfg.model, jnp.float32)
    y_btd, cache = attn.cached(x_btd, positions_bt, cache)    # positions: where x's tokens sit
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pallas_kernels import flash_attention
from toolkit.config import ModelConfig
from toolkit.models.layers import param, rms_norm, rope
from toolkit.precision.fake_quant import linear, quantize_kv, quantize_weight
from toolkit.sharding.context_parallel import context_attention
from toolkit.sharding.tensor_parallel import psum_if, tensor_parallel


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, impl: str = "", tp_chunks: int = 1,
                 context: str = "ring", rngs: nnx.Rngs):
        """`impl`: the flash-attention backend; `tp_chunks`: token pieces per device under
        tensor parallelism, each with its own all-reduce (`parallel.overlap_chunks`);
        `context`: context-parallel attention when sequences are split ("ring" or
        "all_gather", `parallel.context`)."""
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.w_q = param(rngs, (d, n, h), ("embed", "heads", "kv"))
        self.w_k = param(rngs, (d, k, h), ("embed", "kv_heads", "kv"))
        self.w_v = param(rngs, (d, k, h), ("embed", "kv_heads", "kv"))
        self.w_o = param(rngs, (n, h, d), ("heads", "kv", "embed"), fan_in=n * h)
        zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
        self.b_q = _const(zeros, (n, h), ("heads", "kv")) if cfg.attention_bias else None
        self.b_k = _const(zeros, (k, h), ("kv_heads", "kv")) if cfg.attention_bias else None
        self.b_v = _const(zeros, (k, h), ("kv_heads", "kv")) if cfg.attention_bias else None
        full = cfg.qk_norm == "full"
        self.q_norm = (_const(ones, (n, h) if full else (h,), ("heads", "kv") if full else ("kv",))
                       if cfg.qk_norm else None)
        self.k_norm = (_const(ones, (k, h) if full else (h,), ("kv_heads", "kv") if full else ("kv",))
                       if cfg.qk_norm else None)
        self.qk_norm, self.norm_eps = cfg.qk_norm, cfg.norm_eps
        self.rope_theta = cfg.rope_theta
        self.impl = impl or None
        self.tp_chunks = tp_chunks
        self.context = context

    def _weights(self, dt):
        """The (quantized) projections, then the biases and norm scales present, each with its
        logical names; and the names of those extras, in the order they follow."""
        weights = [(_quantized(self.w_q[...].astype(dt), 1), ("embed", "heads", "kv")),
                   (_quantized(self.w_k[...].astype(dt), 1), ("embed", "kv_heads", "kv")),
                   (_quantized(self.w_v[...].astype(dt), 1), ("embed", "kv_heads", "kv")),
                   (_quantized(self.w_o[...].astype(dt), 2), ("heads", "kv", "embed"))]
        full = self.qk_norm == "full"
        names = [name for name in ("b_q", "b_k", "b_v", "q_norm", "k_norm")
                 if getattr(self, name) is not None]
        # Logical names spelled out: under a pipeline the variables' own carry stage axes.
        axes = {"b_q": ("heads", "kv"), "b_k": ("kv_heads", "kv"), "b_v": ("kv_heads", "kv"),
                "q_norm": ("heads", "kv") if full else ("kv",),
                "k_norm": ("kv_heads", "kv") if full else ("kv",)}
        weights += [(getattr(self, name)[...].astype(dt), axes[name]) for name in names]
        return weights, tuple(names)

    def __call__(self, x_btd, positions_bt):
        weights, names = self._weights(x_btd.dtype)
        local = functools.partial(_attention, theta=self.rope_theta, impl=self.impl,
                                  context=self.context, extras=names, qk_norm=self.qk_norm,
                                  eps=self.norm_eps)
        return tensor_parallel(local, x_btd, weights, split=("heads", "kv_heads"),
                               extra=(positions_bt,), chunks=self.tp_chunks, sequence_axis=True)

    def cached(self, x_btd, positions_bt, cache: "KVCache"):
        """`(y_btd, cache)`: attention of the tokens `x_btd` at `positions_bt` (int [B, S])
        over every cached position up to their own, their keys and values written into the
        cache first. One device, no mesh."""
        weights, names = self._weights(x_btd.dtype)
        return _cached_attention(x_btd, positions_bt, cache, *(w for w, _ in weights),
                                 theta=self.rope_theta, extras=names, qk_norm=self.qk_norm,
                                 eps=self.norm_eps)


@struct.dataclass
class KVCache:
    """One layer's keys and values for generation, preallocated to the whole length.

    Attributes:
      k_blkh: [B, max_len, K, h] keys (biased, normed and rotated as attention uses them).
      v_blkh: [B, max_len, K, h] values.
    """

    k_blkh: jax.Array
    v_blkh: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, cfg: ModelConfig, dtype) -> "KVCache":
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(k_blkh=jnp.zeros(shape, dtype), v_blkh=jnp.zeros(shape, dtype))


def _quantized(w, k_dims: int):
    """`w` under the "attention" formats, its first `k_dims` axes flattened as the K axis."""
    return quantize_weight(w.reshape(math.prod(w.shape[:k_dims]), -1), "attention").reshape(w.shape)


def _const(init, shape, names) -> nnx.Param:
    """A float32 parameter `init(shape)` (zeros for biases, ones for norm scales)."""
    return nnx.Param(init(None, shape, jnp.float32), logical_axes=tuple(names))


def _project_qkv(x_btd, positions_bt, w_q, w_k, w_v, *, theta, qk_norm, eps, tensor_axis,
                 b_q=None, b_k=None, b_v=None, q_norm=None, k_norm=None):
    """Queries and keys (biased, normed, rotated) and values of one device's heads:
    q `[B, S, N_local, h]`, k and v `[B, S, K_local, h]`."""
    q_btnh = linear(x_btd, w_q, "attention")
    k_btkh = linear(x_btd, w_k, "attention")
    v_btkh = linear(x_btd, w_v, "attention")
    if b_q is not None:
        q_btnh, k_btkh, v_btkh = q_btnh + b_q, k_btkh + b_k, v_btkh + b_v
    if qk_norm == "head":
        q_btnh, k_btkh = rms_norm(q_btnh, q_norm, eps), rms_norm(k_btkh, k_norm, eps)
    elif qk_norm == "full":
        q_btnh = _full_rms_norm(q_btnh, q_norm, eps, tensor_axis)
        k_btkh = _full_rms_norm(k_btkh, k_norm, eps, tensor_axis)
    q_btnh = rope(q_btnh, positions_bt, theta)
    k_btkh = quantize_kv(rope(k_btkh, positions_bt, theta))
    return q_btnh, k_btkh, quantize_kv(v_btkh)


def _full_rms_norm(x_btnh, scale_nh, eps, tensor_axis):
    """RMSNorm of each token over all heads * head_dim, in float32; the heads may be split
    over `tensor_axis`, so the sum of squares is added over it."""
    x32 = x_btnh.astype(jnp.float32)
    n_total = x_btnh.shape[-2] * (jax.lax.psum(1, tensor_axis) if tensor_axis else 1)
    sq_bt = psum_if(jnp.sum(x32 * x32, axis=(-2, -1), keepdims=True), tensor_axis)
    y = x32 * jax.lax.rsqrt(sq_bt / (n_total * x_btnh.shape[-1]) + eps)
    return (y * scale_nh).astype(x_btnh.dtype)


def _attention(x_btd, positions_bt, w_q, w_k, w_v, w_o, *extra, theta, impl, context, extras,
               qk_norm, eps, tensor_axis, sequence_axis):
    """Attention on one device's heads: x `[B, S, d]`, w_q `[d, N_local, h]`, w_k, w_v
    `[d, K_local, h]`, w_o `[N_local, h, d]`, then the arrays named in `extras` (biases, norm
    scales); the output projections summed over devices. With `sequence_axis`, x holds
    `[B, S/n, d]` pieces and attention is context-parallel."""
    q_btnh, k_btkh, v_btkh = _project_qkv(
        x_btd, positions_bt, w_q, w_k, w_v, theta=theta, qk_norm=qk_norm, eps=eps,
        tensor_axis=tensor_axis, **dict(zip(extras, extra, strict=True)))
    if sequence_axis:
        o_btnh = context_attention(q_btnh, k_btkh, v_btkh, sequence_axis, context)
    else:
        o_btnh = flash_attention(q_btnh, k_btkh, v_btkh, causal=True, impl=impl)
    b, t, n, h = o_btnh.shape
    return psum_if(linear(o_btnh.reshape(b, t, n * h), w_o.reshape(n * h, -1), "attention"),
                   tensor_axis)


def _cached_attention(x_btd, positions_bt, cache: KVCache, w_q, w_k, w_v, w_o, *extra, theta,
                      extras, qk_norm, eps):
    """`_attention` over a cache on one device: project x `[B, S, d]`, write k and v at
    `positions_bt` into the cache `[B, L, K, h]`, attend each query to the cached keys at
    positions <= its own (GQA: query head n reads kv head n // (N/K)), project out."""
    q_btnh, k_btkh, v_btkh = _project_qkv(
        x_btd, positions_bt, w_q, w_k, w_v, theta=theta, qk_norm=qk_norm, eps=eps,
        tensor_axis=None, **dict(zip(extras, extra, strict=True)))
    rows_b1 = jnp.arange(x_btd.shape[0])[:, None]
    cache = KVCache(k_blkh=cache.k_blkh.at[rows_b1, positions_bt].set(k_btkh.astype(cache.k_blkh.dtype)),
                    v_blkh=cache.v_blkh.at[rows_b1, positions_bt].set(v_btkh.astype(cache.v_blkh.dtype)))
    b, s, n, h = q_btnh.shape
    kv, max_len = cache.k_blkh.shape[2], cache.k_blkh.shape[1]
    q_btkgh = q_btnh.reshape(b, s, kv, n // kv, h)
    scores_bkgtl = jnp.einsum("btkgh,blkh->bkgtl", q_btkgh, cache.k_blkh,
                              preferred_element_type=jnp.float32) / math.sqrt(h)
    visible_btl = jnp.arange(max_len)[None, None, :] <= positions_bt[:, :, None]
    scores_bkgtl = jnp.where(visible_btl[:, None, None], scores_bkgtl, -jnp.inf)
    p_bkgtl = jax.nn.softmax(scores_bkgtl, axis=-1).astype(cache.v_blkh.dtype)
    o_btnh = jnp.einsum("bkgtl,blkh->btkgh", p_bkgtl, cache.v_blkh).reshape(b, s, n * h)
    return linear(o_btnh.astype(x_btd.dtype), w_o.reshape(n * h, -1), "attention"), cache

"""Causal grouped-query attention with RoPE.

`num_heads` query heads share `num_kv_heads` key/value heads (GQA); with equal counts
it is multi-head attention, with one kv head multi-query attention. The attention itself
goes through `pallas_kernels.flash_attention`: Pallas flash attention on GPU and TPU,
`jax.nn.dot_product_attention` on CPU, or the backend named by `impl`
(`KernelConfig.attention`).

    attn = Attention(cfg.model, rngs=nnx.Rngs(0))
    y_btd = attn(x_btd, positions_bt)

On a mesh the heads are split over the tensor-parallel axis (Megatron): each device
attends with its own query heads and their kv heads, and one all-reduce adds the output
projections (`toolkit.sharding.tensor_parallel`).
"""

import functools
import math

from flax import nnx

from pallas_kernels import flash_attention
from toolkit.config import ModelConfig
from toolkit.models.layers import param, rope
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
        self.rope_theta = cfg.rope_theta
        self.impl = impl or None
        self.tp_chunks = tp_chunks
        self.context = context

    def __call__(self, x_btd, positions_bt):
        dt = x_btd.dtype
        weights = [(_quantized(self.w_q[...].astype(dt), 1), ("embed", "heads", "kv")),
                   (_quantized(self.w_k[...].astype(dt), 1), ("embed", "kv_heads", "kv")),
                   (_quantized(self.w_v[...].astype(dt), 1), ("embed", "kv_heads", "kv")),
                   (_quantized(self.w_o[...].astype(dt), 2), ("heads", "kv", "embed"))]
        local = functools.partial(_attention, theta=self.rope_theta, impl=self.impl,
                                  context=self.context)
        return tensor_parallel(local, x_btd, weights, split=("heads", "kv_heads"),
                               extra=(positions_bt,), chunks=self.tp_chunks, sequence_axis=True)


def _quantized(w, k_dims: int):
    """`w` under the "attention" formats, its first `k_dims` axes flattened as the K axis."""
    return quantize_weight(w.reshape(math.prod(w.shape[:k_dims]), -1), "attention").reshape(w.shape)


def _attention(x_btd, positions_bt, w_q, w_k, w_v, w_o, *, theta, impl, context, tensor_axis,
               sequence_axis):
    """Attention on one device's heads: x `[B, S, d]`, w_q `[d, N_local, h]`, w_k, w_v
    `[d, K_local, h]`, w_o `[N_local, h, d]`; the output projections summed over devices.
    With `sequence_axis`, x holds `[B, S/n, d]` pieces and attention is context-parallel."""
    q_btnh = rope(linear(x_btd, w_q, "attention"), positions_bt, theta)
    k_btkh = quantize_kv(rope(linear(x_btd, w_k, "attention"), positions_bt, theta))
    v_btkh = quantize_kv(linear(x_btd, w_v, "attention"))
    if sequence_axis:
        o_btnh = context_attention(q_btnh, k_btkh, v_btkh, sequence_axis, context)
    else:
        o_btnh = flash_attention(q_btnh, k_btkh, v_btkh, causal=True, impl=impl)
    b, t, n, h = o_btnh.shape
    return psum_if(linear(o_btnh.reshape(b, t, n * h), w_o.reshape(n * h, -1), "attention"),
                   tensor_axis)

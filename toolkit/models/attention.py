"""Causal grouped-query attention with RoPE.

`num_heads` query heads share `num_kv_heads` key/value heads (GQA); with equal counts
it is multi-head attention, with one kv head multi-query attention. The attention itself
goes through `pallas_kernels.flash_attention`: Pallas flash attention on GPU and TPU,
`jax.nn.dot_product_attention` on CPU, or the backend named by `impl`
(`KernelConfig.attention`).

    attn = Attention(cfg.model, rngs=nnx.Rngs(0))
    y_btd = attn(x_btd, positions_bt)
"""

import jax.numpy as jnp
from flax import nnx

from pallas_kernels import flash_attention
from toolkit.config import ModelConfig
from toolkit.models.layers import param, rope


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, impl: str = "", rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.w_q = param(rngs, (d, n, h), ("embed", "heads", "kv"))
        self.w_k = param(rngs, (d, k, h), ("embed", "kv_heads", "kv"))
        self.w_v = param(rngs, (d, k, h), ("embed", "kv_heads", "kv"))
        self.w_o = param(rngs, (n, h, d), ("heads", "kv", "embed"), fan_in=n * h)
        self.rope_theta = cfg.rope_theta
        self.impl = impl or None

    def __call__(self, x_btd, positions_bt):
        dt = x_btd.dtype
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.w_q[...].astype(dt))
        k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.w_k[...].astype(dt))
        v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.w_v[...].astype(dt))
        q_btnh = rope(q_btnh, positions_bt, self.rope_theta)
        k_btkh = rope(k_btkh, positions_bt, self.rope_theta)
        o_btnh = flash_attention(q_btnh, k_btkh, v_btkh, causal=True, impl=self.impl)
        return jnp.einsum("btnh,nhd->btd", o_btnh, self.w_o[...].astype(dt))

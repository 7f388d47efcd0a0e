"""The definition of attention, written for clarity rather than speed.

    out[b, t, h] = sum_s softmax_s(sm_scale * q[b, t, h] . k[b, s, h // G]) v[b, s, h // G]

over the keys `s` that query `t` may see: `s <= t` when causal (top-left aligned, as in
`jax.nn.dot_product_attention(is_causal=True)`) and `q_seg[b, t] == kv_seg[b, s]` with
segment ids. Query head `h` reads kv head `h // G` with `G = H // KV` (grouped-query
attention). A query that may see no key outputs zeros. Everything runs in float32 and
materializes the `[B, H, T, S]` scores: use it in tests only.

    out = attention_reference(q, k, v, causal=True, q_seg=None, kv_seg=None, sm_scale=0.125)
"""

import jax
import jax.numpy as jnp


def attention_mask(q_seg, kv_seg, num_q: int, num_kv: int, causal: bool):
    """bool [B or 1, T, S]: which keys each query may attend (None when all may)."""
    mask = None
    if q_seg is not None:
        mask = q_seg[:, :, None] == kv_seg[:, None, :]
    if causal:
        causal_ts = jnp.arange(num_q)[:, None] >= jnp.arange(num_kv)[None, :]
        mask = causal_ts[None] if mask is None else mask & causal_ts
    return mask


def attention_reference(q_bthd, k_bskd, v_bskd, *, causal: bool, q_seg, kv_seg, sm_scale: float):
    """softmax(sm_scale q k^T + mask) v in float32, returned in q's dtype."""
    _, num_q, num_heads, _ = q_bthd.shape
    _, num_kv, num_kv_heads, _ = k_bskd.shape
    group = num_heads // num_kv_heads
    k_bshd = jnp.repeat(k_bskd, group, axis=2).astype(jnp.float32)  # kv head h // G
    v_bshd = jnp.repeat(v_bskd, group, axis=2).astype(jnp.float32)
    s_bhts = sm_scale * jnp.einsum("bthd,bshd->bhts", q_bthd.astype(jnp.float32), k_bshd)
    mask_bts = attention_mask(q_seg, kv_seg, num_q, num_kv, causal)
    if mask_bts is None:
        p_bhts = jax.nn.softmax(s_bhts, axis=-1)
    else:
        mask_b1ts = mask_bts[:, None]
        s_bhts = jnp.where(mask_b1ts, s_bhts, -1e30)  # finite, so empty rows stay NaN-free
        p_bhts = jax.nn.softmax(s_bhts, axis=-1) * mask_b1ts  # empty rows: uniform * 0
    return jnp.einsum("bhts,bshd->bthd", p_bhts, v_bshd).astype(q_bthd.dtype)

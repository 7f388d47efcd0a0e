"""Attention through `jax.nn.dot_product_attention`: XLA's fused path, and cuDNN on GPUs.

The XLA implementation groups query heads by kv head instead of repeating k and v, keeps
logits and softmax in float32, and differentiates by autodiff. Causal masking goes in as
`is_causal`; segment ids become a `[B, 1, T, S]` boolean mask. jax fills masked logits
with a large finite negative, so a query that may see no key would get the mean of v:
those rows are zeroed here to match the other backends.

    out = attention_xla(q, k, v, causal=True, q_seg=seg, kv_seg=seg, sm_scale=0.125)
    out = attention_xla(q, k, v, causal=True, q_seg=None, kv_seg=None, sm_scale=0.125,
                        implementation="cudnn")   # GPU, float16/bfloat16 only
"""

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import attention_mask


def attention_xla(q_bthd, k_bskd, v_bskd, *, causal: bool, q_seg, kv_seg, sm_scale: float,
                  implementation: str = "xla"):
    """`jax.nn.dot_product_attention` with our masks; rows with no allowed key give zeros."""
    attend = lambda mask: jax.nn.dot_product_attention(
        q_bthd, k_bskd, v_bskd, mask=mask, is_causal=causal, scale=sm_scale,
        implementation=implementation)
    if q_seg is None:
        return attend(None)
    seg_bts = attention_mask(q_seg, kv_seg, q_bthd.shape[1], k_bskd.shape[1], causal=False)
    out_bthd = attend(seg_bts[:, None])
    allowed_bts = attention_mask(q_seg, kv_seg, q_bthd.shape[1], k_bskd.shape[1], causal)
    has_key_bt = jnp.any(allowed_bts, axis=-1)
    return jnp.where(has_key_bt[:, :, None, None], out_bthd, 0).astype(out_bthd.dtype)

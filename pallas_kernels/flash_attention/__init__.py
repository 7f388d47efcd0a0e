"""Flash attention: reference, XLA/cuDNN paths, Pallas kernels and the dispatching op.

    from pallas_kernels import flash_attention
    out_bthd = flash_attention(q_bthd, k_bskd, v_bskd, causal=True, segment_ids=seg_bt)

Backend contract. `triton.py` (GPU) and `mosaic_tpu.py` (TPU) each define exactly

    flash_attention_fwd(q, k, v, q_seg, kv_seg, *, causal, sm_scale, block_sizes, interpret)
        -> (o [B, T, H, D] in q.dtype, lse [B, H, T] float32)
    flash_attention_bwd(q, k, v, q_seg, kv_seg, o, lse, do, *, causal, sm_scale, block_sizes,
                        interpret)
        -> (dq [B, T, H, D], dk [B, S, KV, D], dv [B, S, KV, D]) in the dtypes of q, k, v

and `ops.py` calls them (the TPU module imported lazily) inside its `jax.custom_vjp`.

* Shapes: q `[B, T, H, D]`, k and v `[B, S, KV, D]`, `H % KV == 0`; query head h reads
  kv head `h // (H // KV)`. dk and dv are summed over the `H // KV` query heads sharing
  each kv head (`triton.py` loops over those heads inside its dk/dv kernel).
* Tiles: `block_sizes` is a `tuning.AttentionBlockSizes` already fitted by
  `ops.fit_block_sizes` (each tile at most `next_power_of_2(len)`, at least 16). Inputs
  arrive padded: `T % block_q == T % block_q_bwd == 0` and `S % block_k ==
  S % block_k_bwd == 0`. Backends do no padding of their own.
* Masks: key j is allowed for query i iff `(not causal or j <= i)` (top-left aligned,
  also for T != S) and, when segment ids are given, `q_seg[b, i] == kv_seg[b, j]`.
  `q_seg` `[B, T]` and `kv_seg` `[B, S]` are int32 arrays, or both None. Padding is
  expressed only through them: whenever ops.py pads, it passes segment ids (zeros if the
  caller gave none) with padded keys set to `ops.PAD_KV_SEGMENT` (int32 min) and padded
  queries to `ops.PAD_Q_SEGMENT` (int32 min + 1). Padded q, k, v rows are zeros; the
  cotangent `do` of padded queries is zero; ops.py slices their outputs off.
* `lse[b, h, i]` is the natural-log logsumexp of `sm_scale * q.k` over the allowed keys
  of query i, and `+inf` for a query with no allowed key, whose output row is zeros.
  With that convention `exp(s - lse)` is 0 on such rows, so the backward needs no special
  case and never makes NaNs; backward kernels still mask disallowed pairs to 0.
* Numerics: fp32 accumulation and softmax statistics; o and the gradients are cast to
  the input dtypes at the end. `interpret=True` must run the kernels on CPU.
"""

from pallas_kernels.flash_attention.ops import (
    ATTENTION_IMPLS,
    default_attention_impl,
    flash_attention,
)

__all__ = ["ATTENTION_IMPLS", "default_attention_impl", "flash_attention"]

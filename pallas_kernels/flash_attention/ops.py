"""`flash_attention`: multi-head attention behind one door, the backend chosen by platform.

    out_bthd = flash_attention(q_bthd, k_bskd, v_bskd)                  # causal, default impl
    out_bthd = flash_attention(q, k, v, segment_ids=seg_bt)               # packed sequences
    out_bthd = flash_attention(q, k, v, causal=False, impl="reference")   # the definition

Layout is `jax.nn.dot_product_attention`'s: q `[B, T, H, D]`, k and v `[B, S, KV, D]`
with `H % KV == 0` (query head h reads kv head `h // (H // KV)`). Backends (`impl=`):

* `"pallas_gpu"`: Triton kernels (`triton.py`), the GPU default;
* `"pallas_tpu"`: Mosaic kernels (`mosaic_tpu.py`), the TPU default;
* `"xla"`: `jax.nn.dot_product_attention(implementation="xla")` (`xla.py`), the CPU
  default and the fallback when a Pallas default cannot take the inputs (e.g. a head
  dim Triton cannot tile);
* `"cudnn"`: the same call with `implementation="cudnn"`, GPU and float16/bfloat16 only;
* `"reference"`: softmax(q k^T) v in float32 (`reference.py`), for tests.

The Pallas backends see padded inputs: ops.py clips the tiles to the sequence lengths,
pads T and S to whole tiles and, when it pads, gives padded keys the segment id
`PAD_KV_SEGMENT` and padded queries `PAD_Q_SEGMENT`, so no query attends a padded key and
padded queries (sliced off afterwards) attend nothing. Their gradients come from a
`jax.custom_vjp` whose backward runs the backend's FlashAttention-2 kernels; "xla" and
"reference" differentiate by autodiff. `interpret=None` means interpret mode on CPU,
the only way Pallas runs there.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import tuning
from pallas_kernels.flash_attention import reference, triton, xla

ATTENTION_IMPLS = ("pallas_gpu", "pallas_tpu", "xla", "cudnn", "reference")
PAD_KV_SEGMENT = -(2**31)  # int32 min: a key no query attends
PAD_Q_SEGMENT = -(2**31) + 1  # a query that attends no key
_MIN_BLOCK = 16  # Triton dots need operands of at least 16 rows
_TPU_MIN_BLOCK = 128  # Mosaic: short sequences are padded to one whole 128-lane tile


def default_attention_impl() -> str:
    """The backend `flash_attention` uses when `impl` is None, for the default platform."""
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")


def _segments(segment_ids, b, t, s):
    """(q_seg [B, T], kv_seg [B, S]) as int32, or (None, None); checks their shapes."""
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise ValueError(f"flash_attention: segment_ids must be one [B, T] array or a pair "
                             f"(q [B, T], kv [B, S]), got a sequence of {len(segment_ids)}")
        q_seg, kv_seg = (jnp.asarray(x) for x in segment_ids)
    else:
        if t != s:
            raise ValueError(f"flash_attention: one segment_ids array needs self-attention "
                             f"(T == S), got T={t}, S={s}; pass a pair (q_segment_ids [B, {t}], "
                             f"kv_segment_ids [B, {s}])")
        q_seg = kv_seg = jnp.asarray(segment_ids)
    for name, seg, dims in (("q", q_seg, ("T", t)), ("kv", kv_seg, ("S", s))):
        if seg.shape != (b, dims[1]):
            raise ValueError(f"flash_attention: {name} segment ids must be [B, {dims[0]}] = "
                             f"{(b, dims[1])}, got {seg.shape}")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise ValueError(f"flash_attention: {name} segment ids must be integers, got {seg.dtype}")
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _check_shapes(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"flash_attention: {name} must be rank 4 ([B, T, H, D] for q, "
                             f"[B, S, KV, D] for k and v), got shape {x.shape}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have one shape [B, S, KV, D], got "
                         f"k {k.shape} and v {v.shape}")
    (b, _, h, d), (bk, _, kv, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(f"flash_attention: q [B, T, H, D] = {q.shape} and k [B, S, KV, D] = "
                         f"{k.shape} must agree on B and D")
    if h % kv != 0:
        divisors = [n for n in range(1, h + 1) if h % n == 0]
        raise ValueError(f"flash_attention: query heads H={h} must be a multiple of kv heads "
                         f"KV={kv}; KV could be one of {divisors}")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"flash_attention: q, k, v must share one floating dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")


def _unsupported(impl: str, q) -> str | None:
    """Why `impl` cannot take these inputs on this platform, or None when it can.

    Pallas backends are not tied to the default platform here: with interpret=False they
    can still be lowered ahead of time for another one (`.lower(lowering_platforms=...)`).
    """
    platform, d = jax.default_backend(), q.shape[-1]
    if impl == "pallas_gpu" and (d < _MIN_BLOCK or d > 256 or d & (d - 1)):
        return f"Triton tiles need a power-of-two head dim in [16, 256], got D={d}"
    if impl == "cudnn":
        if platform != "gpu":
            return f"cuDNN runs on NVIDIA GPUs, the platform is {platform}"
        if q.dtype not in (jnp.float16, jnp.bfloat16):
            return f"cuDNN flash attention takes float16 or bfloat16, got {q.dtype}"
    return None


def _check_triton_tiles(bs: tuning.AttentionBlockSizes):
    tiles = dict(block_q=bs.block_q, block_k=bs.block_k, block_q_bwd=bs.block_q_bwd,
                 block_k_bwd=bs.block_k_bwd)
    bad = {name: n for name, n in tiles.items() if n < _MIN_BLOCK or n & (n - 1)}
    if bad:
        raise ValueError(f"flash_attention: impl='pallas_gpu' needs power-of-two tiles >= "
                         f"{_MIN_BLOCK} (Triton), got {bad}; e.g. 16, 32, 64 or 128")


def _resolve(impl, q):
    if impl is not None and impl not in ATTENTION_IMPLS:
        raise ValueError(f"flash_attention: impl={impl!r} is not one of {ATTENTION_IMPLS}")
    chosen = impl or default_attention_impl()
    reason = _unsupported(chosen, q)
    if reason is None:
        return chosen
    if impl is None:
        return "xla"  # the fixed fallback: pallas -> xla
    raise ValueError(f"flash_attention: impl={impl!r} cannot take q {q.shape} {q.dtype}: {reason}; "
                     f"impl='xla' works everywhere (or impl=None to pick a backend)")


def _backend(impl):
    if impl == "pallas_tpu":
        from pallas_kernels.flash_attention import mosaic_tpu  # lazy: only pallas_tpu needs it
        return mosaic_tpu
    return triton


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, q_seg, kv_seg, impl, causal, sm_scale, block_sizes, interpret):
    return _flash_fwd(q, k, v, q_seg, kv_seg, impl, causal, sm_scale, block_sizes, interpret)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, impl, causal, sm_scale, block_sizes, interpret):
    o, lse = _backend(impl).flash_attention_fwd(q, k, v, q_seg, kv_seg, causal=causal,
                                                sm_scale=sm_scale, block_sizes=block_sizes,
                                                interpret=interpret)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(impl, causal, sm_scale, block_sizes, interpret, res, do):
    q, k, v, q_seg, kv_seg, o, lse = res
    dq, dk, dv = _backend(impl).flash_attention_bwd(
        q, k, v, q_seg, kv_seg, o, lse, do.astype(o.dtype), causal=causal, sm_scale=sm_scale,
        block_sizes=block_sizes, interpret=interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def fit_block_sizes(bs: tuning.AttentionBlockSizes, t: int, s: int,
                    min_block: int = _MIN_BLOCK) -> tuning.AttentionBlockSizes:
    """Tiles no larger than the sequences need: each clipped to `next_power_of_2(len)`, at
    least `min_block` (16 for Triton; 128 for Mosaic, whose tiles want whole lanes)."""
    fit = lambda block, n: min(block, max(min_block, pl.next_power_of_2(n)))
    return tuning.AttentionBlockSizes(
        block_q=fit(bs.block_q, t), block_k=fit(bs.block_k, s),
        block_q_bwd=fit(bs.block_q_bwd, t), block_k_bwd=fit(bs.block_k_bwd, s),
        num_warps=bs.num_warps, num_stages=bs.num_stages)


@functools.partial(jax.jit, static_argnames=("impl", "causal", "sm_scale", "block_sizes",
                                             "interpret"))
def _pallas_attention(q, k, v, q_seg, kv_seg, *, impl, causal, sm_scale, block_sizes, interpret):
    """Pad T and S to whole tiles, mark the padding with segment ids, run, slice."""
    (b, t, _, _), s = q.shape, k.shape[1]
    bs = fit_block_sizes(block_sizes, t, s, _TPU_MIN_BLOCK if impl == "pallas_tpu" else _MIN_BLOCK)
    t_pad = -(-t // math.lcm(bs.block_q, bs.block_q_bwd)) * math.lcm(bs.block_q, bs.block_q_bwd)
    s_pad = -(-s // math.lcm(bs.block_k, bs.block_k_bwd)) * math.lcm(bs.block_k, bs.block_k_bwd)
    if (t_pad, s_pad) != (t, s):
        if q_seg is None:
            q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
        pad_seq = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
        q, k, v = pad_seq(q, t_pad - t), pad_seq(k, s_pad - s), pad_seq(v, s_pad - s)
        q_seg = jnp.pad(q_seg, [(0, 0), (0, t_pad - t)], constant_values=PAD_Q_SEGMENT)
        kv_seg = jnp.pad(kv_seg, [(0, 0), (0, s_pad - s)], constant_values=PAD_KV_SEGMENT)
    out = _flash(q, k, v, q_seg, kv_seg, impl, causal, sm_scale, bs, interpret)
    return out[:, :t]


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, sm_scale: float | None = None,
                    impl: str | None = None, block_sizes: tuning.AttentionBlockSizes | None = None,
                    interpret: bool | None = None):
    """Attention of q `[B, T, H, D]` over k, v `[B, S, KV, D]`; returns `[B, T, H, D]`.

    Args:
      causal: query i attends keys j <= i (top-left aligned, also when T != S).
      segment_ids: None; an int `[B, T]` array for self-attention (T == S); or a pair
        `(q_segment_ids [B, T], kv_segment_ids [B, S])`. A query attends only keys of its
        own segment; a query with no allowed key outputs zeros (and zero gradients).
      sm_scale: logit scale, default `1 / sqrt(D)`.
      impl: one of `ATTENTION_IMPLS`; None picks `default_attention_impl()` and falls
        back to "xla" when that backend cannot take the inputs. An explicit impl that
        cannot raises ValueError saying why.
      block_sizes: Pallas tiles; None reads `tuning.block_sizes("attention", impl)`.
        They are clipped for short sequences; T and S need not be multiples of them.
      interpret: run Pallas kernels in interpret mode; None means True on CPU.
    """
    _check_shapes(q, k, v)
    (b, t, _, d), s = q.shape, k.shape[1]
    q_seg, kv_seg = _segments(segment_ids, b, t, s)
    sm_scale = float(1.0 / math.sqrt(d) if sm_scale is None else sm_scale)
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    impl = _resolve(impl, q)
    kw = dict(causal=causal, q_seg=q_seg, kv_seg=kv_seg, sm_scale=sm_scale)
    if impl == "reference":
        return reference.attention_reference(q, k, v, **kw)
    if impl in ("xla", "cudnn"):
        return xla.attention_xla(q, k, v, implementation=impl, **kw)
    block_sizes = block_sizes or tuning.block_sizes("attention", impl)
    if impl == "pallas_gpu":
        _check_triton_tiles(block_sizes)
    return _pallas_attention(q, k, v, q_seg, kv_seg, impl=impl, causal=causal, sm_scale=sm_scale,
                             block_sizes=block_sizes, interpret=interpret)

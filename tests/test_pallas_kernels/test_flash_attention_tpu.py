"""The Mosaic TPU flash attention kernels (`mosaic_tpu.py`) against a float32 reference.

On CPU the kernels run in Pallas' TPU interpret mode, forward (o, lse) and backward (dq,
dk, dv vs `jax.vjp` of the reference); a lowering test runs the Pallas -> Mosaic lowering
for TPU at realistic sizes without a TPU; `tpu`-marked tests run the compiled kernels.

    .venv/bin/python -m pytest tests/test_pallas_kernels/test_flash_attention_tpu.py
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import tuning
from pallas_kernels.flash_attention import mosaic_tpu

PAD_Q, PAD_KV = -2, -1  # segment ids of padded queries and keys: they never match


def _reference(q, k, v, q_seg, kv_seg, *, causal, sm_scale):
    """softmax(q k^T * sm_scale + mask) v in float32; also lse [B, H, T].

    A query with no allowed key outputs zeros and has lse = +inf.
    """
    f32 = jnp.float32
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x.astype(f32), group, axis=2) for x in (k, v))
    s_bhts = jnp.einsum("bthd,bshd->bhts", q.astype(f32), k) * sm_scale
    t, s = s_bhts.shape[-2:]
    allowed = jnp.ones((1, 1, t, s), bool)
    if q_seg is not None:
        allowed = allowed & (q_seg[:, None, :, None] == kv_seg[:, None, None, :])
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, s), bool))
    s_bhts = jnp.where(allowed, s_bhts, -1e30)
    p = jnp.where(allowed, jax.nn.softmax(s_bhts, axis=-1), 0.0)  # empty rows: zeros
    lse = jnp.where(allowed.any(-1), jax.nn.logsumexp(s_bhts, axis=-1), jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", p, v), lse


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem. `segments`: None, or segment lengths per batch row; the
    rest of each sequence is padding (PAD_Q / PAD_KV)."""

    b: int
    t: int
    s: int
    h: int
    kv: int
    d: int
    causal: bool
    dtype: str = "float32"
    q_segments: tuple[int, ...] | None = None
    kv_segments: tuple[int, ...] | None = None
    blocks: tuple[int, int, int, int] = (128, 128, 128, 128)  # block_q, block_k, *_bwd


CASES = {
    # packed sequences + padded tail; unequal tiles exercise the causal skips and clamps
    "f32-gqa2-causal-packed-pad-D128": Case(1, 256, 256, 4, 2, 128, True, q_segments=(100, 120),
                                            kv_segments=(100, 120), blocks=(128, 64, 64, 128)),
    "f32-mha-cross-T128-S256-D64": Case(2, 128, 256, 2, 2, 64, False),
    "bf16-gqa4-causal-D128": Case(1, 256, 256, 4, 1, 128, True, dtype="bfloat16"),
    # 3 segments, T != S; queries of segment 2 have no keys (kv has only 2 segments)
    "bf16-gqa2-cross-3segs-pad-D64": Case(2, 256, 128, 4, 2, 64, False, dtype="bfloat16",
                                          q_segments=(60, 90, 70), kv_segments=(50, 40)),
}


def _segment_ids(lengths, n, pad, b):
    ids = np.full((b, n), pad, np.int32)
    start = 0
    for seg, length in enumerate(lengths):
        ids[:, start:start + length] = seg
        start += length
    return jnp.asarray(ids)


def _inputs(case, seed=0):
    kq, kk, kv, kdo = jax.random.split(jax.random.PRNGKey(seed), 4)
    dt = jnp.dtype(case.dtype)
    q = jax.random.normal(kq, (case.b, case.t, case.h, case.d)).astype(dt)
    k = jax.random.normal(kk, (case.b, case.s, case.kv, case.d)).astype(dt)
    v = jax.random.normal(kv, (case.b, case.s, case.kv, case.d)).astype(dt)
    do = jax.random.normal(kdo, q.shape).astype(dt)
    if case.q_segments is None:
        return q, k, v, None, None, do
    return (q, k, v, _segment_ids(case.q_segments, case.t, PAD_Q, case.b),
            _segment_ids(case.kv_segments, case.s, PAD_KV, case.b), do)


def _block_sizes(blocks):
    bq, bk, bq_bwd, bk_bwd = blocks
    return tuning.AttentionBlockSizes(block_q=bq, block_k=bk, block_q_bwd=bq_bwd, block_k_bwd=bk_bwd)


def _check_against_reference(case, *, interpret, block_sizes):
    q, k, v, q_seg, kv_seg, do = _inputs(case)
    kw = dict(causal=case.causal, sm_scale=case.d ** -0.5)
    o, lse = mosaic_tpu.flash_attention_fwd(q, k, v, q_seg, kv_seg, block_sizes=block_sizes,
                                            interpret=interpret, **kw)
    grads = mosaic_tpu.flash_attention_bwd(q, k, v, q_seg, kv_seg, o, lse, do,
                                           block_sizes=block_sizes, interpret=interpret, **kw)
    (o_ref, lse_ref), vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, q_seg, kv_seg, **kw), q, k, v)
    grads_ref = vjp((do.astype(jnp.float32), jnp.zeros_like(lse_ref)))

    assert o.dtype == q.dtype and lse.dtype == jnp.float32 and lse.shape == (case.b, case.h, case.t)
    assert [g.dtype for g in grads] == [q.dtype, k.dtype, v.dtype]
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    # bf16 feeds the MXU in bf16; a TPU's default-precision f32 matmuls are not exact either
    tol = 3e-2 if case.dtype == "bfloat16" else 2e-5 if interpret else 5e-3
    for label, got, want in zip(("o", "dq", "dk", "dv"), (o, *grads), (o_ref, *grads_ref), strict=True):
        got = np.asarray(got.astype(jnp.float32))
        assert not np.isnan(got).any(), f"{label} has NaN"
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=label)
    lse, lse_ref = np.asarray(lse), np.asarray(lse_ref)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))  # +inf exactly on empty rows
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[finite], lse_ref[finite], rtol=tol, atol=tol)
    if q_seg is not None:  # queries without keys: zero output and zero dq
        empty_bt = ~np.asarray((q_seg[:, :, None] == kv_seg[:, None, :]).any(-1))
        assert empty_bt.any()
        assert np.all(np.asarray(o)[empty_bt] == 0) and np.all(np.asarray(grads[0])[empty_bt] == 0)


@pytest.mark.parametrize("name", list(CASES))
def test_interpret_matches_reference(name):
    case = CASES[name]
    _check_against_reference(case, interpret=True, block_sizes=_block_sizes(case.blocks))


def _lower_for_tpu(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("causal, segments, d", [(True, True, 128), (False, False, 128),
                                                 (True, True, 64)])
def test_lowers_to_mosaic_for_tpu(causal, segments, d):
    """The Pallas -> Mosaic lowering (block shapes, index maps, kernel ops) runs on CPU."""
    b, t, h, kv = 1, 1024, 8, 2
    bs = tuning.AttentionBlockSizes(block_q=512, block_k=512, block_q_bwd=256, block_k_bwd=256)
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, kv, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32) if segments else None
    lse = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
    kw = dict(causal=causal, sm_scale=d ** -0.5, block_sizes=bs, interpret=False)
    fwd = lambda q, k, v, qs, ks: mosaic_tpu.flash_attention_fwd(q, k, v, qs, ks, **kw)
    bwd = lambda q, k, v, qs, ks, o, lse, do: mosaic_tpu.flash_attention_bwd(
        q, k, v, qs, ks, o, lse, do, **kw)
    assert _lower_for_tpu(fwd, q, k, k, seg, seg).count("tpu_custom_call") == 1
    assert _lower_for_tpu(bwd, q, k, k, seg, seg, q, lse, q).count("tpu_custom_call") == 2  # dkv, dq


@pytest.mark.parametrize("blocks, interpret, match", [
    ((128, 96, 128, 128), True, r"block_k=96 does not divide the sequence length 256"),
    ((64, 128, 128, 128), False, r"block_q=64 must be a multiple of 128.*on TPU"),
])
def test_bad_blocks_are_named(blocks, interpret, match):
    q, k, v, _, _, _ = _inputs(Case(1, 256, 256, 2, 1, 64, True))
    with pytest.raises(ValueError, match=match):
        mosaic_tpu.flash_attention_fwd(q, k, v, None, None, causal=True, sm_scale=0.125,
                                       block_sizes=_block_sizes(blocks), interpret=interpret)


@pytest.mark.tpu
@pytest.mark.parametrize("name", ["f32-gqa2-causal-packed-pad-D128", "bf16-gqa2-cross-3segs-pad-D64"])
def test_tpu_kernels_match_reference(name):
    case = dataclasses.replace(CASES[name], t=1024, s=1024 if CASES[name].causal else 512)
    lengths = lambda segs, n: (*segs[:-1], n - sum(segs[:-1]) - 24)  # keep a padded tail
    case = dataclasses.replace(case, q_segments=lengths(case.q_segments, case.t),
                               kv_segments=lengths(case.kv_segments, case.s))
    _check_against_reference(case, interpret=False,
                             block_sizes=tuning.block_sizes("attention", "pallas_tpu"))

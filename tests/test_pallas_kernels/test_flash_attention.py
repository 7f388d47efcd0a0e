"""flash_attention backends against the reference, forward and gradients.

The Pallas GPU kernels run in interpret mode on CPU; a lowering test runs the real
Pallas -> Triton lowering for CUDA without a GPU, and `gpu`-marked tests run the compiled
kernels on a GPU machine.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ATTENTION_IMPLS, default_attention_impl, flash_attention, tuning
from pallas_kernels.flash_attention import ops
from pallas_kernels.flash_attention.reference import attention_reference

BS16 = tuning.AttentionBlockSizes(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
BS32 = tuning.AttentionBlockSizes(block_q=32, block_k=32, block_q_bwd=16, block_k_bwd=32)


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: shapes, masks and the tiles the Pallas kernels use."""

    t: int
    s: int
    heads: int
    kv_heads: int
    d: int = 16
    causal: bool = True
    segments: str | None = None  # None, "packed" ([B, T] ids) or "cross" (a pair, one empty row)
    dtype: str = "float32"
    block_sizes: tuning.AttentionBlockSizes | None = BS16
    batch: int = 2


def _packed(b, n, cuts):
    """int32 [B, n]: row r has segments split at `cuts[r]` (packed documents)."""
    return jnp.stack([jnp.searchsorted(jnp.asarray(c), jnp.arange(n), side="right")
                      for c in cuts[:b]]).astype(jnp.int32)


def _inputs(case, seed=0):
    kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    dt = jnp.dtype(case.dtype)
    q = jax.random.normal(kq, (case.batch, case.t, case.heads, case.d), dt)
    k = jax.random.normal(kk, (case.batch, case.s, case.kv_heads, case.d), dt)
    v = jax.random.normal(kv, (case.batch, case.s, case.kv_heads, case.d), dt)
    cotangent = jax.random.normal(kc, q.shape, jnp.float32)
    seg = None
    if case.segments == "packed":
        seg = _packed(case.batch, case.t, [[7, 20, 33], [case.t // 2]])
    elif case.segments == "cross":  # query segment 3 has no keys: its rows must be zero
        q_seg = _packed(case.batch, case.t, [[5, 12], [9]])
        q_seg = q_seg.at[0, -4:].set(3)
        seg = (q_seg, _packed(case.batch, case.s, [[10, 25], [30]]))
    return q, k, v, seg, cotangent


def _out_and_grads(case, impl):
    q, k, v, seg, cotangent = _inputs(case)

    @jax.jit
    def run(q, k, v):
        fn = lambda q, k, v: flash_attention(q, k, v, causal=case.causal, segment_ids=seg,
                                             impl=impl, block_sizes=case.block_sizes)
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(cotangent.astype(out.dtype)))

    return [np.asarray(x.astype(jnp.float32)) for x in run(q, k, v)]


CASES = {
    "mha-causal-T40-pad": Case(t=40, s=40, heads=2, kv_heads=2),
    "gqa2-packed-T64": Case(t=64, s=64, heads=4, kv_heads=2, d=32, causal=False,
                            segments="packed", block_sizes=BS32),
    "gqa4-causal-packed-T40-table-tiles": Case(t=40, s=40, heads=4, kv_heads=1,
                                               segments="packed", block_sizes=None),
    "gqa2-cross-T24-S40-empty-rows": Case(t=24, s=40, heads=4, kv_heads=2, d=32, causal=False,
                                          segments="cross", batch=2),
    "gqa2-causal-T48-S32": Case(t=48, s=32, heads=2, kv_heads=1, batch=1),
    "bf16-gqa2-causal-packed": Case(t=48, s=48, heads=4, kv_heads=2, segments="packed",
                                    dtype="bfloat16"),
}


@pytest.mark.parametrize("impl", ["pallas_gpu", "xla"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_grads_match_reference(name, impl):
    case = CASES[name]
    got = _out_and_grads(case, impl)
    want = _out_and_grads(case, "reference")
    tol = 2e-2 if case.dtype == "bfloat16" else 2e-5
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert np.all(np.isfinite(a)), f"{label} has non-finite values"
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=label)
    if case.segments == "cross":  # rows whose segment has no key: zeros, zero dq
        np.testing.assert_array_equal(got[0][0, -4:], 0.0)
        np.testing.assert_array_equal(got[1][0, -4:], 0.0)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_jax_nn(causal):
    q, k, v, _, _ = _inputs(Case(t=12, s=12, heads=4, kv_heads=2))
    ref = jax.jit(functools.partial(attention_reference, causal=causal, q_seg=None, kv_seg=None,
                                    sm_scale=0.3))(q, k, v)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
    np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)


def test_segments_isolate_documents():
    """Packed documents attend only themselves: each equals attention on it alone."""
    case = Case(t=32, s=32, heads=2, kv_heads=1, batch=1)
    q, k, v, _, _ = _inputs(case)
    seg = jnp.asarray([[0] * 10 + [1] * 22])
    out = flash_attention(q, k, v, segment_ids=seg, impl="pallas_gpu", block_sizes=BS16)
    for lo, hi in ((0, 10), (10, 32)):
        alone = flash_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], impl="reference")
        np.testing.assert_allclose(out[:, lo:hi], alone, rtol=1e-5, atol=1e-5)


def test_defaults_and_fallback(monkeypatch):
    assert default_attention_impl() == "xla"  # on CPU
    assert set(ATTENTION_IMPLS) == {"pallas_gpu", "pallas_tpu", "xla", "cudnn", "reference"}
    case = Case(t=16, s=16, heads=2, kv_heads=2, d=24)  # D=24: no power-of-two Triton tile
    q, k, v, _, _ = _inputs(case)
    monkeypatch.setattr(ops, "default_attention_impl", lambda: "pallas_gpu")
    out = flash_attention(q, k, v)  # falls back to xla
    np.testing.assert_allclose(out, flash_attention(q, k, v, impl="reference"), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two head dim.*D=24.*impl='xla'"):
        flash_attention(q, k, v, impl="pallas_gpu")


def test_fit_block_sizes_clips_to_short_sequences():
    bs = ops.fit_block_sizes(tuning.AttentionBlockSizes(block_q=128, block_k=64), t=40, s=8)
    assert (bs.block_q, bs.block_k, bs.block_q_bwd, bs.block_k_bwd) == (64, 16, 64, 16)


def _lower_for_cuda(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("segments", [False, True])
def test_pallas_gpu_lowers_to_triton(segments):
    """The Pallas -> Triton lowering (power-of-two tiles, supported ops) runs on CPU."""
    bs = tuning.block_sizes("attention", "pallas_gpu", kind="NVIDIA H100")
    q = jnp.zeros((2, 256, 4, 64), jnp.bfloat16)
    k = jnp.zeros((2, 250, 2, 64), jnp.bfloat16)  # padded to 256 inside
    seg = (jnp.zeros((2, 256), jnp.int32), jnp.zeros((2, 250), jnp.int32)) if segments else None
    fwd = lambda q, k, v: flash_attention(q, k, v, segment_ids=seg, impl="pallas_gpu",
                                          block_sizes=bs, interpret=False)
    loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
    assert _lower_for_cuda(fwd, q, k, k).count("__gpu$xla.gpu.triton") == 1
    grad_text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, k, k)
    assert grad_text.count("__gpu$xla.gpu.triton") == 4  # fwd, delta, dk/dv, dq


@pytest.mark.parametrize("bad, match", [
    (dict(q=(2, 8, 4)), r"q must be rank 4.*\(2, 8, 4\)"),
    (dict(k=(2, 8, 3, 16), v=(2, 8, 3, 16)), r"H=4 must be a multiple of kv heads KV=3.*\[1, 2, 4\]"),
    (dict(k=(2, 8, 2, 32), v=(2, 8, 2, 32)), r"agree on B and D"),
    (dict(v=(2, 8, 2, 32)), r"k and v must have one shape"),
    (dict(segment_ids=(2, 9)), r"q segment ids must be \[B, T\] = \(2, 8\), got \(2, 9\)"),
    (dict(k=(2, 6, 2, 16), v=(2, 6, 2, 16), segment_ids=(2, 8)), r"T == S.*T=8, S=6"),
    (dict(impl="cudnn"), r"cuDNN runs on NVIDIA GPUs, the platform is cpu"),
    (dict(impl="flash"), r"impl='flash' is not one of"),
    (dict(impl="pallas_gpu", block_sizes=dataclasses.replace(BS16, block_k=24)),
     r"power-of-two tiles.*'block_k': 24"),
])
def test_errors_name_the_problem(bad, match):
    shapes = dict(q=(2, 8, 4, 16), k=(2, 8, 2, 16), v=(2, 8, 2, 16))
    shapes.update({n: bad.pop(n) for n in ("q", "k", "v") if n in bad})
    if "segment_ids" in bad:
        bad["segment_ids"] = jnp.zeros(bad["segment_ids"], jnp.int32)
    q, k, v = (jnp.zeros(shapes[n]) for n in ("q", "k", "v"))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **bad)


@pytest.mark.gpu
@pytest.mark.parametrize("impl, dtype, tol", [  # cuDNN flash attention takes 16-bit inputs only
    ("pallas_gpu", "bfloat16", 3e-2), ("pallas_gpu", "float32", 2e-2), ("cudnn", "bfloat16", 3e-2)])
def test_gpu_compiled_matches_reference(impl, dtype, tol):
    case = Case(t=200, s=200, heads=8, kv_heads=2, d=64, segments="packed", dtype=dtype,
                block_sizes=None)
    got = _out_and_grads(case, impl)
    want = _out_and_grads(case, "reference")
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=label)

"""The Pallas gmm kernels: interpret mode vs the reference at awkward shapes,
GPU (Triton) and TPU (Mosaic) lowering without the hardware, and backend choice.

No hypothesis here: the GPU machine runs this file with only jax, numpy and pytest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import FALLBACK_ORDER, GmmBlockSizes, choose_impl, gmm, tgmm
from pallas_kernels.gmm.reference import gmm_reference, tgmm_reference

# Small tiles so a few dozen rows already give many tiles, straddles and partial tiles (the
# TPU kernels put rows on lanes in tgmm, so their row tile is 128; CASES has a long case).
TILES = {"pallas_gpu": GmmBlockSizes(tm=16, tk=16, tn=16),
         "pallas_tpu": GmmBlockSizes(tm=128, tk=128, tn=128)}


CASES = [  # (sizes, extra rows past the groups, K, N)
    ([5, 0, 3, 9], 3, 20, 24),       # ragged, an empty group, partial tiles in K and N
    ([0, 45, 0], 0, 32, 16),         # one group holds everything, m not a tile multiple
    ([16, 16, 0, 0], 0, 16, 48),     # group sizes exact tile multiples
    ([0, 0, 0], 7, 16, 16),          # no rows in any group: all zeros
    ([130, 0, 300, 70], 20, 16, 16),  # many 128-row tiles, groups straddling them
]


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("sizes,extra,k,n", CASES)
def test_interpret_matches_reference_forward_and_grads(impl, sizes, extra, k, n):
    m = sum(sizes) + extra
    kx, kw = jax.random.split(jax.random.PRNGKey(len(sizes) + k))
    x, w = jax.random.normal(kx, (m, k)), jax.random.normal(kw, (len(sizes), k, n))
    gs = jnp.asarray(sizes, jnp.int32)
    f = lambda x, w, i, bs=None: gmm(x, w, gs, impl=i, block_sizes=bs)
    np.testing.assert_allclose(f(x, w, impl, TILES[impl]), gmm_reference(x, w, gs),
                               rtol=1e-5, atol=1e-5)
    loss = lambda x, w, i, bs=None: jnp.sum(jnp.sin(f(x, w, i, bs)))
    got = jax.grad(loss, (0, 1))(x, w, impl, TILES[impl])
    want = jax.grad(loss, (0, 1))(x, w, "reference")
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_bf16_inputs_and_expert_shard(impl):
    sizes, m, k, n = [7, 12, 0, 9, 4], 36, 32, 32
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(5), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (5, k, n), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    out = gmm(x, w[1:4], gs, group_offset=1, impl=impl, block_sizes=TILES[impl])
    assert out.dtype == jnp.bfloat16
    ref = gmm_reference(x.astype(jnp.float32), w[1:4].astype(jnp.float32), gs, group_offset=1)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=2e-2, atol=5e-2)
    dout = jax.random.normal(kg, (m, n), jnp.bfloat16)
    dw = tgmm(x.T, dout, gs, num_groups=3, group_offset=1, impl=impl, block_sizes=TILES[impl],
              preferred_element_type=jnp.float32)
    ref = tgmm_reference(x.T.astype(jnp.float32), dout.astype(jnp.float32), gs, num_groups=3,
                         group_offset=1)
    np.testing.assert_allclose(dw, ref, rtol=2e-2, atol=1e-1)


def _lower_text(impl, platform, dtype=jnp.bfloat16, m=2048, k=512, n=768, g=8):
    x = jax.ShapeDtypeStruct((m, k), dtype)
    w = jax.ShapeDtypeStruct((g, k, n), dtype)
    gs = jax.ShapeDtypeStruct((g,), jnp.int32)

    def fwd_and_grad(x, w, gs):
        out, vjp = jax.vjp(lambda x, w: gmm(x, w, gs, impl=impl, interpret=False), x, w)
        return out, vjp(out)

    return jax.jit(fwd_and_grad).trace(x, w, gs).lower(lowering_platforms=(platform,)).as_text()


def test_triton_kernels_lower_for_gpu():
    """Runs the Pallas -> Triton lowering (no GPU needed): gmm, and gmm + tgmm backward."""
    text = _lower_text("pallas_gpu", "cuda")
    assert text.count("__gpu$xla.gpu.triton") == 3


def test_mosaic_kernels_lower_for_tpu():
    """Runs the Pallas -> Mosaic lowering (no TPU needed): gmm, and gmm + tgmm backward."""
    text = _lower_text("pallas_tpu", "tpu")
    assert text.count("tpu_custom_call") == 3


def test_backend_choice_and_errors(monkeypatch):
    x, w = jnp.ones((8, 200)), jnp.ones((2, 200, 64))
    assert choose_impl(x, w) == "xla"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert choose_impl(x, w) == "ragged_dot"  # K=200 does not tile for Mosaic: next in order
    assert choose_impl(jnp.ones((8, 256)), jnp.ones((2, 256, 64))) == "pallas_tpu"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose_impl(x, w) == FALLBACK_ORDER["gpu"][0] == "pallas_gpu"
    with pytest.raises(ValueError, match="impl='pallas_tpu' cannot take these inputs: K=200"):
        choose_impl(x, w, impl="pallas_tpu")
    with pytest.raises(ValueError, match="powers of two >= 16"):
        choose_impl(jnp.ones((64, 200)), w, impl="pallas_gpu",
                    block_sizes=GmmBlockSizes(tm=24, tk=16, tn=16))
    with pytest.raises(ValueError, match="dtypes int32"):
        choose_impl(x.astype(jnp.int32), w, impl="pallas_gpu")
    with pytest.raises(ValueError, match="group_sizes must be integers"):
        gmm(x, w, jnp.array([4.0, 4.0]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_triton_matches_reference_on_gpu(dtype):
    _compiled_matches_reference("pallas_gpu", dtype)


@pytest.mark.tpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_mosaic_matches_reference_on_tpu(dtype):
    _compiled_matches_reference("pallas_tpu", dtype)


def _compiled_matches_reference(impl, dtype):
    sizes = jnp.array([300, 0, 1000, 17, 731, 0, 1, 1999], jnp.int32)
    m, k, n = 4096, 512, 768
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (m, k), dtype)
    w = (jax.random.normal(kw, (8, k, n), jnp.float32) / k ** 0.5).astype(dtype)
    loss = lambda x, w, i: jnp.sum(gmm(x, w, sizes, impl=i).astype(jnp.float32) ** 2)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(gmm(x, w, sizes, impl=impl), np.float32),
                               np.asarray(gmm(x, w, sizes, impl="reference"), np.float32), **tol)
    got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, impl)
    want = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, "reference")
    for a, b in zip(got, want, strict=True):
        scale = float(jnp.abs(b.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale,
                                   np.asarray(b, np.float32) / scale, **tol)

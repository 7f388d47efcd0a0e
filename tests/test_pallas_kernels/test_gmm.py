"""gmm backends against the reference, forward and gradients, on ragged and empty groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import GMM_IMPLS, GmmBlockSizes, gmm, tgmm
from pallas_kernels.gmm.metadata import make_work_list, num_items
from pallas_kernels.gmm.reference import gmm_reference, group_ids


def _inputs(sizes, m, k=8, n=6, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return (jax.random.normal(k1, (m, k)), jax.random.normal(k2, (len(sizes), k, n)),
            jnp.asarray(sizes, jnp.int32))


def test_reference_is_the_definition():
    x, w, gs = _inputs([2, 0, 3], m=6)
    out = np.asarray(gmm_reference(x, w, gs))
    expect = np.concatenate([x[:2] @ w[0], x[2:5] @ w[2], np.zeros((1, 6))])
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(group_ids(gs, 6), [0, 0, 2, 2, 2, 3])


@pytest.mark.parametrize("impl", [i for i in GMM_IMPLS if i != "reference"])
@pytest.mark.parametrize("sizes,m", [([5, 0, 3, 9], 17), ([0, 0, 0, 4], 4), ([3, 3], 10), ([0, 0], 3)])
def test_forward_and_grads_match_reference(impl, sizes, m):
    x, w, gs = _inputs(sizes, m)
    out = gmm(x, w, gs, impl=impl)
    ref = gmm(x, w, gs, impl="reference")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    loss = lambda fn_impl: lambda x, w: jnp.sum(jnp.sin(gmm(x, w, gs, impl=fn_impl)))
    g = jax.grad(loss(impl), argnums=(0, 1))(x, w)
    g_ref = jax.grad(loss("reference"), argnums=(0, 1))(x, w)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=5), st.integers(0, 6),
       st.sampled_from([None, 1, 4, 8]))
def test_xla_tiled_any_group_sizes(sizes, extra_rows, tile_rows):
    x, w, gs = _inputs(sizes, m=sum(sizes) + extra_rows, seed=len(sizes))
    bs = tile_rows and GmmBlockSizes(tm=tile_rows)
    out = gmm(x, w, gs, impl="xla", block_sizes=bs)
    np.testing.assert_allclose(out, gmm_reference(x, w, gs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", GMM_IMPLS)
def test_padded_layout(impl):
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 8))
    w = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 5))
    gs = jnp.array([4, 0, 2])
    out = np.asarray(gmm(x, w, gs, impl=impl))
    for g in range(3):
        np.testing.assert_allclose(out[g, : gs[g]], x[g, : gs[g]] @ w[g], rtol=1e-5, atol=1e-5)
        assert np.all(out[g, gs[g]:] == 0)


def test_bf16_output_dtype_and_accuracy():
    x, w, gs = _inputs([4, 4], m=8)
    out = gmm(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), gs, impl="xla")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), gmm_reference(x, w, gs), rtol=0.05, atol=0.1)


def test_shape_errors_are_clear():
    x, w, gs = _inputs([2, 2], m=4)
    with pytest.raises(ValueError, match=r"group_sizes must be \[..., G\] with G=2"):
        gmm(x, w, jnp.array([1, 1, 2]))
    with pytest.raises(ValueError, match="contracting dims differ"):
        gmm(x[:, :5], w, gs)
    with pytest.raises(ValueError, match="impl='triton' is not one of"):
        gmm(x, w, gs, impl="triton")


@pytest.mark.parametrize("impl", GMM_IMPLS)
def test_leading_batch_dims_are_independent_problems(impl):
    sizes = jnp.array([[3, 0, 4], [0, 7, 0], [1, 1, 1]])
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 8, 5))
    w = jax.random.normal(jax.random.PRNGKey(4), (3, 5, 4))
    out = gmm(x, w, sizes, impl=impl)
    for b in range(3):
        np.testing.assert_allclose(out[b], gmm_reference(x[b], w, sizes[b]), rtol=1e-5, atol=1e-5)
    f = lambda x, w, i: jnp.sum(jnp.cos(gmm(x, w, sizes, impl=i)))
    for a, r in zip(jax.grad(f, (0, 1))(x, w, impl), jax.grad(f, (0, 1))(x, w, "reference"),
                    strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
    x_bgck = x[:, :6].reshape(3, 3, 2, 5)
    padded = gmm(x_bgck, w, jnp.minimum(sizes, 2), impl=impl)
    np.testing.assert_allclose(padded[1, 1], x_bgck[1, 1] @ w[1], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(padded[1, 0]).max()) == 0.0


@pytest.mark.parametrize("impl", GMM_IMPLS)
def test_transpose_rhs(impl):
    x, w, gs = _inputs([4, 0, 9], m=15)
    w_t = jnp.swapaxes(w, 1, 2)
    out = gmm(x, w_t, gs, transpose_rhs=True, impl=impl)
    np.testing.assert_allclose(out, gmm_reference(x, w, gs), rtol=1e-5, atol=1e-5)
    f = lambda x, w_t: jnp.sum(jnp.sin(gmm(x, w_t, gs, transpose_rhs=True, impl=impl)))
    g_ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(gmm_reference(x, w, gs))), (0, 1))(x, w)
    dx, dw_t = jax.grad(f, (0, 1))(x, w_t)
    np.testing.assert_allclose(dx, g_ref[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jnp.swapaxes(dw_t, 1, 2), g_ref[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", GMM_IMPLS)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_group_offset_runs_only_the_local_shard(impl, offset):
    sizes = [3, 5, 0, 6, 2]
    x, w, gs = _inputs(sizes, m=18)
    shard = w[offset:offset + 2]
    out = gmm(x, shard, gs, group_offset=offset, impl=impl)
    full = np.asarray(gmm_reference(x, w, gs))
    gid = np.asarray(group_ids(gs, 18))
    local = (gid >= offset) & (gid < offset + 2)
    np.testing.assert_allclose(out, np.where(local[:, None], full, 0.0), rtol=1e-5, atol=1e-5)
    f = lambda x, w, i: jnp.sum(jnp.cos(gmm(x, w, gs, group_offset=offset, impl=i)))
    for a, r in zip(jax.grad(f, (0, 1))(x, shard, impl), jax.grad(f, (0, 1))(x, shard, "reference"),
                    strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
    jitted = jax.jit(lambda off: gmm(x, shard, gs, group_offset=off, impl=impl))
    np.testing.assert_allclose(jitted(offset), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", GMM_IMPLS)
@pytest.mark.parametrize("sizes,m", [([5, 0, 3, 9], 17), ([12], 12), ([0, 0], 2)])
def test_tgmm_is_the_weight_gradient(impl, sizes, m):
    x, w, gs = _inputs(sizes, m)
    dout = jax.random.normal(jax.random.PRNGKey(9), (m, w.shape[2]))
    _, vjp = jax.vjp(lambda w: gmm_reference(x, w, gs), w)
    np.testing.assert_allclose(tgmm(x.T, dout, gs, impl=impl), vjp(dout)[0], rtol=1e-4, atol=1e-4)
    if len(sizes) > 2:
        shard = tgmm(x.T, dout, gs, num_groups=2, group_offset=1, impl=impl)
        np.testing.assert_allclose(shard, vjp(dout)[0][1:3], rtol=1e-4, atol=1e-4)


def test_tgmm_shape_errors():
    with pytest.raises(ValueError, match=r"tgmm: need lhs \[K, M\] and grad \[M, N\] with equal M"):
        tgmm(jnp.ones((4, 6)), jnp.ones((5, 3)), jnp.array([6]))


def test_group_offset_shape_errors():
    x, w, gs = _inputs([2, 2, 2], m=6)
    with pytest.raises(ValueError, match="pass group_offset for an expert shard"):
        gmm(x, w[:2], gs)
    with pytest.raises(ValueError, match="group_offset applies to the ragged layout"):
        gmm(jnp.ones((3, 2, 8)), w, gs, group_offset=0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=6), st.integers(0, 9),
       st.sampled_from([1, 4, 8]), st.data(), st.booleans(), st.booleans())
def test_work_list_covers_every_row_once(sizes, extra, tm, data, visit_empty, cover_all):
    m = sum(sizes) + extra
    if m == 0:
        return
    visit_empty = visit_empty or not cover_all  # the only lists the kernels build
    offset = data.draw(st.integers(0, len(sizes) - 1))
    num_local = data.draw(st.integers(1, len(sizes) - offset))
    w = make_work_list(jnp.asarray(sizes), num_rows=m, tm=tm, group_offset=offset,
                       num_local=num_local, visit_empty_groups=visit_empty,
                       cover_all_rows=cover_all)
    n = int(w.num_work[0])
    assert w.group.shape == (num_items(m, tm, num_local, visit_empty),) and 1 <= n <= len(w.group)
    covered = np.zeros(m, int)
    gid = np.asarray(group_ids(jnp.asarray(sizes), m)) - offset
    gid = np.where((gid >= 0) & (gid < num_local), gid, -9)
    for i in range(n):
        rows = np.arange(w.tile[i] * tm, w.tile[i] * tm + tm)
        rows = rows[(rows >= w.row_start[i]) & (rows < w.row_end[i]) & (rows < m)]
        covered[rows] += 1
        g = int(w.group[i])
        if 0 <= g < num_local:
            assert np.all(gid[rows] == g)
        else:
            assert cover_all and np.all(gid[rows] == -9)
    # gmm covers every row once; tgmm's list (cover_all=False) only the local groups' rows
    assert np.all(covered == np.where(cover_all | (gid >= 0), 1, 0))
    assert np.all(np.diff(np.asarray(w.tile[:n])) >= 0)  # tiles in order: blocks stay resident
    assert np.all(np.asarray(w.tile[n:]) == int(w.tile[n - 1]))  # padding repeats the last item
    if visit_empty:  # tgmm: every local group has an item, so its gradient block is written
        assert set(range(num_local)) <= set(np.asarray(w.group[:n]).tolist())

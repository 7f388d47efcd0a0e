"""`gmm`: grouped matmul behind one door, with the backend chosen by platform.

Two layouts share the op, told apart by rank:

* ragged, `lhs: [M, K]`, `group_sizes: [G]`: group g owns the next `group_sizes[g]` rows
  (rows sorted by group, as dropless dispatch produces them); rows past the last group
  give zeros;
* padded, `lhs: [G, C, K]`, `group_sizes: [G]`: group g owns `lhs[g, :group_sizes[g]]`
  (the capacity layout). Every backend but "reference" runs it as one batched matmul.

Both take leading batch dims on `lhs` and `group_sizes` (`[B, M, K]` with `[B, G]`):
independent problems sharing `rhs`, such as the dispatch groups of an MoE layer.

`transpose_rhs=True` takes `rhs` as `[G, N, K]`; `group_offset=a` with a `rhs` of
`G_local` groups computes only groups `[a, a + G_local)` of `group_sizes` (the experts
one device holds in expert parallelism), giving zeros for other rows. `tgmm(lhs_km,
grad_mn, group_sizes)` is the transposed op, `out[g] = lhs[:, rows_g] @ grad[rows_g]`.

Backends (`impl=`), tried in a fixed order per platform when `impl` is None
(`FALLBACK_ORDER`; the first that can take the inputs wins):

* `"pallas_gpu"`: Pallas kernels lowered through Triton (`triton.py`), GPU default;
* `"pallas_tpu"`: Pallas Mosaic kernels with scalar-prefetched work lists
  (`mosaic_tpu.py`), TPU default;
* `"xla"`: row-tile padding plus one batched matmul (`xla.py`), the CPU default, since
  XLA:CPU expands `jax.lax.ragged_dot` to dense work over every group;
* `"ragged_dot"`: `jax.lax.ragged_dot` (`ragged.py`), XLA's own grouped kernels;
* `"reference"`: the masked definition (`reference.py`), G times the FLOPs, for tests.

The Pallas and xla backends share one custom VJP written with their own two ops:
`d lhs = gmm(grad, rhs, transpose_rhs=not transpose_rhs)` and `d rhs = tgmm(lhs.T, grad)`
(backends take tgmm's `lhs` as `[M, K]`, so no transpose is materialised).
Pallas backends run interpreted on CPU (`interpret=None` decides by platform), which is
how the tests check them; tiles come from `tuning.block_sizes` unless given.

    out_mn = gmm(x_mk, w_gkn, sizes_g)                      # platform default
    out_mn = gmm(x_mk, w_gkn, sizes_g, impl="pallas_gpu")   # interpreted on CPU
    dw_gkn = tgmm(x_mk.T, dout_mn, sizes_g)                 # weight gradient
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import tuning
from pallas_kernels.gmm import mosaic_tpu, ragged, reference, triton, xla

GMM_IMPLS = ("pallas_gpu", "pallas_tpu", "xla", "ragged_dot", "reference")
FALLBACK_ORDER = {"gpu": ("pallas_gpu", "ragged_dot", "xla"),
                  "tpu": ("pallas_tpu", "ragged_dot", "xla"),
                  "cpu": ("xla", "ragged_dot")}
_BACKENDS = {"pallas_gpu": triton, "pallas_tpu": mosaic_tpu, "xla": xla}
_GPU_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_impl() -> str:
    """The backend `gmm` tries first when `impl` is None, for the default JAX platform."""
    return FALLBACK_ORDER.get(jax.default_backend(), ("xla",))[0]


def _block_sizes(impl, block_sizes, m, k, n):
    """Tiles for `impl`: given or from the table, shrunk to the problem (GPU: powers of 2 >= 16)."""
    if impl not in ("pallas_gpu", "pallas_tpu"):
        return block_sizes
    bs = block_sizes or tuning.block_sizes("gmm", impl)
    if impl == "pallas_gpu":
        fit = lambda t, d: min(t, max(16, pl.next_power_of_2(d)))
        return tuning.GmmBlockSizes(tm=fit(bs.tm, m), tk=fit(bs.tk, k), tn=fit(bs.tn, n),
                                    num_warps=bs.num_warps, num_stages=bs.num_stages)
    return bs


def unsupported(impl, lhs, rhs, transpose_rhs, block_sizes) -> str | None:
    """Why `impl` cannot run these inputs, or None when it can."""
    k, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else rhs.shape[1:]
    if impl == "pallas_gpu":
        if lhs.dtype not in _GPU_DTYPES or rhs.dtype not in _GPU_DTYPES:
            return f"dtypes {lhs.dtype}/{rhs.dtype}; Triton dots take float32, bfloat16, float16"
        bs = _block_sizes(impl, block_sizes, lhs.shape[-2], k, n)
        bad = [t for t in (bs.tm, bs.tk, bs.tn) if t < 16 or t & (t - 1)]
        if bad:
            return f"tiles {bs} must be powers of two >= 16"
    if impl == "pallas_tpu":
        bs = _block_sizes(impl, block_sizes, lhs.shape[-2], k, n)
        if mosaic_tpu.fit_tile(k, bs.tk) is None or mosaic_tpu.fit_tile(n, bs.tn) is None:
            return f"K={k}, N={n} do not split into tiles of (tk={bs.tk}, tn={bs.tn}) multiples of 128"
        if bs.tm % 8 or (bs.tm % 128 and lhs.shape[-2] > bs.tm):
            return (f"tm={bs.tm} must be a multiple of 128 (tgmm puts rows on lanes), or a "
                    f"multiple of 8 no smaller than M={lhs.shape[-2]}")
    return None


def choose_impl(lhs, rhs, *, transpose_rhs=False, block_sizes=None, impl=None) -> str:
    """The backend `gmm(lhs, rhs, ..., impl=impl)` runs: `impl` itself when given (checked),
    else the first of `FALLBACK_ORDER[platform]` that can take the inputs."""
    if impl is not None:
        if impl not in GMM_IMPLS:
            raise ValueError(f"gmm: impl={impl!r} is not one of {GMM_IMPLS} (or None for the default)")
        reason = unsupported(impl, lhs, rhs, transpose_rhs, block_sizes)
        if reason:
            raise ValueError(f"gmm: impl={impl!r} cannot take these inputs: {reason}; "
                             f"pass impl=None to fall back in order {FALLBACK_ORDER}")
        return impl
    order = FALLBACK_ORDER.get(jax.default_backend(), ("xla",))
    for candidate in order:
        if unsupported(candidate, lhs, rhs, transpose_rhs, block_sizes) is None:
            return candidate
    return "xla"


def _check_shapes(lhs, rhs, group_sizes, transpose_rhs, local):
    if rhs.ndim != 3:
        raise ValueError(f"gmm: rhs must be [G, K, N] ([G, N, K] with transpose_rhs), got {rhs.shape}")
    if group_sizes.ndim < 1 or (group_sizes.shape[-1] != rhs.shape[0] and not local):
        raise ValueError(
            f"gmm: group_sizes must be [..., G] with G={rhs.shape[0]} to match rhs {rhs.shape}, "
            f"got shape {group_sizes.shape} (pass group_offset for an expert shard)")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"gmm: group_sizes must be integers, got {group_sizes.dtype}")
    if local and group_sizes.shape[-1] < rhs.shape[0]:
        raise ValueError(f"gmm: rhs holds {rhs.shape[0]} groups but group_sizes has only "
                         f"{group_sizes.shape[-1]}")
    extra = lhs.ndim - group_sizes.ndim
    if extra not in (1, 2):
        raise ValueError(f"gmm: lhs {lhs.shape} must be [..., M, K] (ragged) or [..., G, C, K] "
                         f"(padded) for group_sizes {group_sizes.shape}")
    if lhs.shape[: group_sizes.ndim - 1] != group_sizes.shape[:-1]:
        raise ValueError(f"gmm: batch dims differ: lhs {lhs.shape} vs group_sizes {group_sizes.shape}")
    if extra == 2 and lhs.shape[-3] != rhs.shape[0]:
        raise ValueError(f"gmm: padded lhs [..., G, C, K] has G={lhs.shape[-3]}, rhs has G={rhs.shape[0]}")
    if extra == 2 and local:
        raise ValueError("gmm: group_offset applies to the ragged layout [..., M, K] only")
    k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[-1] != k:
        raise ValueError(f"gmm: contracting dims differ: lhs {lhs.shape} vs rhs {rhs.shape}"
                         f"{' (transpose_rhs)' if transpose_rhs else ''}")


def _batched_gmm(impl, lhs_bmk, rhs, sizes_bg, group_offset, **kw):
    """`[B, M, K]` problems sharing `rhs`: natively for "xla", by `vmap` for the kernels
    (a batched `pallas_call` gains a grid dimension)."""
    if impl == "xla":
        return xla.gmm(lhs_bmk, rhs, sizes_bg, group_offset, **kw)
    one = lambda x, gs: _BACKENDS[impl].gmm(x, rhs, gs, group_offset, **kw)
    return jax.vmap(one)(lhs_bmk, sizes_bg)


def _batched_tgmm(impl, x_bmk, g_bmn, sizes_bg, group_offset, *, out_dtype, **kw):
    """`sum_b tgmm(x[b], g[b])`: the weight gradient of problems sharing `rhs`."""
    if impl == "xla":
        return xla.tgmm(x_bmk, g_bmn, sizes_bg, group_offset, out_dtype=out_dtype, **kw)
    if x_bmk.shape[0] == 1:
        return _BACKENDS[impl].tgmm(x_bmk[0], g_bmn[0], sizes_bg[0], group_offset,
                                    out_dtype=out_dtype, **kw)
    one = lambda x, g, gs: _BACKENDS[impl].tgmm(x, g, gs, group_offset, out_dtype=jnp.float32, **kw)
    return jnp.sum(jax.vmap(one)(x_bmk, g_bmn, sizes_bg), axis=0).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _gmm(lhs_bmk, rhs, sizes_bg, group_offset, impl, transpose_rhs, block_sizes, out_dtype,
         interpret):
    return _batched_gmm(impl, lhs_bmk, rhs, sizes_bg, group_offset, transpose_rhs=transpose_rhs,
                        block_sizes=block_sizes, out_dtype=out_dtype, interpret=interpret)


def _gmm_fwd(lhs_bmk, rhs, sizes_bg, group_offset, impl, transpose_rhs, block_sizes, out_dtype,
             interpret):
    out = _gmm(lhs_bmk, rhs, sizes_bg, group_offset, impl, transpose_rhs, block_sizes, out_dtype,
               interpret)
    return out, (lhs_bmk, rhs, sizes_bg, group_offset)


def _gmm_bwd(impl, transpose_rhs, block_sizes, out_dtype, interpret, res, grad_bmn):
    lhs_bmk, rhs, sizes_bg, group_offset = res
    grad_bmn = grad_bmn.astype(lhs_bmk.dtype)
    _, m, k = lhs_bmk.shape
    n = grad_bmn.shape[-1]
    dlhs = _batched_gmm(impl, grad_bmn, rhs, sizes_bg, group_offset,
                        transpose_rhs=not transpose_rhs,
                        block_sizes=_block_sizes(impl, block_sizes, m, n, k),
                        out_dtype=lhs_bmk.dtype, interpret=interpret)
    a_bmk, b_bmn = (grad_bmn, lhs_bmk) if transpose_rhs else (lhs_bmk, grad_bmn)
    drhs = _batched_tgmm(impl, a_bmk, b_bmn, sizes_bg, group_offset, num_groups=rhs.shape[0],
                         block_sizes=_block_sizes(impl, block_sizes, m, a_bmk.shape[-1],
                                                  b_bmn.shape[-1]),
                         out_dtype=rhs.dtype, interpret=interpret)
    return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _interpret(interpret, impl):
    if impl not in ("pallas_gpu", "pallas_tpu"):
        return False
    return jax.default_backend() == "cpu" if interpret is None else interpret


def gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, group_offset=None, impl=None,
        block_sizes=None, interpret=None, preferred_element_type=None):
    """Grouped matmul `out[m] = lhs[m] @ rhs[group(m)]`; see the module docstring.

    Args:
      lhs: `[..., M, K]` rows sorted by group, or `[..., G, C, K]` padded groups; leading
        dims are independent batches (e.g. dispatch groups) that share `rhs`.
      rhs: `[G, K, N]` one matrix per group (`[G, N, K]` with `transpose_rhs`).
      group_sizes: int `[..., G]`; for the ragged layout `sum(group_sizes) <= M`.
      transpose_rhs: multiply by `rhs[g].T`.
      group_offset: int (may be traced): `rhs` holds groups `[offset, offset + rhs.shape[0])`
        of `group_sizes`; rows of other groups give zeros. Ragged layout only.
      impl: one of `GMM_IMPLS`, or None for the first backend of `FALLBACK_ORDER` that can
        take the inputs.
      block_sizes: `tuning.GmmBlockSizes`; None: the tuning table's entry (the "xla" backend
        picks its row tile from the shapes).
      interpret: run a Pallas backend in the interpreter (None: only on CPU).
      preferred_element_type: output dtype (default: `lhs.dtype`); accumulation is fp32.
    """
    _check_shapes(lhs, rhs, group_sizes, transpose_rhs, group_offset is not None)
    impl = choose_impl(lhs, rhs, transpose_rhs=transpose_rhs, block_sizes=block_sizes, impl=impl)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    batch = group_sizes.shape[:-1]
    if lhs.ndim == group_sizes.ndim + 2:
        w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        if impl != "reference":
            return xla.padded_gmm(lhs, w, group_sizes, preferred_element_type=out_dtype)
        fn = lambda x, gs: reference.padded_gmm_reference(x, w, gs, preferred_element_type=out_dtype)
    elif impl == "ragged_dot":
        flat = ragged.gmm(lhs.reshape(-1, *lhs.shape[-2:]), rhs,
                          group_sizes.reshape(-1, group_sizes.shape[-1]),
                          group_offset, transpose_rhs, out_dtype)
        return flat.reshape(*lhs.shape[:-1], flat.shape[-1])
    elif impl == "reference":
        offset = 0 if group_offset is None else group_offset
        fn = lambda x, gs: reference.gmm_reference(x, rhs, gs, transpose_rhs=transpose_rhs,
                                                   group_offset=offset,
                                                   preferred_element_type=out_dtype)
    elif lhs.shape[-2] == 0:  # no rows: nothing to multiply
        n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
        return jnp.zeros((*lhs.shape[:-1], n), out_dtype)
    else:  # the kernels: batch dims flattened into one [B, M, K] call
        offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
        k, n = (rhs.shape[2], rhs.shape[1]) if transpose_rhs else rhs.shape[1:]
        bs = _block_sizes(impl, block_sizes, lhs.shape[-2], k, n)
        out = _gmm(lhs.reshape(-1, *lhs.shape[-2:]), rhs,
                   group_sizes.reshape(-1, group_sizes.shape[-1]), offset, impl, transpose_rhs,
                   bs, out_dtype, _interpret(interpret, impl))
        return out.reshape(*lhs.shape[:-1], n)
    for _ in batch:
        fn = jax.vmap(fn)
    return fn(lhs, group_sizes)


def tgmm(lhs_km, grad_mn, group_sizes, *, num_groups=None, group_offset=None, impl=None,
         block_sizes=None, interpret=None, preferred_element_type=None):
    """Transposed grouped matmul: `out[l] = lhs[:, rows of group offset + l] @ grad[rows]`.

    Args:
      lhs_km: `[K, M]`, the transpose of a ragged `lhs` (rows sorted by group).
      grad_mn: `[M, N]`.
      group_sizes: int `[G]`.
      num_groups: groups to produce (default `G`); with `group_offset`, the local shard size.
      group_offset: first group produced (may be traced).
      impl, block_sizes, interpret, preferred_element_type: as for `gmm`.

    Returns `[num_groups, K, N]`: the gradient of `gmm` with respect to `rhs`.
    """
    if lhs_km.ndim != 2 or grad_mn.ndim != 2 or lhs_km.shape[1] != grad_mn.shape[0]:
        raise ValueError(f"tgmm: need lhs [K, M] and grad [M, N] with equal M, got {lhs_km.shape} "
                         f"and {grad_mn.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"tgmm: group_sizes must be [G], got shape {group_sizes.shape}")
    num = num_groups or group_sizes.shape[0]
    # tgmm's tiles match gmm's for lhs = lhs_km.T and rhs = [num, K, N].
    probe_lhs = jax.ShapeDtypeStruct(lhs_km.shape[::-1], lhs_km.dtype)
    probe_rhs = jax.ShapeDtypeStruct((num, lhs_km.shape[0], grad_mn.shape[1]), grad_mn.dtype)
    impl = choose_impl(probe_lhs, probe_rhs, block_sizes=block_sizes, impl=impl)
    out_dtype = jnp.dtype(preferred_element_type or lhs_km.dtype)
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    if impl == "reference":
        return reference.tgmm_reference(lhs_km, grad_mn, group_sizes, num_groups=num,
                                        group_offset=offset, preferred_element_type=out_dtype)
    if impl == "ragged_dot":
        return ragged.tgmm(lhs_km, grad_mn, group_sizes, offset, num, out_dtype)
    (k, m), n = lhs_km.shape, grad_mn.shape[1]
    return _batched_tgmm(impl, lhs_km.T[None], grad_mn[None], group_sizes[None], offset,
                         num_groups=num, block_sizes=_block_sizes(impl, block_sizes, m, k, n),
                         out_dtype=out_dtype, interpret=_interpret(interpret, impl))

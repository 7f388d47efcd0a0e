"""Quantization-aware training: a precision policy applied to every matmul of the model.

`PrecisionConfig` names a format for the weights, the input activations and the output
gradient of each matmul class ("attention", "mlp", "experts", "router", "head"). While a
model is traced under `use_precision(cfg.precision)` (the `Transformer` and the pipeline
executor enter it), the layers call:

    w = quantize_weight(w_kn, "mlp")            # module level: on the whole (global) weight
    y = linear(x_bk, w, "mlp")                  # x quantized along K; dy quantized in the VJP

Forward values are quantized and dequantized in float32 ("fake quant"); the backward
pass treats each rounding as the identity (straight-through estimator), and the output
cotangent is itself quantized once (along its feature axis) and feeds both the input and
the weight gradient. With `mode="native"` (or "auto" on a GPU with FP8 units) a matmul
whose weight and activation formats are both FP8 runs as a real fp8 dot with float32
accumulation, block by block along K, and the scales are applied to the partial sums:

    y[t, n] = sum_b  s_x[t, b] * s_w[b, n] * (x8[t, b, :] @ w8[b, :, n])

`rotation=g` rotates both operands of a quantized matmul by the same random Hadamard
blocks along K first, which leaves the product unchanged (`toolkit.precision.rotation`).
`describe_mode(cfg)` says which classes run natively, faked, or in full precision.
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

from toolkit.precision.formats import NumberFormat, get_format, quantize, quantize_dequantize
from toolkit.precision.rotation import rotate

CLASSES = ("attention", "mlp", "experts", "router", "head")
MODES = ("auto", "fake", "native")
_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}   # elements with a jnp fp8 dot
_CURRENT = contextvars.ContextVar("precision_policy", default=None)
_CAPTURE = contextvars.ContextVar("precision_capture", default=None)


@contextlib.contextmanager
def use_precision(policy):
    """Make `policy` (a `PrecisionConfig`, or None for full precision) the one the layers read."""
    token = _CURRENT.set(policy)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def capture_inputs():
    """Collect the float32 inputs of every matmul class (and keys/values as "kv") that
    runs inside, as host arrays `{cls: [array [..., K]]}`; works under jit and vmap."""
    store = {}
    token = _CAPTURE.set(store)
    try:
        yield store
    finally:
        _CAPTURE.reset(token)


def record(cls: str, x):
    """Add `x` to the active `capture_inputs` store (a no-op outside one)."""
    store = _CAPTURE.get()
    if store is not None:
        jax.debug.callback(lambda a: store.setdefault(cls, []).append(np.asarray(a, np.float32)), x)


def formats_of(cls: str, policy=None) -> tuple:
    """(weights, acts, grads) formats of matmul class `cls`, None where full precision."""
    policy = policy if policy is not None else _CURRENT.get()
    if policy is None:
        return None, None, None
    return tuple(get_format(getattr(policy, f"{cls}_{r}")) if getattr(policy, f"{cls}_{r}") else None
                 for r in ("weights", "acts", "grads"))


def _rotation(cls: str) -> int:
    policy = _CURRENT.get()
    w, a, _ = formats_of(cls)
    return policy.rotation if policy is not None and (w or a) else 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quant(x, fmt: NumberFormat, axis: int = -1):
    """Quantize-dequantize `x` in its dtype; the gradient passes straight through."""
    return quantize_dequantize(x, fmt, axis)


fake_quant.defvjp(lambda x, fmt, axis: (fake_quant(x, fmt, axis), None),
                  lambda fmt, axis, _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def quantize_grad(y, fmt: NumberFormat, axis: int = -1):
    """The identity forward; the incoming gradient is quantized to `fmt` along `axis`."""
    return y


quantize_grad.defvjp(lambda y, fmt, axis: (y, None),
                     lambda fmt, axis, _, g: (quantize_dequantize(g, fmt, axis),))


def quantize_weight(w, cls: str, axis: int = 0):
    """Rotate and fake-quantize weight `w` of class `cls` along its contraction `axis`.

    Called where the layer materialises the whole weight, so scale groups never depend on
    how the mesh splits it. In native mode the FP8 classes are quantized in `linear`."""
    fw = formats_of(cls)[0]
    g = _rotation(cls)
    if g:
        w = rotate(w, g, axis=axis)
    if fw is None or _native(cls):
        return w
    return fake_quant(w, fw, axis)


def quantize_acts(x, cls: str):
    """Rotate and fake-quantize matmul input `x` of class `cls` along its last axis."""
    _, fa, _ = formats_of(cls)
    g = _rotation(cls)
    if g:
        x = rotate(x, g, axis=-1)
    return fake_quant(x, fa, -1) if fa is not None else x


def quantize_out(y, cls: str):
    """Mark matmul output `y` of class `cls` so its gradient is quantized."""
    fg = formats_of(cls)[2]
    return quantize_grad(y, fg, -1) if fg is not None else y


def quantize_kv(x_btkh):
    """Keys or values as a `kv_cache` format would store them (per token and head, groups
    along head_dim); unchanged without one."""
    record("kv", x_btkh)
    policy = _CURRENT.get()
    if policy is None or not policy.kv_cache:
        return x_btkh
    return fake_quant(x_btkh, get_format(policy.kv_cache), -1)


def linear(x, w, cls: str):
    """`x @ w` contracting x's last axis with w's first, under class `cls`'s formats.

    `w` comes from `quantize_weight` (rotated, and faked unless native)."""
    record(cls, x)
    fw, fa, _ = formats_of(cls)
    if fw is None and fa is None and not _rotation(cls):
        return quantize_out(jnp.tensordot(x, w, axes=1), cls)
    if _native(cls):
        g = _rotation(cls)
        xr = rotate(x, g, axis=-1) if g else x
        y = native_dot(xr.reshape(-1, xr.shape[-1]), w.reshape(w.shape[0], -1), fa, fw)
        y = y.astype(x.dtype).reshape(x.shape[:-1] + w.shape[1:])
    else:
        y = jnp.tensordot(quantize_acts(x, cls), w, axes=1)
    return quantize_out(y, cls)


def native_supported() -> bool:
    """Whether the default backend has FP8 matmul units (NVIDIA compute capability >= 8.9)."""
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    return dev.platform == "gpu" and cc is not None and float(cc) >= 8.9


def _native(cls: str, policy=None) -> bool:
    policy = policy if policy is not None else _CURRENT.get()
    if policy is None or policy.mode == "fake" or cls == "experts":   # gmm takes float operands
        return False
    fw, fa, _ = formats_of(cls, policy)
    blocks = {f.block for f in (fa, fw) if f is not None and f.scaling in ("block", "block2d")}
    eligible = (fa is not None and fw is not None and fa.element in _DTYPES
                and fw.element in _DTYPES and fa.scaling != "block2d" and len(blocks) <= 1)
    return eligible and (policy.mode == "native" or native_supported())


def describe_mode(policy) -> dict:
    """{class: "native fp8 dot" | "fake-quant" | "full precision"} under `policy`."""
    out = {}
    for cls in CLASSES:
        fw, fa, fg = formats_of(cls, policy)
        out[cls] = ("native fp8 dot" if _native(cls, policy) else
                    "fake-quant" if (fw or fa or fg) else "full precision")
    return out


def _k_blocks(q, rows: int, g: int):
    """A quantized operand (`quantize` moved K last) as fp8 codes `[rows, Kb, g]` and
    float32 scales `[rows, Kb]`."""
    vals, scales = q.values, q.scales
    if q.fmt.scaling == "block2d":                      # [Nb, g, Kb, g], scales [Nb, 1, Kb, 1]
        nb, _, kb, _ = vals.shape
        vals = vals.reshape(nb * g, kb, g)[:rows]
        scales = jnp.broadcast_to(scales, (nb, g, kb, 1)).reshape(nb * g, kb)[:rows]
    elif q.fmt.scaling == "block":                      # [R, Kb, g], scales [R, Kb, 1]
        scales = scales[..., 0]
    else:                                               # tensor / channel: [R, K]
        vals = jnp.pad(vals, ((0, 0), (0, -vals.shape[-1] % g))).reshape(rows, -1, g)
        scales = jnp.broadcast_to(scales.reshape(-1, 1), (rows, vals.shape[1]))
    return vals.astype(_DTYPES[q.fmt.element]), scales


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def native_dot(x_tk, w_kn, fa: NumberFormat, fw: NumberFormat):
    """`x_tk @ w_kn` with both operands in FP8 and a real fp8 dot per K block (float32
    accumulation); the gradient flows through the dequantized operands (STE)."""
    return _native_forward(x_tk, w_kn, fa, fw)


def _native_forward(x_tk, w_kn, fa, fw):
    blocky = [f.block for f in (fa, fw) if f.scaling in ("block", "block2d")]
    g = blocky[0] if blocky else x_tk.shape[-1]
    x8, sx = _k_blocks(quantize(x_tk, fa, -1), x_tk.shape[0], g)      # [T, Kb, g], [T, Kb]
    w8, sw = _k_blocks(quantize(w_kn, fw, 0), w_kn.shape[1], g)       # [N, Kb, g], [N, Kb]
    partial_tbn = jnp.einsum("tbk,nbk->tbn", x8, w8, preferred_element_type=jnp.float32)
    return jnp.einsum("tbn,tb,nb->tn", partial_tbn, sx, sw)


def _native_fwd(x_tk, w_kn, fa, fw):
    return _native_forward(x_tk, w_kn, fa, fw), (x_tk, w_kn)


def _native_bwd(fa, fw, res, dy_tn):
    x_tk, w_kn = res
    xq, wq = quantize_dequantize(x_tk, fa, -1), quantize_dequantize(w_kn, fw, 0)
    return ((dy_tn @ wq.T.astype(dy_tn.dtype)).astype(x_tk.dtype),
            (xq.T.astype(dy_tn.dtype) @ dy_tn).astype(w_kn.dtype))


native_dot.defvjp(_native_fwd, _native_bwd)

"""Low-bit number formats: one `NumberFormat` description, quantize and dequantize.

A format is an element type (FP8 E4M3, FP4 E2M1, INT8, ...) plus a scaling scheme: how
many values share one scale (a tensor, a channel, a 1x128 tile, a 128x128 block, an MX
block of 32, an NV block of 16) and how the scale itself is stored (FP32, a power of two
UE8M0, or E4M3 under an FP32 per-tensor scale). Quantizing divides each group by its
scale, rounds every value to the nearest element (ties to even), and multiplies back:

    x_q = s * Q(x / s),        s = absmax(group) / Q_max   (then rounded per `scale`)

    from toolkit.precision import qsnr, quantize, dequantize, get_format
    q = quantize(x_td, "mxint8")              # values on the INT8 grid, one scale per 32
    x_back = dequantize(q)
    qsnr(x_td, "nvfp4")                       # dB; any name in FORMATS, or a NumberFormat
    get_format("mxfp4").replace(block=16)     # formats are frozen values

Groups run along `axis`, the contraction axis of the matmul the tensor feeds (the last
axis of activations, the first of a `[K, N]` weight): MX and NV blocks and 1x128 tiles
split it; "channel" keeps one scale per row of the other axes; "block2d" tiles the last
two axes once `axis` is moved last (128x128 weight blocks of DeepSeek-V3 / Ling 2.0).

UE8M0 scale rounding (`scale_rule`): "ceil" rounds `absmax / Q_max` up to a power of two,
so no value clips (the INT v.s. FP paper's rule, our default); "floor" is the OCP MX
rule `2^(floor(log2 absmax) - emax_elem)`, which can clip the block's largest values.
Integer elements clip symmetrically to +-(2^(b-1) - 1) by default (the paper's fix for
a negative gradient bias); `symmetric=False` allows -2^(b-1).
"""

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

# element name -> (kind, exponent bits, mantissa bits, largest value, ml_dtypes type)
ELEMENTS = {
    "e4m3": ("fp", 4, 3, 448.0, ml_dtypes.float8_e4m3fn),
    "e5m2": ("fp", 5, 2, 57344.0, ml_dtypes.float8_e5m2),
    "e2m3": ("fp", 2, 3, 7.5, ml_dtypes.float6_e2m3fn),
    "e3m2": ("fp", 3, 2, 28.0, ml_dtypes.float6_e3m2fn),
    "e2m1": ("fp", 2, 1, 6.0, ml_dtypes.float4_e2m1fn),
    "bf16": ("fp", 8, 7, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max), ml_dtypes.bfloat16),
    "int8": ("int", 0, 0, 127.0, np.int8),
    "int6": ("int", 0, 0, 31.0, None),
    "int4": ("int", 0, 0, 7.0, ml_dtypes.int4),
}
SCALINGS = ("none", "tensor", "channel", "block", "block2d")
SCALES = ("fp32", "ue8m0", "e4m3")
SCALE_RULES = ("ceil", "floor")


@dataclass(frozen=True, kw_only=True)
class NumberFormat:
    """A quantization format.

    Attributes:
      name: short name (a key of `FORMATS` for the built-in ones).
      element: element type, a key of `ELEMENTS` ("e4m3", "e2m1", "int8", ...).
      scaling: "none" (cast only), "tensor", "channel" (one scale per row of the other
        axes), "block" (`block` consecutive values along the axis) or "block2d"
        (`block x block` tiles of the last two axes once the axis is moved last).
      block: values per scale along the axis for "block"/"block2d".
      scale: how scales are stored: "fp32", "ue8m0" (a power of two, MX) or "e4m3" (an
        E4M3 block scale times an FP32 per-tensor scale, NV).
      scale_rule: UE8M0 rounding, "ceil" (no clipping) or "floor" (OCP MX spec).
      symmetric: integer elements clip to +-(2^(b-1)-1) instead of [-2^(b-1), 2^(b-1)-1].
    """

    name: str
    element: str
    scaling: str = "tensor"
    block: int = 0
    scale: str = "fp32"
    scale_rule: str = "ceil"
    symmetric: bool = True

    def __post_init__(self):
        checks = [("element", self.element, tuple(ELEMENTS)), ("scaling", self.scaling, SCALINGS),
                  ("scale", self.scale, SCALES), ("scale_rule", self.scale_rule, SCALE_RULES)]
        for field, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"NumberFormat {self.name!r}: {field}={value!r} is not one of {allowed}")
        if self.scaling in ("block", "block2d") and self.block < 1:
            raise ValueError(f"NumberFormat {self.name!r}: scaling={self.scaling!r} needs block >= 1, "
                             f"got block={self.block}; MX formats use 32, NV 16, tiles 128")

    def replace(self, **changes) -> "NumberFormat":
        return dataclasses.replace(self, **changes)

    @property
    def is_int(self) -> bool:
        return ELEMENTS[self.element][0] == "int"

    @property
    def bits(self) -> int:
        """Bits per element."""
        kind, e, m, _, _ = ELEMENTS[self.element]
        return int(self.element[3:]) if kind == "int" else 1 + e + m

    @property
    def mantissa_bits(self) -> int:
        return ELEMENTS[self.element][2]

    @property
    def qmax(self) -> float:
        """Largest element magnitude."""
        return ELEMENTS[self.element][3]

    @property
    def emax(self) -> int:
        """Exponent of the largest element (the OCP MX floor rule subtracts it)."""
        return math.floor(math.log2(self.qmax))

    @property
    def bits_per_value(self) -> float:
        """Storage bits per value including its share of a block scale (4.25 for MXFP4,
        4.5 for NVFP4; per-tensor and per-channel scales are not counted)."""
        per_scale = {"fp32": 32, "ue8m0": 8, "e4m3": 8}[self.scale]
        return self.bits + (per_scale / self.block if self.scaling == "block" else 0.0) + (
            per_scale / self.block ** 2 if self.scaling == "block2d" else 0.0)


def _fmt(name, element, scaling="tensor", block=0, scale="fp32") -> NumberFormat:
    return NumberFormat(name=name, element=element, scaling=scaling, block=block, scale=scale)


FORMATS = {f.name: f for f in [
    _fmt("bf16", "bf16", "none"),
    _fmt("fp8_e4m3", "e4m3"), _fmt("fp8_e5m2", "e5m2"),
    _fmt("fp8_e4m3_channel", "e4m3", "channel"), _fmt("fp8_e5m2_channel", "e5m2", "channel"),
    _fmt("fp8_e4m3_1x128", "e4m3", "block", 128), _fmt("fp8_e5m2_1x128", "e5m2", "block", 128),
    _fmt("fp8_e4m3_128x128", "e4m3", "block2d", 128),
    _fmt("mxfp8", "e4m3", "block", 32, "ue8m0"), _fmt("mxfp8_e5m2", "e5m2", "block", 32, "ue8m0"),
    _fmt("mxfp6", "e2m3", "block", 32, "ue8m0"), _fmt("mxfp6_e3m2", "e3m2", "block", 32, "ue8m0"),
    _fmt("mxfp4", "e2m1", "block", 32, "ue8m0"),
    _fmt("mxint8", "int8", "block", 32, "ue8m0"), _fmt("mxint6", "int6", "block", 32, "ue8m0"),
    _fmt("mxint4", "int4", "block", 32, "ue8m0"),
    _fmt("nvfp4", "e2m1", "block", 16, "e4m3"), _fmt("nvint4", "int4", "block", 16, "e4m3"),
    _fmt("int8", "int8", "channel"), _fmt("int4", "int4", "channel"),
    _fmt("int8_g128", "int8", "block", 128), _fmt("int4_g128", "int4", "block", 128),
    _fmt("int4_g32", "int4", "block", 32),
]}
MX_NV = ("mxfp8", "mxint8", "mxfp6", "mxint6", "mxfp4", "mxint4", "nvfp4", "nvint4")


def get_format(fmt) -> NumberFormat:
    """A `NumberFormat` from itself, its short name (a key of `FORMATS`), or a name with
    changes such as "mxint4,block=16" or "mxfp4,scale_rule=floor" or "int8,symmetric=false"
    (the spec string becomes the format's name, so configs can hold it)."""
    if isinstance(fmt, NumberFormat):
        return fmt
    base, *changes = str(fmt).split(",")
    if base not in FORMATS:
        raise ValueError(f"unknown number format {base!r}; known formats: {', '.join(FORMATS)}")
    kw = {}
    for change in changes:
        key, _, value = change.partition("=")
        if key == "block" and value.isdigit():
            kw[key] = int(value)
        elif key == "scale_rule" and value in SCALE_RULES:
            kw[key] = value
        elif key == "symmetric" and value in ("true", "false"):
            kw[key] = value == "true"
        else:
            raise ValueError(f"format change {change!r} in {fmt!r} is not understood; use block=<int>, "
                             f"scale_rule=ceil|floor or symmetric=true|false")
    return FORMATS[base].replace(name=str(fmt), **kw) if kw else FORMATS[base]


def round_to_element(v, element: str, *, symmetric: bool = True):
    """Round float32 `v` to the nearest value of `element` (ties to even), saturating."""
    kind, e, m, vmax, _ = ELEMENTS[element]
    if kind == "int":
        lo = -vmax if symmetric else -vmax - 1
        return jnp.clip(jnp.round(v), lo, vmax)
    emin = 2 - 2 ** (e - 1)                            # exponent of the smallest normal
    _, exp = jnp.frexp(jnp.abs(v))                     # |v| = mant * 2^exp, mant in [0.5, 1)
    step = _pow2(jnp.maximum(exp - 1, emin) - m)
    return jnp.clip(jnp.round(v / step) * step, -vmax, vmax)


def _pow2(n):
    """2^n exactly for integer n (XLA's exp2 is off in the last bits)."""
    return jnp.ldexp(jnp.float32(1.0), jnp.asarray(n, jnp.int32))


def _ceil_log2(s):
    """ceil(log2 s) for s > 0, exactly (via frexp, not log2)."""
    mant, exp = jnp.frexp(s)
    return exp - (mant == 0.5)


def _scales(amax, fmt: NumberFormat, tensor_amax):
    """Per-group scales from per-group absmax (zero groups get scale 1)."""
    s = amax / fmt.qmax
    if fmt.scale == "ue8m0":
        if fmt.scale_rule == "ceil":
            log2 = _ceil_log2(s)
        else:
            log2 = jnp.frexp(amax)[1] - 1 - fmt.emax
        s = _pow2(jnp.clip(log2, -126, 127))           # 2^-127 is an fp32 subnormal, flushed on CPU
    elif fmt.scale == "e4m3":
        s_tensor = jnp.where(tensor_amax > 0, tensor_amax / (448.0 * fmt.qmax), 1.0)
        s_block = round_to_element(s / s_tensor, "e4m3")
        s = jnp.maximum(s_block, 2.0 ** -9) * s_tensor   # an all-zero block keeps a tiny scale
    return jnp.where(amax > 0, s, 1.0)


def grouped(x, fmt: NumberFormat, axis: int):
    """x with `axis` last, padded and reshaped so each scale group is reducible over
    `red` axes; returns (view, red axes, undo)."""
    x = jnp.moveaxis(x, axis, -1)
    shape = x.shape
    g = fmt.block
    if fmt.scaling == "block":
        pad = -shape[-1] % g
        v = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(shape[:-1] + (-1, g))
        red = (-1,)

        def undo(y):
            return jnp.moveaxis(y.reshape(shape[:-1] + (-1,))[..., :shape[-1]], -1, axis)
    elif fmt.scaling == "block2d":
        if x.ndim < 2:
            raise ValueError(f"format {fmt.name!r} tiles two axes; got a {x.ndim}-d array")
        pads = (-shape[-2] % g, -shape[-1] % g)
        xp = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pads[0]), (0, pads[1])])
        m, k = xp.shape[-2:]
        v = xp.reshape(shape[:-2] + (m // g, g, k // g, g))
        red = (-3, -1)

        def undo(y):
            y = y.reshape(shape[:-2] + (m, k))[..., :shape[-2], :shape[-1]]
            return jnp.moveaxis(y, -1, axis)
    else:
        v = x
        red = {"channel": (-1,), "tensor": tuple(range(x.ndim)), "none": ()}[fmt.scaling]

        def undo(y):
            return jnp.moveaxis(y, -1, axis)
    return v, red, undo


@struct.dataclass
class Quantized:
    """A quantized tensor: `values` on the element grid (float32, the view's layout) and
    one scale per group; `dequantize` restores the original layout."""

    values: jax.Array
    scales: jax.Array
    fmt: NumberFormat = struct.field(pytree_node=False)
    axis: int = struct.field(pytree_node=False)
    shape: tuple = struct.field(pytree_node=False)

    def codes(self):
        """The values in their storage dtype (jnp float8/float4/int8/int4 where JAX has one)."""
        target = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2, "e2m1": jnp.float4_e2m1fn,
                  "int8": jnp.int8, "int4": jnp.int4, "bf16": jnp.bfloat16}.get(self.fmt.element)
        return self.values if target is None else self.values.astype(target)


def quantize(x, fmt, axis: int = -1) -> Quantized:
    """Quantize `x` to `fmt` (a NumberFormat or a name) with groups along `axis`."""
    fmt = get_format(fmt)
    x32 = jnp.asarray(x, jnp.float32)
    axis = axis % max(x32.ndim, 1)
    v, red, _ = grouped(x32, fmt, axis)
    if fmt.scaling == "none":
        scales = jnp.ones((), jnp.float32)
    else:
        amax = jnp.max(jnp.abs(v), axis=red, keepdims=True)
        scales = _scales(amax, fmt, jnp.max(jnp.abs(x32)))
    values = round_to_element(v / scales, fmt.element, symmetric=fmt.symmetric)
    return Quantized(values=values, scales=scales, fmt=fmt, axis=axis, shape=x32.shape)


def dequantize(q: Quantized):
    """float32 values `scale * element` in the original layout."""
    _, _, undo = grouped(jnp.zeros(q.shape, jnp.float32), q.fmt, q.axis)
    return undo(q.values * q.scales)


def quantize_dequantize(x, fmt, axis: int = -1):
    """`dequantize(quantize(x))` in x's dtype (no gradient handling; see `fake_quant`)."""
    return dequantize(quantize(x, fmt, axis)).astype(jnp.asarray(x).dtype)


def qsnr(x, fmt, axis: int = -1, *, rotation: int = 0, seed: int = 0) -> float:
    """Quantization signal-to-noise ratio in dB, `-10 log10(|x - x_q|^2 / |x|^2)`; with
    `rotation=g`, a random Hadamard rotation of blocks of g along `axis` comes first."""
    from toolkit.precision.rotation import rotate  # rotation imports nothing from here
    x = jnp.asarray(x, jnp.float32)
    if rotation:
        x = rotate(x, rotation, axis=axis, seed=seed)
    err = x - quantize_dequantize(x, fmt, axis)
    return float(10.0 * jnp.log10(jnp.sum(x * x) / jnp.maximum(jnp.sum(err * err), 1e-30)))


def crest_factor(x, block: int = 32, axis: int = -1) -> float:
    """Mean over blocks of `block` values along `axis` of absmax / RMS (the paper's kappa).
    `block=0` takes the whole tensor as one block."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
    v = x.reshape(-1) if not block else x.reshape(x.shape[:-1] + (-1, block))
    rms = jnp.sqrt(jnp.mean(v * v, axis=-1))
    return float(jnp.mean(jnp.max(jnp.abs(v), axis=-1) / jnp.maximum(rms, 1e-30)))


# Crest factors below which the INT format beats its FP twin (INT v.s. FP, Table/Fig.).
CROSSOVER_CREST = {("mxint8", "mxfp8"): 7.55, ("mxint6", "mxfp6"): 1.96,
                   ("mxint4", "mxfp4"): 2.04, ("nvint4", "nvfp4"): 2.39}


def qsnr_theory(fmt, crest: float, *, rho: float = 1.5) -> float:
    """Theorem 1 of INT v.s. FP (dB): INT `4.78 + 6.02 b - 20 log10(rho) - 20 log10(kappa)`
    with UE8M0 scales (E4M3 scales: no rho term, `+10 log10(g/(g-1))`); FP with M mantissa
    bits `13.80 + 6.02 M`, independent of kappa while the range suffices."""
    fmt = get_format(fmt)
    if not fmt.is_int:
        return 13.80 + 6.02 * fmt.mantissa_bits
    base = 4.78 + 6.02 * fmt.bits - 20.0 * math.log10(crest)
    if fmt.scale == "e4m3":
        return base + 10.0 * math.log10(fmt.block / (fmt.block - 1))
    return base - 20.0 * math.log10(rho)

"""Low-bit number formats, Hadamard rotation and quantization-aware training."""

from toolkit.precision.fake_quant import (
    CLASSES,
    describe_mode,
    fake_quant,
    formats_of,
    linear,
    native_dot,
    native_supported,
    quantize_acts,
    quantize_grad,
    quantize_kv,
    quantize_out,
    quantize_weight,
    use_precision,
)
from toolkit.precision.formats import (
    CROSSOVER_CREST,
    ELEMENTS,
    FORMATS,
    MX_NV,
    NumberFormat,
    Quantized,
    crest_factor,
    dequantize,
    get_format,
    qsnr,
    qsnr_theory,
    quantize,
    quantize_dequantize,
    round_to_element,
)
from toolkit.precision.rotation import hadamard, rotate, unrotate

__all__ = [
    "CLASSES", "CROSSOVER_CREST", "ELEMENTS", "FORMATS", "MX_NV", "NumberFormat", "Quantized",
    "crest_factor", "dequantize", "describe_mode", "fake_quant", "formats_of", "get_format",
    "hadamard", "linear", "native_dot", "native_supported", "qsnr", "qsnr_theory", "quantize",
    "quantize_acts", "quantize_dequantize", "quantize_grad", "quantize_kv", "quantize_out", "quantize_weight",
    "rotate", "round_to_element", "unrotate", "use_precision",
]

"""COMET's fine-grained mixed precision (FMPQ): INT8 for outlier blocks, INT4 elsewhere.

Activation channels (the K axis) are cut into blocks of `block` (128 in COMET). A few
channels carry outliers; a block holding one needs INT8, the rest do well in INT4. A
channel permutation, found offline on calibration data and applied to the weight rows
too (so `x P (P^T w) = x w`), sorts the outlier channels into the same few blocks, so
fewer blocks need 8 bits for the same error:

    perm = outlier_permutation(calib_tk, block=128)
    frac, db = int8_fraction_needed(x_tk, target_db=30.0)                # blocks in order
    frac_p, db_p = int8_fraction_needed(x_tk[:, perm], target_db=30.0)   # fewer INT8 blocks

Scales are per token and block, symmetric (COMET does not pin the activation scale
granularity down; per token x block is the finest one its W4Ax kernel supports).
Blocks are promoted to INT8 in order of their absmax over the calibration tokens.
"""

import jax.numpy as jnp
import numpy as np

from toolkit.precision.formats import NumberFormat, quantize_dequantize

_INT8 = NumberFormat(name="int8_block", element="int8", scaling="block", block=128)
_INT4 = NumberFormat(name="int4_block", element="int4", scaling="block", block=128)


def _blocks(x_tk, block: int):
    t, k = x_tk.shape
    if k % block:
        raise ValueError(f"FMPQ block {block} does not divide the {k} channels; use a divisor of {k}")
    return jnp.asarray(x_tk, jnp.float32).reshape(t, k // block, block)


def fmpq_quantize(x_tk, int8_blocks, block: int = 128):
    """Fake-quantize `x_tk` with blocks `int8_blocks` (bool `[K/block]`) in INT8, the rest INT4."""
    x_tbk = _blocks(x_tk, block)
    q8 = quantize_dequantize(x_tbk, _INT8.replace(block=block))
    q4 = quantize_dequantize(x_tbk, _INT4.replace(block=block))
    q = jnp.where(jnp.asarray(int8_blocks)[None, :, None], q8, q4)
    return q.reshape(x_tk.shape)


def outlier_permutation(calib_tk) -> np.ndarray:
    """Channel order putting the channels with the largest calibration absmax first."""
    return np.argsort(-np.max(np.abs(np.asarray(calib_tk)), axis=0), kind="stable")


def _db(x, q) -> float:
    x, q = np.asarray(x, np.float64), np.asarray(q, np.float64)
    return float(10 * np.log10(np.sum(x * x) / max(np.sum((x - q) ** 2), 1e-30)))


def int8_fraction_needed(x_tk, target_db: float, block: int = 128) -> tuple:
    """Smallest share of INT8 blocks (promoted by absmax, largest first) whose QSNR reaches
    `target_db`, and the QSNR reached; (1.0, all-INT8 QSNR) if even that falls short."""
    x_tbk = _blocks(x_tk, block)
    nb = x_tbk.shape[1]
    order = np.argsort(-np.asarray(jnp.max(jnp.abs(x_tbk), axis=(0, 2))), kind="stable")
    db = None
    for n8 in range(nb + 1):
        mask = np.zeros(nb, bool)
        mask[order[:n8]] = True
        db = _db(x_tk, fmpq_quantize(x_tk, mask, block))
        if db >= target_db:
            return n8 / nb, db
    return 1.0, db

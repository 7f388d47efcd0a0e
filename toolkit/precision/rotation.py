"""Random Hadamard rotation: spread outliers across a block before quantizing.

A block-diagonal orthogonal matrix `R = diag(H_g D, H_g D, ...)` (H_g the normalised
g x g Sylvester-Hadamard matrix, D a fixed random +-1 diagonal) mixes each block of g
values, so one outlier becomes g values of similar size: the block's crest factor drops
and integer formats gain (INT v.s. FP, section on rotation; QuaRot). Because R is
orthogonal, rotating both matmul operands along the contraction axis leaves the product
unchanged, `(x R)(R^T w) = x w`:

    x_rot = rotate(x_tk, 32)                  # blocks of 32 along the last axis
    w_rot = rotate(w_kn, 32, axis=0)          # R^T w: the same call along K
    x_back = unrotate(x_rot, 32)              # R^T is the inverse (exact to fp32 rounding)
"""

import jax.numpy as jnp
import numpy as np


def hadamard(g: int, seed: int = 0) -> np.ndarray:
    """float32 `[g, g]` orthogonal `diag(signs) H_g / sqrt(g)`; g a power of two."""
    if g < 1 or g & (g - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {g}; use 16, 32, 64 or 128")
    h = np.ones((1, 1))
    while h.shape[0] < g:
        h = np.block([[h, h], [h, -h]])
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=g)
    return (signs[:, None] * h / np.sqrt(g)).astype(np.float32)


def _apply(x, r, axis):
    g = r.shape[0]
    x = jnp.moveaxis(jnp.asarray(x), axis, -1)
    if x.shape[-1] % g:
        raise ValueError(f"rotation block {g} does not divide the axis of size {x.shape[-1]}; "
                         f"use a block that divides it (a power of two <= {x.shape[-1]})")
    blocks = x.reshape(x.shape[:-1] + (-1, g))
    y = jnp.einsum("...bj,ji->...bi", blocks, jnp.asarray(r, blocks.dtype))
    return jnp.moveaxis(y.reshape(x.shape), -1, axis)


def rotate(x, g: int, axis: int = -1, seed: int = 0):
    """`x R` along `axis` in blocks of g (for a weight `[K, N]` with axis=0: `R^T w`)."""
    return _apply(x, hadamard(g, seed), axis)


def unrotate(x, g: int, axis: int = -1, seed: int = 0):
    """The inverse of `rotate`: `x R^T` along `axis`."""
    return _apply(x, hadamard(g, seed).T, axis)

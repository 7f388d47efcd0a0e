"""Vocabulary-parallel cross-entropy: softmax over a vocabulary split across devices.

The output layer `[d, V]` is split by columns over the devices of `axis_name`; each holds
logits for its `V/n` ids only. Cross-entropy needs the whole row's log-sum-exp, which
partial statistics give with small all-reduces (Yeung et al. 2024, Vocabulary Parallelism):

    m     = pmax(max_j z_loc)                       # global max, for stability
    Sigma = psum(sum_j exp(z_loc - m))              # global normaliser
    z_t   = psum(z_loc[target] if target is mine else 0)
    CE    = log Sigma + m - z_t
    dCE/dz_loc = exp(z_loc - m) / Sigma - onehot_loc(target)     # stays local

Only `[tokens]`-sized numbers travel, never logits. Use it inside `shard_map` on local
logits:

    loss_bt = vocab_parallel_cross_entropy(logits_btv_local, targets_bt, "tensor")

`axis_name` may be a tuple of axes; device `k` along it (row-major) owns ids
`k*V_loc ... (k+1)*V_loc - 1`, the layout of a `[d, V]` array sharded over those axes.
"""

import functools

import jax
import jax.numpy as jnp


def _stats(logits_loc, targets, axis_name):
    v_loc = logits_loc.shape[-1]
    start = jax.lax.axis_index(axis_name) * v_loc
    z = logits_loc.astype(jnp.float32)
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(z, axis=-1)), axis_name)
    e = jnp.exp(z - m[..., None])
    total = jax.lax.psum(jnp.sum(e, axis=-1), axis_name)
    local = targets - start
    mine = (local >= 0) & (local < v_loc)
    z_t = jnp.take_along_axis(z, jnp.clip(local, 0, v_loc - 1)[..., None], axis=-1)[..., 0]
    z_t = jax.lax.psum(jnp.where(mine, z_t, 0.0), axis_name)
    return e, total, m, z_t, local, mine


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def vocab_parallel_cross_entropy(logits_loc, targets, axis_name):
    """Per-token cross-entropy `[...]` from this device's logit columns `[..., V_loc]`."""
    _, total, m, z_t, _, _ = _stats(logits_loc, targets, axis_name)
    return jnp.log(total) + m - z_t


def _fwd(logits_loc, targets, axis_name):
    e, total, m, z_t, local, mine = _stats(logits_loc, targets, axis_name)
    return jnp.log(total) + m - z_t, (e / total[..., None], local, mine,
                                      jnp.zeros((), logits_loc.dtype))


def _bwd(axis_name, res, g):
    softmax_loc, local, mine, like = res
    onehot = jax.nn.one_hot(jnp.where(mine, local, -1), softmax_loc.shape[-1], dtype=jnp.float32)
    return ((softmax_loc - onehot) * g[..., None]).astype(like.dtype), None


vocab_parallel_cross_entropy.defvjp(_fwd, _bwd)

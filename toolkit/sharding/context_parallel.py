"""Context parallelism: causal attention when each device holds one piece of every sequence.

With `parallel.sequence = n`, device j of the `sequence` axis holds positions
`[j*S/n, (j+1)*S/n)` of each sequence. Everything but attention is per token; attention
needs the keys and values of all earlier positions. Two ways, both inside `shard_map`
(local shapes `[B, S/n, heads, h]`):

  ring (Liu et al. 2023, Ring Attention): n steps; at step i a device attends its queries
      to the K/V block of device j-i, then passes the block on with `ppermute`. Scores
      are merged with the online softmax (running max m, normaliser l, output o), so
      memory stays one block; blocks wholly in the future are masked out.
  all_gather: gather every device's K/V, attend to the causal prefix. One collective, K/V
      memory for the whole sequence.

    o_bsnh = context_attention(q_bsnh, k_bskh, v_bskh, "sequence", mode="ring")

Both equal full causal attention on the gathered sequence (`reference_attention`),
forward and gradients. Query heads share kv heads in groups (GQA), as in `Attention`.
Load balancing of the causal triangle (zig-zag ordering) is not done: with a
contiguous split, the last device does the most work.
"""

import jax
import jax.numpy as jnp

MODES = ("ring", "all_gather")
_MASKED = -1e30


def _scores(q_bsnh, k_bskh):
    """`[B, K, G, S_q, S_k]` scores, query head n = k*G + g sharing kv head k."""
    b, s, n, h = q_bsnh.shape
    k = k_bskh.shape[2]
    q = q_bsnh.reshape(b, s, k, n // k, h).astype(jnp.float32)
    return jnp.einsum("bskgh,btkh->bkgst", q, k_bskh.astype(jnp.float32)) / jnp.sqrt(h)


def _block(q_bsnh, k_bskh, v_bskh, q_start, k_start, state):
    """Fold one K/V block into the online-softmax state `(max, normaliser, output)`."""
    m, denom, o = state
    s_q, s_k = q_bsnh.shape[1], k_bskh.shape[1]
    visible = (q_start + jnp.arange(s_q))[:, None] >= (k_start + jnp.arange(s_k))[None, :]
    scores = jnp.where(visible, _scores(q_bsnh, k_bskh), _MASKED)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    p = jnp.where(visible, jnp.exp(scores - m_new[..., None]), 0.0)
    scale = jnp.exp(m - m_new)
    denom = denom * scale + jnp.sum(p, axis=-1)
    o = o * scale[..., None] + jnp.einsum("bkgst,btkh->bkgsh", p, v_bskh.astype(jnp.float32))
    return m_new, denom, o


def _finish(state, like_bsnh):
    _, denom, o = state
    b, s, n, h = like_bsnh.shape
    out = o / denom[..., None]                                   # [B, K, G, S, h]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, s, n, h).astype(like_bsnh.dtype)


def _init(q_bsnh, k_bskh):
    b, s, n, h = q_bsnh.shape
    k = k_bskh.shape[2]
    return (jnp.full((b, k, n // k, s), _MASKED, jnp.float32),
            jnp.zeros((b, k, n // k, s), jnp.float32), jnp.zeros((b, k, n // k, s, h), jnp.float32))


def ring_attention(q_bsnh, k_bskh, v_bskh, axis_name):
    """Causal ring attention over `axis_name` (inside `shard_map`)."""
    n = jax.lax.psum(1, axis_name)
    j = jax.lax.axis_index(axis_name)
    s = q_bsnh.shape[1]
    state = _init(q_bsnh, k_bskh)
    perm = [(d, (d + 1) % n) for d in range(n)]
    for i in range(n):             # the block of device j-i; the own block first (never empty)
        state = _block(q_bsnh, k_bskh, v_bskh, j * s, ((j - i) % n) * s, state)
        if i < n - 1:
            k_bskh, v_bskh = jax.lax.ppermute((k_bskh, v_bskh), axis_name, perm)
    return _finish(state, q_bsnh)


def all_gather_attention(q_bsnh, k_bskh, v_bskh, axis_name):
    """Causal attention to the gathered keys and values (inside `shard_map`)."""
    j = jax.lax.axis_index(axis_name)
    k_all = jax.lax.all_gather(k_bskh, axis_name, axis=1, tiled=True)
    v_all = jax.lax.all_gather(v_bskh, axis_name, axis=1, tiled=True)
    state = _block(q_bsnh, k_all, v_all, j * q_bsnh.shape[1], 0, _init(q_bsnh, k_bskh))
    return _finish(state, q_bsnh)


def context_attention(q_bsnh, k_bskh, v_bskh, axis_name, mode: str = "ring"):
    """Causal attention for sequences split over `axis_name`; `mode` one of `MODES`."""
    if mode not in MODES:
        raise ValueError(f"parallel.context={mode!r} is unknown; use one of {MODES}")
    fn = ring_attention if mode == "ring" else all_gather_attention
    return fn(q_bsnh, k_bskh, v_bskh, axis_name)


def reference_attention(q_bsnh, k_bskh, v_bskh):
    """Plain causal GQA attention on whole sequences, the check for the above."""
    return _finish(_block(q_bsnh, k_bskh, v_bskh, 0, 0, _init(q_bsnh, k_bskh)), q_bsnh)

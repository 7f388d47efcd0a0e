"""Experts computed where the token is: never dispatched, never in a grouped matmul.

MoE++ (Jin et al. 2024) adds zero-computation experts beside the FFN experts, so easy
tokens can spend less:

    zero:      E(x) = 0                      (Duo-LLM's "skip" is this expert)
    copy:      E(x) = x
    constant:  E(x) = a1 x + a2 v,  [a1, a2] = softmax(W_c x),  v a learned vector

They cost no FFN FLOPs and move no bytes between devices. Hecto (2025) mixes experts of
different kinds; here a GRU expert runs causally along the sequence (`recurrent.GRU`, width
`d_gru_expert`, projected back to d_model), so a token routed to it gets a summary of its
prefix instead of a per-token FFN. A recurrence needs every position, so the GRU runs over
all tokens and its output is weighed in only where routed: it is a dense cost, like
attention, and `toolkit.analysis.routing.flops_per_token` counts it that way.

Expert ids follow the FFN experts: zero, then copy, constant and GRU experts
(`MoEConfig.num_ffn_experts` onwards).

    local = LocalExperts(d_model, cfg.moe, rngs=rngs)
    y_btd = local(x_btd, routing_weights_btk, routing_ids_btk)
"""

import jax
import jax.numpy as jnp
from flax import nnx

from toolkit.config import MoEConfig
from toolkit.models.layers import param
from toolkit.moe.recurrent import GRU


class LocalExperts(nnx.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.first = cfg.num_ffn_experts
        self.counts = (cfg.zero_experts, cfg.copy_experts, cfg.constant_experts, cfg.gru_experts)
        n_const, n_gru = cfg.constant_experts, cfg.gru_experts
        self.w_cd2 = param(rngs, (n_const, d_model, 2), (None, "embed", None),
                           fan_in=d_model) if n_const else None
        self.v_cd = param(rngs, (n_const, d_model), (None, "embed"), fan_in=1) if n_const else None
        self.grus = nnx.List([GRU(d_model, cfg.d_gru_expert, rngs=rngs) for _ in range(n_gru)])
        self.w_out = nnx.List([param(rngs, (cfg.d_gru_expert, d_model), (None, "embed"))
                               for _ in range(n_gru)])

    def gates(self, weights_btk, ids_btk, valid_btk):
        """[B, S, n_local] combine weight of each local expert per token (0 where unchosen)."""
        n = sum(self.counts)
        local_btk = jnp.where(valid_btk, ids_btk - self.first, -1)
        onehot_btkn = jax.nn.one_hot(local_btk, n, dtype=jnp.float32)   # -1 and FFN ids -> 0
        return jnp.einsum("bskn,bsk->bsn", onehot_btkn, weights_btk.astype(jnp.float32))

    def __call__(self, x_btd, weights_btk, ids_btk, valid_btk):
        n_zero, n_copy, n_const, n_gru = self.counts
        g_bsn = self.gates(weights_btk, ids_btk, valid_btk)
        x32 = x_btd.astype(jnp.float32)
        y = jnp.zeros_like(x32)
        at = n_zero                                       # zero experts add nothing
        if n_copy:
            y += jnp.sum(g_bsn[..., at:at + n_copy], -1, keepdims=True) * x32
        at += n_copy
        if n_const:
            a_bsc2 = jax.nn.softmax(jnp.einsum("bsd,cdt->bsct", x32, self.w_cd2[...]), axis=-1)
            g_bsc = g_bsn[..., at:at + n_const]
            y += jnp.einsum("bsc,bsc->bs", g_bsc, a_bsc2[..., 0])[..., None] * x32
            y += jnp.einsum("bsc,bsc,cd->bsd", g_bsc, a_bsc2[..., 1], self.v_cd[...])
        at += n_const
        for j, (gru, w_out) in enumerate(zip(self.grus, self.w_out, strict=True)):
            y += g_bsn[..., at + j, None] * (gru.scan(x32) @ w_out[...])
        return y.astype(x_btd.dtype)

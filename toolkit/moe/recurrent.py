"""Recurrence in an MoE: the layerwise recurrent router (RMoE) and its GRU.

RMoE (Qiu et al. 2024) lets a layer's router see how earlier layers routed the token. Depth
is the time axis of one GRU shared by every MoE layer; each layer i has its own projection
`D -> p` and gate `p -> E`:

    x'_i = x_i W_proj_i
    h_i  = GRU(x'_i, h_{i-1})          # h_0 = 0; one GRU for all layers
    l_i  = h_i G_i  ->  softmax, top-k, renormalise

`h_{i-1}` is not detached, so the loss at layer i trains the projections and gates of
every earlier layer through the recurrence (the paper's "recurrent gradient"). The state
travels between layers in `Routing.state["h"]`; the `Transformer` owns the shared GRU.

    gru = GRU(128, 128, rngs=rngs)            # shared
    router = RecurrentRouter(d_model, 8, 2, gru=gru, rngs=rngs)
    r1 = router(x_td)                         # layer 1: h_0 = 0
    r2 = router2(y_td, r1.state)              # layer 2 continues from r1.state["h"]

The same `GRU` runs along the sequence in `toolkit.moe.local_experts` (Hecto's GRU expert).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from toolkit.models.layers import param
from toolkit.moe.router import Router, Routing, top_k_routing


class GRU(nnx.Module):
    """A standard GRU cell (PyTorch's gate order r, z, n), float32:

        r = sigmoid(W_r x + U_r h + b_r),  z = sigmoid(W_z x + U_z h + b_z)
        n = tanh(W_n x + b_n + r * (U_n h + b_hn)),  h' = (1 - z) * n + z * h
    """

    def __init__(self, d_in: int, d_hidden: int, *, rngs: nnx.Rngs):
        self.w_x = param(rngs, (d_in, 3 * d_hidden), (None, None))
        self.w_h = param(rngs, (d_hidden, 3 * d_hidden), (None, None))
        self.b = nnx.Param(jnp.zeros((3 * d_hidden,), jnp.float32), logical_axes=(None,))
        self.b_hn = nnx.Param(jnp.zeros((d_hidden,), jnp.float32), logical_axes=(None,))
        self.d_hidden = d_hidden

    def input_gates(self, x):
        """`W x + b` for the three gates, [..., 3h]: precompute it for a whole sequence."""
        return x.astype(jnp.float32) @ self.w_x[...] + self.b[...]

    def step(self, gx, h):
        """One update from precomputed input gates `gx` [..., 3h] and state `h` [..., h]."""
        gx_r, gx_z, gx_n = jnp.split(gx, 3, axis=-1)
        gh_r, gh_z, gh_n = jnp.split(h @ self.w_h[...], 3, axis=-1)
        r, z = jax.nn.sigmoid(gx_r + gh_r), jax.nn.sigmoid(gx_z + gh_z)
        n = jnp.tanh(gx_n + r * (gh_n + self.b_hn[...]))
        return (1.0 - z) * n + z * h

    def __call__(self, x, h):
        return self.step(self.input_gates(x), h)

    def scan(self, x_bsd):
        """Run along axis 1 from h = 0: the states [B, S, h] (causal: h_t sees x_<=t)."""
        gx_sbg = jnp.swapaxes(self.input_gates(x_bsd), 0, 1)
        h0 = jnp.zeros((x_bsd.shape[0], self.d_hidden), jnp.float32)

        def body(h, gx):
            h = self.step(gx, h)
            return h, h

        _, h_sbh = jax.lax.scan(body, h0, gx_sbg)
        return jnp.swapaxes(h_sbh, 0, 1)


class RecurrentRouter(Router):
    """RMoE: project, advance the shared GRU by one layer, gate from its state, top-k."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, gru: GRU,
                 renormalize: bool = True, rngs: nnx.Rngs, **front):
        # The gate G_i reads the GRU state (width p), so it is not sharded like d_model.
        super().__init__(gru.d_hidden, num_experts, gate_axes=(None, None), rngs=rngs, **front)
        self.w_dp = param(rngs, (d_model, gru.d_hidden), ("embed", None))
        self.gru = gru
        self.top_k, self.renormalize = top_k, renormalize

    def __call__(self, x_td, state=None) -> Routing:
        state = state or {}
        x_tp = self.jittered(x_td) @ self.w_dp[...]
        h_prev = state.get("h", jnp.zeros_like(x_tp))
        h_tp = self.gru(x_tp, h_prev)
        logits_te = self.gated(h_tp @ self.w_de[...], state)
        return top_k_routing(logits_te, self.top_k, self.renormalize, state={"h": h_tp})

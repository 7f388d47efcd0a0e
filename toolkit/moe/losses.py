"""Router auxiliary losses and statistics, all from a `Routing` record.

* Switch load balancing (Fedus et al. 2021): `E * sum_i f_i P_i`, with `f_i` the share of
  routed assignments that chose expert i and `P_i` its mean router probability. It is 1
  for a perfectly uniform router and grows as load concentrates.
* Router z-loss (ST-MoE, Zoph et al. 2022): `mean_t logsumexp(logits_t)^2`, keeping logits
  small so the softmax stays numerically tame.
* Entropy: mean per-token entropy of the router distribution, in nats.
* Tsallis (DynMoLE): mean normalised Tsallis entropy of the router distribution, in [0, 1].

MoE++ weighs each expert's balance term by eta_i (`load_balance_loss(..., eta_e)`): tau for
zero-computation experts, 1 for FFN experts, so a small tau makes cheap experts cheaper
to load. With every eta 1 it is the Switch loss.
"""

import jax
import jax.numpy as jnp

from toolkit.moe.router import Routing, tsallis_entropy


def expert_counts(routing: Routing, num_experts: int) -> jax.Array:
    """float32 [E]: routed assignments per expert (valid slots only, before any dropping)."""
    onehot_tke = jax.nn.one_hot(routing.expert_ids, num_experts, dtype=jnp.float32)
    return jnp.sum(onehot_tke * routing.valid[..., None], axis=(0, 1))


def load_balance_loss(routing: Routing, num_experts: int, eta_e=None) -> jax.Array:
    """`E * sum_i eta_i f_i P_i` over the tokens of `routing` (eta = 1 by default)."""
    counts_e = expert_counts(routing, num_experts)
    f_e = counts_e / jnp.maximum(jnp.sum(counts_e), 1.0)
    p_e = jnp.mean(routing.probs, axis=0)
    terms_e = f_e * p_e if eta_e is None else eta_e * f_e * p_e
    return num_experts * jnp.sum(terms_e)


def z_loss(routing: Routing) -> jax.Array:
    return jnp.mean(jax.nn.logsumexp(routing.logits, axis=-1) ** 2)


def router_entropy(routing: Routing) -> jax.Array:
    p = routing.probs
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1))


def tsallis_loss(routing: Routing, q: float) -> jax.Array:
    return jnp.mean(tsallis_entropy(routing.probs, q))

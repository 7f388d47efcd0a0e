"""Dispatch moves tokens to experts and back; it decides nothing and computes nothing.

Both modes share one contract: `plan = *_plan(routing, ...)`, then
`xs = dispatch(x_td, plan)` gives expert inputs laid out for `pallas_kernels.gmm` with
`plan.group_sizes`, and `combine(ys, plan, routing)` returns `y_td = sum_k w_tk * E_k(x_t)`.

Dropless (MegaBlocks-style): the T*k assignments are sorted by expert, so expert e owns
the next `group_sizes[e]` rows of a `[T*k, d]` array. Nothing is dropped.

Capacity (GShard/Switch-style): each expert has `C = ceil(capacity_factor * T * k / E)`
slots in an `[E, C, d]` buffer. Slots are filled by priority: every token's first choice
before any second choice, and within a choice in token order. Assignments past the
capacity are dropped: they add nothing to the output, and the token keeps its residual.

    plan = dropless_plan(routing, num_experts=8)
    ys = experts(dispatch(x_td, plan), plan.group_sizes)
    y_td = combine(ys, plan, routing)
"""

import math

import jax
import jax.numpy as jnp
from flax import struct

from toolkit.moe.router import Routing


@struct.dataclass
class DispatchPlan:
    """Where each of the T*k assignments goes.

    Attributes:
      group_sizes: int32 [E] rows each expert computes (after dropping).
      token_of_row: int32 [R] source token of each expert-input row (R = T*k or E*C).
      row_of_assignment: int32 [T, k] row holding each assignment's output; R if dropped.
      kept: bool [T, k] assignments that were computed.
      capacity: static slots per expert (0 for dropless).
    """

    group_sizes: jax.Array
    token_of_row: jax.Array
    row_of_assignment: jax.Array
    kept: jax.Array
    capacity: int = struct.field(pytree_node=False, default=0)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * T * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def dropless_plan(routing: Routing, num_experts: int) -> DispatchPlan:
    t, k = routing.expert_ids.shape
    ids_a = routing.expert_ids.reshape(-1)
    valid_a = routing.valid.reshape(-1)
    order_r = jnp.argsort(jnp.where(valid_a, ids_a, num_experts), stable=True)
    group_sizes_e = jnp.zeros((num_experts,), jnp.int32).at[ids_a].add(valid_a.astype(jnp.int32))
    row_of_a = jnp.zeros((t * k,), jnp.int32).at[order_r].set(jnp.arange(t * k, dtype=jnp.int32))
    row_of_a = jnp.where(valid_a, row_of_a, t * k)
    return DispatchPlan(group_sizes=group_sizes_e, token_of_row=(order_r // k).astype(jnp.int32),
                        row_of_assignment=row_of_a.reshape(t, k), kept=routing.valid)


def capacity_plan(routing: Routing, num_experts: int, capacity_factor: float) -> DispatchPlan:
    t, k = routing.expert_ids.shape
    c = capacity(t, k, num_experts, capacity_factor)
    # Priority order: slot-major (all first choices, then all second choices, ...).
    ids_a = routing.expert_ids.T.reshape(-1)                       # [k*T]
    valid_a = routing.valid.T.reshape(-1)
    onehot_ae = jax.nn.one_hot(ids_a, num_experts, dtype=jnp.int32) * valid_a[:, None]
    position_a = jnp.sum((jnp.cumsum(onehot_ae, axis=0) - 1) * onehot_ae, axis=-1)
    kept_a = valid_a & (position_a < c)
    row_a = jnp.where(kept_a, ids_a * c + position_a, num_experts * c)
    token_a = jnp.tile(jnp.arange(t, dtype=jnp.int32), k)
    token_of_row = jnp.zeros((num_experts * c,), jnp.int32).at[row_a].set(token_a, mode="drop")
    counts_e = jnp.sum(onehot_ae, axis=0)
    return DispatchPlan(group_sizes=jnp.minimum(counts_e, c).astype(jnp.int32),
                        token_of_row=token_of_row,
                        row_of_assignment=row_a.reshape(k, t).T.astype(jnp.int32),
                        kept=kept_a.reshape(k, t).T, capacity=c)


def dispatch(x_td, plan: DispatchPlan):
    """Expert inputs: `[T*k, d]` sorted by expert (dropless) or `[E, C, d]` (capacity)."""
    xs_rd = jnp.take(x_td, plan.token_of_row, axis=0)
    if plan.capacity:
        e = plan.group_sizes.shape[0]
        valid_r = (jnp.arange(plan.capacity)[None, :] < plan.group_sizes[:, None]).reshape(-1)
        xs_rd = jnp.where(valid_r[:, None], xs_rd, 0)
        return xs_rd.reshape(e, plan.capacity, -1)
    return xs_rd


def combine(ys, plan: DispatchPlan, routing: Routing):
    """`y_td = sum_k weights_tk * ys[row_of_assignment_tk]`; dropped assignments give 0."""
    ys_rd = ys.reshape(-1, ys.shape[-1])
    y_tkd = jnp.take(ys_rd, plan.row_of_assignment, axis=0, mode="fill", fill_value=0)
    w_tk = jnp.where(plan.kept, routing.weights, 0.0).astype(ys_rd.dtype)
    return jnp.einsum("tkd,tk->td", y_tkd, w_tk)


def dropped_fraction(plan: DispatchPlan, routing: Routing) -> jax.Array:
    """Share of valid assignments that were not computed."""
    valid = jnp.sum(routing.valid.astype(jnp.float32))
    return 1.0 - jnp.sum(plan.kept.astype(jnp.float32)) / jnp.maximum(valid, 1.0)

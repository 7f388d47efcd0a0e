"""Routed experts: E SwiGLU FFNs whose matmuls all go through `pallas_kernels.gmm`.

Experts only compute. They take rows already grouped by dispatch, one problem per
dispatch group, either ragged (`[G, R, d]` with `group_sizes [G, E]`) or padded
(`[G, E, C, d]`), and return the same layout:

    h = silu(x W_gate[e]) * (x W_up[e])       # one gmm over [W_gate | W_up]
    y = h W_down[e]                           # second gmm

Under a mesh the dispatch groups are sharded like the batch, so the experts run inside
`shard_map`: each device multiplies its own groups' rows, with the weights gathered over
FSDP and, under tensor parallelism, split along the hidden (`mlp`) width, the down
projection's partial sums added with a `psum`. The kernels thus always see local arrays
(a Pallas call or a loop with traced trip counts cannot be split by the partitioner).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels import gmm
from toolkit.models.layers import param
from toolkit.sharding.rules import logical_to_spec


def _swiglu_experts(xs, group_sizes, w_gate, w_up, w_down, *, impl, tensor_axis):
    """The experts on local arrays: xs `[G, R, d]` (or `[G, E, C, d]`), weights `[E, ...]`."""
    d_expert = w_gate.shape[-1]
    h = gmm(xs, jnp.concatenate([w_gate, w_up], axis=-1), group_sizes, impl=impl)
    act = jax.nn.silu(h[..., :d_expert]) * h[..., d_expert:]
    y = gmm(act, w_down, group_sizes, impl=impl)
    return jax.lax.psum(y, tensor_axis) if tensor_axis else y


class Experts(nnx.Module):
    def __init__(self, num_experts: int, d_model: int, d_expert: int, *, gmm_impl: str = "",
                 rngs: nnx.Rngs):
        """`gmm_impl`: a `pallas_kernels.GMM_IMPLS` backend, or "" for the platform's best."""
        self.w_gate = param(rngs, (num_experts, d_model, d_expert), ("expert", "embed", "mlp"),
                            fan_in=d_model)
        self.w_up = param(rngs, (num_experts, d_model, d_expert), ("expert", "embed", "mlp"),
                          fan_in=d_model)
        self.w_down = param(rngs, (num_experts, d_expert, d_model), ("expert", "mlp", "embed"),
                            fan_in=d_expert)
        self.d_expert = d_expert
        self.gmm_impl = gmm_impl or None

    def __call__(self, xs, group_sizes):
        """xs `[G, R, d]` with group_sizes `[G, E]` (or padded `[G, E, C, d]`)."""
        dt = xs.dtype
        weights = (self.w_gate[...].astype(dt), self.w_up[...].astype(dt),
                   self.w_down[...].astype(dt))
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return _swiglu_experts(xs, group_sizes, *weights, impl=self.gmm_impl, tensor_axis=None)
        batch, mlp = logical_to_spec(("batch",))[0], logical_to_spec(("mlp",))[0]
        batch_axes = (batch,) if isinstance(batch, str) else tuple(batch or ())
        shards = 1
        for a in batch_axes:
            shards *= mesh.shape[a]
        if xs.shape[0] % shards:
            batch = None  # groups that do not split over the batch shards: every device runs all
        tensor = mlp if mlp and mesh.shape[mlp] > 1 else None
        # local shapes: xs [G / shards, R, d]; w_gate, w_up [E, d, d_e / T]; w_down [E, d_e / T, d]
        local = jax.shard_map(
            functools.partial(_swiglu_experts, impl=self.gmm_impl, tensor_axis=tensor),
            in_specs=(P(batch), P(batch), P(None, None, tensor), P(None, None, tensor),
                      P(None, tensor, None)),
            out_specs=P(batch), check_vma=False)
        return local(xs, group_sizes, *weights)

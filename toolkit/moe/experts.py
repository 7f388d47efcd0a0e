"""Routed experts: E SwiGLU FFNs whose matmuls all go through `pallas_kernels.gmm`.

Experts only compute. They take rows already grouped by dispatch, one problem per
dispatch group, either ragged (`[G, R, d]` with `group_sizes [G, E]`) or padded
(`[G, E, C, d]`), and return the same layout:

    h = act(x W_gate[e]) * (x W_up[e])        # one gmm over [W_gate | W_up]
    y = h W_down[e]                           # second gmm

with `act` silu (SwiGLU) or relu (ReGLU, SmallThinker). ReGLU makes many entries of `h`
exactly zero, and an inference engine can skip the matching rows of W_down; the experts
report that share. Experts of two widths (big and small) are two grouped matmuls, each over
its own range of expert ids. Under a precision policy (`toolkit.precision`) the "experts"
formats apply to the weights (per expert, along K), the rows entering each grouped matmul
and the gradients leaving it.

Experts hold the weights and compute on local arrays; where they run on a mesh (dispatch
groups split over devices, experts split over the expert-parallel group, each expert's
hidden width split for expert tensor parallelism) is `toolkit.sharding.expert_parallel`'s
business, which calls `Experts.compute` inside `shard_map` with each device's shards. The
kernels thus always see local arrays (a Pallas call or a loop with traced trip counts
cannot be split by the partitioner).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import gmm
from toolkit.models.layers import param
from toolkit.precision.fake_quant import quantize_acts, quantize_out, quantize_weight, record

_ACTIVATIONS = {"swiglu": jax.nn.silu, "reglu": jax.nn.relu}


def _rows_of(xs, group_sizes, offset, count: int):
    """bool mask over the rows of `xs` that experts [offset, offset + count) compute."""
    if xs.ndim == 4:                                     # padded [G, E, C, d]
        c = jnp.arange(xs.shape[2])
        return c[None, None, :] < group_sizes[:, offset:offset + count, None]
    ends = jnp.cumsum(group_sizes, axis=-1)              # ragged [G, R, d]
    ends = jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends], axis=-1)
    start = jnp.take(ends, offset, axis=-1)
    stop = jnp.take(ends, offset + count, axis=-1)
    r = jnp.arange(xs.shape[1])
    return (r[None, :] >= start[:, None]) & (r[None, :] < stop[:, None])


def gated_experts(xs, group_sizes, weights, *, kinds, activation, impl=None, tensor_axis=None,
                  group_offset=None):
    """The experts on local arrays: xs `[G, R, d]` (or `[G, E, C, d]`), weights per kind.

    `kinds` lists (first expert id, count) per width class (big, then small experts);
    `weights` holds (w_gate, w_up, w_down) for each. `group_offset` (ragged layout, may be
    traced): the weights are experts [offset, offset + E_local) of `group_sizes`' columns,
    as on one device of an expert-parallel group; rows of other experts give zeros.
    `tensor_axis`: the mesh axes the hidden width is split over (partial sums added).
    Returns the output and, per group, the number of hidden activations that are exactly
    zero and of all computed ones.
    """
    with jax.named_scope("routed_experts"):     # cost checks find the expert FLOPs by this name
        return _gated_experts(xs, group_sizes, weights, kinds, activation, impl, tensor_axis,
                              group_offset)


def _gated_experts(xs, group_sizes, weights, kinds, activation, impl, tensor_axis, group_offset):
    act_fn = _ACTIVATIONS[activation]
    y, zeros_g, total_g = 0.0, 0.0, 0.0
    for (offset, count), (w_gate, w_up, w_down) in zip(kinds, weights, strict=True):
        d_expert = w_gate.shape[-1]
        if xs.ndim == 4:                                 # padded: this kind's slice of E
            x_k, sizes, kw = xs[:, offset:offset + count], group_sizes[:, offset:offset + count], {}
        else:                                            # ragged: an expert shard of the rows
            x_k, sizes = xs, group_sizes
            if group_offset is not None:
                offset = group_offset
            kw = {"group_offset": offset} if len(kinds) > 1 or group_offset is not None else {}
        h = gmm(quantize_acts(x_k, "experts"), jnp.concatenate([w_gate, w_up], axis=-1), sizes,
                impl=impl, **kw)
        h = quantize_out(h, "experts")
        act = act_fn(h[..., :d_expert]) * h[..., d_expert:]
        rows = _rows_of(xs, group_sizes, offset, count)
        record("experts", jnp.where(rows[..., None], x_k, 0))       # computed rows only
        record("experts", jnp.where(rows[..., None], act, 0))
        out = quantize_out(gmm(quantize_acts(act, "experts"), w_down, sizes, impl=impl, **kw), "experts")
        y = jnp.concatenate([y, out], axis=1) if xs.ndim == 4 and offset else y + out
        zero_rows = jnp.sum(jax.lax.stop_gradient(act) == 0, axis=-1)
        axes = tuple(range(1, rows.ndim))
        zeros_g = zeros_g + jnp.sum(jnp.where(rows, zero_rows, 0), axis=axes).astype(jnp.float32)
        total_g = total_g + jnp.sum(rows, axis=axes).astype(jnp.float32) * d_expert
    if tensor_axis:
        y, zeros_g, total_g = jax.lax.psum((y, zeros_g, total_g), tensor_axis)
    return y, zeros_g, total_g


def _expert_weights(rngs, n: int, d_model: int, d_expert: int) -> tuple:
    names = ("expert", "expert_embed", "expert_mlp"), ("expert", "expert_mlp", "expert_embed")
    return (param(rngs, (n, d_model, d_expert), names[0], fan_in=d_model),
            param(rngs, (n, d_model, d_expert), names[0], fan_in=d_model),
            param(rngs, (n, d_expert, d_model), names[1], fan_in=d_expert))


class Experts(nnx.Module):
    """`num_experts` gated FFN experts of width `d_expert`, then `small_experts` of width
    `d_small_expert` (Duo-LLM's big and small experts), ids in that order. Each width class
    is one grouped matmul over its own expert shard of the rows (`gmm(group_offset=...)`)."""

    def __init__(self, num_experts: int, d_model: int, d_expert: int, *, small_experts: int = 0,
                 d_small_expert: int = 0, activation: str = "swiglu", gmm_impl: str = "",
                 rngs: nnx.Rngs):
        """`gmm_impl`: a `pallas_kernels.GMM_IMPLS` backend, or "" for the platform's best."""
        self.w_gate, self.w_up, self.w_down = _expert_weights(rngs, num_experts, d_model, d_expert)
        self.small = (nnx.List(_expert_weights(rngs, small_experts, d_model, d_small_expert))
                      if small_experts else None)
        self.kinds = ((0, num_experts),) + (((num_experts, small_experts),) if small_experts else ())
        self.d_expert, self.activation = d_expert, activation
        self.gmm_impl = gmm_impl or None

    def weights(self, dtype) -> list:
        """[(w_gate, w_up, w_down)] per width class, cast to `dtype` and quantized under the
        "experts" precision formats (groups along each expert's K axis)."""
        kinds = [(self.w_gate, self.w_up, self.w_down)] + ([tuple(self.small)] if self.small else [])
        return [tuple(quantize_weight(w[...].astype(dtype), "experts", axis=1) for w in kind)
                for kind in kinds]

    def compute(self, xs, group_sizes, weights, *, tensor_axis=None, group_offset=None):
        """`gated_experts` with this module's kinds and activation on local arrays."""
        kinds = self.kinds
        if xs.ndim == 4 and xs.shape[1] != sum(c for _, c in kinds):
            assert len(kinds) == 1, "expert parallelism needs one expert width"
            kinds = ((0, xs.shape[1]),)                  # padded layout over local experts
        if group_offset is not None:
            assert len(kinds) == 1, "expert parallelism needs one expert width"
            kinds = ((0, weights[0][0].shape[0]),)
        return gated_experts(xs, group_sizes, weights, kinds=kinds, activation=self.activation,
                             impl=self.gmm_impl, tensor_axis=tensor_axis, group_offset=group_offset)

    def __call__(self, xs, group_sizes):
        """On one device: xs `[G, R, d]` with group_sizes `[G, E]` (or padded `[G, E, C, d]`).

        Returns the outputs in the same layout and the share of hidden activations that are
        exactly zero over the computed rows (ReGLU's activation sparsity). On a mesh, use
        `toolkit.sharding.expert_parallel.routed_ffn`.
        """
        y, zeros, total = self.compute(xs, group_sizes, self.weights(xs.dtype))
        return y, jnp.sum(zeros) / jnp.maximum(jnp.sum(total), 1.0)

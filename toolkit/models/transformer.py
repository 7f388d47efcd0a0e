"""The decoder-only MoE language model.

    x = embed(tokens)
    for each block:  x = x + attention(norm(x));  x = x + ffn(norm(x))
    logits = unembed(norm(x))

`ffn` is an `MoELayer` on every `moe.moe_every`-th layer past `moe.first_dense_layers`,
and a dense SwiGLU elsewhere. With `moe.router_placement="pre_attention"` (SmallThinker)
an MoE block routes from its raw input x before attention runs. The router state
(`Routing.state`: logits for gating residuals, the recurrent router's GRU state) flows
from each MoE layer to the next; the recurrent router's GRU is one module all layers share.

The model returns logits and the MoE layers' `MoEAux` stacked along a leading layer axis
(None for a dense model):

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_btv, aux = model(tokens_bt)
    aux.expert_counts          # [num_moe_layers, E]

Multi-token prediction (`model.mtp_layers`, DeepSeek-V3 / Ling 2.0): given the next tokens
(`mtp_tokens_bt`, the targets), MTP module j merges the previous depth's final hidden
state with the embedding of token t+j, `h' = Block(W_j [norm(h); norm(emb(t+j))])`, and its
logits through the shared output projection predict token t+j+1:

    logits_btv, aux, mtp_logits_jbtv = model(tokens_bt, mtp_tokens_bt=targets_bt)

Generation (`toolkit.generation`) runs the listed blocks over per-layer KV caches:
`decode` takes tokens at given positions (a prompt from 0, then one token at a time) and
returns the logits, each MoE layer's `Routing` and the updated caches:

    caches = model.init_cache(batch, max_len)
    logits_btv, routings, caches = model.decode(tokens_bt, positions_bt, caches)

Every matmul runs under `cfg.precision` (`toolkit.precision.use_precision`): number
formats per matmul class for weights, activations and gradients, full precision by default.

With `parallel.pipeline = p > 1` the blocks are stacked instead of listed: `model.stages`
is one `Stage` (L/(p v) consecutive blocks) whose every variable has two leading axes
`[v, p, ...]` (chunk `r*p + s` at `[r, s]`; logical names `(None, "layers", ...)`, so the
`p` axis lies on the `pipeline` mesh axis). Same seed, same numbers as the listed model
(`stacked_blocks_state` converts a listed state). Calling the model runs the chunks in
order, which is what evaluation uses; training runs them as a pipeline
(`toolkit.sharding.pipeline`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from toolkit.config import Config
from toolkit.models.attention import Attention, KVCache
from toolkit.models.layers import Embed, RMSNorm, SwiGLU, param
from toolkit.moe.layer import MoELayer
from toolkit.moe.recurrent import GRU
from toolkit.precision.fake_quant import linear, quantize_weight, use_precision
from toolkit.sharding.mesh import rules_for
from toolkit.sharding.rules import constrain, use_rules


def moe_layer_indices(cfg: Config) -> list:
    """Indices of the layers that are MoE under `cfg`."""
    if cfg.moe.num_experts == 0:
        return []
    return [i for i in range(cfg.model.num_layers)
            if i >= cfg.moe.first_dense_layers and (i + 1) % cfg.moe.moe_every == 0]


class Block(nnx.Module):
    def __init__(self, cfg: Config, is_moe: bool, *, shared_gru=None, rngs: nnx.Rngs):
        m = cfg.model
        self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
        chunks = cfg.parallel.overlap_chunks
        self.attn = Attention(m, impl=cfg.kernels.attention, tp_chunks=chunks,
                              context=cfg.parallel.context, rngs=rngs)
        self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
        self.is_moe = is_moe
        self.pre_attention = cfg.moe.router_placement == "pre_attention"
        self.ffn = MoELayer(m.d_model, cfg.moe, d_expert=cfg.moe.expert_width(m.d_ff),
                            gmm_impl=cfg.kernels.gmm, shared_gru=shared_gru, parallel=cfg.parallel,
                            rngs=rngs) if is_moe else SwiGLU(m.d_model, m.d_ff, tp_chunks=chunks,
                                                               rngs=rngs)

    def __call__(self, x_btd, positions_bt, state=None):
        """`(x_btd, aux, state)`: aux is the MoE layer's record (None when dense)."""
        routing = self.ffn.route(x_btd, state) if self.is_moe and self.pre_attention else None
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), positions_bt)
        x_btd = constrain(x_btd, ("batch", "seq", "embed"))
        if not self.is_moe:
            return constrain(x_btd + self.ffn(self.ffn_norm(x_btd)), ("batch", "seq", "embed")), \
                None, state
        h, aux, state = self.ffn(self.ffn_norm(x_btd), state, routing=routing)
        return constrain(x_btd + h, ("batch", "seq", "embed")), aux, state

    def decode(self, x_btd, positions_bt, state, cache: KVCache):
        """The block over a KV cache: `(x_btd, routing, state, cache)`, routing the MoE
        layer's `Routing` (None when dense). The same computation as `__call__`, on one device."""
        routing = self.ffn.route(x_btd, state) if self.is_moe and self.pre_attention else None
        a_btd, cache = self.attn.cached(self.attn_norm(x_btd), positions_bt, cache)
        x_btd = x_btd + a_btd
        if not self.is_moe:
            return x_btd + self.ffn(self.ffn_norm(x_btd)), None, state, cache
        h_btd = self.ffn_norm(x_btd)
        routing = self.ffn.route(h_btd, state) if routing is None else routing
        y_btd, _, state = self.ffn(h_btd, state, routing=routing)
        return x_btd + y_btd, routing, state, cache


class Stage(nnx.Module):
    """Consecutive blocks: one pipeline chunk. Returns `(x_btd, aux)`, aux stacked over its
    MoE layers (None when it has none)."""

    def __init__(self, blocks):
        self.blocks = nnx.List(blocks)

    def __call__(self, x_btd, positions_bt):
        auxes = []
        for block in self.blocks:
            x_btd, aux, _ = block(x_btd, positions_bt, {})
            if aux is not None:
                auxes.append(aux)
        return x_btd, (jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else None)


def pipeline_chunks(cfg: Config) -> tuple:
    """`(v, p, layers per chunk)` of `cfg`'s pipeline (`(1, 1, L)` without one)."""
    p, v = cfg.parallel.pipeline, cfg.parallel.virtual_stages
    if p == 1:
        return 1, 1, cfg.model.num_layers
    return v, p, cfg.model.num_layers // (p * v)


def stack_stages(blocks, v: int, p: int) -> Stage:
    """One `Stage` whose variables stack the `v*p` chunks of `blocks` as `[v, p, ...]`."""
    per = len(blocks) // (v * p)
    chunks = [Stage(blocks[c * per:(c + 1) * per]) for c in range(v * p)]
    graphdef, states = nnx.split(chunks[0])[0], [nnx.state(c) for c in chunks]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs).reshape((v, p) + xs[0].shape), *states)
    template = nnx.merge(graphdef, nnx.state(chunks[0]))
    nnx.update(template, stacked)
    for _, var in nnx.iter_graph(template):
        if isinstance(var, nnx.Variable) and var.get_metadata().get("logical_axes") is not None:
            var.set_metadata(logical_axes=(None, "layers") + tuple(var.get_metadata()["logical_axes"]))
    return template


def stacked_blocks_state(tree: dict, v: int, p: int) -> dict:
    """A listed model's state as a pure dict (`nnx.to_pure_dict`: parameters, gradients,
    optimizer moments) in the stacked layout of `parallel.pipeline=p`, `virtual_stages=v`:
    `blocks` becomes `stages/blocks/j` with leaves `[v, p, ...]`."""
    blocks = tree["blocks"]
    per = len(blocks) // (v * p)
    stacked = {j: jax.tree.map(lambda *xs: jnp.stack(xs).reshape((v, p) + jnp.shape(xs[0])),
                               *[blocks[c * per + j] for c in range(v * p)]) for j in range(per)}
    out = {k: val for k, val in tree.items() if k != "blocks"}
    return dict(out, stages={"blocks": stacked})


def listed_blocks_state(tree: dict, v: int, p: int) -> dict:
    """The inverse of `stacked_blocks_state`: a stacked model's pure-dict state with
    `stages/blocks/j` leaves `[v, p, ...]` back in the listed layout (`blocks/i`)."""
    stacked = tree["stages"]["blocks"]
    per = len(stacked)
    blocks = {c * per + j: jax.tree.map(lambda a, c=c: a.reshape((v * p,) + a.shape[2:])[c], stacked[j])
              for c in range(v * p) for j in range(per)}
    out = {k: val for k, val in tree.items() if k != "stages"}
    return dict(out, blocks=blocks)


def chunk_of(stages: Stage, r, s) -> Stage:
    """The `[r, s]` chunk of stacked `stages` as a plain `Stage`."""
    graphdef, state = nnx.split(stages)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[r, s], state))


class MTPModule(nnx.Module):
    """One depth of multi-token prediction: merge, one dense block (see the module doc)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        self.h_norm = RMSNorm(m.d_model, eps=m.norm_eps)
        self.e_norm = RMSNorm(m.d_model, eps=m.norm_eps)
        self.w_merge = param(rngs, (2 * m.d_model, m.d_model), (None, "embed"))
        self.block = Block(cfg, False, rngs=rngs)

    def __call__(self, h_btd, emb_btd, positions_bt):
        merged = jnp.concatenate([self.h_norm(h_btd), self.e_norm(emb_btd)], axis=-1)
        x_btd = merged @ self.w_merge[...].astype(h_btd.dtype)
        return self.block(x_btd, positions_bt)[0]


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        self.embed = Embed(m.vocab_size, m.d_model, rngs=rngs)
        moe_layers = set(moe_layer_indices(cfg))
        # RMoE: one GRU carries routing state through all MoE layers.
        self.router_gru = (GRU(cfg.moe.recurrent_dim, cfg.moe.recurrent_dim, rngs=rngs)
                           if moe_layers and cfg.moe.router == "recurrent" else None)
        blocks = [Block(cfg, i in moe_layers, shared_gru=self.router_gru, rngs=rngs)
                  for i in range(m.num_layers)]
        v, p, _ = pipeline_chunks(cfg)
        self.blocks = nnx.List(blocks) if p == 1 else None
        self.stages = stack_stages(blocks, v, p) if p > 1 else None
        self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps)
        self.unembed = None if m.tie_embeddings else param(
            rngs, (m.d_model, m.vocab_size), ("embed", "vocab"))
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(m.mtp_layers)])

    def head_weight(self):
        """The output projection `[d, V]`: the unembedding, or the tied embedding table."""
        return self.embed.table[...].T if self.unembed is None else self.unembed[...]

    def logits(self, x_btd):
        """The shared output head: final norm, then unembedding, in float32."""
        x_btd = self.final_norm(x_btd)
        w_dv = quantize_weight(self.head_weight().astype(x_btd.dtype), "head")
        logits_btv = linear(x_btd, w_dv, "head")
        return logits_btv.astype(jnp.float32)

    def init_cache(self, batch: int, max_len: int) -> list:
        """Empty KV caches, one per block, `[batch, max_len, K, h]` in the compute dtype."""
        dtype = jnp.dtype(self.cfg.model.dtype)
        return [KVCache.zeros(batch, max_len, self.cfg.model, dtype)
                for _ in range(self.cfg.model.num_layers)]

    def decode(self, tokens_bt, positions_bt, caches: list):
        """`(logits_btv, routings, caches)` for `tokens_bt` at `positions_bt` (int [B, S]),
        attending over `caches` (from `init_cache`), which come back holding these tokens'
        keys and values too; `routings`: each MoE layer's `Routing`, in layer order. Needs
        the listed blocks (`parallel.pipeline=1`; see `listed_blocks_state`); no MTP heads."""
        if self.blocks is None:
            raise ValueError(f"decode needs the listed blocks; this model stacks them for "
                             f"parallel.pipeline={self.cfg.parallel.pipeline}: rebuild it with "
                             f"parallel.pipeline=1 and listed_blocks_state (toolkit.generation "
                             f"does so)")
        with use_rules(rules_for(self.cfg.parallel)), use_precision(self.cfg.precision):
            x_btd = self.embed(tokens_bt, jnp.dtype(self.cfg.model.dtype))
            state, routings, out = {}, [], []
            for block, cache in zip(self.blocks, caches, strict=True):
                x_btd, routing, state, cache = block.decode(x_btd, positions_bt, state, cache)
                out.append(cache)
                if routing is not None:
                    routings.append(routing)
            return self.logits(x_btd), routings, out

    def __call__(self, tokens_bt, mtp_tokens_bt=None):
        # Logical axis names resolve through the recipe's table while the model is traced.
        with use_rules(rules_for(self.cfg.parallel)), use_precision(self.cfg.precision):
            return self._forward(tokens_bt, mtp_tokens_bt)

    def _forward(self, tokens_bt, mtp_tokens_bt):
        dtype = jnp.dtype(self.cfg.model.dtype)
        positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x_btd = constrain(self.embed(tokens_bt, dtype), ("batch", "seq", "embed"))
        auxes, state = [], {}
        if self.stages is not None:
            v, p, _ = pipeline_chunks(self.cfg)
            for c in range(v * p):
                x_btd, aux = chunk_of(self.stages, c // p, c % p)(x_btd, positions_bt)
                auxes += [jax.tree.map(lambda a, j=j: a[j], aux) for j in range(
                    0 if aux is None else aux.expert_counts.shape[0])]
        for block in self.blocks or ():
            x_btd, aux, state = block(x_btd, positions_bt, state)
            if aux is not None:
                auxes.append(aux)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else None
        if mtp_tokens_bt is None:
            return self.logits(x_btd), stacked
        mtp_logits, h_btd = [], x_btd
        for j, module in enumerate(self.mtp):
            # token t+j+1 sits at position t of mtp_tokens shifted by j; the tail wraps and
            # is masked out of the loss.
            next_bt = jnp.roll(mtp_tokens_bt, -j, axis=1)
            h_btd = module(h_btd, self.embed(next_bt, dtype), positions_bt)
            mtp_logits.append(self.logits(h_btd))
        return self.logits(x_btd), stacked, (jnp.stack(mtp_logits) if mtp_logits else None)

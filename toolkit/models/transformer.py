"""The decoder-only MoE language model.

    x = embed(tokens)
    for each block:  x = x + attention(norm(x));  x = x + ffn(norm(x))
    logits = unembed(norm(x))

`ffn` is an `MoELayer` on every `moe.moe_every`-th layer past `moe.first_dense_layers`,
and a dense SwiGLU elsewhere. The model returns logits and the MoE layers' `MoEAux`
stacked along a leading layer axis (None for a dense model):

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_btv, aux = model(tokens_bt)
    aux.expert_counts          # [num_moe_layers, E]
"""

import jax
import jax.numpy as jnp
from flax import nnx

from toolkit.config import Config
from toolkit.models.attention import Attention
from toolkit.models.layers import Embed, RMSNorm, SwiGLU, param
from toolkit.moe.layer import MoELayer
from toolkit.sharding.rules import constrain


def moe_layer_indices(cfg: Config) -> list:
    """Indices of the layers that are MoE under `cfg`."""
    if cfg.moe.num_experts == 0:
        return []
    return [i for i in range(cfg.model.num_layers)
            if i >= cfg.moe.first_dense_layers and (i + 1) % cfg.moe.moe_every == 0]


class Block(nnx.Module):
    def __init__(self, cfg: Config, is_moe: bool, *, rngs: nnx.Rngs):
        m = cfg.model
        self.attn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
        self.attn = Attention(m, impl=cfg.kernels.attention, rngs=rngs)
        self.ffn_norm = RMSNorm(m.d_model, eps=m.norm_eps)
        self.is_moe = is_moe
        self.ffn = MoELayer(m.d_model, cfg.moe, gmm_impl=cfg.kernels.gmm,
                            rngs=rngs) if is_moe else SwiGLU(
            m.d_model, m.d_ff, rngs=rngs)

    def __call__(self, x_btd, positions_bt):
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), positions_bt)
        x_btd = constrain(x_btd, ("batch", "seq", "embed"))
        h = self.ffn(self.ffn_norm(x_btd))
        aux = None
        if self.is_moe:
            h, aux = h
        return constrain(x_btd + h, ("batch", "seq", "embed")), aux


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        self.embed = Embed(m.vocab_size, m.d_model, rngs=rngs)
        moe_layers = set(moe_layer_indices(cfg))
        self.blocks = nnx.List([Block(cfg, i in moe_layers, rngs=rngs) for i in range(m.num_layers)])
        self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps)
        self.unembed = None if m.tie_embeddings else param(
            rngs, (m.d_model, m.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_bt):
        dtype = jnp.dtype(self.cfg.model.dtype)
        positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        x_btd = constrain(self.embed(tokens_bt, dtype), ("batch", "seq", "embed"))
        auxes = []
        for block in self.blocks:
            x_btd, aux = block(x_btd, positions_bt)
            if aux is not None:
                auxes.append(aux)
        x_btd = self.final_norm(x_btd)
        if self.unembed is None:
            logits_btv = self.embed.attend(x_btd)
        else:
            logits_btv = x_btd @ self.unembed[...].astype(dtype)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes else None
        return logits_btv.astype(jnp.float32), stacked

"""Parameter counts from a config alone: total and active per token.

"Active" counts what one token multiplies through: attention, dense MLPs, the router,
shared experts and `top_k` routed experts (plus embeddings and the output projection).
That is the quantity a dense model must match for an equal-FLOPs comparison.

    total, active = count_params(tiny())
"""

from toolkit.config import Config
from toolkit.models.transformer import moe_layer_indices


def count_params(cfg: Config) -> tuple:
    m, moe = cfg.model, cfg.moe
    attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    norms = 2 * m.d_model
    dense_mlp = 3 * m.d_model * m.d_ff
    expert = 3 * m.d_model * moe.d_expert
    router = m.d_model * moe.num_experts
    shared = 3 * m.d_model * moe.num_shared_experts * moe.d_expert
    n_moe = len(moe_layer_indices(cfg))
    n_dense = m.num_layers - n_moe
    embed = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    common = embed + m.num_layers * (attn + norms) + n_dense * dense_mlp
    total = common + n_moe * (router + shared + moe.num_experts * expert)
    active = common + n_moe * (router + shared + moe.top_k * expert)
    return total, active

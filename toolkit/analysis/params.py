"""Parameter counts from a config alone: total and active per token.

"Active" counts what one token multiplies through: attention, dense MLPs, the router,
shared experts and `top_k` routed experts of full width (plus embeddings, the output
projection and any MTP modules). With small or zero-computation experts, or a variable-k
router, that is an upper bound on the FFN part; `flops_per_token` in
`toolkit.analysis.routing` measures what a trained router actually spends. Local experts
with parameters (constant, GRU) count as active: the GRU runs over every token.

    total, active = count_params(tiny())
"""

from toolkit.config import Config
from toolkit.models.transformer import moe_layer_indices


def _gru(d_in: int, h: int) -> int:
    return d_in * 3 * h + h * 3 * h + 3 * h + h


def _router(cfg: Config) -> int:
    moe, d = cfg.moe, cfg.model.d_model
    n = moe.num_routed
    gate = (d * moe.recurrent_dim + moe.recurrent_dim * n) if moe.router == "recurrent" else d * n
    return gate + (n * n if moe.gating_residual else 0)


def _local_experts(cfg: Config) -> int:
    moe, d = cfg.moe, cfg.model.d_model
    return (moe.constant_experts * 3 * d
            + moe.gru_experts * (_gru(d, moe.d_gru_expert) + moe.d_gru_expert * d))


def count_params(cfg: Config) -> tuple:
    m, moe = cfg.model, cfg.moe
    attn = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
    attn += m.head_dim * (m.num_heads + 2 * m.num_kv_heads) if m.attention_bias else 0
    attn += {"": 0, "head": 2 * m.head_dim,
             "full": (m.num_heads + m.num_kv_heads) * m.head_dim}.get(m.qk_norm, 0)
    norms = 2 * m.d_model
    dense_mlp = 3 * m.d_model * m.d_ff
    width = moe.expert_width(m.d_ff)
    d_in = max(1, round(moe.bigmac_ratio * m.d_model)) if moe.bigmac_ratio else m.d_model
    bigmac = 2 * m.d_model * d_in if moe.bigmac_ratio else 0
    expert = 3 * d_in * width
    small = moe.small_experts * 3 * d_in * moe.d_small_expert
    shared = 3 * m.d_model * moe.shared_width(m.d_ff) + (
        m.d_model if moe.shared_expert_gate and moe.num_shared_experts else 0)
    per_layer = _router(cfg) + shared + bigmac + _local_experts(cfg)
    n_moe = len(moe_layer_indices(cfg))
    n_dense = m.num_layers - n_moe
    embed = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model
    mtp = m.mtp_layers * (2 * m.d_model + 2 * m.d_model * m.d_model + attn + norms + dense_mlp)
    gru = _gru(moe.recurrent_dim, moe.recurrent_dim) if n_moe and moe.router == "recurrent" else 0
    common = embed + m.num_layers * (attn + norms) + n_dense * dense_mlp + mtp + gru
    total = common + n_moe * (per_layer + moe.num_experts * expert + small)
    active = common + n_moe * (per_layer + moe.top_k * expert)
    return total, active

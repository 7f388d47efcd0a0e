"""Mixture-of-Experts: routers decide, dispatch moves, experts compute, combine weighs.

    layer = MoELayer(d_model, cfg.moe, rngs=nnx.Rngs(0))
    y_btd, aux = layer(x_btd)        # aux: MoEAux (counts, drops, losses, entropy, ids)
"""

from toolkit.moe.dispatch import (
                                  DispatchPlan,
                                  capacity,
                                  capacity_plan,
                                  combine,
                                  dispatch,
                                  dropless_plan,
                                  dropped_fraction,
)
from toolkit.moe.experts import Experts
from toolkit.moe.layer import MoEAux, MoELayer, balance_weights
from toolkit.moe.local_experts import LocalExperts
from toolkit.moe.losses import (
    expert_counts,
    load_balance_loss,
    router_entropy,
    tsallis_loss,
    z_loss,
)
from toolkit.moe.recurrent import GRU, RecurrentRouter
from toolkit.moe.router import (
    ROUTERS,
    ExpertChoiceRouter,
    Router,
    RouterBias,
    Routing,
    SigmoidBiasRouter,
    TopKRouter,
    TopPRouter,
    TsallisRouter,
    make_router,
    tsallis_entropy,
    update_bias,
)

__all__ = ["DispatchPlan", "ExpertChoiceRouter", "Experts", "GRU", "LocalExperts", "MoEAux", "MoELayer",
           "ROUTERS", "RecurrentRouter", "Router", "RouterBias", "Routing", "SigmoidBiasRouter",
           "TopKRouter", "TopPRouter", "TsallisRouter", "balance_weights", "capacity", "capacity_plan",
           "combine", "dispatch", "dropless_plan", "dropped_fraction", "expert_counts",
           "load_balance_loss", "make_router", "router_entropy", "tsallis_entropy", "tsallis_loss",
           "update_bias", "z_loss"]

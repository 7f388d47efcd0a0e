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
from toolkit.moe.layer import MoEAux, MoELayer
from toolkit.moe.losses import expert_counts, load_balance_loss, router_entropy, z_loss
from toolkit.moe.router import (
    ROUTERS,
    ExpertChoiceRouter,
    RouterBias,
    Routing,
    SigmoidBiasRouter,
    TopKRouter,
    TopPRouter,
    make_router,
    update_bias,
)

__all__ = ["DispatchPlan", "ExpertChoiceRouter", "Experts", "MoEAux", "MoELayer", "ROUTERS",
           "RouterBias", "Routing", "SigmoidBiasRouter", "TopKRouter", "TopPRouter", "capacity",
           "capacity_plan", "combine", "dispatch", "dropless_plan", "dropped_fraction",
           "expert_counts", "load_balance_loss", "make_router", "router_entropy", "update_bias",
           "z_loss"]

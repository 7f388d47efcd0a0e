"""Meshes, the logical-axis rules tables (parallelism recipes), and the shard_map code with
explicit collectives (expert parallelism).

    mesh = make_mesh(cfg.parallel)
    rules = rules_for(cfg.parallel)                     # the table of parallel.recipe
    spec = logical_to_spec(("embed", "mlp"), rules)     # PartitionSpec('fsdp', 'tensor')
"""

from toolkit.sharding.mesh import MESH_AXES, batch_sharding, make_mesh, rules_for, state_shardings
from toolkit.sharding.rules import (
           DEFAULT_RECIPE,
           DEFAULT_RULES,
           LOGICAL_AXES,
           RECIPES,
           constrain,
           current_rules,
           logical_to_spec,
           mesh_axes_of,
           named_sharding,
           recipe_axes,
           recipe_rules,
           use_rules,
)

__all__ = ["DEFAULT_RECIPE", "DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "RECIPES", "batch_sharding",
           "constrain", "current_rules", "logical_to_spec", "make_mesh", "mesh_axes_of",
           "named_sharding", "recipe_axes", "recipe_rules", "rules_for", "state_shardings",
           "use_rules"]

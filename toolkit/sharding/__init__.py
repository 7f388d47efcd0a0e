"""Meshes and the logical-axis rules table that maps parameters and activations onto them.

    mesh = make_mesh(cfg.parallel)
    spec = logical_to_spec(("embed", "mlp"))       # PartitionSpec('fsdp', 'tensor')
"""

from toolkit.sharding.mesh import MESH_AXES, batch_sharding, make_mesh, state_shardings
from toolkit.sharding.rules import DEFAULT_RULES, LOGICAL_AXES, constrain, logical_to_spec, named_sharding

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "batch_sharding", "constrain",
           "logical_to_spec", "make_mesh", "named_sharding", "state_shardings"]

"""Build the device mesh from `ParallelConfig`, and shardings for whole model states.

    mesh = make_mesh(ParallelConfig(data=2, fsdp=4))     # 8 devices, axes `MESH_AXES`
    rules = rules_for(cfg.parallel)                       # the table of parallel.recipe
    shardings = state_shardings(nnx.state(model), mesh, rules)  # from each Variable's logical_axes

Axes are `Auto`: the compiler propagates shardings between the ones we pin (parameters,
batch, and constraints inside the model). Explicit collectives live in shard_map code.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from toolkit.sharding.rules import logical_to_spec, recipe_rules, with_sequence_parallel

# Outermost first: pipeline stages talk least (one activation per micro-batch), tensor and
# expert groups most, so they sit on neighbouring devices.
MESH_AXES = ("pipeline", "data", "fsdp", "sequence", "tensor", "expert")


def make_mesh(parallel, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes `MESH_AXES`, sizes from `parallel` (a -1 axis takes the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = parallel.axis_sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {sizes} needs {int(np.prod(shape))} devices, "
                         f"got {len(devices)}; run validate(cfg, num_devices) first")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def rules_for(parallel) -> tuple:
    """The rules table of `parallel.recipe` (a `ParallelConfig`), with Megatron sequence
    parallelism when `parallel.sequence_parallel` is set."""
    rules = recipe_rules(parallel.recipe)
    return with_sequence_parallel(rules) if getattr(parallel, "sequence_parallel", False) else rules


def state_shardings(state, mesh, rules=None):
    """NamedSharding per leaf of an nnx State, from each Variable's `logical_axes` metadata
    (`rules`: a table, default the current one, see `use_rules`)."""
    def one(v):
        names = v.get_metadata().get("logical_axes") if _is_var(v) else None
        shape = np.shape(v.get_value() if _is_var(v) else v)
        if names is None or len(names) != len(shape):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(names, rules))
    return jax.tree.map(one, state, is_leaf=_is_var)


def sharded_abstract(abstract, mesh, rules=None):
    """An abstract nnx State (from `nnx.eval_shape`) with each leaf a ShapeDtypeStruct that
    carries its sharding: a compile or restore target that allocates nothing."""
    def one(var, sharding):
        value = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
    return jax.tree.map(one, abstract, state_shardings(abstract, mesh, rules), is_leaf=_is_var)


def batch_sharding(mesh, rules=None) -> NamedSharding:
    """Sharding of `[batch, seq]` token arrays."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))

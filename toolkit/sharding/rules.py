"""Sharding is a table: logical axis names -> mesh axes.

Every parameter carries logical names (`("expert", "embed", "mlp")`); a rules table maps
each name to mesh axes. A parallelism recipe is another table, not another code path:

    spec = logical_to_spec(("expert", "embed", "mlp"), DEFAULT_RULES)
    # PartitionSpec('expert', 'fsdp', 'tensor')

A mesh axis is used at most once per array: when two names map to the same mesh axis
(activations `("batch", "seq", "embed")` with FSDP), the first one keeps it.
"""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Logical names used by the toolkit's modules, with their meaning.
LOGICAL_AXES = {
    "batch": "sequences in a batch",
    "seq": "positions in a sequence",
    "embed": "the residual stream width d_model",
    "mlp": "hidden width of dense MLPs and experts",
    "heads": "query heads",
    "kv_heads": "key/value heads",
    "kv": "width of one attention head",
    "vocab": "token ids",
    "expert": "routed experts",
    "layers": "stacked layers",
}

DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("seq", None),
    ("kv", None),
    ("layers", None),
)


def logical_to_spec(names, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for an array whose dimensions carry logical `names` (None = replicated)."""
    table = dict(rules)
    used, out = set(), []
    for name in names:
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def constrain(x, names, rules=DEFAULT_RULES):
    """Sharding constraint by logical names under the current mesh (`jax.set_mesh`); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def named_sharding(mesh, names, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))

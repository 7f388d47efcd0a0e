"""Sharding is a table: logical axis names -> mesh axes. A parallelism recipe is a table.

Every parameter carries logical names (`("expert", "expert_embed", "expert_mlp")`); a rules
table maps each name to mesh axes. Recipes are alternative tables over the same mesh axes
(`pipeline`, `data`, `fsdp`, `sequence`, `tensor`, `expert`), not alternative code paths:

    rules = recipe_rules("fsdp_ep")
    logical_to_spec(("expert", "expert_embed", "expert_mlp"), rules)
    # PartitionSpec('expert', 'fsdp', None)

Megatron sequence parallelism (`parallel.sequence_parallel`) is a change to the table too:
`seq` maps to `sequence x tensor`, so the residual stream between tensor-parallel blocks is
split along the sequence over the tensor axis (`with_sequence_parallel`).

The routed experts and their tokens have names of their own (`expert_*`, `moe_batch`), so
one table can lay out the MoE layers differently from attention over the same devices:
MoE Parallel Folding (Liu et al. 2025). The `folded` recipe runs attention and dense MLPs
tensor-parallel over `tensor` while the experts use `expert x tensor` as one expert-parallel
group, each device holding whole experts and its own slice of the tokens.

Inside the model, `logical_to_spec(names)` reads the table set by `use_rules` (the loss
function enters it from `cfg.parallel.recipe`), so modules never pass tables around.
A mesh axis is used at most once per array: when two names map to the same mesh axis
(activations `("batch", "seq", "embed")` with FSDP), the first one keeps it.
"""

import contextlib
import contextvars

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Logical names used by the toolkit's modules, with their meaning.
LOGICAL_AXES = {
    "batch": "sequences in a batch",
    "seq": "positions in a sequence",
    "embed": "the residual stream width d_model",
    "mlp": "hidden width of dense MLPs (and shared experts)",
    "heads": "query heads",
    "kv_heads": "key/value heads",
    "kv": "width of one attention head",
    "vocab": "token ids",
    "layers": "pipeline stages: the stacked model chunks `[virtual, stages, ...]` split over devices",
    "expert": "routed experts (the expert-parallel split)",
    "expert_embed": "the model width inside routed expert weights (FSDP of experts)",
    "expert_mlp": "hidden width of routed experts (expert tensor parallelism)",
    "moe_batch": "dispatch groups: the token groups an MoE layer routes (whole sequences)",
}


def _table(**names) -> tuple:
    """A full rules table: every logical name, `None` (replicated) unless given.

    Every recipe also takes the pipeline and sequence axes: stacked stages over `pipeline`,
    sequence positions over `sequence` (context parallelism), and the vocabulary over
    `pipeline` before any axis the recipe gives it (vocabulary parallelism: the embedding
    and output layer are spread over all pipeline devices, not held by the end stages).
    """
    unknown = set(names) - set(LOGICAL_AXES)
    assert not unknown, f"rules name unknown logical axes {sorted(unknown)}"
    vocab = names.get("vocab")
    names = dict(names, layers="pipeline", seq="sequence",
                 vocab=("pipeline",) + ((vocab,) if isinstance(vocab, str) else tuple(vocab or ())))
    return tuple((n, names.get(n)) for n in LOGICAL_AXES)


_TP = dict(mlp="tensor", heads="tensor", kv_heads="tensor", vocab="tensor")
_FSDP = dict(embed="fsdp", expert_embed="fsdp")

# Recipe name -> rules. Each recipe uses some mesh axes; a mesh axis of size > 1 that its
# recipe does not use is rejected by validate() (it would hold identical replicas).
RECIPES = {
    # Batch split, everything replicated.
    "dp": _table(batch="data", moe_batch="data"),
    # ZeRO-3: parameters and optimizer state sharded on the model width, gathered per use.
    "fsdp": _table(batch=("data", "fsdp"), moe_batch=("data", "fsdp"), **_FSDP),
    # Megatron tensor parallelism: heads and MLP hidden split; routed experts split on their
    # hidden width (expert tensor parallelism).
    "tp": _table(batch="data", moe_batch="data", expert_mlp="tensor", **_TP),
    # Expert parallelism: whole experts per device; tokens split over the expert axis too.
    "ep": _table(batch=("data", "expert"), moe_batch=("data", "expert"), expert="expert"),
    "fsdp_ep": _table(batch=("data", "fsdp", "expert"), moe_batch=("data", "fsdp", "expert"),
                      expert="expert", **_FSDP),
    # All four: the default, every axis of size > 1 takes its role.
    "fsdp_tp_ep": _table(batch=("data", "fsdp", "expert"), moe_batch=("data", "fsdp", "expert"),
                         expert="expert", expert_mlp="tensor", **_FSDP, **_TP),
    # MoE Parallel Folding: attention as fsdp_tp_ep; the experts fold `tensor` into their
    # expert-parallel group (no expert tensor parallelism), tokens split over it too.
    "folded": _table(batch=("data", "fsdp", "expert"),
                     moe_batch=("data", "fsdp", "expert", "tensor"),
                     expert=("expert", "tensor"), **_FSDP, **_TP),
}
DEFAULT_RECIPE = "fsdp_tp_ep"
DEFAULT_RULES = RECIPES[DEFAULT_RECIPE]

_CURRENT = contextvars.ContextVar("toolkit_sharding_rules", default=DEFAULT_RULES)


def recipe_rules(name: str) -> tuple:
    """The rules table of recipe `name` (one of `RECIPES`)."""
    if name not in RECIPES:
        raise ValueError(f"parallel.recipe={name!r} is not a recipe; use one of {sorted(RECIPES)}")
    return RECIPES[name]


def with_sequence_parallel(rules) -> tuple:
    """`rules` with positions also split over the axes that split `heads` (Megatron SP)."""
    table = dict(rules)
    tp = mesh_axes_of("heads", rules)
    return tuple((n, (tuple(mesh_axes_of("seq", rules)) + tp) if n == "seq" and tp else v)
                 for n, v in table.items())


def recipe_axes(name: str) -> set:
    """Mesh axes that recipe `name` shards anything over."""
    axes = set()
    for _, value in recipe_rules(name):
        axes.update((value,) if isinstance(value, str) else (value or ()))
    return axes


@contextlib.contextmanager
def use_rules(rules):
    """Make `rules` the table that `logical_to_spec` reads (while tracing a model)."""
    token = _CURRENT.set(tuple(rules))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_rules() -> tuple:
    return _CURRENT.get()


def mesh_axes_of(name: str, rules=None) -> tuple:
    """Mesh axes (a tuple, maybe empty) that logical axis `name` maps to."""
    value = dict(rules or current_rules()).get(name)
    return (value,) if isinstance(value, str) else tuple(value or ())


def logical_to_spec(names, rules=None) -> P:
    """PartitionSpec for an array whose dimensions carry logical `names` (None = replicated)."""
    table = dict(rules or current_rules())
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


def constrain(x, names, rules=None):
    """Sharding constraint by logical names under the current mesh (`jax.set_mesh`); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def named_sharding(mesh, names, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))

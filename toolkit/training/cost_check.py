"""The cost model against the compiled train step: what `python -m toolkit inspect` and the
tests use to keep `toolkit.analysis.costs` honest.

`cost_check(cfg)` compiles `cfg`'s train step on its mesh (abstract arrays, nothing runs)
and sets each figure of the compiled program beside the formula's:

* dot FLOPs per device outside the routed experts (loops multiplied out);
* dot FLOPs inside the `routed_experts` scope, when the experts run the reference grouped
  matmul (every local expert multiplies every row it is given: `E_local` times the useful
  work; the fast CPU kernel's loops have data-dependent trip counts no count can read);
* step arguments (parameters, AdamW state, the batch) against the parameter table;
* temporaries against gradients plus kept activations (XLA's buffer assignment, fusion
  and scheduling decide the rest, so this one is an estimate);
* bytes sent per collective kind, per step.

In a pipeline the step is a loop of ticks, each running idle, forward or backward as the
schedule's table says (`lax.switch`) and the loss head under a `lax.cond`; a static count
takes every tick's costliest branch (and every branch's collectives), so there all rows but
the arguments and the stage sends are upper bounds.

    rows = cost_check(cfg)
    print(render_cost_check(rows))
"""

import math

import jax
import jax.numpy as jnp

from toolkit.analysis.compiled import matmul_flops, step_collectives
from toolkit.analysis.costs import estimate_costs
from toolkit.config import Config, validate
from toolkit.sharding.mesh import batch_sharding, make_mesh, rules_for
from toolkit.training.step import abstract_state, graphdef_of, make_train_step


def compile_train_step(cfg: Config, devices):
    """The compiled train step of `cfg` on a mesh of `devices`, and the abstract state."""
    mesh = make_mesh(cfg.parallel, devices)
    state = abstract_state(cfg, mesh)
    step = make_train_step(cfg, graphdef_of(cfg), mesh, state)
    sh = batch_sharding(mesh, rules_for(cfg.parallel))
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len), jnp.int32, sharding=sh)
             for k in ("tokens", "targets", "domain")}
    with jax.set_mesh(mesh):
        return step.lower(state, batch).compile(), state


def _row(what, compiled, model):
    return {"what": what, "compiled": float(compiled), "model": float(model),
            "ratio": float(compiled) / model if model else (1.0 if not compiled else math.inf)}


def cost_check(cfg: Config, devices=None, *, experts: bool = True) -> list:
    """Rows {"what", "compiled", "model", "ratio"} for `cfg` on `devices` (default: all).
    `experts=False` skips the second compile (reference grouped matmul) for the expert FLOPs."""
    import dataclasses
    devices = list(devices if devices is not None else jax.devices())
    cfg = validate(cfg, num_devices=len(devices))
    costs = estimate_costs(cfg, len(devices), platform=devices[0].platform)
    compiled, _ = compile_train_step(cfg, devices)
    hlo = compiled.as_text()
    dev = costs.device_component_flops
    inside = matmul_flops(hlo, "routed_experts")["flops"]
    # A pipeline's tick picks idle, forward or backward at run time (`lax.switch`); the count
    # takes every tick's costliest branch, so for pipelines its FLOPs are an upper bound.
    bound = " (upper bound: pipeline ticks)" if cfg.parallel.pipeline > 1 else ""
    rows = [_row("dot FLOPs outside routed experts" + bound, matmul_flops(hlo)["flops"] - inside,
                 sum(v for k, v in dev.items() if k != "experts"))]
    if experts and cfg.moe.num_experts:
        ref = dataclasses.replace(cfg, kernels=dataclasses.replace(cfg.kernels, gmm="reference"))
        ref_hlo = compile_train_step(ref, devices)[0].as_text()
        waste = _reference_waste(cfg, costs, devices[0].platform)
        rows.append(_row(f"dot FLOPs in routed experts / {waste:g} (reference gmm's waste){bound}",
                         matmul_flops(ref_hlo, "routed_experts")["flops"] / waste,
                         dev["experts"]))
    memory = compiled.memory_analysis()
    mem = costs.memory
    # tokens and targets, int32 (the step never reads the domain labels; jit drops them)
    batch_bytes = 2 * 4 * cfg.train.batch_size * cfg.model.seq_len / _token_split(cfg, costs)
    rows.append(_row("argument bytes (params + optimizer + batch)", memory.argument_size_in_bytes,
                     mem["params"] + mem["optimizer"] + batch_bytes))
    rows.append(_row("temporary bytes (gradients + activations + gathered)", memory.temp_size_in_bytes,
                     mem["gradients"] + mem["activations"] + mem["gathered"]))
    sent = {}
    for op, times in step_collectives(hlo):
        sent[op.kind] = sent.get(op.kind, 0.0) + op.sent_bytes * times
    model = {}
    for r in costs.communication:
        for kind in r["collective"].split(" + "):
            share = r["bytes"] / len(r["collective"].split(" + "))
            model[kind] = model.get(kind, 0.0) + share
    for kind in sorted(set(sent) | set(model)):
        # in a pipeline, collectives inside the tick's branches count on every tick
        note = bound if kind != "collective-permute" else ""
        rows.append(_row(f"{kind} bytes sent{note}", sent.get(kind, 0.0), model.get(kind, 0.0)))
    return rows


def _reference_waste(cfg: Config, costs, platform: str) -> float:
    """Expert rows the reference grouped matmul multiplies per row the model counts: every
    local expert against every row it is given (dropless), the gathered rows of the whole
    expert-parallel group under the all-gather exchange; padded capacity slots go one
    expert at a time, nothing wasted."""
    from toolkit.analysis.costs import _axes, _exchange, _rules
    if cfg.moe.dispatch == "capacity":
        return 1.0
    ep = math.prod(costs.sizes[a] for a in _axes("expert", _rules(cfg)))
    gathered = ep if ep > 1 and _exchange(cfg.parallel, platform) == "all_gather" else 1
    return cfg.moe.num_ffn_experts // ep * gathered


def _token_split(cfg: Config, costs) -> int:
    from toolkit.analysis.costs import _axes, _rules
    rules = _rules(cfg)
    return math.prod(costs.sizes[a] for a in _axes("batch", rules) | _axes("seq", rules))


def render_cost_check(rows) -> str:
    width = max(len(r["what"]) for r in rows) + 2
    lines = [f"  {'figure':<{width}}{'compiled':>14}{'model':>14}{'ratio':>8}"]
    for r in rows:
        lines.append(f"  {r['what']:<{width}}{r['compiled']:>14.4g}{r['model']:>14.4g}{r['ratio']:>8.3f}")
    return "\n".join(lines)

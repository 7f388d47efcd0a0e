"""What one training step costs a device, from the compiled program alone (nothing runs).

`inspect_train_step` compiles the train step of a config on its mesh, with abstract
arrays, and reads back:

* parameter and optimizer-state bytes each device holds (from the state's shardings);
* XLA's memory analysis of the compiled step: arguments, outputs, temporaries;
* the collectives the partitioner inserted (`toolkit.analysis.collectives`), per kind.

    info = inspect_train_step(cfg)                  # cfg validated against the devices
    print(render_inspection(info))                  # what `python -m toolkit inspect` prints
"""

import math

import jax
import jax.numpy as jnp

from toolkit.analysis.collectives import parse_collectives, summarize_collectives
from toolkit.config import Config, validate
from toolkit.sharding.mesh import MESH_AXES, batch_sharding, make_mesh
from toolkit.training.step import abstract_state, graphdef_of, make_train_step


def _bytes_per_device(tree) -> int:
    """Bytes of one device's shards of the abstract arrays in `tree` (the largest device)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += jnp.dtype(x.dtype).itemsize * math.prod(shard)
    return total


def inspect_train_step(cfg: Config, devices=None) -> dict:
    """Compile `cfg`'s train step on its mesh and report memory and collectives per device."""
    devices = list(devices if devices is not None else jax.devices())
    cfg = validate(cfg, num_devices=len(devices))
    mesh = make_mesh(cfg.parallel, devices)
    state = abstract_state(cfg, mesh)
    step = make_train_step(cfg, graphdef_of(cfg), mesh, state)
    sh = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len), jnp.int32,
                                     sharding=sh) for k in ("tokens", "targets", "domain")}
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    sizes = cfg.parallel.axis_sizes(len(devices))
    return {
        "mesh": ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes[a] > 1) or "1 device",
        "devices": len(devices),
        "state_bytes": _bytes_per_device(state),
        "param_bytes": _bytes_per_device(state[0]),     # the model; state[1] is the optimizer
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "collectives": summarize_collectives(parse_collectives(compiled.as_text())),
    }


def render_inspection(info: dict) -> str:
    """A plain-text report of `inspect_train_step`'s result."""
    mib = lambda b: f"{b / 2**20:,.2f} MiB"
    lines = [f"train step on mesh {info['mesh']} ({info['devices']} devices), per device:",
             f"  model (parameters)       {mib(info['param_bytes'])}",
             f"  parameters + optimizer   {mib(info['state_bytes'])}",
             f"  step arguments           {mib(info['argument_bytes'])}",
             f"  step outputs             {mib(info['output_bytes'])}",
             f"  temporaries              {mib(info['temp_bytes'])}", "",
             "collectives in the compiled step (bytes one device sends on a ring):",
             f"  {'kind':<20}{'ops':>5}{'result':>16}{'sent':>16}"]
    for kind, row in sorted(info["collectives"].items()):
        lines.append(f"  {kind:<20}{row['count']:>5}{mib(row['result_bytes']):>16}"
                     f"{mib(row['sent_bytes']):>16}")
    if not info["collectives"]:
        lines.append("  (none: every array is local)")
    return "\n".join(lines)

"""What one training step costs a device, from the compiled program alone (nothing runs).

`inspect_train_step` compiles the train step of a config on its mesh, with abstract
arrays, and reads back:

* parameter and optimizer-state bytes each device holds (from the state's shardings);
* XLA's memory analysis of the compiled step: arguments, outputs, temporaries;
* the collectives the partitioner inserted (`toolkit.analysis.collectives`), per kind.

    info = inspect_train_step(cfg)                  # cfg validated against the devices
    print(render_inspection(info))                  # what `python -m toolkit inspect` prints

`loss_and_grads` computes one batch's loss and gradients on a mesh (the single-device
equivalence check). `communication_check` compiles one transformer block alone and sets the bytes its
collectives move beside the analytic formulas: the expert exchange of an MoE block
(`expert_parallel.comm_bytes`) and Megatron tensor parallelism of a dense block
(`tensor_parallel.tensor_parallel_bytes`).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from toolkit.analysis.collectives import parse_collectives, summarize_collectives
from toolkit.config import Config, validate
from toolkit.data import Batches, load_corpus
from toolkit.models.transformer import Block
from toolkit.sharding.expert_parallel import SCOPE, comm_bytes, layout
from toolkit.sharding.mesh import MESH_AXES, batch_sharding, make_mesh, rules_for, sharded_abstract
from toolkit.sharding.rules import logical_to_spec, mesh_axes_of, use_rules
from toolkit.sharding.tensor_parallel import tensor_parallel_bytes
from toolkit.training.step import abstract_state, graphdef_of, init_state, make_train_step, value_and_grad


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
    sh = batch_sharding(mesh, rules_for(cfg.parallel))
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.model.seq_len), jnp.int32,
                                     sharding=sh) for k in ("tokens", "targets", "domain")}
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    sizes = cfg.parallel.axis_sizes(len(devices))
    return {
        "mesh": ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes[a] > 1) or "1 device",
        "devices": len(devices), "recipe": cfg.parallel.recipe,
        "state_bytes": _bytes_per_device(state),
        "param_bytes": _bytes_per_device(state[0]),     # the model; state[1] is the optimizer
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "collectives": summarize_collectives(parse_collectives(compiled.as_text())),
        "pipeline_ticks": _pipeline_ticks(cfg),
    }


def _pipeline_ticks(cfg: Config) -> int:
    """Ticks of the pipeline schedule (0 without a pipeline)."""
    par = cfg.parallel
    if par.pipeline == 1:
        return 0
    from toolkit.sharding.schedules import timeline
    return int(timeline(par.schedule, par.pipeline, cfg.train.microbatches, par.virtual_stages).length)


def render_inspection(info: dict) -> str:
    """A plain-text report of `inspect_train_step`'s result."""
    mib = lambda b: f"{b / 2**20:,.2f} MiB"
    lines = [f"train step on mesh {info['mesh']} ({info['devices']} devices, recipe "
             f"{info['recipe']}), per device:",
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
    if info.get("pipeline_ticks"):
        lines.append(f"  (counted once per op in the program; the pipeline's per-tick ops, e.g. its "
                     f"collective-permutes, run {info['pipeline_ticks']} times a step)")
    return "\n".join(lines)


def block_collectives(cfg: Config, *, moe: bool, backward: bool, devices=None) -> list:
    """The collectives of one transformer block (MoE or dense) applied to a batch of
    `train.batch_size` sequences on `cfg`'s mesh: forward only, or forward and backward."""
    devices = list(devices if devices is not None else jax.devices())
    mesh, rules = make_mesh(cfg.parallel, devices), rules_for(cfg.parallel)
    m = cfg.model
    with use_rules(rules):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(cfg, moe, rngs=nnx.Rngs(0))))
        state = sharded_abstract(state, mesh, rules)
        x_sh = NamedSharding(mesh, logical_to_spec(("batch", "seq", "embed")))
    x = jax.ShapeDtypeStruct((cfg.train.batch_size, m.seq_len, m.d_model), jnp.dtype(m.dtype),
                             sharding=x_sh)

    def f(state, x_btd):
        with use_rules(rules):
            block = nnx.merge(graphdef, state)
            positions = jnp.broadcast_to(jnp.arange(x_btd.shape[1]), x_btd.shape[:2])
            return jnp.sum(block(x_btd, positions, {})[0].astype(jnp.float32))

    fn = jax.grad(f, argnums=(0, 1)) if backward else f
    with jax.set_mesh(mesh):
        return parse_collectives(jax.jit(fn).lower(state, x).compile().as_text())


def communication_check(cfg: Config, devices=None) -> list:
    """Rows `{what, kind, measured_bytes, analytic_bytes}` for `cfg` on its mesh.

    * expert exchange of one MoE block, forward: the all-to-all bytes (capacity) or the
      token all-gather and reduce-scatter bytes (dropless, all_gather exchange) a device
      sends, against `comm_bytes` for its T tokens of width d (r*d for BigMac);
    * tensor parallelism of one dense block, forward and backward: the all-reduces of
      `[b, s, d]` activations, against `8 * b*s*d * (t-1)/t`.
    """
    devices = list(devices if devices is not None else jax.devices())
    cfg = validate(cfg, num_devices=len(devices))
    sizes, rules = cfg.parallel.axis_sizes(len(devices)), rules_for(cfg.parallel)
    size = lambda name: math.prod(sizes[a] for a in mesh_axes_of(name, rules))
    m, moe, rows = cfg.model, cfg.moe, []
    itemsize = jnp.dtype(m.dtype).itemsize
    ep, tp = size("expert"), size("heads")
    if moe.num_experts and ep > 1:
        tokens = cfg.train.batch_size * m.seq_len // size("moe_batch")
        d = max(1, round(moe.bigmac_ratio * m.d_model)) if moe.bigmac_ratio else m.d_model
        exchange = layout(make_mesh(cfg.parallel, devices), cfg.parallel).exchange
        analytic = comm_bytes(moe, tokens, d, ep, itemsize, exchange)
        ops = block_collectives(cfg, moe=True, backward=False, devices=devices)
        # float rows only (tokens, routing weights), not the integer ids, sizes and offsets
        ops = [o for o in ops if SCOPE in o.scope and o.dtype in ("f32", "bf16")]
        what = "expert exchange per MoE layer (forward)"
        if moe.dispatch != "capacity" and exchange == "ragged_all_to_all":
            what += "; ragged: formula at uniform load" + (", CPU emulation pads"
                                                           if jax.default_backend() == "cpu" else "")
        for kind in ("all-to-all", "all-gather", "reduce-scatter"):
            if analytic[kind]:
                measured = sum(o.sent_bytes for o in ops if o.kind == kind)
                rows.append({"what": what, "kind": kind, "measured_bytes": measured,
                             "analytic_bytes": analytic[kind]})
    if tp > 1:
        b = cfg.train.batch_size // size("batch")
        ops = block_collectives(cfg, moe=False, backward=True, devices=devices)
        # [b, s, d] activations, or [b/n, s, d] pieces with parallel.overlap_chunks=n
        # (XLA may fuse the pieces into one all-reduce of a tuple).
        act = lambda o: len(o.shape) == 3 and o.shape[1:] == (m.seq_len, m.d_model)
        measured = sum(o.sent_bytes for o in ops if o.kind == "all-reduce" and act(o))
        rows.append({"what": "tensor parallelism per dense layer (forward + backward)",
                     "kind": "all-reduce", "measured_bytes": measured,
                     "analytic_bytes": tensor_parallel_bytes(b, m.seq_len, m.d_model, tp, itemsize)})
    return rows


def render_communication(rows) -> str:
    if not rows:
        return "no expert or tensor parallelism on this mesh: nothing to check"
    width = max(56, *(len(r["what"]) + 2 for r in rows))
    lines = [f"  {'collective':<{width}}{'kind':<16}{'HLO':>12}{'formula':>12}"]
    kib = lambda b: f"{b / 1024:,.1f} KiB"
    for r in rows:
        lines.append(f"  {r['what']:<{width}}{r['kind']:<16}{kib(r['measured_bytes']):>12}"
                     f"{kib(r['analytic_bytes']):>12}")
    return "\n".join(lines)





def loss_and_grads(cfg: Config, devices=None, corpus=None) -> tuple:
    """`(loss, grads, state)` of train batch 0 on `cfg`'s mesh over `devices`: the numbers an
    equivalence check compares between a mesh and one device. `corpus`: a loaded corpus to
    reuse (default: `load_corpus(cfg.data)`)."""
    devices = list(devices if devices is not None else jax.devices())
    mesh = make_mesh(cfg.parallel, devices)
    graphdef, state = init_state(cfg, mesh)
    corpus = corpus if corpus is not None else load_corpus(cfg.data)
    batch = Batches(corpus, seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size,
                    seed=cfg.train.seed, domain_weights=cfg.data.domain_weights).train(0)
    sharding = batch_sharding(mesh, rules_for(cfg.parallel))
    batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}

    @jax.jit
    def f(state, batch):
        model, _ = nnx.merge(graphdef, state)
        (loss, _), grads = value_and_grad(model, batch, cfg)
        return loss, grads

    with jax.set_mesh(mesh):
        loss, grads = f(state, batch)
    return float(loss), grads, state


def pipeline_stage_times(cfg: Config, *, repeats: int = 5, num_devices=None) -> tuple:
    """Measured `(forward_s, backward_s)` of one pipeline chunk (L/(p v) blocks) on one
    micro-batch of one device's share of the batch: what a stage spends per op. The
    backward includes the recomputed forward when `parallel.pipeline_remat` is on. Feed
    them to `timeline(..., forward_time=, backward_time=)` for the wall-clock bubble.
    `num_devices`: the mesh's size, for the share of the batch (default: all devices)."""
    import time

    from toolkit.models.transformer import Stage, moe_layer_indices, pipeline_chunks
    v, p, per = pipeline_chunks(cfg)
    sizes = cfg.parallel.axis_sizes(num_devices or len(jax.devices()))
    rows = cfg.train.batch_size // cfg.train.microbatches
    rows //= math.prod(sizes[a] for a in mesh_axes_of("batch", rules_for(cfg.parallel)))
    moe_at = set(moe_layer_indices(cfg))
    stage = Stage([Block(cfg, j in moe_at, rngs=nnx.Rngs(j)) for j in range(per)])
    graphdef, state = nnx.split(stage)
    m = cfg.model
    x = jax.random.normal(jax.random.key(0), (max(rows, 1), m.seq_len, m.d_model), jnp.dtype(m.dtype))
    state, x = jax.device_put((state, x), jax.devices()[0])

    def run(state, x):
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        return nnx.merge(graphdef, state)(x, positions)[0]
    fwd = jax.jit(run)
    bwd = jax.jit(lambda s, x, dy: jax.vjp(run, s, x)[1](dy))

    def median(fn, *args):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    return median(fwd, state, x), median(bwd, state, x, x)

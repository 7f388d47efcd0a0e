"""The loss, the optimizer and the jitted train/eval steps over a mesh.

The loss is next-token cross-entropy plus the weighted router losses summed over MoE
layers (each layer balances its own experts, as in Switch and GShard):

    loss = CE + moe.aux_loss_weight * sum_l LB_l + moe.seq_aux_loss_weight * sum_l SeqLB_l
              + moe.z_loss_weight * sum_l Z_l + moe.entropy_loss_weight * sum_l H_l
              + moe.tsallis_loss_weight * sum_l S_q,l + model.mtp_loss_weight * mean_j MTP_j

Each term is logged on its own. The aux-loss-free bias of `sigmoid_bias` routers moves
after the optimizer step, outside it (`update_router_biases`).

Steps are pure functions of `(state, batch)` compiled once per config with explicit
shardings, so the same code runs on one device or a mesh:

    graphdef, state = init_state(cfg, mesh)
    train = make_train_step(cfg, graphdef, mesh, state)
    with jax.set_mesh(mesh):      # activation constraints and local MoE dispatch read it
        state, metrics = train(state, batch)

Trace the steps under `jax.set_mesh(mesh)` (the `Trainer` does): without a current mesh
the model's sharding constraints are no-ops and each MoE layer dispatches the whole batch
as one group.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from toolkit.config import Config
from toolkit.models.transformer import Transformer, pipeline_chunks
from toolkit.moe.layer import aux_metrics
from toolkit.moe.router import update_bias
from toolkit.sharding.mesh import batch_sharding, rules_for, sharded_abstract, state_shardings
from toolkit.sharding.pipeline import pipeline_value_and_grad, split_microbatches


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup to `train.learning_rate`, then cosine decay to `min_lr_ratio` of it."""
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
        decay_steps=t.steps, end_value=t.learning_rate * t.min_lr_ratio)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW on `lr_schedule`, after global-norm clipping."""
    t = cfg.train
    adamw = optax.adamw(lr_schedule(cfg), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw) if t.grad_clip else adamw


def learning_rate(cfg: Config, step: int) -> float:
    return float(lr_schedule(cfg)(step))


def _build(cfg: Config, seed: int):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)


def init_state(cfg: Config, mesh):
    """(graphdef, state) of model + optimizer, every array created already sharded on `mesh`."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _build(cfg, cfg.train.seed)))
    shardings = state_shardings(abstract, mesh, rules_for(cfg.parallel))
    state = jax.jit(lambda: nnx.state(_build(cfg, cfg.train.seed)), out_shardings=shardings)()
    return graphdef, state


def graphdef_of(cfg: Config):
    """The model + optimizer graph structure, without allocating any parameter."""
    return nnx.split(nnx.eval_shape(lambda: _build(cfg, cfg.train.seed)))[0]


def abstract_state(cfg: Config, mesh):
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: _build(cfg, cfg.train.seed)))
    return sharded_abstract(abstract, mesh, rules_for(cfg.parallel))


def mtp_loss(mtp_logits_jbtv, targets_bt):
    """Mean CE of MTP depth j against token t+j+2 (`targets` shifted by j+1), per depth [J];
    the last j+1 positions have no such token and are left out."""
    s = targets_bt.shape[1]
    out = []
    for j in range(mtp_logits_jbtv.shape[0]):
        shifted_bt = jnp.roll(targets_bt, -(j + 1), axis=1)
        ce_bt = optax.softmax_cross_entropy_with_integer_labels(mtp_logits_jbtv[j], shifted_bt)
        mask_t = (jnp.arange(s) < s - j - 1).astype(jnp.float32)
        out.append(jnp.sum(ce_bt * mask_t) / (mask_t.sum() * targets_bt.shape[0]))
    return jnp.stack(out)


ROUTER_LOSSES = (("aux_loss_weight", "load_balance_loss"), ("seq_aux_loss_weight", "seq_balance_loss"),
                 ("z_loss_weight", "z_loss"), ("entropy_loss_weight", "entropy"),
                 ("tsallis_loss_weight", "tsallis_entropy"))
"""(MoEConfig weight, MoEAux field) of each router loss."""


def router_loss(aux, cfg: Config):
    """The weighted router losses of stacked `MoEAux` records, summed over layers."""
    loss = jnp.zeros((), jnp.float32)
    for weight, field in ROUTER_LOSSES:
        if getattr(cfg.moe, weight):
            loss = loss + getattr(cfg.moe, weight) * jnp.sum(getattr(aux, field))
    return loss


def loss_fn(model, batch, cfg: Config):
    """Mean CE plus weighted router and MTP losses; returns (loss, metrics)."""
    if cfg.model.mtp_layers:
        logits_btv, aux, mtp_logits = model(batch["tokens"], mtp_tokens_bt=batch["targets"])
    else:
        (logits_btv, aux), mtp_logits = model(batch["tokens"]), None
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"]).mean()
    metrics = {"ce": ce}
    loss = ce
    if aux is not None:
        loss = loss + router_loss(aux, cfg)
        metrics.update(aux_metrics(aux))
    if mtp_logits is not None:
        mtp_ce_j = mtp_loss(mtp_logits, batch["targets"])
        loss = loss + cfg.model.mtp_loss_weight * jnp.mean(mtp_ce_j)
        metrics["mtp_ce"] = mtp_ce_j
    metrics["loss"] = loss
    return loss, metrics


def value_and_grad(model, batch, cfg: Config):
    """`((loss, metrics), grads)` of the step's loss: the mean over `train.microbatches`
    micro-batches (`split_microbatches`), each `loss_fn`; run as a pipeline when
    `parallel.pipeline > 1`, else by accumulating gradients over the micro-batches.
    Metrics average over micro-batches, except counts (`*_counts`), which add."""
    m = cfg.train.microbatches
    if cfg.parallel.pipeline > 1:
        return pipeline_value_and_grad(model, batch, cfg, lambda aux: router_loss(aux, cfg))
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    if m == 1:
        return grad_fn(model, batch, cfg)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def micro_loss(params, rest, micro):
        mdl = nnx.merge(graphdef, params, rest)
        loss, metrics = loss_fn(mdl, micro, cfg)
        return loss, (metrics, nnx.state(mdl, nnx.Not(nnx.Param)))   # rest: jitter counters

    def one(carry, micro):
        grads, rest = carry
        (loss, (metrics, rest)), g = jax.value_and_grad(micro_loss, has_aux=True)(params, rest, micro)
        return (jax.tree.map(jnp.add, grads, g), rest), (loss, metrics)

    micro = jax.tree.map(lambda a: split_microbatches(a, m), batch)
    (grads, rest), (loss_m, metrics_m) = jax.lax.scan(
        one, (jax.tree.map(jnp.zeros_like, params), rest), micro)
    nnx.update(model, rest)
    metrics = {k: jnp.sum(a, 0) if k.endswith("_counts") else jnp.mean(a, 0)
               for k, a in metrics_m.items()}
    return (jnp.mean(loss_m), metrics), jax.tree.map(lambda g: g / m, grads)


def _train_step(model, optimizer, batch, cfg):
    (_, metrics), grads = value_and_grad(model, batch, cfg)
    optimizer.update(model, grads)
    update_router_biases(model, metrics.get("expert_counts"), cfg)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return metrics


def update_router_biases(model, expert_counts_le, cfg: Config):
    """Aux-loss-free balancing, outside the optimizer: each `sigmoid_bias` router's bias
    takes one `update_bias` step from its layer's expert counts of this batch."""
    if expert_counts_le is None or cfg.moe.router != "sigmoid_bias" or not cfg.moe.bias_update_rate:
        return
    rate = cfg.moe.bias_update_rate
    if model.stages is not None:     # stacked [v, p, ...]: layer (r*p + s)*n + j is block j of [r, s]
        moe_blocks = [b for b in model.stages.blocks if b.is_moe]
        v, p, _ = pipeline_chunks(cfg)
        counts_vpne = expert_counts_le.reshape(v, p, len(moe_blocks), -1)
        step = jax.vmap(jax.vmap(functools.partial(update_bias, rate=rate)))
        for j, block in enumerate(moe_blocks):
            block.ffn.router.bias[...] = step(block.ffn.router.bias[...], counts_vpne[:, :, j])
        return
    routers = [b.ffn.router for b in model.blocks if b.is_moe]
    for router, counts_e in zip(routers, expert_counts_le, strict=True):
        router.bias[...] = update_bias(router.bias[...], counts_e, rate)


def make_train_step(cfg: Config, graphdef, mesh, state):
    """Jitted `(state, batch) -> (state, metrics)`; the state buffers are donated.

    A step whose loss or global gradient norm is not finite changes nothing: the returned
    state is the input state (parameters, optimizer moments and step count, router biases),
    chosen element-wise with `jnp.where`, and `metrics["skipped"]` is 1 with
    `metrics["loss_finite"]`/`metrics["grads_finite"]` saying which value was not.
    """
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = batch_sharding(mesh, rules_for(cfg.parallel))

    def step(state, batch):
        old_leaves = jax.tree.leaves(state)        # the arrays, before the update mutates state
        model, optimizer = nnx.merge(graphdef, state)
        metrics = _train_step(model, optimizer, batch, cfg)
        loss_ok, grads_ok = jnp.isfinite(metrics["loss"]), jnp.isfinite(metrics["grad_norm"])
        ok = loss_ok & grads_ok
        new_leaves, treedef = jax.tree.flatten(nnx.state((model, optimizer)))
        new_state = jax.tree.unflatten(treedef, [jnp.where(ok, new, old) for new, old in
                                                 zip(new_leaves, old_leaves, strict=True)])
        metrics.update(skipped=(~ok).astype(jnp.int32), loss_finite=loss_ok, grads_finite=grads_ok)
        return new_state, metrics

    # Metrics come back replicated, so every process can read them (no gather needed).
    return jax.jit(step, donate_argnums=0, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, NamedSharding(mesh, P())))


def make_eval_step(cfg: Config, graphdef, mesh, state, num_domains: int):
    """Jitted `(state, batch) -> sums`: CE nats, byte targets, and per-domain expert counts.

    Returns `{"nats": [D], "byte_nats": [D], "bytes": [D], "tokens": [D], "domain_counts":
    [L, D, E], "affinity_counts": [L-1, E, E]}` summed over the batch, so callers can add
    batches and divide once; `affinity_counts[l, i, j]` counts tokens that chose expert i at
    MoE layer l and expert j at layer l+1. Bits per
    byte count byte targets only (BOS/EOS excluded), like the unigram baseline.
    """
    state_sh = jax.tree.map(lambda x: x.sharding, state)

    def step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        model.eval()                                   # no router jitter
        logits_btv, aux = model(batch["tokens"])
        ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
        dom_btd = jax.nn.one_hot(batch["domain"], num_domains, dtype=jnp.float32)
        is_byte_bt = (batch["targets"] < 256).astype(jnp.float32)
        out = {"nats": jnp.einsum("bt,btd->d", ce_bt, dom_btd),
               "byte_nats": jnp.einsum("bt,btd->d", ce_bt * is_byte_bt, dom_btd),
               "bytes": jnp.einsum("bt,btd->d", is_byte_bt, dom_btd),
               "tokens": jnp.sum(dom_btd, axis=(0, 1))}
        if aux is not None:
            ids_onehot = jax.nn.one_hot(aux.expert_ids, cfg.moe.num_routed, dtype=jnp.float32)
            out["domain_counts"] = jnp.einsum("lbtke,btd->lde", ids_onehot, dom_btd)
            chosen_lbte = jnp.minimum(jnp.sum(ids_onehot, axis=3), 1.0)
            out["affinity_counts"] = jnp.einsum("lbti,lbtj->lij", chosen_lbte[:-1], chosen_lbte[1:])
        return out

    return jax.jit(step, in_shardings=(state_sh, batch_sharding(mesh, rules_for(cfg.parallel))),
                   out_shardings=NamedSharding(mesh, P()))


def to_host(tree):
    """Device arrays -> numpy (for logging)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)

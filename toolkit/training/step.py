"""The loss, the optimizer and the jitted train/eval steps over a mesh.

The loss is next-token cross-entropy plus the weighted router losses summed over MoE
layers (each layer balances its own experts, as in Switch and GShard):

    loss = CE + moe.aux_loss_weight * sum_l LB_l + moe.z_loss_weight * sum_l Z_l

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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from toolkit.config import Config
from toolkit.models.transformer import Transformer
from toolkit.moe.router import update_bias
from toolkit.sharding.mesh import batch_sharding, state_shardings


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
    shardings = state_shardings(abstract, mesh)
    state = jax.jit(lambda: nnx.state(_build(cfg, cfg.train.seed)), out_shardings=shardings)()
    return graphdef, state


def graphdef_of(cfg: Config):
    """The model + optimizer graph structure, without allocating any parameter."""
    return nnx.split(nnx.eval_shape(lambda: _build(cfg, cfg.train.seed)))[0]


def abstract_state(cfg: Config, mesh):
    """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: _build(cfg, cfg.train.seed)))
    shardings = state_shardings(abstract, mesh)
    def with_sharding(var, sharding):
        value = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
    return jax.tree.map(with_sharding, abstract, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def loss_fn(model, batch, cfg: Config):
    """Mean CE plus weighted router losses; returns (loss, metrics)."""
    logits_btv, aux = model(batch["tokens"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"]).mean()
    metrics = {"ce": ce}
    loss = ce
    if aux is not None:
        lb, z = jnp.sum(aux.load_balance_loss), jnp.sum(aux.z_loss)
        loss = (loss + cfg.moe.aux_loss_weight * lb + cfg.moe.z_loss_weight * z
                + cfg.moe.entropy_loss_weight * jnp.sum(aux.entropy))
        metrics.update(load_balance_loss=aux.load_balance_loss, z_loss=aux.z_loss,
                       expert_counts=aux.expert_counts, dropped_fraction=aux.dropped_fraction,
                       router_entropy=aux.entropy, experts_per_token=aux.experts_per_token)
    metrics["loss"] = loss
    return loss, metrics


def _train_step(model, optimizer, batch, cfg):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(model, batch, cfg)
    optimizer.update(model, grads)
    update_router_biases(model, metrics.get("expert_counts"), cfg)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return metrics


def update_router_biases(model, expert_counts_le, cfg: Config):
    """Aux-loss-free balancing, outside the optimizer: each `sigmoid_bias` router's bias
    takes one `update_bias` step from its layer's expert counts of this batch."""
    if expert_counts_le is None or cfg.moe.router != "sigmoid_bias" or not cfg.moe.bias_update_rate:
        return
    routers = [b.ffn.router for b in model.blocks if b.is_moe]
    for router, counts_e in zip(routers, expert_counts_le, strict=True):
        router.bias[...] = update_bias(router.bias[...], counts_e, cfg.moe.bias_update_rate)


def make_train_step(cfg: Config, graphdef, mesh, state):
    """Jitted `(state, batch) -> (state, metrics)`; the state buffers are donated."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = batch_sharding(mesh)

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        metrics = _train_step(model, optimizer, batch, cfg)
        return nnx.state((model, optimizer)), metrics

    return jax.jit(step, donate_argnums=0, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, None))


def make_eval_step(cfg: Config, graphdef, mesh, state, num_domains: int):
    """Jitted `(state, batch) -> sums`: CE nats, byte targets, and per-domain expert counts.

    Returns `{"nats": [D], "byte_nats": [D], "bytes": [D], "tokens": [D], "domain_counts":
    [L, D, E]}` summed over the batch, so callers can add batches and divide once. Bits per
    byte count byte targets only (BOS/EOS excluded), like the unigram baseline.
    """
    state_sh = jax.tree.map(lambda x: x.sharding, state)

    def step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        logits_btv, aux = model(batch["tokens"])
        ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
        dom_btd = jax.nn.one_hot(batch["domain"], num_domains, dtype=jnp.float32)
        is_byte_bt = (batch["targets"] < 256).astype(jnp.float32)
        out = {"nats": jnp.einsum("bt,btd->d", ce_bt, dom_btd),
               "byte_nats": jnp.einsum("bt,btd->d", ce_bt * is_byte_bt, dom_btd),
               "bytes": jnp.einsum("bt,btd->d", is_byte_bt, dom_btd),
               "tokens": jnp.sum(dom_btd, axis=(0, 1))}
        if aux is not None:
            ids_onehot = jax.nn.one_hot(aux.expert_ids, cfg.moe.num_experts, dtype=jnp.float32)
            out["domain_counts"] = jnp.einsum("lbtke,btd->lde", ids_onehot, dom_btd)
        return out

    return jax.jit(step, in_shardings=(state_sh, batch_sharding(mesh)))


def to_host(tree):
    """Device arrays -> numpy (for logging)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)

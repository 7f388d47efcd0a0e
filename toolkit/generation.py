"""Autoregressive generation with a KV cache, recording the experts every token went to.

    from toolkit.generation import generate
    out = generate(model, prompt_ids_bt, 32, temperature=0.8, top_p=0.9, seed=0)
    out.tokens_bt            # int32 [B, P + N]: the prompt, then the N generated tokens
    out.new_tokens_bn        # int32 [B, N]
    out.expert_ids_lbsk      # int32 [L_moe, B, P + N, k]: each position's experts (-1: unused slot)
    out.weights_lbsk         # float32 [L_moe, B, P + N, k]: their combine weights
    out.logits_bnv           # float32 [B, N, V]: the logits each new token was drawn from

A prefill pass runs the prompt through `Transformer.decode`, which writes every layer's
keys and values into a cache `[B, P + N, K, h]` preallocated to the final length; then a
compiled decode step feeds one token at a time. Positions drive RoPE and the causal mask
(a query at position i sees the cached keys at positions <= i), so every decode step has
the same shapes and compiles once. After the last token is drawn, one more step feeds it
in, so the routing trace covers every position, prompt and generated.

Sampling composes, in this order: temperature 0 is greedy (argmax); otherwise the logits
are divided by the temperature, `top_k` keeps the k largest (ties with the k-th included),
and `top_p` keeps the smallest set of most probable tokens whose probabilities reach p
(nucleus). The i-th new token is drawn with `fold_in(key(seed), i)`: a seed fixes the text.

The model generates as `generation_model(model)` builds it:
- MoE layers run dropless. Capacity dispatch drops assignments depending on how many
  tokens share a batch, so a one-token step could never equal a full forward; inference
  engines do not drop tokens, and dropless is exact (`moe.dispatch="dropless"`, and
  `moe.dispatch_groups=0`, which dropless results do not depend on).
- On one device: the parameters are moved to `jax.devices()[0]` and no mesh is used, so a
  model trained on any mesh generates the same way. A pipeline-stacked model
  (`parallel.pipeline > 1`) is converted to listed blocks (`listed_blocks_state`).
- In eval mode (no router jitter). MTP heads are not used.
- Router state between layers (the recurrent router's GRU state, gating residuals) is per
  token, so it flows through a decode step as through the full forward, and
  pre-attention routing works too. Refused with `ValueError`: expert-choice routing (an
  expert picks the best tokens of the whole batch, later ones included, so a token's
  experts are not a function of its prefix) and GRU experts (their recurrence along the
  sequence is not part of the cache).

Precision formats apply as in the full forward (the cache holds keys and values as the
`kv_cache` format stores them, per token); an activation format with a per-tensor scale
(NV) scales over the tokens of each pass, so there cached logits differ by that rounding.

Length: prompt + max_new_tokens may not exceed `model.seq_len`. RoPE itself has no limit,
but the model never saw later positions in training, so they are refused rather than
extrapolated.

`generate_uncached` is the reference without a cache: each new token comes from the
model's ordinary forward over the whole sequence so far. `load_run` reads a trained run
(`runs/NAME`: its config.json and latest checkpoint) onto one device;
`python -m toolkit generate --run runs/NAME --prompt "def "` does all of it.
"""

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolkit.config import Config, ConfigError, ParallelConfig, from_dict
from toolkit.models.transformer import (
    Transformer,
    listed_blocks_state,
    moe_layer_indices,
    pipeline_chunks,
)


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` produced.

    Attributes:
      tokens_bt: int32 [B, P + N] the prompt, then the generated tokens.
      prompt_len: P.
      expert_ids_lbsk: int32 [L_moe, B, P + N, k] experts each position went to in each MoE
        layer (`moe_layer_indices` order), -1 in unused slots; None for a dense model.
      weights_lbsk: float32 [L_moe, B, P + N, k] their combine weights (0 in unused slots);
        None for a dense model, and from `generate_uncached`.
      logits_bnv: float32 [B, N, V] the logits each new token was drawn from.
    """

    tokens_bt: np.ndarray
    prompt_len: int
    expert_ids_lbsk: np.ndarray | None
    weights_lbsk: np.ndarray | None
    logits_bnv: np.ndarray

    @property
    def new_tokens_bn(self) -> np.ndarray:
        return self.tokens_bt[:, self.prompt_len:]


# -- sampling ------------------------------------------------------------------------------

def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise `ValueError` naming a sampling value that is out of range."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy); "
                         f"use e.g. 0.8")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be a whole number >= 0 (0 = off); use e.g. 40")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1] (1 = off); use e.g. 0.9")


def top_k_filter(logits_bv, k):
    """Logits outside the k largest of each row set to -inf (ties with the k-th kept);
    k = 0 keeps all. `k` may be traced: one compiled step serves every k."""
    v = logits_bv.shape[-1]
    sorted_bv = -jnp.sort(-logits_bv, axis=-1)
    kth_b1 = jnp.take(sorted_bv, jnp.clip(k - 1, 0, v - 1), axis=-1)[..., None]
    return jnp.where((k > 0) & (logits_bv < kth_b1), -jnp.inf, logits_bv)


def top_p_filter(logits_bv, p):
    """Nucleus: keep the smallest set of most probable tokens whose probabilities sum to
    at least p (the token that crosses p is kept, and always the most probable one);
    p = 1 keeps every token of nonzero probability. `p` may be traced."""
    probs_bv = jax.nn.softmax(logits_bv.astype(jnp.float32), axis=-1)
    order_bv = jnp.argsort(-probs_bv, axis=-1, stable=True)
    sorted_bv = jnp.take_along_axis(probs_bv, order_bv, axis=-1)
    keep_sorted_bv = jnp.cumsum(sorted_bv, axis=-1) - sorted_bv < p
    rows_b1 = jnp.arange(logits_bv.shape[0])[:, None]
    keep_bv = jnp.zeros_like(keep_sorted_bv).at[rows_b1, order_bv].set(keep_sorted_bv)
    return jnp.where(keep_bv | (p >= 1.0), logits_bv, -jnp.inf)


def sample_logits(logits_bv, key, *, temperature=0.0, top_k=0, top_p=1.0):
    """int32 [B] next tokens: argmax at temperature 0, else a draw from the tempered,
    top-k and top-p filtered logits. The three values may be traced, so one compiled
    step serves greedy decoding and every sampling setting."""
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return greedy_b
    tempered_bv = logits_bv.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    drawn_b = jax.random.categorical(key, top_p_filter(top_k_filter(tempered_bv, top_k), top_p), axis=-1)
    return jnp.where(temperature > 0, drawn_b.astype(jnp.int32), greedy_b)


# -- the generation model ------------------------------------------------------------------

def generation_config(cfg: Config) -> Config:
    """`cfg` as generation runs it (dropless, one device), or `ValueError` for a model
    generation refuses (see the module doc)."""
    moe = cfg.moe
    if moe_layer_indices(cfg) and moe.router == "expert_choice":
        raise ValueError("moe.router='expert_choice' cannot generate: each expert picks the best "
                         "tokens of the whole batch, later positions included, so a token's experts "
                         "depend on tokens not yet generated; use a token-choice router such as "
                         "topk_softmax")
    if moe_layer_indices(cfg) and moe.gru_experts:
        raise ValueError(f"moe.gru_experts={moe.gru_experts}: GRU experts run a recurrence along the "
                         f"sequence, which the KV cache does not carry; generate from a model with "
                         f"moe.gru_experts=0")
    return dataclasses.replace(cfg, moe=dataclasses.replace(moe, dispatch="dropless", dispatch_groups=0),
                               parallel=ParallelConfig(data=1))


def generation_model(model: Transformer) -> Transformer:
    """A copy of `model` for generation: dropless MoE layers, listed blocks, eval mode, its
    parameters on `jax.devices()[0]` (see the module doc)."""
    cfg = generation_config(model.cfg)
    pure = nnx.to_pure_dict(nnx.state(model))
    if model.stages is not None:
        v, p, _ = pipeline_chunks(model.cfg)
        pure = listed_blocks_state(pure, v, p)
    device = jax.devices()[0]
    pure = jax.tree.map(lambda a: jax.device_put(a, device), pure)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(abstract, pure)
    gen = nnx.merge(graphdef, abstract)
    gen.eval()
    return gen


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def _step(graphdef, sampling, state, tokens_bt, positions_bt, caches, key):
    """One compiled pass (prefill or decode step): the next token after the last position,
    its logits, this pass's routing `[L_moe, B, S, k]` and the caches, updated in place
    (donated). `sampling`: the temperature, top_k and top_p, traced."""
    model = nnx.merge(graphdef, state)
    logits_btv, routings, caches = model.decode(tokens_bt, positions_bt, caches)
    b, s = tokens_bt.shape
    ids = [jnp.where(r.valid, r.expert_ids, -1).reshape(b, s, -1) for r in routings]
    weights = [jnp.where(r.valid, r.weights, 0.0).astype(jnp.float32).reshape(b, s, -1)
               for r in routings]
    logits_bv = logits_btv[:, -1]
    next_b = sample_logits(logits_bv, key, **sampling)
    stacked = (jnp.stack(ids), jnp.stack(weights)) if routings else (None, None)
    return next_b, logits_bv, stacked, caches


def _checked_prompt(model: Transformer, prompt_ids_bt, max_new_tokens: int) -> np.ndarray:
    prompt = np.asarray(prompt_ids_bt)
    if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1 or \
            not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_ids_bt must be integer token ids [B, P] with B, P >= 1; got "
                         f"{prompt.dtype} {prompt.shape}")
    vocab = model.cfg.model.vocab_size
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"prompt ids must lie in [0, {vocab}) (model.vocab_size); got "
                         f"[{prompt.min()}, {prompt.max()}]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 1, e.g. 32")
    total, seq_len = prompt.shape[1] + max_new_tokens, model.cfg.model.seq_len
    if total > seq_len:
        room = seq_len - prompt.shape[1]
        fix = (f"use max_new_tokens <= {room} or a shorter prompt" if room >= 1 else
               f"shorten the prompt to at most {seq_len - 1} tokens")
        raise ValueError(f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{total} exceeds model.seq_len={seq_len}, the longest sequence the model "
                         f"was trained on; {fix}")
    return prompt.astype(np.int32)


def generate(model: Transformer, prompt_ids_bt, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Generation:
    """Continue each row of `prompt_ids_bt` (int [B, P]) by `max_new_tokens` tokens with a KV
    cache, recording the routing of every position (see the module doc)."""
    check_sampling(temperature, top_k, top_p)
    prompt = _checked_prompt(model, prompt_ids_bt, max_new_tokens)
    gen = generation_model(model)
    (b, p), n = prompt.shape, max_new_tokens
    graphdef, state = nnx.split(gen)
    sampling = dict(temperature=jnp.float32(temperature), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p))
    step = functools.partial(_step, graphdef, sampling, state)
    key = jax.random.key(seed)
    caches = gen.init_cache(b, p + n)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    next_b, logits_bv, (ids, weights), caches = step(jnp.asarray(prompt), positions, caches,
                                                     jax.random.fold_in(key, 0))
    new, logits, traces = [next_b], [logits_bv], [(ids, weights)]
    for i in range(1, n + 1):
        position = jnp.full((b, 1), p + i - 1, jnp.int32)
        next_b, logits_bv, trace, caches = step(new[-1][:, None], position, caches,
                                                jax.random.fold_in(key, i))
        traces.append(trace)
        if i < n:                           # the last pass only records the last token's routing
            new.append(next_b)
            logits.append(logits_bv)
    tokens = np.concatenate([prompt, np.stack([np.asarray(t) for t in new], axis=1)], axis=1)
    has_moe = traces[0][0] is not None
    return Generation(
        tokens_bt=tokens, prompt_len=p,
        expert_ids_lbsk=np.concatenate([np.asarray(t[0]) for t in traces], axis=2) if has_moe else None,
        weights_lbsk=np.concatenate([np.asarray(t[1]) for t in traces], axis=2) if has_moe else None,
        logits_bnv=np.stack([np.asarray(x) for x in logits], axis=1))


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, tokens_bt):
    logits_btv, aux = nnx.merge(graphdef, state)(tokens_bt)
    return logits_btv, (None if aux is None else aux.expert_ids)


def generate_uncached(model: Transformer, prompt_ids_bt, max_new_tokens: int, *,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int = 0) -> Generation:
    """`generate` without a cache, the reference it is tested against: the i-th new token
    comes from the model's ordinary forward (`Transformer.__call__`) over the whole
    sequence so far, drawn with the same key. The sequence is padded to its final length
    so the forward compiles once; causal attention and per-token dropless routing keep the
    padding out of every earlier position. The trace holds expert ids only (the forward's
    `MoEAux.expert_ids` over the final sequence)."""
    check_sampling(temperature, top_k, top_p)
    prompt = _checked_prompt(model, prompt_ids_bt, max_new_tokens)
    gen = generation_model(model)
    (b, p), n = prompt.shape, max_new_tokens
    graphdef, state = nnx.split(gen)
    key = jax.random.key(seed)
    tokens = np.zeros((b, p + n), np.int32)
    tokens[:, :p] = prompt
    logits = []
    for i in range(n):
        logits_btv, _ = _full_forward(graphdef, state, jnp.asarray(tokens))
        logits_bv = logits_btv[:, p + i - 1]
        tokens[:, p + i] = np.asarray(sample_logits(
            logits_bv, jax.random.fold_in(key, i), temperature=temperature, top_k=top_k, top_p=top_p))
        logits.append(np.asarray(logits_bv))
    ids = _full_forward(graphdef, state, jnp.asarray(tokens))[1]
    return Generation(tokens_bt=tokens, prompt_len=p,
                      expert_ids_lbsk=None if ids is None else np.asarray(ids), weights_lbsk=None,
                      logits_bnv=np.stack(logits, axis=1))


def load_run(run_dir) -> Transformer:
    """The model of the run in `run_dir` at its latest checkpoint, on one device, whatever
    mesh it was trained on. A missing run, config or checkpoint raises `ConfigError`."""
    from toolkit.sharding.mesh import make_mesh
    from toolkit.training.checkpoint import Checkpointer
    from toolkit.training.step import abstract_state, graphdef_of

    path = Path(run_dir)
    hint = "give a directory written by `python -m toolkit train --out DIR`"
    if not path.is_dir():
        raise ConfigError(f"run directory {str(path)!r} does not exist; {hint}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{str(path)!r} holds no run (no config.json); {hint}")
    try:
        cfg = from_dict(json.loads(config_path.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{config_path} is not valid JSON ({e}); {hint}") from None
    ckpt_dir = path / "checkpoints"
    no_checkpoint = ConfigError(f"{str(path)!r} holds no checkpoint (nothing in {ckpt_dir}); a run "
                                f"saves one when it finishes and every train.checkpoint_every steps")
    if not ckpt_dir.is_dir():          # checked first: the Checkpointer would create it
        raise no_checkpoint
    ckpt = Checkpointer(ckpt_dir)
    try:
        if ckpt.latest_step() is None:
            raise no_checkpoint
        state, _ = ckpt.restore(abstract_state(cfg, make_mesh(ParallelConfig(data=1), jax.devices()[:1])))
    finally:
        ckpt.close()
    return nnx.merge(graphdef_of(cfg), state)[0]


def render_trace(gen: Generation, cfg: Config, labels: list, row: int = 0) -> str:
    """One line per generated token of batch row `row` (as many as `labels`, its printable
    forms): position, token, then per MoE layer `L<i>: expert:weight ...`."""
    if gen.expert_ids_lbsk is None:
        return "routing: the model has no MoE layer"
    lines = ["routing of each generated token (per MoE layer, expert:weight):"]
    for j, label in enumerate(labels):
        t = gen.prompt_len + j
        parts = [f"L{layer}: " + " ".join(f"{e}:{w:.2f}" for e, w in zip(
                     gen.expert_ids_lbsk[i, row, t], gen.weights_lbsk[i, row, t], strict=True) if e >= 0)
                 for i, layer in enumerate(moe_layer_indices(cfg))]
        lines.append(f"{t:>5} {label:<6} " + "   ".join(parts))
    return "\n".join(lines)

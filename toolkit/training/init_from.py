"""Start training from given weights instead of a random init (fine-tuning).

    graphdef, state = init_state(cfg, mesh)                   # random, sharded
    state = place_params(cfg, state, load_hf_params(path, cfg))

`params` is a nested dict shaped like `nnx.to_pure_dict(nnx.state(model, nnx.Param))` for
the listed (non-pipelined) model, host arrays. Each array lands on the sharding that the
random parameter it replaces had, built shard by shard from the host copy, so it works on
any mesh and in every process of a multi-process run. With `parallel.pipeline > 1` the
listed blocks are first stacked as the pipelined model holds them.
"""

import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict

from toolkit.config import Config, ConfigError
from toolkit.models.transformer import pipeline_chunks, stacked_blocks_state


def place_params(cfg: Config, state, params: dict):
    """`state` (the trainer's `(model, optimizer)` state) with the model's parameters
    replaced by `params`, each on its parameter's sharding; the optimizer state is kept."""
    v, p, _ = pipeline_chunks(cfg)
    if p > 1:
        params = stacked_blocks_state(params, v, p)
    model_state = state[0]
    current = dict(nnx.to_flat_state(model_state))
    given = flatten_dict(params)
    unknown = sorted("/".join(map(str, k)) for k in given if k not in current)
    absent = sorted("/".join(map(str, k)) for k, var in current.items()
                    if k not in given and isinstance(var, nnx.Param))
    if unknown or absent:
        raise ConfigError(f"the given parameters do not fit the model of this config: unknown "
                          f"{unknown[:3]}, missing {absent[:3]}")
    for key, value in given.items():
        var = current[key]
        old = var.get_value()
        host = np.asarray(value, old.dtype)
        if host.shape != old.shape:
            raise ConfigError(f"parameter {'/'.join(map(str, key))} has shape {list(host.shape)}, "
                              f"the model expects {list(old.shape)}")
        var.set_value(jax.make_array_from_callback(host.shape, old.sharding,
                                                   lambda idx, h=host: h[idx]))
    return state

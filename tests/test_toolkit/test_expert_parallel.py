"""The ragged all-to-all that dropless expert parallelism uses on GPU/TPU, and its CPU stand-in.

Whole-model equivalence of every exchange is in test_sharding.py; here the collective itself
is checked against its definition: sender i writes rows `[in_off_i[j], + send_i[j])` of its
operand into receiver j's output at `out_off_i[j]`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from toolkit.sharding.expert_parallel import _ragged_all_to_all_emulated

ROWS, D = 6, 3


def _case(n: int, seed: int = 0):
    """Random ragged sends between n devices: operands [n, ROWS, D] and per-sender tables."""
    rng = np.random.default_rng(seed)
    send = np.zeros((n, n), np.int32)               # send[i, j]: rows i sends to j
    for i in range(n):
        cuts = np.sort(rng.integers(0, ROWS + 1, n - 1))
        send[i] = np.diff(np.concatenate([[0], cuts, [rng.integers(cuts[-1] if n > 1 else 0,
                                                                    ROWS + 1)]]))
    in_off = np.cumsum(send, axis=1) - send          # contiguous chunks in sender order
    out_off = np.cumsum(send, axis=0) - send         # receivers stack senders in order
    operand = rng.normal(size=(n, ROWS, D)).astype(np.float32)
    expected = np.full((n, n * ROWS, D), -1.0, np.float32)
    for i in range(n):
        for j in range(n):
            rows = operand[i, in_off[i, j]:in_off[i, j] + send[i, j]]
            expected[j, out_off[i, j]:out_off[i, j] + send[i, j]] = rows
    return operand, send, in_off, out_off, expected


def _run(fn, devices):
    n = len(devices)
    operand, send, in_off, out_off, expected = _case(n)
    mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Explicit,), devices=devices)

    def local(op, in_off, send, out_off, recv):
        out = jnp.full((n * ROWS, D), -1.0, op.dtype)
        return fn(op[0], out, in_off[0], send[0], out_off[0], recv[0], axis_name="x")[None]

    args = (operand, in_off, send, out_off, send.T.copy())
    args = [jax.device_put(a, jax.NamedSharding(mesh, P("x"))) for a in args]
    got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("x"),) * 5, out_specs=P("x")))(*args)
    return np.asarray(got), expected


def test_emulated_ragged_all_to_all_follows_the_definition():
    got, expected = _run(_ragged_all_to_all_emulated, jax.devices()[:4])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.gpu
def test_ragged_all_to_all_equals_the_emulation_on_gpus():
    """On the GPU machine: XLA's ragged all-to-all over every GPU it has (one GPU checks that
    the op lowers and keeps a device's own rows)."""
    got, expected = _run(jax.lax.ragged_all_to_all, jax.devices())
    np.testing.assert_array_equal(got, expected)

# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 02 · Expert parallelism: sending tokens to their experts
#
# **Open it:** from the repository root run
# `.venv/bin/jupyter lab --ip 127.0.0.1 --no-browser tutorials/02_expert_parallelism.ipynb` and choose
# *Run ▸ Run All Cells*. Headless, as the tests do: `.venv/bin/python -m pytest -q
# tests/notebooks/test_tutorials.py -k 02`. The notebook is paired with `02_expert_parallelism.py`
# (jupytext); the `.py` is the source, the `.ipynb` is kept without outputs.
#
# An MoE layer has many experts, each a full FFN. Expert parallelism (GShard, Lepikhin et al. 2020;
# Switch Transformer, Fedus et al. 2021) gives each device of an `expert` mesh axis E/n whole experts,
# and splits the tokens over the same devices. A token's expert usually lives elsewhere, so the layer
# becomes: route locally, **all-to-all** the tokens to their experts, compute, **all-to-all** them back,
# combine. We build that from scratch in a `jax.shard_map` on 8 simulated CPU devices, check it against a
# single-device computation, then read what the toolkit does (`toolkit/sharding/expert_parallel.py`),
# count the collectives in the compiled HLO, and check that the toolkit's model gives the same loss on an
# expert mesh as on one device.
#
# **A tiny CPU run:** the defaults below run in well under a minute on a 2-core CPU.

# %% tags=["parameters"]
DEVICES = 8  # simulated CPU devices (the `expert` axis of the from-scratch part uses all of them)
NUM_EXPERTS = 16  # E: must divide by DEVICES
TOP_K = 2  # k: experts per token
D_MODEL = 16  # d
D_HIDDEN = 32  # f: hidden width of one expert
TOKENS_PER_DEVICE = 32  # T_local
SMALL_CAPACITY_FACTOR = 0.5  # a capacity that drops assignments
# the toolkit's model for sections 4 and 5: a preset with tiny overrides
PRESET = "tiny"
OVERRIDES = ["model.num_layers=1", "model.d_model=32", "model.head_dim=8", "model.d_ff=64",
             "model.seq_len=16", "train.batch_size=8", "moe.d_expert=32", "data.max_code_bytes=300000"]
EP_MESH = ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep"]

# %% [markdown]
# JAX fixes its device list when it starts, so the simulated devices are requested before anything
# imports `jax`. If the kernel already ran JAX, restart it to change `DEVICES`.

# %%
import os  # noqa: E402

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={DEVICES}".strip()

import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from toolkit.analysis.collectives import parse_collectives, summarize_collectives  # noqa: E402
from toolkit.config import apply_overrides, preset  # noqa: E402
from toolkit.moe.dispatch import capacity, capacity_plan  # noqa: E402
from toolkit.moe.router import Routing  # noqa: E402
from toolkit.sharding.expert_parallel import comm_bytes  # noqa: E402
from toolkit.training.inspect import communication_check, loss_and_grads, render_communication  # noqa: E402

print(f"{len(jax.devices())} {jax.default_backend()} devices")
assert len(jax.devices()) >= DEVICES, "restart the kernel: JAX started before XLA_FLAGS was set"

# %% [markdown]
# ## 1. A mesh with an `expert` axis
#
# One axis, `expert`, over all devices. Expert weights `w_in: [E, d, f]` and `w_out: [E, f, d]` are split
# on their first dimension, so device i holds experts `i*E/n ... (i+1)*E/n - 1`. The tokens `[n*T_local, d]`
# are split on theirs; the router `[d, E]` is small and replicated. We pass `axis_types=` explicitly
# (`Auto`: shard_map's `in_specs` then say how each argument is split, and `device_put` places them).

# %%
N, E, K, D, F, T = DEVICES, NUM_EXPERTS, TOP_K, D_MODEL, D_HIDDEN, TOKENS_PER_DEVICE
E_LOCAL = E // N
mesh = jax.make_mesh((N,), ("expert",), axis_types=(AxisType.Auto,))

keys = jax.random.split(jax.random.key(0), 4)
x_all = jax.random.normal(keys[0], (N * T, D))
w_router = jax.random.normal(keys[1], (D, E)) / math.sqrt(D)
w_in = jax.random.normal(keys[2], (E, D, F)) / math.sqrt(D)
w_out = jax.random.normal(keys[3], (E, F, D)) / math.sqrt(F)

x_sh = jax.device_put(x_all, NamedSharding(mesh, P("expert")))
w_router_sh = jax.device_put(w_router, NamedSharding(mesh, P()))
w_in_sh = jax.device_put(w_in, NamedSharding(mesh, P("expert")))
w_out_sh = jax.device_put(w_out, NamedSharding(mesh, P("expert")))
print("w_in per device:", w_in_sh.sharding.shard_shape(w_in_sh.shape), "of", w_in_sh.shape)
print("tokens per device:", x_sh.sharding.shard_shape(x_sh.shape), "of", x_sh.shape)

# %% [markdown]
# ## 2. The capacity exchange, from scratch
#
# Each device routes its own tokens (softmax, then top-k as in Shazeer et al. 2017 and Mixtral) and fills
# a buffer `[E, C, d]`: C slots per expert, C = ceil(capacity_factor * T_local * k / E). Assignments are
# placed in priority order, all first choices before second choices (as GShard/Switch do); an
# assignment that finds its expert's C slots full is **dropped** (its token just gets less, or nothing,
# from the layer; the residual connection carries it on).
#
# Reshaped to `[n, E/n, C, d]`, row j of the buffer holds the slots of device j's experts, and
# `all_to_all(split_axis=0, concat_axis=0)` delivers row j to device j: afterwards row j is what device j
# *sent* us. Every device computes its E/n experts on all n rows, and a second all-to-all sends each row
# home.

# %%
def route(x, w_router):
    """Top-k routing: gate weights and expert ids, both [T, k] (weights renormalised over the k)."""
    probs = jax.nn.softmax(x @ w_router, axis=-1)             # [T, E]
    gate, ids = jax.lax.top_k(probs, K)                        # [T, k]
    return gate / jnp.sum(gate, axis=-1, keepdims=True), ids


def expert_ffn(x, w_in, w_out):
    """One expert per leading index: x [..., e, c, d] with w_in [e, d, f], w_out [e, f, d]."""
    return jnp.einsum("...ecf,efd->...ecd", jax.nn.gelu(jnp.einsum("...ecd,edf->...ecf", x, w_in)), w_out)


def slots(ids, c):
    """Each assignment's slot in its expert's buffer, in priority order (all first choices first).
    Returns (expert id, position, kept), each [k*T] in slot-major order."""
    ids_a = ids.T.reshape(-1)                                  # [k*T]
    onehot = jax.nn.one_hot(ids_a, E, dtype=jnp.int32)         # [k*T, E]
    pos_a = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    return ids_a, pos_a, pos_a < c


def ep_moe_local(x, w_router, w_in, w_out, *, c):
    """One device's part of the layer, inside shard_map."""
    # x: f32[T_local, d]; w_router: f32[d, E]; w_in: f32[E/n, d, f]; w_out: f32[E/n, f, d]
    t = x.shape[0]
    assert x.shape == (T, D) and w_in.shape == (E_LOCAL, D, F), (x.shape, w_in.shape)
    gate, ids = route(x, w_router)                             # gate, ids: [T_local, k]
    ids_a, pos_a, kept_a = slots(ids, c)                       # [k*T_local]
    tok_a = jnp.tile(jnp.arange(t), K)                         # token of each assignment
    buf = jnp.zeros((E, c, D), x.dtype).at[ids_a, pos_a].set(x[tok_a], mode="drop")  # buf: f32[E, C, d]
    buf = buf.reshape(N, E_LOCAL, c, D)                        # row j: the slots of device j's experts
    recv = jax.lax.all_to_all(buf, "expert", 0, 0)             # recv: f32[n (source), E/n, C, d]
    y = expert_ffn(recv, w_in, w_out)                          # y: f32[n (source), E/n, C, d]
    back = jax.lax.all_to_all(y, "expert", 0, 0).reshape(E, c, D)  # back: f32[E, C, d], my slots
    y_a = back[ids_a, jnp.minimum(pos_a, c - 1)] * kept_a[:, None]  # y_a: f32[k*T_local, d]
    out = jnp.sum((gate.T.reshape(-1)[:, None] * y_a).reshape(K, t, D), axis=0)  # out: f32[T_local, d]
    return out, kept_a.reshape(K, t).T                         # kept: bool[T_local, k]


def ep_moe(c):
    return jax.jit(jax.shard_map(
        lambda *a: ep_moe_local(*a, c=c), mesh=mesh,
        in_specs=(P("expert"), P(), P("expert"), P("expert")),
        out_specs=(P("expert"), P("expert"))))


def reference_moe(x, w_router, w_in, w_out):
    """Single device, dropless: every token gets all of its k experts (computed densely over E)."""
    gate, ids = route(x, w_router)                             # [T, k]
    y_all = expert_ffn(jnp.broadcast_to(x, (E, *x.shape)), w_in, w_out)   # [E, T, d]
    weight = jnp.sum(jax.nn.one_hot(ids, E) * gate[..., None], axis=1)    # [T, E]
    return jnp.einsum("te,etd->td", weight, y_all)


y_ref = reference_moe(x_all, w_router, w_in, w_out)
c_big = T * K                  # every assignment fits, even if all go to one expert
y_big, kept_big = ep_moe(c_big)(x_sh, w_router_sh, w_in_sh, w_out_sh)
print(f"C = {c_big}: kept {float(jnp.mean(kept_big)):.0%}, max |y - reference| = "
      f"{float(jnp.max(jnp.abs(y_big - y_ref))):.2e}")
np.testing.assert_allclose(y_big, y_ref, rtol=1e-5, atol=1e-5)

# %% [markdown]
# With enough slots nothing is dropped and the exchange equals the dropless single-device layer. With a
# small capacity factor some assignments are dropped. Capacity is per device (each fills its own
# buffers), so the single-device equivalent with drops is the same computation over each device's tokens:
# tokens with all k assignments kept agree with the reference, the others differ.

# %%
c_small = capacity(T, K, E, SMALL_CAPACITY_FACTOR)
y_small, kept_small = ep_moe(c_small)(x_sh, w_router_sh, w_in_sh, w_out_sh)
whole = np.asarray(jnp.all(kept_small, axis=-1))               # tokens with nothing dropped
err = np.max(np.abs(np.asarray(y_small - y_ref)), axis=-1)
print(f"capacity factor {SMALL_CAPACITY_FACTOR}: C = {c_small}, dropped "
      f"{1 - float(jnp.mean(kept_small)):.1%} of assignments; {int((~whole).sum())} of {N * T} tokens lose "
      f"an expert")
print(f"max error on whole tokens {err[whole].max():.1e}, on tokens with a drop {err[~whole].max():.2f}")
assert err[whole].max() < 1e-5 and (~whole).sum() > 0

# %% [markdown]
# The toolkit's capacity plan (`toolkit.moe.dispatch.capacity_plan`, used by the MoE layer) uses the same
# priority order, so it keeps exactly the same assignments:

# %%
def toolkit_kept(c_factor):
    kept = []
    for dev in range(N):
        gate, ids = route(x_all[dev * T:(dev + 1) * T], w_router)
        r = Routing(weights=gate, expert_ids=ids, valid=jnp.ones_like(ids, bool), probs=None, logits=None)
        kept.append(capacity_plan(r, E, c_factor).kept)
    return jnp.concatenate(kept)


assert bool(jnp.all(toolkit_kept(SMALL_CAPACITY_FACTOR) == kept_small))
print("the toolkit's capacity_plan keeps the same assignments")

# %% [markdown]
# ### Exercise (a): where does each assignment go?
#
# Device `i` owns experts `i*E/n ... (i+1)*E/n - 1`. Write the destination device of each expert id,
# and how many assignments one device sends to each device (before capacity). Device 0's routing is given.

# %%
def destination_device(expert_ids, num_experts, num_devices):
    """Device that owns each expert id (same shape as `expert_ids`)."""
    # --- solution (try it yourself first: delete and rewrite) ---
    return expert_ids // (num_experts // num_devices)


def send_counts(expert_ids, num_experts, num_devices):
    """Assignments [num_devices] this device sends to each device, from its ids [T, k]."""
    # --- solution (try it yourself first: delete and rewrite) ---
    dest = destination_device(expert_ids, num_experts, num_devices)
    return jnp.bincount(dest.reshape(-1), length=num_devices)


def check_routing_exercise(destination_device, send_counts):
    ids = route(x_all[:T], w_router)[1]
    want_dest = np.repeat(np.arange(N), E_LOCAL)
    got = np.asarray(destination_device(jnp.arange(E), E, N))
    assert np.array_equal(got, want_dest), (
        f"destination_device(arange({E})) gave {got}, expected {want_dest}: expert e lives on device "
        f"e // (E/n) = e // {E_LOCAL}")
    _, pos_a, _ = slots(ids, c_big)
    # what device 0 really sends: the filled slots of each device's experts in its buffer
    filled = jnp.bincount(ids.reshape(-1), length=E).reshape(N, E_LOCAL).sum(-1)
    got = np.asarray(send_counts(ids, E, N))
    assert np.array_equal(got, np.asarray(filled)), (
        f"send_counts gave {got}, expected {np.asarray(filled)} (sum {T * K} = T_local * k): count each "
        f"assignment under its destination device")
    print("correct")


# %%
check_routing_exercise(destination_device, send_counts)

# %% [markdown]
# ### Exercise (b): capacity and drops
#
# Write the capacity C (slots per expert) for T tokens, top-k, E experts and a capacity factor, and the
# fraction of assignments dropped when expert e receives `counts[e]` assignments and keeps at most C.

# %%
def capacity_slots(tokens, top_k, num_experts, capacity_factor):
    """C = slots per expert (an int, at least 1)."""
    # --- solution (try it yourself first: delete and rewrite) ---
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def drop_fraction(counts, c):
    """Dropped share of all assignments, given the assignments per expert `counts` [E] and C."""
    # --- solution (try it yourself first: delete and rewrite) ---
    counts = np.asarray(counts)
    return float(np.maximum(counts - c, 0).sum() / counts.sum())


def check_capacity_exercise(capacity_slots, drop_fraction):
    for args in [(T, K, E, 1.0), (T, K, E, SMALL_CAPACITY_FACTOR), (1000, 2, 8, 1.25), (7, 1, 64, 1.0)]:
        got, want = capacity_slots(*args), capacity(*args)
        assert got == want, (f"capacity_slots{args} = {got}, expected {want}: ceil(cf * T * k / E), "
                             f"at least one slot")
    ids = np.asarray(route(x_all, w_router)[1]).reshape(N, T, K)
    counts = np.stack([np.bincount(i.reshape(-1), minlength=E) for i in ids])   # [devices, E]
    got = np.mean([drop_fraction(cnt, c_small) for cnt in counts])
    want = 1 - float(jnp.mean(kept_small))
    assert abs(got - want) < 1e-6, (f"mean drop fraction {got:.4f}, the exchange dropped {want:.4f}: "
                                     f"an expert keeps min(count, C) assignments")
    print("correct")


# %%
check_capacity_exercise(capacity_slots, drop_fraction)

# %% [markdown]
# ## 3. Dropless expert parallelism
#
# Dropless MoE (MegaBlocks, Gale et al. 2023; Mixtral and DeepSeekMoE train without drops) keeps every
# assignment, so the number of rows a device sends each expert is data dependent. The natural collective is
# `jax.lax.ragged_all_to_all` (each device sends a variable-length slice to each peer, sizes exchanged
# first), followed by a grouped matmul with variable group sizes (`ragged_dot`). XLA:CPU does not implement
# `ragged-all-to-all`, so `toolkit/sharding/expert_parallel.py` offers three exchanges:
#
# * **capacity, all_to_all** (`moe.dispatch="capacity"`): the GShard exchange above, on `[G, E, C, d]`
#   buffers; the group sizes travel in a small integer all-to-all beside them.
# * **dropless, all_gather** (the CPU default, `parallel.dropless_exchange="auto"`): the "ring of experts":
#   all-gather the EP group's tokens and routing, let each device compute only the rows of its own experts
#   (`gmm(..., group_offset=first local expert)`), then `psum_scatter` the partial outputs back to the
#   tokens' home devices. No ragged collective, no drops; it moves (n-1)·T·d each way, more than the
#   all-to-all's 2·k·(n-1)/n·T·d once n > 2k.
# * **dropless, ragged_all_to_all** (GPU/TPU default): rows go only to their expert's device; on CPU it is
#   emulated by a padded all-to-all (each chunk padded to the worst case), correct but n times the bytes.
#
# All three run inside one `shard_map`, under `jax.named_scope("expert_exchange")`, which is how the
# toolkit finds its exchange's collectives in the compiled HLO.

# %% [markdown]
# ## 4. What the HLO shows
#
# Compile the from-scratch layer and parse the collectives out of the compiled HLO text
# (`toolkit.analysis.collectives`). An all-to-all over n devices keeps 1/n of its data at home, so a device
# sends (n-1)/n of its result; `summarize_collectives` reports that as `sent_bytes`.

# %%
compiled = ep_moe(c_small).lower(x_sh, w_router_sh, w_in_sh, w_out_sh).compile()
ops = parse_collectives(compiled.as_text())
for op in ops:
    print(f"{op.kind:<12} {op.dtype}{list(op.shape)}  group {op.group_size}  sends {op.sent_bytes:,.0f} B")
summary = summarize_collectives(ops)
print(summary)

# %% [markdown]
# Two all-to-alls, as written. XLA:CPU prints each as a tuple of n pieces `[1, E/n, C, d]` (one per peer);
# the parser adds them up to the whole `[E, C, d]` buffer.

# %% [markdown]
# ### Exercise (c): predict the all-to-all bytes
#
# Predict the bytes one device sends through the all-to-alls of one call of `ep_moe(c)` (both directions),
# for float32 buffers, then check against the HLO.

# %%
def all_to_all_bytes(num_experts, c, d, num_devices, itemsize=4):
    """Bytes one device sends in the two all-to-alls of the capacity exchange."""
    # --- solution (try it yourself first: delete and rewrite) ---
    return 2 * num_experts * c * d * itemsize * (num_devices - 1) / num_devices


def check_bytes_exercise(all_to_all_bytes):
    got = all_to_all_bytes(E, c_small, D, N)
    measured = summary["all-to-all"]["sent_bytes"]
    assert abs(got - measured) < 1e-6 * measured, (
        f"predicted {got:,.0f} B, the compiled HLO sends {measured:,.0f} B: two all-to-alls of the "
        f"[E, C, d] buffer, each keeping 1/n at home")
    formula = comm_bytes(type("moe", (), {"dispatch": "capacity", "top_k": K, "num_ffn_experts": E,
                                           "capacity_factor": SMALL_CAPACITY_FACTOR})(), T, D, N)
    assert abs(formula["all-to-all"] - measured) <= 8, (formula, measured)
    print(f"correct: {measured:,.0f} B per device; at capacity factor 1 this is 2*k*(n-1)/n*T*d*4 = "
          f"{2 * K * (N - 1) / N * T * D * 4:,.0f} B")


# %%
check_bytes_exercise(all_to_all_bytes)

# %% [markdown]
# The toolkit does the same bookkeeping for its own MoE block: `communication_check` compiles one
# transformer block on the config's mesh and sets the bytes of the `expert_exchange` collectives beside
# `expert_parallel.comm_bytes`. Capacity dispatch gives all-to-alls; dropless on CPU gives the ring of
# experts' all-gather and reduce-scatter.

# %%
base = apply_overrides(preset(PRESET), OVERRIDES + EP_MESH)
for dispatch in ("capacity", "dropless"):
    cfg = apply_overrides(base, [f"moe.dispatch={dispatch}"])
    rows = communication_check(cfg)
    print(f"moe.dispatch={dispatch}, mesh {', '.join(EP_MESH)}:")
    print(render_communication(rows))
    for r in rows:
        assert r["kind"] != "all-to-all" or r["measured_bytes"] == r["analytic_bytes"], r

# %% [markdown]
# ## 5. Same loss on an expert mesh
#
# Expert parallelism changes where the work happens, not what is computed. The toolkit's model on
# `data=2, expert=4` (recipe `ep`) gives the single-device loss for one training batch (dropless: no
# capacity, so nothing depends on how tokens are grouped).

# %%
cfg = apply_overrides(base, ["moe.dispatch=dropless"])
loss_mesh, _, _ = loss_and_grads(cfg)
single = apply_overrides(cfg, ["parallel.data=1", "parallel.expert=1"])
loss_one, _, _ = loss_and_grads(single, jax.devices()[:1])
print(f"loss on data=2, expert=4: {loss_mesh:.6f}; on one device: {loss_one:.6f}")
assert abs(loss_mesh - loss_one) < 1e-5 * max(1.0, abs(loss_one))

# %% [markdown]
# ## Summary
#
# * Expert parallelism splits experts and tokens over one mesh axis; the layer is route, all-to-all,
#   compute, all-to-all, combine (GShard).
# * Capacity buffers `[E, C, d]` make the all-to-all dense and static: 2·E·C·d·(n-1)/n values per device,
#   2·k·(n-1)/n·T·d at capacity factor 1, at the price of dropped assignments when an expert is popular.
# * Dropless exchanges need ragged communication (or, on CPU, the toolkit's all-gather ring), and give
#   exactly the single-device result.

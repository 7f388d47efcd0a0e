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
# # Tutorial 01 · An MoE layer from scratch: route, dispatch, compute, combine
#
# **Open it:** from the repository root run
# `.venv/bin/jupyter lab --ip 127.0.0.1 --no-browser tutorials/01_moe_layer_from_scratch.ipynb` and choose
# *Run ▸ Run All Cells*. Headless, as the tests do: `.venv/bin/python -m pytest -q
# tests/notebooks/test_tutorials.py -k 01`. The notebook is paired with `01_moe_layer_from_scratch.py`
# (jupytext); the `.py` is the source, the `.ipynb` is kept without outputs.
#
# A mixture-of-experts layer (Shazeer et al. 2017) replaces one FFN by E expert FFNs and a router that
# sends each token to k of them. We write the layer in plain JAX on tiny shapes, one stage at a time,
# and check every stage against the toolkit's code: the router (`toolkit/moe/router.py`), dispatch
# (`toolkit/moe/dispatch.py`), the experts' grouped matmul (`pallas_kernels/gmm`), combine, and the
# auxiliary losses (`toolkit/moe/losses.py`). At the end our layer must equal `toolkit.moe.MoELayer`
# given the same weights. Three exercises (top-k routing, capacity drops, the balance loss) each end in
# a check that prints "correct".
#
# **A tiny CPU run:** the defaults below run in well under a minute on a 2-core CPU, on one device.

# %% tags=["parameters"]
NUM_EXPERTS = 8  # E: routed experts
TOP_K = 2  # k: experts per token
D_MODEL = 16  # d
D_EXPERT = 32  # f: hidden width of one SwiGLU expert
BATCH, SEQ = 2, 16  # T = BATCH * SEQ tokens
CAPACITY_FACTOR = 1.0  # capacity dispatch: slots per expert = ceil(cf * k * T / E)
SEED = 0

# %%
import dataclasses  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pallas_kernels import default_impl, gmm  # noqa: E402
from toolkit.config import MoEConfig  # noqa: E402
from toolkit.moe import (  # noqa: E402
    MoELayer,
    capacity,
    capacity_plan,
    combine,
    dispatch,
    dropless_plan,
    dropped_fraction,
    load_balance_loss,
    z_loss,
)
from toolkit.moe.router import top_k_routing  # noqa: E402

np.set_printoptions(precision=3, suppress=True)
T = BATCH * SEQ
print(f"{jax.default_backend()} backend; E={NUM_EXPERTS}, k={TOP_K}, d={D_MODEL}, f={D_EXPERT}, T={T}")

# %% [markdown]
# ## 0 · The layer we will rebuild
#
# A small `MoEConfig`: softmax top-k router with renormalised weights, SwiGLU experts, dropless
# dispatch, no shared experts. We build the toolkit's `MoELayer` once and read its weights, so our
# from-scratch functions and the library see exactly the same numbers:
#
# * `w_de` `[d, E]`: the router (gate) matrix;
# * `w_gate`, `w_up` `[E, d, f]` and `w_down` `[E, f, d]`: the SwiGLU weights of every expert.

# %%
cfg = MoEConfig(num_experts=NUM_EXPERTS, top_k=TOP_K, d_expert=D_EXPERT, router="topk_softmax",
                renormalize=True, dispatch="dropless", capacity_factor=CAPACITY_FACTOR)
layer = MoELayer(D_MODEL, cfg, rngs=nnx.Rngs(SEED))
w_de = layer.router.w_de[...]
w_gate, w_up, w_down = (w[...] for w in (layer.experts.w_gate, layer.experts.w_up, layer.experts.w_down))
assert w_de.shape == (D_MODEL, NUM_EXPERTS) and w_gate.shape == (NUM_EXPERTS, D_MODEL, D_EXPERT)
assert w_down.shape == (NUM_EXPERTS, D_EXPERT, D_MODEL)

x_btd = jax.random.normal(jax.random.key(SEED + 1), (BATCH, SEQ, D_MODEL), jnp.float32)
x_td = x_btd.reshape(T, D_MODEL)  # the layer sees a flat list of tokens
print("router", w_de.shape, "| experts", w_gate.shape, w_up.shape, w_down.shape, "| tokens", x_td.shape)

# %% [markdown]
# ## 1 · The router: logits, softmax, top-k, renormalise
#
# Each token scores every expert with one matmul, `logits = x W_r` (`[T, E]`); a softmax turns the
# scores into probabilities; the token keeps its k most probable experts (Shazeer et al. 2017's top-k
# gating; k=2 in GShard, Lepikhin et al. 2020; k=1 in Switch, Fedus et al. 2021). With
# renormalisation the k kept probabilities are rescaled to sum to 1; they are the combine weights.
# Mixtral (Jiang et al. 2024) writes the same thing the other way round, `softmax(top_k(logits))`:
# the softmax of the k largest logits equals the renormalised top-k of the full softmax, since the
# normaliser cancels.
#
# Routing is computed in float32 whatever the activations' dtype: small logit differences decide
# which expert a token gets.

# %%
logits_te = x_td @ w_de  # f32[T, E]
probs_te = jax.nn.softmax(logits_te, axis=-1)
top_p_tk, top_ids_tk = jax.lax.top_k(probs_te, TOP_K)
print("token 0: probabilities", np.asarray(probs_te[0]))
print(f"token 0: experts {top_ids_tk[0]}, probabilities {np.asarray(top_p_tk[0])}, "
      f"renormalised {np.asarray(top_p_tk[0] / top_p_tk[0].sum())}")

mixtral_tk = jax.nn.softmax(jax.lax.top_k(logits_te, TOP_K)[0], axis=-1)  # Mixtral's order
np.testing.assert_allclose(mixtral_tk, top_p_tk / top_p_tk.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
print("softmax(top_k(logits)) == renormalised top_k(softmax(logits))")

# %% [markdown]
# The toolkit's router returns a `Routing` record (`toolkit/moe/router.py`): `weights` and
# `expert_ids` `[T, k]`, `valid` `[T, k]` (all True for fixed top-k; variable-k routers leave slots
# unused), and `probs`, `logits` `[T, E]` for the losses. `top_k_routing(logits, k, renormalize)`
# is the decision part on its own; the `TopKRouter` inside `MoELayer` adds the gate matmul.

# %% [markdown]
# ### Exercise (a): top-k routing with renormalisation
#
# Write `top_k_route(logits_te, k)` returning `(weights_tk, ids_tk)`: the k most probable experts of
# each token, most probable first, and their softmax probabilities renormalised to sum to 1.

# %%
def check_top_k_route(fn):
    """Compare `fn(logits, k)` with the toolkit's `top_k_routing` on random and tied logits."""
    for k in (1, TOP_K, NUM_EXPERTS):
        for logits in (logits_te, jnp.zeros((4, NUM_EXPERTS)).at[:, 3].set(1.0)):
            want = top_k_routing(logits, k, renormalize=True)
            weights, ids = fn(logits, k)
            assert weights.shape == ids.shape == (logits.shape[0], k), \
                f"k={k}: expected shapes ({logits.shape[0]}, {k}), got {weights.shape} and {ids.shape}"
            np.testing.assert_allclose(np.sum(weights, -1), 1.0, rtol=1e-5, err_msg=(
                f"k={k}: each token's weights must sum to 1; divide the k kept probabilities by "
                f"their sum"))
            assert np.array_equal(ids, want.expert_ids), (
                f"k={k}: expert ids differ from the toolkit's, e.g. {np.asarray(ids[0])} vs "
                f"{np.asarray(want.expert_ids[0])}: keep the k largest probabilities, largest first "
                f"(jax.lax.top_k breaks ties towards the lower index)")
            np.testing.assert_allclose(weights, want.weights, rtol=1e-5, atol=1e-6, err_msg=(
                f"k={k}: right experts, wrong weights: renormalise softmax probabilities, not logits"))
    print("exercise (a): correct")


# %%
def top_k_route(logits_te, k):
    """(weights f32[T, k], ids int32[T, k]): top-k of softmax(logits), weights summing to 1."""
    # --- solution (try it yourself first: delete and rewrite) ---
    probs = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    return weights / jnp.sum(weights, axis=-1, keepdims=True), ids.astype(jnp.int32)
    # --- end of solution ---


check_top_k_route(top_k_route)

# %% [markdown]
# The router of the toolkit's layer, called on our tokens, decides exactly what our function decides:

# %%
routing = layer.router(x_td)
weights_tk, ids_tk = top_k_route(x_td @ w_de, TOP_K)
assert np.array_equal(ids_tk, routing.expert_ids)
np.testing.assert_allclose(weights_tk, routing.weights, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(probs_te, routing.probs, rtol=1e-5, atol=1e-6)
print("from scratch == layer.router(x):", routing.expert_ids.shape, "ids,", routing.weights.shape, "weights")

# %% [markdown]
# ## 2 · Dispatch: sorting tokens by expert
#
# The router only decides. To compute, each expert needs the rows of the tokens it was given, in
# one contiguous block. There are T·k *assignments* (token t, slot j → expert `ids[t, j]`).
#
# **Dropless** (MegaBlocks, Gale et al. 2023): sort the assignments by expert. Expert e then owns the
# next `group_sizes[e]` rows of a `[T·k, d]` array; group sizes vary from batch to batch, nothing is
# dropped, and the experts run as one *grouped* matmul over those ragged groups (section 3).

# %%
ids_a = ids_tk.reshape(-1)  # [T*k] assignments, token-major: a = t * k + j
order_r = jnp.argsort(ids_a, stable=True)  # row r of the expert input holds assignment order_r[r]
token_of_row = order_r // TOP_K  # ... which came from token order_r[r] // k
group_sizes_e = jnp.bincount(ids_a, length=NUM_EXPERTS)  # rows per expert
xs_rd = x_td[token_of_row]  # f32[T*k, d], sorted by expert
print("group sizes", np.asarray(group_sizes_e), "sum", int(group_sizes_e.sum()), "= T*k =", T * TOP_K)
print("experts of the sorted rows:", np.asarray(ids_a[order_r]))

plan = dropless_plan(routing, NUM_EXPERTS)
assert np.array_equal(plan.group_sizes, group_sizes_e)
assert np.array_equal(plan.token_of_row, token_of_row)
np.testing.assert_array_equal(dispatch(x_td, plan), xs_rd)
print("from scratch == toolkit.moe.dropless_plan + dispatch")

# %% [markdown]
# **Capacity** (GShard; Switch): static shapes instead. Every expert gets a buffer of
# `C = ceil(capacity_factor · k · T / E)` slots, so expert inputs are a dense `[E, C, d]` array.
# Assignments are seated by priority: every token's first choice before any second choice, and within
# a choice in token order (GShard's rule, so that a token's best expert is the last to be lost).
# Assignments that find their expert full are *dropped*: they add nothing to the output, and the
# token passes on through the residual connection. `capacity_factor` trades dropped tokens for padding.

# %% [markdown]
# ### Exercise (c): group sizes and capacity drops
#
# Write `capacity_drops(ids_tk, num_experts, capacity_factor)` returning `(c, kept_tk, sizes_e,
# dropped)`: the capacity C, which assignments get a slot (bool `[T, k]`), the rows each expert computes
# (`[E]`, at most C) and the dropped share of all T·k assignments.

# %%
def check_capacity_drops(fn):
    """Compare `fn` with `toolkit.moe.capacity_plan` and `dropped_fraction` at several factors."""
    for cf in (0.5, CAPACITY_FACTOR, 2.0):
        want = capacity_plan(routing, NUM_EXPERTS, cf)
        c, kept, sizes, dropped = fn(ids_tk, NUM_EXPERTS, cf)
        assert int(c) == want.capacity, (
            f"capacity_factor={cf}: capacity {c}, expected {want.capacity} = "
            f"ceil({cf} * k={TOP_K} * T={T} / E={NUM_EXPERTS}) (and at least 1)")
        assert np.array_equal(sizes, want.group_sizes), (
            f"capacity_factor={cf}: group sizes {np.asarray(sizes)}, expected "
            f"{np.asarray(want.group_sizes)}: min(assignments to e, C)")
        assert np.array_equal(kept, want.kept), (
            f"capacity_factor={cf}: right counts, wrong assignments kept ({int(np.sum(kept != want.kept))} "
            f"differ): seat all first choices (slot 0) before any second choice, each in token order")
        np.testing.assert_allclose(dropped, dropped_fraction(want, routing), rtol=1e-6, err_msg=(
            f"capacity_factor={cf}: the dropped share is 1 - kept / (T * k)"))
    print("exercise (c): correct")


# %%
def capacity_drops(ids_tk, num_experts, capacity_factor):
    """(C, kept bool[T, k], group sizes int32[E], dropped share) of capacity dispatch."""
    # --- solution (try it yourself first: delete and rewrite) ---
    t, k = ids_tk.shape
    c = max(1, math.ceil(capacity_factor * k * t / num_experts))
    onehot_ae = jax.nn.one_hot(ids_tk.T.reshape(-1), num_experts, dtype=jnp.int32)  # slot-major
    position_a = jnp.sum((jnp.cumsum(onehot_ae, axis=0) - 1) * onehot_ae, axis=-1)  # seat in its expert
    kept_tk = (position_a < c).reshape(k, t).T
    sizes_e = jnp.minimum(jnp.sum(onehot_ae, axis=0), c).astype(jnp.int32)
    return c, kept_tk, sizes_e, 1.0 - jnp.mean(kept_tk.astype(jnp.float32))
    # --- end of solution ---


check_capacity_drops(capacity_drops)

# %% [markdown]
# How much a capacity layer drops on this (untrained, fairly balanced) router, per capacity factor.
# Dropless dispatch never drops; its price is ragged group sizes, which need a grouped-matmul kernel.

# %%
for cf in (0.5, 1.0, 1.25, 2.0):
    c, kept_tk, sizes_e, dropped = capacity_drops(ids_tk, NUM_EXPERTS, cf)
    assert c == capacity(T, TOP_K, NUM_EXPERTS, cf)
    print(f"capacity_factor {cf:4}: C = {c:2d}, computed rows {np.asarray(sizes_e)} "
          f"(buffer {NUM_EXPERTS * c:3d} rows), dropped {float(dropped):.1%}")

cap_plan = capacity_plan(routing, NUM_EXPERTS, CAPACITY_FACTOR)
xs_ecd = dispatch(x_td, cap_plan)  # f32[E, C, d], rows past group_sizes[e] are zeros
print("capacity layout", xs_ecd.shape, "with group sizes", np.asarray(cap_plan.group_sizes))

# %% [markdown]
# ## 3 · The experts: one grouped matmul per weight
#
# Each expert is a SwiGLU FFN (Shazeer 2020), `E_e(x) = (silu(x W_gate[e]) * (x W_up[e])) W_down[e]`.
# The obvious implementation is a loop over experts, each multiplying its own block of rows. A
# *grouped matmul* (`gmm`) does the whole loop as one op: rows `[offset_e, offset_e + group_sizes[e])`
# of the left operand are multiplied by `rhs[e]`. The toolkit stacks `[W_gate | W_up]` so the first
# projection is one gmm, the down projection a second. On GPU and TPU `pallas_kernels.gmm` runs a Pallas
# kernel; on CPU its default is the "xla" backend (`pallas_kernels/gmm/xla.py`), a loop over groups
# of ordinary matmuls. Either way the work is k·T rows, not E·T as a dense "every expert on every
# token" would be.

# %%
def swiglu(x, wg, wu, wd):
    return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


ends = np.cumsum(np.asarray(group_sizes_e))
starts = ends - np.asarray(group_sizes_e)
ys_loop = jnp.concatenate([swiglu(xs_rd[s:e], w_gate[i], w_up[i], w_down[i])
                           for i, (s, e) in enumerate(zip(starts, ends, strict=True))])

h_rf = gmm(xs_rd, jnp.concatenate([w_gate, w_up], axis=-1), group_sizes_e)  # f32[T*k, 2f]
ys_gmm = gmm(jax.nn.silu(h_rf[:, :D_EXPERT]) * h_rf[:, D_EXPERT:], w_down, group_sizes_e)
np.testing.assert_allclose(ys_gmm, ys_loop, rtol=1e-5, atol=1e-5)
print(f"gmm (backend {default_impl()!r} on {jax.default_backend()}) == loop over experts:", ys_gmm.shape)

ys_lib, _ = layer.experts(xs_rd[None], group_sizes_e[None])  # Experts take [G, R, d]: G dispatch groups
np.testing.assert_allclose(ys_lib[0], ys_loop, rtol=1e-5, atol=1e-5)
print("loop == layer.experts (toolkit.moe.Experts)")

# %% [markdown]
# ## 4 · Combine: back to token order, weighted
#
# Each token's output is the weighted sum of its experts' outputs, `y_t = Σ_j w[t, j] · E_{ids[t,j]}(x_t)`.
# Row r of the expert output belongs to token `token_of_row[r]` with weight `weights[order_r[r]]`, so
# combine is a weighted scatter-add (a segment sum) back to T rows. The toolkit's `combine` does the
# gather form: it keeps, per assignment, the row that holds its output (`plan.row_of_assignment`).

# %%
w_r = weights_tk.reshape(-1)[order_r]  # the combine weight of each sorted row
y_td = jnp.zeros_like(x_td).at[token_of_row].add(w_r[:, None] * ys_loop)
np.testing.assert_allclose(combine(ys_loop, plan, routing), y_td, rtol=1e-5, atol=1e-6)
print("scatter-add == toolkit.moe.combine:", y_td.shape)

# %% [markdown]
# Now all four stages as one function, and the whole toolkit layer on the same input. The capacity
# variant needs no new code: it is the dropless layer with the weights of dropped assignments set to
# zero, and we check it against an `MoELayer` built with `dispatch="capacity"` from the same seed (so
# with the same weights).

# %%
def moe_from_scratch(x_btd, w_de, w_gate, w_up, w_down, k, capacity_factor=None):
    b, s, d = x_btd.shape
    x_td = x_btd.reshape(b * s, d)
    weights_tk, ids_tk = top_k_route(x_td @ w_de, k)                       # 1 route
    if capacity_factor is not None:
        _, kept_tk, _, _ = capacity_drops(ids_tk, w_de.shape[1], capacity_factor)
        weights_tk = jnp.where(kept_tk, weights_tk, 0.0)                   #   drop past capacity
    ids_a = ids_tk.reshape(-1)
    order_r = jnp.argsort(ids_a, stable=True)                              # 2 dispatch
    sizes_e = jnp.bincount(ids_a, length=w_de.shape[1])
    xs_rd = x_td[order_r // k]
    h_rf = gmm(xs_rd, jnp.concatenate([w_gate, w_up], axis=-1), sizes_e)   # 3 experts
    f = w_gate.shape[-1]
    ys_rd = gmm(jax.nn.silu(h_rf[:, :f]) * h_rf[:, f:], w_down, sizes_e)
    w_r = weights_tk.reshape(-1)[order_r]                                  # 4 combine
    y_td = jnp.zeros_like(x_td).at[order_r // k].add(w_r[:, None] * ys_rd)
    return y_td.reshape(b, s, d)


y_ours = moe_from_scratch(x_btd, w_de, w_gate, w_up, w_down, TOP_K)
y_lib, aux, _ = layer(x_btd)
np.testing.assert_allclose(y_ours, y_lib, rtol=1e-5, atol=1e-5)
print(f"dropless: from scratch == MoELayer, max |difference| {float(jnp.max(jnp.abs(y_ours - y_lib))):.1e}")

layer_cap = MoELayer(D_MODEL, dataclasses.replace(cfg, dispatch="capacity"), rngs=nnx.Rngs(SEED))
assert np.array_equal(layer_cap.experts.w_down[...], w_down), "same seed, same weights"
y_ours_cap = moe_from_scratch(x_btd, w_de, w_gate, w_up, w_down, TOP_K, CAPACITY_FACTOR)
y_lib_cap, aux_cap, _ = layer_cap(x_btd)
np.testing.assert_allclose(y_ours_cap, y_lib_cap, rtol=1e-5, atol=1e-5)
_, kept_tk, _, _ = capacity_drops(ids_tk, NUM_EXPERTS, CAPACITY_FACTOR)
print(f"capacity {CAPACITY_FACTOR}: from scratch == MoELayer(dispatch='capacity'); "
      f"dropped {float(aux_cap.dropped_fraction):.1%} of assignments; "
      f"{int(jnp.sum(~jnp.any(kept_tk, axis=-1)))} of {T} tokens lost all their experts")

# %% [markdown]
# ## 5 · The auxiliary losses
#
# Nothing in the output pushes a router to spread its tokens; left alone it tends to collapse onto a few
# experts, which then get all the gradient. The **load-balancing loss** (Switch, Fedus et al. 2021;
# GShard's auxiliary loss has the same form, counting first choices only) is
#
# $$L_{\text{balance}} = E \sum_i f_i P_i,$$
#
# with `f_i` the share of the T·k routed assignments that chose expert i and `P_i` the mean router
# probability of expert i over the tokens. It is 1 for a uniform router and E/k when every token puts
# all its probability on the same k experts. `f` is counted (no gradient); the gradient flows through
# `P`, lowering the probability of experts that are over-loaded.
#
# The **router z-loss** (ST-MoE, Zoph et al. 2022), `mean_t logsumexp(logits_t)^2`, keeps logits small
# so the float32 softmax stays tame; it does not balance anything. The toolkit adds both to the training
# loss, weighted by `moe.aux_loss_weight` and `moe.z_loss_weight`.

# %% [markdown]
# ### Exercise (b): the load-balancing loss
#
# Write `balance_loss(probs_te, ids_tk, num_experts)`: `E * sum_i f_i P_i` as defined above.

# %%
def check_balance_loss(fn):
    """Compare `fn` with `toolkit.moe.load_balance_loss` on our router and on two extremes."""
    e, k = NUM_EXPERTS, TOP_K
    uniform = top_k_routing(jnp.zeros((T, e)), k, renormalize=True)
    collapsed = top_k_routing(jnp.zeros((T, e)).at[:, :k].set(20.0), k, renormalize=True)
    for name, r, expect in (("this router", routing, None), ("a uniform router", uniform, 1.0),
                            (f"a router collapsed onto {k} experts", collapsed, e / k)):
        got, want = fn(r.probs, r.expert_ids, e), load_balance_loss(r, e)
        hint = ("f_i = (assignments to expert i) / (T * k), P_i = mean over tokens of probs[:, i], "
                "loss = E * sum_i f_i * P_i")
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{name}: got {float(got):.4f}, "
                                   f"expected {float(want):.4f}; {hint}")
        if expect is not None:
            np.testing.assert_allclose(got, expect, rtol=1e-3, err_msg=f"{name} should give {expect}")
    print("exercise (b): correct")


# %%
def balance_loss(probs_te, ids_tk, num_experts):
    """Switch load-balancing loss E * sum_i f_i P_i (f: share of assignments, P: mean probability)."""
    # --- solution (try it yourself first: delete and rewrite) ---
    f_e = jnp.bincount(ids_tk.reshape(-1), length=num_experts) / ids_tk.size
    p_e = jnp.mean(probs_te, axis=0)
    return num_experts * jnp.sum(f_e * p_e)
    # --- end of solution ---


check_balance_loss(balance_loss)

# %% [markdown]
# The z-loss from scratch, and both losses against what the layer itself reported in its `MoEAux`
# (computed over the whole batch, from the same router outputs):

# %%
z_ours = jnp.mean(jax.nn.logsumexp(x_td @ w_de, axis=-1) ** 2)
lb_ours = balance_loss(jax.nn.softmax(x_td @ w_de, axis=-1), ids_tk, NUM_EXPERTS)
np.testing.assert_allclose(z_ours, z_loss(routing), rtol=1e-5)
np.testing.assert_allclose(z_ours, aux.z_loss, rtol=1e-5)
np.testing.assert_allclose(lb_ours, aux.load_balance_loss, rtol=1e-5)
assert np.array_equal(aux.expert_counts, group_sizes_e)
print(f"load balance {float(lb_ours):.4f} (1 = uniform, {NUM_EXPERTS / TOP_K:g} = collapsed), "
      f"z-loss {float(z_ours):.4f}: equal to MoELayer's aux")
print("expert counts", np.asarray(aux.expert_counts, dtype=int))

# %% [markdown]
# The gradient of the balance loss reaches the router only through `P`. Per token it is
# `dL/dlogit_tj = E p_tj (f_j - sum_i f_i p_ti)`: an expert with more than its share of assignments has
# its logits pushed down, one with less pushed up.

# %%
grad_te = jax.grad(lambda lg: balance_loss(jax.nn.softmax(lg, -1), ids_tk, NUM_EXPERTS))(logits_te)
load_e = group_sizes_e / (T * TOP_K)
for i in np.argsort(-np.asarray(load_e)):
    print(f"expert {i}: load {float(load_e[i]):.3f} (fair {1 / NUM_EXPERTS:.3f}), "
          f"mean logit change under a descent step {float(-jnp.mean(grad_te[:, i])):+.4f}")

# %% [markdown]
# ## What we built, and where it lives in the toolkit
#
# | stage | from scratch | toolkit |
# |---|---|---|
# | route | `softmax(x W_r)`, `top_k`, renormalise | `TopKRouter`, `top_k_routing` → `Routing` |
# | dispatch | `argsort` by expert, `bincount`; seats | `dropless_plan`, `capacity_plan`, `dispatch` |
# | experts | loop over experts | `Experts` via `pallas_kernels.gmm` |
# | combine | weighted scatter-add | `combine` |
# | losses | `E Σ f_i P_i`, `mean logsumexp²` | `load_balance_loss`, `z_loss` |
#
# `MoELayer` adds what this tutorial left out: dispatch groups (per device, `moe.dispatch_groups`),
# expert parallelism (tutorial 02), shared experts (DeepSeekMoE, Dai et al. 2024), other routers
# (sigmoid with aux-loss-free bias, top-p, expert choice) and the zero/copy experts of MoE++.

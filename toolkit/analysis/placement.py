"""Expert placement from routing traces: keep each token's consecutive experts on one device.

A token's expert at MoE layer l+1 is predictable from its expert at layer l (ExFlow). When
the two sit on the same device, the token need not cross the network between the layers.
Record which experts a trained model's tokens use (`routing_trace`), place every layer's
experts on devices, E/D per device, so that as many tokens as possible find their next
expert where their last one was (`place_experts`), and measure it on held-out tokens:

    fit, held_out = routing_trace(model, train_tokens), routing_trace(model, val_tokens)
    ep_le = contiguous_placement(8, 4, fit.num_layers)      # the toolkit's EP layout
    best = place_experts(fit, 4)                            # Placement(device_le [L, E], ...)
    cross_device_fraction(held_out, ep_le)[1]               # about 3/4 without affinity
    cross_device_fraction(held_out, best.device_le)[1]      # lower when layers agree

Where a token is: after MoE layer l, on the device of its top-1 expert there (its first
valid slot: the largest router weight for every router but `expert_choice`, whose slots go
by expert id). It crosses devices between layers l and l+1 when the two devices differ;
each crossing is one hop of its d_model activations (ExFlow keeps the attention context on
every device, so no hop back). Tokens without an expert at either layer are not counted;
the other k-1 slots' traffic is not modelled. A device's load is the assignments (all
slots) of its experts, and `device_load_imbalance` is the busiest device over the mean.

`place_experts` solves ExFlow's integer program with `scipy.optimize.milp`: binary
x[l, e, c] (expert e of layer l on device c), E/D experts per device per layer, and for each
pair (i at l, j at l+1) that top-1 tokens take, a co-location y[l, i, j, c] in [0, 1]
weighted by those tokens, maximised. An expert co-locates only on its own device, and with
at most E/D experts of the next layer: sum_j y[l, i, j, c] <= E/D * x[l, i, c] (and the
same over i for j), which also bounds the relaxation. Tokens are aggregated per pair, so
the program grows with E^2 per layer, not with tokens. MoETuner's load balance
is a constraint: no device carries more than (1 + load_tolerance) x the mean load, or than
it does in the contiguous layout if that is more. Big instances (and every fallback) use
a greedy search: from each layer in turn, the other layers' experts assigned to the devices
of their neighbour toward it (Hungarian), then swaps of two experts while they help; the
best of the L results wins.

`toolkit.analysis.speculation` scores a placement for Speculative MoE's token shuffling.
"""

import dataclasses
import time

import jax
import numpy as np
from flax import nnx
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp
from scipy.sparse import coo_array

from toolkit.models.transformer import moe_layer_indices

METHODS = ("auto", "milp", "greedy")
MILP_MAX_VARIABLES = 2000
"""`method="auto"` solves the integer program up to this many variables, else greedy
(HiGHS proves 8 experts on 4 devices over 4 layers optimal in seconds; 16 experts not in a minute)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """Which experts each token chose at each MoE layer.

    Attributes:
      expert_ids_lnk: int32 [L, N, k] experts of token n at MoE layer l, -1 in unused slots.
      token_ids_n: int32 [N] the input token at each position.
      num_experts: routed expert ids (`cfg.moe.num_routed`).
    """

    expert_ids_lnk: np.ndarray
    token_ids_n: np.ndarray
    num_experts: int

    def __post_init__(self):
        ids, tok = np.asarray(self.expert_ids_lnk), np.asarray(self.token_ids_n)
        if ids.ndim != 3 or tok.shape != ids.shape[1:2]:
            raise ValueError(f"Trace: expert_ids_lnk {ids.shape} must be [L, N, k] and token_ids_n "
                             f"{tok.shape} must be [N]")
        if ids.size and (ids.min() < -1 or ids.max() >= self.num_experts):
            raise ValueError(f"Trace: expert_ids_lnk holds ids in [{ids.min()}, {ids.max()}]; "
                             f"with num_experts={self.num_experts} use 0..{self.num_experts - 1}, "
                             f"or -1 for an unused slot")
        object.__setattr__(self, "expert_ids_lnk", ids.astype(np.int32))
        object.__setattr__(self, "token_ids_n", tok.astype(np.int32))

    @property
    def num_layers(self) -> int:
        return self.expert_ids_lnk.shape[0]

    def top1_ln(self) -> np.ndarray:
        """int [L, N] each token's top-1 expert (its first valid slot), -1 where it had none."""
        valid = self.expert_ids_lnk >= 0
        first = np.take_along_axis(self.expert_ids_lnk, np.argmax(valid, -1)[..., None], -1)[..., 0]
        return np.where(valid.any(-1), first, -1)


def routing_trace(model, tokens) -> Trace:
    """Run `model` (a `Transformer`, e.g. `trainer.model()`) in eval mode over each int
    [B, S] array in `tokens` and record its routing (`MoEAux.expert_ids`), batches joined."""
    if not moe_layer_indices(model.cfg):
        raise ValueError(f"routing_trace: the model has no MoE layer (moe.num_experts="
                         f"{model.cfg.moe.num_experts}); trace a model with moe.num_experts >= 2")
    graphdef, state = nnx.split(model)

    @jax.jit
    def expert_ids(state, tokens_bs):
        m = nnx.merge(graphdef, state)
        m.eval()                                      # no router jitter
        return m(tokens_bs)[1].expert_ids             # int32 [L, B, S, k]

    ids, toks = [], []
    for tokens_bs in tokens:
        tokens_bs = np.asarray(tokens_bs)
        if tokens_bs.ndim != 2:
            raise ValueError(f"routing_trace: each tokens array must be int [B, S]; got shape "
                             f"{tokens_bs.shape}")
        ids_lbsk = np.asarray(expert_ids(state, tokens_bs))
        ids.append(ids_lbsk.reshape(ids_lbsk.shape[0], -1, ids_lbsk.shape[-1]))
        toks.append(tokens_bs.reshape(-1))
    if not ids:
        raise ValueError("routing_trace: tokens is empty; pass at least one int [B, S] array")
    return Trace(np.concatenate(ids, 1), np.concatenate(toks), model.cfg.moe.num_routed)


def _per_device(num_experts: int, num_devices: int) -> int:
    if num_devices < 1 or num_experts % num_devices:
        ok = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        raise ValueError(f"num_devices={num_devices} must divide num_experts={num_experts} "
                         f"(equal experts per device); use one of {ok}")
    return num_experts // num_devices


def contiguous_placement(num_experts: int, num_devices: int, num_layers: int) -> np.ndarray:
    """int [L, E]: expert e on device e // (E/D) at every layer, the toolkit's expert-parallel
    layout (each device of the `expert` mesh axis holds a contiguous block of experts)."""
    b = _per_device(num_experts, num_devices)
    return np.tile(np.arange(num_experts) // b, (num_layers, 1))


def round_robin_placement(num_experts: int, num_devices: int, num_layers: int) -> np.ndarray:
    """int [L, E]: expert e on device e % D at every layer."""
    _per_device(num_experts, num_devices)
    return np.tile(np.arange(num_experts) % num_devices, (num_layers, 1))


def top1_pair_counts(trace: Trace) -> np.ndarray:
    """float [L-1, E, E] tokens whose top-1 expert is i at MoE layer l and j at layer l+1."""
    top_ln, e = trace.top1_ln(), trace.num_experts
    out = np.zeros((max(trace.num_layers - 1, 0), e, e))
    for layer in range(trace.num_layers - 1):
        ok = (top_ln[layer] >= 0) & (top_ln[layer + 1] >= 0)
        pair = top_ln[layer][ok] * e + top_ln[layer + 1][ok]
        out[layer] = np.bincount(pair, minlength=e * e).reshape(e, e)
    return out


def expert_loads(trace: Trace) -> np.ndarray:
    """float [L, E] assignments (all valid slots) per expert and MoE layer."""
    return np.stack([np.bincount(ids[ids >= 0], minlength=trace.num_experts).astype(float)
                     for ids in trace.expert_ids_lnk])


def check_placement(trace: Trace, device_le) -> np.ndarray:
    """`device_le` as int64 [L, E] after checking it fits `trace` (a ValueError says how not)."""
    device_le = np.asarray(device_le)
    want = (trace.num_layers, trace.num_experts)
    if device_le.shape != want or device_le.min() < 0:
        raise ValueError(f"placement: device_le has shape {device_le.shape} and min "
                         f"{device_le.min()}; the trace needs int [L, E] = {list(want)} with devices >= 0")
    if trace.num_layers < 2:
        raise ValueError(f"placement: the trace has {trace.num_layers} MoE layer; crossings between "
                         f"layers need at least 2 (more layers, or moe.moe_every=1)")
    return device_le.astype(np.int64)


def _onehot(device_e, num_devices: int) -> np.ndarray:
    return np.eye(num_devices)[device_e]


def _device_loads(load_le, device_le) -> np.ndarray:
    """[L, D] assignments on each device."""
    d = int(device_le.max()) + 1
    return np.stack([np.bincount(dev_e, weights=load_e, minlength=d)
                     for load_e, dev_e in zip(load_le, device_le, strict=True)])


def _crossings(pairs_lij, device_le) -> float:
    same_lij = device_le[:-1, :, None] == device_le[1:, None, :]
    return float(pairs_lij.sum() - (pairs_lij * same_lij).sum())


def cross_device_fraction(trace: Trace, device_le) -> tuple:
    """(fraction [L-1], overall): share of tokens whose top-1 experts at MoE layers l and l+1
    sit on different devices under `device_le` [L, E], per transition and over all."""
    pairs_lij = top1_pair_counts(trace)
    device_le = check_placement(trace, device_le)
    same_lij = device_le[:-1, :, None] == device_le[1:, None, :]
    tokens_l = np.maximum(pairs_lij.sum((1, 2)), 1e-12)
    crossed_l = tokens_l - (pairs_lij * same_lij).sum((1, 2))
    return crossed_l / tokens_l, float(crossed_l.sum() / tokens_l.sum())


def device_load_imbalance(trace: Trace, device_le) -> np.ndarray:
    """[L] busiest device's assignments over the mean (1 is balanced); D = max device + 1."""
    loads_ld = _device_loads(expert_loads(trace), check_placement(trace, device_le))
    return loads_ld.max(1) / np.maximum(loads_ld.mean(1), 1e-12)


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """An expert placement and how it was found.

    Attributes:
      device_le: int [L, E] device of expert e at MoE layer l; E/D experts per device.
      method: "milp" or "greedy", whichever found this placement.
      optimal: whether the integer program proved it optimal (within HiGHS's 1e-4 gap).
      crossings: top-1 tokens of the fitted trace that change device between layers.
      seconds: wall time of the search.
    """

    device_le: np.ndarray
    method: str
    optimal: bool
    crossings: float
    seconds: float


def _chain(pairs_lij, load_le, base_le, cap_l, anchor: int) -> np.ndarray:
    """Layer `anchor` as `base_le`; outward from it, each layer's experts assigned to devices
    (E/D each) to keep the most tokens of its neighbour toward the anchor (an assignment
    problem), or `base_le` where that would overload a device."""
    out = base_le.copy()
    d = int(base_le.max()) + 1
    b = base_le.shape[1] // d
    for layer in [*range(anchor + 1, len(out)), *range(anchor - 1, -1, -1)]:
        if layer > anchor:
            keep_ec = pairs_lij[layer - 1].T @ _onehot(out[layer - 1], d)   # tokens e keeps on c
        else:
            keep_ec = pairs_lij[layer] @ _onehot(out[layer + 1], d)
        _, slot_e = linear_sum_assignment(np.repeat(keep_ec, b, axis=1), maximize=True)
        dev_e = slot_e // b
        if np.bincount(dev_e, weights=load_le[layer], minlength=d).max() <= cap_l[layer]:
            out[layer] = dev_e
    return out


def _refine(pairs_lij, load_le, device_le, cap_l) -> np.ndarray:
    """Swap two experts of a layer (on different devices, within `cap_l`) while a swap keeps
    more tokens co-located; the best swap of a layer first, layers in turn, until none helps."""
    dev_le = device_le.copy()
    n_layers, n_experts = dev_le.shape
    d = int(dev_le.max()) + 1
    improved = True
    while improved:
        improved = False
        for layer in range(n_layers):
            while True:
                dev_e, p_e = dev_le[layer], load_le[layer]
                keep_ec = np.zeros((n_experts, d))       # tokens expert e co-locates on device c
                if layer > 0:
                    keep_ec += pairs_lij[layer - 1].T @ _onehot(dev_le[layer - 1], d)
                if layer < n_layers - 1:
                    keep_ec += pairs_lij[layer] @ _onehot(dev_le[layer + 1], d)
                own_e = keep_ec[np.arange(n_experts), dev_e]
                at_other_ab = keep_ec[:, dev_e]                       # a moved to b's device
                gain_ab = at_other_ab + at_other_ab.T - own_e[:, None] - own_e[None, :]
                load_e = np.bincount(dev_e, weights=p_e, minlength=d)[dev_e]
                fits_ab = ((load_e[:, None] - p_e[:, None] + p_e[None, :] <= cap_l[layer])
                           & (load_e[None, :] - p_e[None, :] + p_e[:, None] <= cap_l[layer]))
                gain_ab = np.where(fits_ab & (dev_e[:, None] != dev_e[None, :]), gain_ab, -np.inf)
                a, b = np.unravel_index(np.argmax(gain_ab), gain_ab.shape)
                if gain_ab[a, b] <= 1e-9:
                    break
                dev_le[layer, a], dev_le[layer, b] = dev_e[b], dev_e[a]
                improved = True
    return dev_le


def _cap(load_le, base_le, load_tolerance: float) -> np.ndarray:
    d = int(base_le.max()) + 1
    return np.maximum((1 + load_tolerance) * load_le.sum(1) / d, _device_loads(load_le, base_le).max(1))


def refine_placement(trace: Trace, device_le, *, load_tolerance: float = 0.1) -> np.ndarray:
    """int [L, E]: `device_le` improved by swaps of two experts (the greedy search's second
    half); never more crossings on `trace`, the same experts per device, and no device above
    (1 + load_tolerance) x the mean load or the busiest device's load in `device_le`,
    whichever is more."""
    device_le = check_placement(trace, device_le)
    load_le = expert_loads(trace)
    return _refine(top1_pair_counts(trace), load_le, device_le, _cap(load_le, device_le, load_tolerance))


def _milp(pairs_lij, load_le, num_devices: int, cap_l, time_limit: float):
    """(device_le or None, proved optimal) of the co-location integer program (module doc)."""
    n_layers, n_exp = load_le.shape
    d, b = num_devices, n_exp // num_devices
    pair_pl = np.argwhere(pairs_lij > 0)                                  # [P, (l, i, j)]
    n_x, n_p = n_layers * n_exp * d, len(pair_pl)
    x_lec = np.arange(n_x).reshape(n_layers, n_exp, d)
    y_pc = n_x + np.arange(n_p * d).reshape(n_p, d)
    rows, cols, vals, lo, hi = [], [], [], [], []

    def add(row_t, col_t, val_t, lo_r, hi_r):
        rows.append(np.ravel(row_t) + len(lo))
        cols.append(np.ravel(col_t))
        vals.append(np.broadcast_to(val_t, np.shape(col_t)).ravel())
        lo.extend(lo_r)
        hi.extend(hi_r)

    le_rows, lc_rows = np.arange(n_layers * n_exp), np.arange(n_layers * d)
    add(np.repeat(le_rows, d), x_lec, 1.0, [1] * len(le_rows), [1] * len(le_rows))   # one device each
    per_dev = x_lec.transpose(0, 2, 1).reshape(-1, n_exp)
    add(np.repeat(lc_rows, n_exp), per_dev, 1.0, [b] * len(lc_rows), [b] * len(lc_rows))  # E/D each
    load_lce = np.repeat(load_le[:, None, :], d, 1).reshape(-1, n_exp)
    add(np.repeat(lc_rows, n_exp), per_dev, load_lce, [-np.inf] * len(lc_rows),
        np.repeat(cap_l, d).tolist())                                     # load cap
    for end in (1, 2):                   # expert i at l (end 1) or j at l+1 (end 2): <= E/D partners
        key_p = pair_pl[:, 0] * n_exp + pair_pl[:, end]
        keys, row_p = np.unique(key_p, return_inverse=True)
        first_p = np.unique(row_p, return_index=True)[1]
        r_y = (row_p[:, None] * d + np.arange(d)).ravel()
        r_x = (np.arange(len(keys))[:, None] * d + np.arange(d)).ravel()
        x_kc = x_lec[pair_pl[first_p, 0] + end - 1, pair_pl[first_p, end]]
        add(np.concatenate([r_y, r_x]), np.concatenate([y_pc.ravel(), x_kc.ravel()]),
            np.concatenate([np.ones(r_y.size), np.full(r_x.size, -float(b))]),
            [-np.inf] * r_x.size, [0] * r_x.size)
    a = coo_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                  shape=(len(lo), n_x + n_p * d)).tocsr()
    ub = np.ones(n_x + n_p * d)
    ub[x_lec[0][np.arange(n_exp)[:, None] < np.arange(d)[None, :]]] = 0   # devices' labels: fixed
    cost = np.concatenate([np.zeros(n_x), -np.repeat(pairs_lij[tuple(pair_pl.T)], d)])
    res = milp(cost, constraints=LinearConstraint(a, lo, hi), bounds=Bounds(0, ub),
               integrality=np.r_[np.ones(n_x), np.zeros(n_p * d)],
               options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        return None, False
    return res.x[:n_x].reshape(n_layers, n_exp, d).argmax(-1), bool(res.status == 0)


def place_experts(trace: Trace, num_devices: int, *, method: str = "auto", load_tolerance: float = 0.1,
                  time_limit: float = 60.0) -> Placement:
    """Place each MoE layer's experts on `num_devices` devices (E/D each, loads capped as in
    the module doc) to minimise the top-1 tokens of `trace` that change device between layers.

    method: "milp" (the integer program, at most `time_limit` seconds; if it stops early
    with a worse placement than greedy, greedy's is returned), "greedy", or "auto" (milp up
    to `MILP_MAX_VARIABLES` variables, else greedy).
    """
    if method not in METHODS:
        raise ValueError(f"place_experts: method={method!r}; use one of {METHODS}")
    if load_tolerance < 0 or time_limit <= 0:
        raise ValueError(f"place_experts: load_tolerance={load_tolerance} must be >= 0 and "
                         f"time_limit={time_limit} > 0 (e.g. 0.1 and 60)")
    t0 = time.perf_counter()
    base_le = check_placement(trace, contiguous_placement(trace.num_experts, num_devices,
                                                           trace.num_layers))
    pairs_lij, load_le = top1_pair_counts(trace), expert_loads(trace)
    cap_l = _cap(load_le, base_le, load_tolerance)
    greedy_le = [_refine(pairs_lij, load_le, _chain(pairs_lij, load_le, base_le, cap_l, anchor), cap_l)
                 for anchor in range(trace.num_layers)]
    best_le = min(greedy_le, key=lambda dev_le: _crossings(pairs_lij, dev_le))
    found, optimal = "greedy", False
    n_vars = base_le.size * num_devices + int((pairs_lij > 0).sum()) * num_devices
    if method == "milp" or (method == "auto" and n_vars <= MILP_MAX_VARIABLES):
        milp_le, proved = _milp(pairs_lij, load_le, num_devices, cap_l, time_limit)
        if milp_le is not None and _crossings(pairs_lij, milp_le) <= _crossings(pairs_lij, best_le):
            best_le, found, optimal = milp_le, "milp", proved
    return Placement(best_le, found, optimal, _crossings(pairs_lij, best_le), time.perf_counter() - t0)

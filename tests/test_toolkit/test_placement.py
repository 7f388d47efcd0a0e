"""Expert placement: planted affinities are found, balance holds, greedy and MILP agree with
brute force, speculative shuffling scores what it should, and bad inputs say what works."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import micro
from flax import nnx

from toolkit.analysis.placement import (
    Trace,
    contiguous_placement,
    cross_device_fraction,
    device_load_imbalance,
    expert_loads,
    place_experts,
    refine_placement,
    round_robin_placement,
    routing_trace,
    top1_pair_counts,
)
from toolkit.analysis.speculation import speculative_shuffle
from toolkit.models.transformer import Transformer


def planted(perm_le, n: int, follow: float, seed: int) -> Trace:
    """Top-1 expert of layer l+1 is perm_le[l][top-1 at l] with probability `follow`, else
    uniform; the second slot is another expert; token ids are the layer-0 expert."""
    rng = np.random.default_rng(seed)
    e = perm_le.shape[1]
    top = [rng.integers(0, e, n)]
    for perm_e in perm_le:
        top.append(np.where(rng.random(n) < follow, perm_e[top[-1]], rng.integers(0, e, n)))
    top_ln = np.stack(top)
    second_ln = (top_ln + rng.integers(1, e, top_ln.shape)) % e
    return Trace(np.stack([top_ln, second_ln], -1), top_ln[0], e)


def perms(layers: int, e: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(e) for _ in range(layers)])


def assert_balanced(device_le, num_devices: int):
    per = device_le.shape[1] // num_devices
    for dev_e in device_le:
        np.testing.assert_array_equal(np.bincount(dev_e, minlength=num_devices), per)


def crossings(trace, device_le) -> float:
    frac_l, _ = cross_device_fraction(trace, device_le)
    return float(frac_l @ top1_pair_counts(trace).sum((1, 2)))


def test_layouts_and_counts_by_hand():
    np.testing.assert_array_equal(contiguous_placement(4, 2, 1), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(round_robin_placement(4, 2, 1), [[0, 1, 0, 1]])
    ids = np.array([[[0, 1], [-1, 2], [3, 0], [-1, -1]],         # token 1's top-1 is slot 1
                    [[1, 3], [3, 0], [2, -1], [0, 1]]])          # [L=2, N=4, k=2]
    trace = Trace(ids, np.arange(4), 4)
    np.testing.assert_array_equal(trace.top1_ln(), [[0, 2, 3, -1], [1, 3, 2, 0]])
    device_le = contiguous_placement(4, 2, 2)                    # {0, 1} -> 0, {2, 3} -> 1
    frac_l, overall = cross_device_fraction(trace, device_le)    # 0->1 stays, 2->3 stays, 3->2 stays
    np.testing.assert_allclose(frac_l, [0.0])
    frac_l, overall = cross_device_fraction(trace, round_robin_placement(4, 2, 2))
    np.testing.assert_allclose(frac_l, [1.0])                    # 0->1, 2->3, 3->2 all change parity
    np.testing.assert_array_equal(expert_loads(trace), [[2, 1, 1, 1], [2, 2, 1, 2]])
    np.testing.assert_allclose(device_load_imbalance(trace, device_le), [3 / 2.5, 4 / 3.5])


def test_milp_finds_a_planted_affinity_that_round_robin_misses():
    e, d, follow = 8, 4, 0.9
    perm_le = perms(2, e, seed=3)
    fit, held_out = planted(perm_le, 3000, follow, seed=0), planted(perm_le, 3000, follow, seed=1)
    p = place_experts(fit, d, method="milp")
    assert (p.method, p.optimal) == ("milp", True)
    assert_balanced(p.device_le, d)
    off = (1 - follow) * (d - 1) / d                             # unfollowed tokens land anywhere
    assert cross_device_fraction(held_out, p.device_le)[1] == pytest.approx(off, abs=0.03)
    rr_le = round_robin_placement(e, d, 3)
    moved = np.mean(perm_le % d != np.arange(e) % d)             # pairs round robin splits
    assert cross_device_fraction(held_out, rr_le)[1] == pytest.approx(follow * moved + off, abs=0.03)
    assert moved > 0.5                                           # so round robin is far off
    greedy = place_experts(fit, d, method="greedy")
    assert_balanced(greedy.device_le, d)
    assert cross_device_fraction(held_out, greedy.device_le)[1] == pytest.approx(off, abs=0.03)


def brute_force(trace, d: int) -> float:
    e = trace.num_experts
    layouts = [np.array(a) for a in itertools.product(range(d), repeat=e)
               if np.all(np.bincount(a, minlength=d) == e // d)]
    return min(crossings(trace, np.stack(c)) for c in itertools.product(layouts, repeat=trace.num_layers))


def test_milp_is_optimal_and_greedy_no_better():
    rng = np.random.default_rng(5)
    trace = Trace(rng.choice(4, size=(3, 200, 1), p=[0.4, 0.3, 0.2, 0.1]), np.zeros(200), 4)
    trace = Trace(np.where(rng.random((3, 200, 1)) < 0.5, np.roll(trace.expert_ids_lnk, 1, 0) % 4,
                           trace.expert_ids_lnk), np.zeros(200), 4)
    best = brute_force(trace, 2)
    milp_p = place_experts(trace, 2, method="milp", load_tolerance=10.0)
    greedy = place_experts(trace, 2, method="greedy", load_tolerance=10.0)
    assert milp_p.crossings == pytest.approx(best) == crossings(trace, milp_p.device_le)
    assert greedy.crossings >= milp_p.crossings
    assert place_experts(trace, 2, load_tolerance=10.0).method == "milp"     # auto: small enough


def test_refine_never_worse_than_its_start_and_keeps_balance_and_cap():
    trace = planted(perms(3, 8, seed=7), 800, 0.6, seed=2)
    rng = np.random.default_rng(0)
    for _ in range(4):
        start_le = np.stack([rng.permutation(np.arange(8) % 4) for _ in range(4)])
        out_le = refine_placement(trace, start_le, load_tolerance=0.0)
        assert crossings(trace, out_le) <= crossings(trace, start_le)
        assert crossings(trace, out_le) < crossings(trace, start_le)          # random starts improve
        assert_balanced(out_le, 4)
        assert np.all(device_load_imbalance(trace, out_le)
                      <= np.maximum(device_load_imbalance(trace, start_le), 1.0) + 1e-12)


@pytest.mark.parametrize("method", ["milp", "greedy"])
def test_load_tolerance_keeps_two_heavy_experts_apart(method):
    """Expert 0 at layer 0 sends its tokens to experts 0 and 2 at layer 1, both heavy:
    co-locating them saves crossings but overloads one device unless the tolerance allows."""
    top0 = np.r_[np.zeros(600, int), np.arange(400) % 3 + 1]
    top1 = np.r_[np.arange(600) % 2 * 2, np.arange(400) % 2 * 2 + 1]      # loads 300, 200, 300, 200
    trace = Trace(np.stack([top0, top1])[..., None], np.zeros(1000), 4)
    loose = place_experts(trace, 2, method=method, load_tolerance=1.0)
    tight = place_experts(trace, 2, method=method, load_tolerance=0.0)
    assert loose.device_le[1, 0] == loose.device_le[1, 2] == loose.device_le[0, 0]
    assert tight.device_le[1, 0] != tight.device_le[1, 2]
    assert tight.crossings > loose.crossings
    assert device_load_imbalance(trace, tight.device_le)[1] == pytest.approx(1.0)
    assert device_load_imbalance(trace, loose.device_le)[1] == pytest.approx(1.2)


def test_speculation_on_a_deterministic_trace_is_exact():
    e, d, n, hop = 8, 4, 2000, 64 * 2
    perm_le = perms(3, e, seed=1)
    fit, held_out = planted(perm_le, n, 1.0, seed=0), planted(perm_le, n, 1.0, seed=1)
    device_le = contiguous_placement(e, d, 4)
    s = speculative_shuffle(fit, held_out, device_le, d_model=64, bytes_per_element=2)
    np.testing.assert_allclose(s["accuracy"], 1.0)
    np.testing.assert_allclose(s["token_accuracy"], 1.0)
    np.testing.assert_allclose(s["speculative_bytes"], 0.0)
    frac_l, _ = cross_device_fraction(held_out, device_le)
    np.testing.assert_allclose(s["baseline_bytes"], np.r_[(d - 1) / d, frac_l] * n * hop)
    assert s["bytes_saved"] == pytest.approx(s["baseline_bytes"].sum())
    assert s["bytes_saved_fraction"] == pytest.approx(1.0)


def test_speculation_trusts_the_context_when_token_ids_say_nothing():
    e = d = 4                                       # one expert per device: devices are experts
    n, perm_le = 4000, perms(3, e, seed=2)
    rng = np.random.default_rng(9)
    fit, held_out = (Trace(planted(perm_le, n, 1.0, seed=s).expert_ids_lnk, rng.integers(0, 256, n), e)
                     for s in (3, 4))                # token ids unrelated to the routing
    s = speculative_shuffle(fit, held_out, contiguous_placement(e, d, 4), d_model=8)
    assert np.all(s["accuracy"][1:] == 1.0) and np.all(s["context_share"][1:] > 0.99)
    assert np.all(s["token_accuracy"] < 0.5) and s["accuracy"][0] < 0.5
    assert np.isnan(s["context_accuracy"][0]) and s["context_share"][0] == 0.0
    assert s["speculative_bytes"][1:].sum() == 0.0 < s["baseline_bytes"][1:].sum()


def test_routing_trace_records_the_models_choices():
    cfg = micro(moe={"num_experts": 4, "top_k": 2})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens_bs = np.arange(32, dtype=np.int32).reshape(2, 16) * 7 % 256
    trace = routing_trace(model, [tokens_bs, tokens_bs[::-1]])
    assert trace.expert_ids_lnk.shape == (2, 64, 2) and trace.num_experts == 4
    np.testing.assert_array_equal(trace.token_ids_n, np.r_[tokens_bs.ravel(), tokens_bs[::-1].ravel()])
    model.eval()
    ids_lbsk = np.asarray(nnx.jit(lambda m, t: m(t)[1].expert_ids)(model, jnp.asarray(tokens_bs)))
    np.testing.assert_array_equal(trace.expert_ids_lnk[:, :32], ids_lbsk.reshape(2, 32, 2))
    np.testing.assert_array_equal(trace.expert_ids_lnk[:, 32:], ids_lbsk[:, ::-1].reshape(2, 32, 2))


def test_bad_inputs_say_what_works():
    trace = planted(perms(1, 4, seed=0), 50, 0.5, seed=0)
    one_layer = Trace(trace.expert_ids_lnk[:1], trace.token_ids_n, 4)
    cases = [(lambda: contiguous_placement(6, 4, 2), r"num_devices=4 must divide num_experts=6.*\[1, 2, 3"),
             (lambda: place_experts(trace, 3), r"num_devices=3 must divide num_experts=4"),
             (lambda: place_experts(one_layer, 2), r"1 MoE layer.*at least 2"),
             (lambda: place_experts(trace, 2, method="ilp"), r"method='ilp'.*'milp'"),
             (lambda: place_experts(trace, 2, time_limit=0), r"time_limit=0"),
             (lambda: cross_device_fraction(trace, np.zeros((3, 4), int)), r"shape \(3, 4\).*\[2, 4\]"),
             (lambda: Trace(np.full((2, 3, 1), 4), np.zeros(3), 4), r"num_experts=4 use 0..3"),
             (lambda: Trace(np.zeros((2, 3, 1)), np.zeros(2), 4), r"token_ids_n \(2,\) must be \[N\]"),
             (lambda: speculative_shuffle(trace, one_layer, np.zeros((2, 4), int), d_model=8),
              r"fit has 2 layers.*held_out 1"),
             (lambda: routing_trace(Transformer(micro(moe={"num_experts": 0}), rngs=nnx.Rngs(0)), []),
              r"no MoE layer \(moe.num_experts=0\)")]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            call()

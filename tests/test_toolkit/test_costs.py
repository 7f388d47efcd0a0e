"""The cost model against compiled programs, the HLO counter against XLA, and the hardware table."""

import math

import jax
import jax.numpy as jnp
import pytest

from toolkit.analysis import costs as cost_model
from toolkit.analysis.compiled import matmul_flops, step_collectives
from toolkit.analysis.hardware import get_cluster, measure_cpu
from toolkit.analysis.params import count_params
from toolkit.config import apply_overrides, preset
from toolkit.training.cost_check import cost_check

SMALL = ["parallel.data=1", "train.batch_size=8", "model.num_layers=2"]


def _tiny(*overrides):
    return apply_overrides(preset("tiny"), SMALL + list(overrides))


def _rows(rows):
    return {r["what"].split(" (")[0].split(" /")[0]: r for r in rows}


# ---- the HLO counter ---------------------------------------------------------------------

def test_matmul_flops_equals_xla_cost_analysis_without_loops():
    x = jnp.ones((64, 96))
    compiled = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x).lower(x).compile()
    expected = 2 * 64 * 96 * 64 + 2 * 64 * 64 * 96
    assert matmul_flops(compiled.as_text())["flops"] == expected
    assert compiled.cost_analysis()["flops"] == expected


def test_matmul_flops_multiplies_loop_trips_that_xla_counts_once():
    x = jnp.ones((32, 32))
    compiled = jax.jit(lambda x: jax.lax.fori_loop(0, 7, lambda i, a: a @ x, x)).lower(x).compile()
    counted = matmul_flops(compiled.as_text())
    assert counted == {"flops": 7 * 2 * 32**3, "unknown_loops": 0}
    assert compiled.cost_analysis()["flops"] < 2 * 2 * 32**3       # XLA: one trip


def test_matmul_flops_scope_and_unknown_loops():
    x = jnp.ones((16, 16))

    def f(x, n):
        with jax.named_scope("inner"):
            y = x @ x
        return jax.lax.fori_loop(0, n, lambda i, a: a @ x, y)
    counted = matmul_flops(jax.jit(f).lower(x, 3).compile().as_text(), "inner")
    assert counted["flops"] == 2 * 16**3
    assert counted["unknown_loops"] == 1          # the trip count is an argument


def test_step_collectives_weights_loop_trips():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(i, a):
        return jax.lax.psum(a, "d") * 0.5

    f = jax.shard_map(lambda a: jax.lax.fori_loop(0, 5, body, a), mesh=mesh,
                      in_specs=jax.P("d"), out_specs=jax.P("d"), check_vma=False)
    x = jnp.ones((8, 4))
    ops = step_collectives(jax.jit(f).lower(x).compile().as_text())
    assert [(op.kind, times) for op, times in ops] == [("all-reduce", 5)]


# ---- the cost model against the compiled train step --------------------------------------

def _check(rows, *, flops=0.02, comm=0.15, expert_rows=True):
    by = _rows(rows)
    assert abs(by["dot FLOPs outside routed experts"]["ratio"] - 1) < flops, rows
    if expert_rows:
        assert abs(by["dot FLOPs in routed experts"]["ratio"] - 1) < 0.01, rows
    assert abs(by["argument bytes"]["ratio"] - 1) < 1e-4, rows
    # XLA's buffer assignment decides the temporaries; the estimate stays within 2.5x below
    assert 1.0 <= by["temporary bytes"]["ratio"] < 2.5, rows
    for what, r in by.items():
        if what.endswith("bytes sent"):
            assert abs(r["ratio"] - 1) < comm, (what, rows)
    return by


def test_costs_match_compiled_fsdp_data_expert_capacity_accumulation():
    # FSDP gathers (hoisted out of the micro-batch loop) and per-micro-batch reduce-scatters,
    # data all-reduces, all-to-alls, padded capacity rows
    cfg = _tiny("parallel.data=2", "parallel.fsdp=2", "parallel.expert=2", "parallel.recipe=fsdp_ep",
                "moe.dispatch=capacity", "train.microbatches=2", "train.batch_size=16")
    by = _check(cost_check(cfg))
    assert {"all-gather bytes sent", "reduce-scatter bytes sent", "all-reduce bytes sent",
            "all-to-all bytes sent"} <= set(by)
    assert abs(by["reduce-scatter bytes sent"]["ratio"] - 1) < 0.01
    assert cost_model.capacity_padding(cfg, cost_model.estimate_costs(cfg, 8).sizes) == 1.25


def test_costs_match_compiled_folded_dropless_all_gather():
    # attention tensor-parallel, experts over expert x tensor, the dropless all-gather exchange
    by = _check(cost_check(_tiny("parallel.data=2", "parallel.expert=2", "parallel.tensor=2",
                                 "parallel.recipe=folded")))
    assert by["all-gather bytes sent"]["compiled"] > 0 and by["reduce-scatter bytes sent"]["compiled"] > 0


def test_costs_match_compiled_tensor_and_context_parallel():
    _check(cost_check(_tiny("parallel.data=4", "parallel.tensor=2", "parallel.recipe=tp"), experts=False),
           expert_rows=False)
    by = _check(cost_check(_tiny("parallel.data=4", "parallel.sequence=2", "parallel.recipe=dp"),
                           experts=False), expert_rows=False)
    assert by["collective-permute bytes sent"]["compiled"] > 0          # the K/V ring


def test_costs_pipeline_permutes_exact_and_flops_bounded():
    rows = cost_check(_tiny("parallel.pipeline=2", "parallel.fsdp=4", "train.microbatches=2",
                            "train.batch_size=16"), experts=False)
    by = _rows(rows)
    assert abs(by["collective-permute bytes sent"]["ratio"] - 1) < 1e-3
    assert abs(by["argument bytes"]["ratio"] - 1) < 1e-4
    bounded = [r for r in rows if "upper bound" in r["what"]]
    assert len(bounded) >= 4                      # FLOPs, gathers, reduce-scatters, all-reduces
    assert all(r["ratio"] >= 1.0 for r in bounded), bounded    # every tick's costliest branch


def test_param_bytes_match_the_sharded_model_state():
    from toolkit.sharding.mesh import make_mesh
    from toolkit.training.inspect import _bytes_per_device
    from toolkit.training.step import abstract_state
    for over in (["parallel.fsdp=4", "parallel.expert=2", "parallel.recipe=fsdp_ep"],
                 ["parallel.tensor=2", "parallel.data=4", "parallel.recipe=folded", "parallel.expert=1",
                  "moe.num_shared_experts=1"],
                 ["parallel.pipeline=2", "parallel.data=4", "model.tie_embeddings=true"]):
        cfg = _tiny(*over)
        sizes = cfg.parallel.axis_sizes(8)
        state = abstract_state(cfg, make_mesh(cfg.parallel, jax.devices()))
        assert cost_model.param_bytes_per_device(cfg, sizes) == pytest.approx(
            _bytes_per_device(state[0]), rel=1e-6), over


def test_published_shapes_parameter_counts():
    # the parameter table read from the model agrees with count_params' closed form
    for name in ("mixtral_8x7b", "deepseek_v3"):
        cfg = preset(name)
        total, _ = count_params(cfg)
        table = cost_model.param_table(cfg.model, cfg.moe, False)
        assert sum(math.prod(shape) * copies for _, shape, _, _, copies in table) == total
    assert 46e9 < count_params(preset("mixtral_8x7b"))[0] < 47e9


def test_estimate_costs_components_and_remat():
    cfg = apply_overrides(preset("mixtral_8x7b"), ["parallel.data=1", "parallel.fsdp=64"])
    plain = cost_model.estimate_costs(cfg, 64, remat=False)
    remat = cost_model.estimate_costs(cfg, 64, remat=True)
    assert plain.flops["experts"] == pytest.approx(2 * 32 * 2 * 3 * 4096 * 14336)
    assert remat.device_flops > plain.device_flops
    assert remat.memory["activations"] < plain.memory["activations"]
    assert plain.model_flops == pytest.approx(3 * plain.tokens * sum(plain.flops.values()))
    assert plain.memory["optimizer"] == 2 * plain.memory["params"]
    with pytest.raises(ValueError, match="has 64 devices, not 32"):
        cost_model.estimate_costs(cfg, 32)


# ---- hardware ----------------------------------------------------------------------------

def test_clusters_from_names_and_links():
    c = get_cluster("h100x64")
    assert c.num_devices == 64 and c.device.flops_bf16 == 989.5e12
    assert c.link_for(8).bandwidth == 450e9 and c.link_for(16).bandwidth == 50e9
    assert get_cluster("v5p-128").num_devices == 64               # v5p names count TensorCores
    assert get_cluster("v6e-256").num_devices == 256
    mixed = get_cluster("h100x16+a100x16")
    assert mixed.heterogeneous and mixed.num_devices == 32
    assert mixed.device.name == "a100" and mixed.hbm_bytes == 80e9
    assert mixed.link_for(32).bandwidth == 25e9                   # across groups: the slower NIC


@pytest.mark.parametrize("spec, message", [("h900x8", "devices: h100"), ("h100", "DEVICExCOUNT"),
                                           ("v5p-127", "multiple of 2"), ("a100x0", "count >= 1")])
def test_bad_cluster_names(spec, message):
    with pytest.raises(ValueError, match=message):
        get_cluster(spec)


def test_measure_cpu_is_positive_and_cached():
    cpu = measure_cpu(size=256, stream_mb=8, repeats=2)
    assert cpu.kind == "cpu" and cpu.flops_bf16 > 1e8 and cpu.hbm_bandwidth > 1e8
    assert measure_cpu(size=256, stream_mb=8, repeats=2) is cpu
    cluster = get_cluster("cpux8")                 # this machine split into simulated devices
    assert cluster.num_devices == 8 and cluster.device.kind == "cpu"
    assert cluster.link_for(8).bandwidth == cluster.device.hbm_bandwidth / 2


# ---- step time, planner, published runs ---------------------------------------------------

def test_step_time_parts_and_links():
    from toolkit.analysis.step_time import axis_span, estimate_step_time
    cfg = apply_overrides(preset("mixtral_8x7b"), ["parallel.data=1", "parallel.fsdp=8", "parallel.expert=8",
                                                   "train.batch_size=256"])
    t = estimate_step_time(cfg, get_cluster("h100x64"))
    assert 0 < t.mfu < 1 and t.step_s > t.breakdown["matmul"] > 0
    assert t.tokens_per_s == pytest.approx(256 * 4096 / t.step_s)
    sizes = t.costs.sizes
    assert axis_span("expert", sizes) == 8 and axis_span("fsdp", sizes) == 64
    # the expert all-to-all stays on NVLink; across nodes (expert outermost of 16) it would be slower
    slow = estimate_step_time(cfg, get_cluster("h100x32+a100x32"))
    assert slow.step_s > t.step_s


def test_planner_ranks_fitting_plans_and_explains():
    from toolkit.analysis.planner import explain, parse_tokens, plan
    cfg = preset("qwen3_30b_a3b")
    cluster = get_cluster("h100x16")
    plans = plan(cfg, cluster, parse_tokens("256K"), remat=(True,), top=5)
    assert len(plans) == 5
    assert [p.time.step_s for p in plans] == sorted(p.time.step_s for p in plans)
    assert all(p.memory_bytes <= 0.9 * cluster.hbm_bytes for p in plans)
    assert all(p.cfg.parallel.axis_sizes(16)["pipeline"] * p.cfg.parallel.data * p.cfg.parallel.fsdp
               * p.cfg.parallel.tensor * p.cfg.parallel.expert * p.cfg.parallel.sequence == 16 for p in plans)
    text = explain(plans)
    assert "best:" in text and "time goes to" in text
    fixed = plan(cfg, cluster, parse_tokens("256K"), fixed={"tensor": 2}, remat=(True,), top=3)
    assert {p.cfg.parallel.tensor for p in fixed} == {2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(cluster="h100x2", tokens="4M"), "does not fit on h100x2"),
    (dict(cluster="h100x64", tokens="4M", fixed={"tensor": 3}), "tensor may be one of"),
    (dict(cluster="h100x64", tokens="2K"), "less than one sequence"),
    (dict(cluster="h100x64", tokens="4M", fixed={"model": 2}), "unknown axis"),
])
def test_planner_bad_inputs(kwargs, message):
    from toolkit.analysis.planner import parse_tokens, plan
    with pytest.raises(ValueError, match=message):
        plan(preset("mixtral_8x7b"), get_cluster(kwargs["cluster"]), parse_tokens(kwargs["tokens"]),
             fixed=kwargs.get("fixed"))


def test_published_runs_estimated_near_their_mfu():
    from toolkit.analysis.published import compare_published
    rows = compare_published()
    assert len(rows) == 3
    for r in rows:          # within a third of the published MFU: the model is coarse, not wild
        assert abs(r["estimated_mfu"] / r["published_mfu"] - 1) < 0.33, r
    assert rows[0]["fits"]


def test_cli_plan(capsys):
    from toolkit.cli import main
    assert main(["plan", "--preset", "qwen3_30b_a3b", "--cluster", "h100x16", "--global-batch", "256K",
                 "--remat", "on", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "plans that fit" in out and "best:" in out
    assert main(["plan", "--cluster", "h900x8"]) == 2
    assert "devices: h100" in capsys.readouterr().err

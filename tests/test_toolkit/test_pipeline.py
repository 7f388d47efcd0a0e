"""Pipeline schedules: timelines match the bubble theory, buffers deliver the right
messages, and every schedule gives the single-device loss and gradients on the mesh."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest
from conftest import micro
from flax import nnx

from toolkit.config import ConfigError, validate
from toolkit.models.transformer import Transformer, stacked_blocks_state
from toolkit.sharding.pipeline import B_SRC, CHUNK, F_SRC, KIND, MB, RECV_B, RECV_F, STASH, plan
from toolkit.sharding.schedules import (
    stage_orders,
    theory_bubble_fraction,
    theory_bubble_ratio,
    timeline,
)
from toolkit.training.inspect import loss_and_grads
from toolkit.training.step import loss_fn, update_router_biases, value_and_grad

GRID = [(p, m) for p in (2, 3, 4) for m in (1, 2, 4, 8)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", GRID)
def test_bubble_fraction_matches_theory(schedule, p, m):
    tl = timeline(schedule, p, m)
    assert tl.bubble_fraction() == pytest.approx(theory_bubble_fraction(p, m))
    assert tl.bubble_ratio() == pytest.approx(theory_bubble_ratio(p, m))
    assert tl.length == 2 * (m + p - 1)


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 2), (2, 6, 3), (4, 8, 4)])
def test_interleaved_bubble_is_megatron_value(p, m, v):
    tl = timeline("interleaved", p, m, v)
    assert tl.bubble_ratio() == pytest.approx(theory_bubble_ratio(p, m, v))
    assert tl.bubble_ratio() < timeline("1f1b", p, m).bubble_ratio()


def test_1f1b_keeps_fewer_microbatches_in_flight_than_gpipe():
    assert timeline("gpipe", 4, 8).peak_in_flight() == [8, 8, 8, 8]
    assert timeline("1f1b", 4, 8).peak_in_flight() == [4, 3, 2, 1]
    assert plan(timeline("gpipe", 4, 8)).stash == 8
    assert plan(timeline("1f1b", 4, 8)).stash == 4


@pytest.mark.parametrize("schedule,p,m,v", [("gpipe", 3, 4, 1), ("1f1b", 4, 8, 1),
                                            ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2)])
def test_timeline_respects_dependencies(schedule, p, m, v):
    tl = timeline(schedule, p, m, v)
    end = {(o.kind, o.microbatch, o.chunk * p + o.stage): o for o in tl.ops}
    assert len(end) == 2 * m * p * v
    for (kind, i, c), op in end.items():
        deps = [("F", i, c - 1)] if kind == "F" and c else []
        if kind == "B":
            deps = [("F", i, c)] + ([("B", i, c + 1)] if c < p * v - 1 else [])
        assert all(end[d].end <= op.start for d in deps), (kind, i, c)
    for s in range(p):                       # one op at a time per stage
        spans = sorted((o.start, o.end) for o in tl.ops if o.stage == s)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


@pytest.mark.parametrize("schedule,p,m,v", [("gpipe", 4, 4, 1), ("1f1b", 4, 8, 1),
                                            ("1f1b", 2, 1, 1), ("interleaved", 4, 8, 2),
                                            ("interleaved", 2, 6, 3)])
def test_plan_buffers_deliver_each_message(schedule, p, m, v):
    """Replay the executor's tables symbolically: every read finds the message it needs."""
    pl = plan(timeline(schedule, p, m, v))
    last = p * v - 1
    fbuf = [dict() for _ in range(p)]
    bbuf = [dict() for _ in range(p)]
    stash = [dict() for _ in range(p)]
    for t in range(pl.ticks):
        sent_f, sent_b = [None] * p, [None] * p
        for s in range(p):
            row = pl.table[t, s]
            if row[KIND] == 0:
                continue
            i, c = int(row[MB]), int(row[CHUNK]) * p + s
            if row[KIND] == 1:
                got = ("x", i) if row[F_SRC] < 0 else fbuf[s].pop(int(row[F_SRC]))
                assert got == (("x", i) if c == 0 else ("f", i, c)), (t, s, got)
                assert int(row[STASH]) not in stash[s]
                stash[s][int(row[STASH])] = (i, c)
                sent_f[s] = ("f", i, c + 1)
            else:
                assert bbuf[s].pop(int(row[B_SRC])) == ("b", i, c)
                assert stash[s].pop(int(row[STASH])) == (i, c)
                sent_b[s] = ("b", i, c - 1)
        if pl.head[t] >= 0:
            bbuf[p - 1][int(pl.head_slot[t])] = ("b", int(pl.head[t]), last)
        for s in range(p):
            if pl.table[t, s, RECV_F] >= 0:
                assert int(pl.table[t, s, RECV_F]) not in fbuf[s]
                fbuf[s][int(pl.table[t, s, RECV_F])] = sent_f[(s - 1) % p]
            if pl.table[t, s, RECV_B] >= 0:
                bbuf[s][int(pl.table[t, s, RECV_B])] = sent_b[(s + 1) % p]
    assert all(not b for b in fbuf + bbuf + stash)


def test_stage_orders_reject_bad_combinations():
    with pytest.raises(ValueError, match="multiple of stages=4"):
        stage_orders("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="needs schedule 'interleaved'"):
        stage_orders("1f1b", 4, 8, 2)
    with pytest.raises(ValueError, match="unknown"):
        stage_orders("zero_bubble", 4, 8)


# Four layers (eight when interleaving over 4 devices, for whole chunks); 4 micro-batches.
MODEL = {"num_layers": 8, "seq_len": 8}
TRAIN = {"batch_size": 16, "microbatches": 4}


@pytest.fixture(scope="module")
def single():
    """Single-device loss and gradients (same micro-batches), cached by layer count."""
    cache = {}

    def get(layers):
        if layers not in cache:
            cfg = micro(model={**MODEL, "num_layers": layers}, train=TRAIN)
            loss, grads, _ = loss_and_grads(cfg, jax.devices()[:1])
            cache[layers] = loss, nnx.to_pure_dict(grads)
        return cache[layers]
    return get


CASES = {  # name: (parallel, devices)
    "p2": ({"pipeline": 2}, 2),
    "p4": ({"pipeline": 4}, 4),
    "p2_data2_expert2": ({"pipeline": 2, "data": 2, "expert": 2}, 8),
    "p4_expert2": ({"pipeline": 4, "expert": 2}, 8),
}
SCHEDULES = {"gpipe": {"schedule": "gpipe"}, "1f1b": {"schedule": "1f1b"},
             "interleaved_v2": {"schedule": "interleaved", "virtual_stages": 2}}


def _check(cfg, devices, single):
    validate(cfg, devices)
    single = single(cfg.model.num_layers)
    loss, grads, _ = loss_and_grads(cfg, jax.devices()[:devices])
    want = stacked_blocks_state(single[1], cfg.parallel.virtual_stages, cfg.parallel.pipeline)
    assert loss == pytest.approx(single[0], rel=1e-6, abs=1e-6)
    got = nnx.to_pure_dict(grads)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


# Every schedule on at least two meshes and every mesh under at least one schedule (the
# executor is one code path; the interleaved schedule, the most intricate, gets three).
PAIRS = [("gpipe", "p2"), ("gpipe", "p4_expert2"), ("1f1b", "p4"), ("1f1b", "p2_data2_expert2"),
         ("interleaved_v2", "p4"), ("interleaved_v2", "p2_data2_expert2"),
         ("interleaved_v2", "p4_expert2")]


@pytest.mark.parametrize("schedule,case", PAIRS)
def test_pipeline_equals_single_device(single, schedule, case):
    mesh, devices = CASES[case]
    parallel = {"data": 1, "recipe": "fsdp_ep" if "expert" in case else "fsdp_tp_ep",
                **mesh, **SCHEDULES[schedule]}
    layers = 8 if parallel["pipeline"] * parallel.get("virtual_stages", 1) > 4 else 4
    _check(micro(model={**MODEL, "num_layers": layers}, train=TRAIN, parallel=parallel), devices,
           single)


def test_gpipe_without_rematerialisation_equals_single_device(single):
    parallel = {"data": 2, "pipeline": 2, "schedule": "gpipe", "pipeline_remat": False}
    _check(micro(model={**MODEL, "num_layers": 4}, train=TRAIN, parallel=parallel), 4, single)


def test_pipeline_composes_with_tensor_sequence_and_megatron_sp(single):
    parallel = {"data": 1, "pipeline": 2, "tensor": 2, "sequence": 2, "context": "all_gather",
                "sequence_parallel": True}
    _check(micro(model={**MODEL, "num_layers": 4}, train=TRAIN, parallel=parallel), 8, single)


def test_bfloat16_pipeline_compiles_and_tracks_float32(single):
    cfg = micro(model={**MODEL, "num_layers": 4, "dtype": "bfloat16"}, train=TRAIN,
                parallel={"data": 1, "pipeline": 2})
    loss, grads, _ = loss_and_grads(validate(cfg, 2), jax.devices()[:2])
    assert loss == pytest.approx(single(4)[0], rel=2e-3)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_microbatch_accumulation_is_the_mean_of_microbatch_gradients():
    cfg = micro(model={"num_layers": 1}, train={"batch_size": 4, "microbatches": 2})
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(0), 2)
    batch = {k: jax.random.randint(key, (4, 16), 0, 264)
             for k, key in zip(("tokens", "targets"), keys, strict=True)}
    (loss, metrics), grads = nnx.jit(value_and_grad, static_argnums=2)(model, batch, cfg)
    one = micro(model={"num_layers": 1}, train={"batch_size": 2})
    step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True), static_argnums=2)
    parts = [step(model, {k: v[i::2] for k, v in batch.items()}, one) for i in range(2)]
    assert float(loss) == pytest.approx(np.mean([float(p[0][0]) for p in parts]), rel=1e-6)
    np.testing.assert_allclose(metrics["expert_counts"], sum(p[0][1]["expert_counts"] for p in parts))
    for g, g0, g1 in zip(jax.tree.leaves(grads), *(jax.tree.leaves(p[1]) for p in parts), strict=True):
        np.testing.assert_allclose(g, (g0 + g1) / 2, rtol=1e-5, atol=1e-7)


def test_stacked_model_equals_listed_model():
    listed = Transformer(micro(model=MODEL), rngs=nnx.Rngs(0))
    cfg = micro(model=MODEL, parallel={"pipeline": 2, "schedule": "interleaved", "virtual_stages": 2})
    stacked = Transformer(cfg, rngs=nnx.Rngs(0))
    want = stacked_blocks_state(nnx.to_pure_dict(nnx.state(listed)), 2, 2)
    got = nnx.to_pure_dict(nnx.state(stacked))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 264)
    logits = nnx.jit(lambda model, t: model(t)[0])
    np.testing.assert_allclose(logits(stacked, tokens), logits(listed, tokens), rtol=1e-6, atol=1e-6)


def test_router_biases_update_per_layer_in_the_stacked_layout():
    moe = {"router": "sigmoid_bias", "bias_update_rate": 0.1}
    listed = Transformer(micro(model=MODEL, moe=moe), rngs=nnx.Rngs(0))
    cfg = micro(model=MODEL, moe=moe, parallel={"pipeline": 4})
    stacked = Transformer(cfg, rngs=nnx.Rngs(0))
    counts_le = jax.random.uniform(jax.random.key(1), (8, 4)) * 10
    update_router_biases(listed, counts_le, cfg)
    update_router_biases(stacked, counts_le, cfg)
    want = stacked_blocks_state(nnx.to_pure_dict(nnx.state(listed)), 1, 4)
    got = nnx.to_pure_dict(nnx.state(stacked))
    for j in want["stages"]["blocks"]:
        a = got["stages"]["blocks"][j]["ffn"]["router"]["bias"]
        np.testing.assert_allclose(a, want["stages"]["blocks"][j]["ffn"]["router"]["bias"], atol=1e-7)
        assert np.abs(a).max() > 0


@pytest.mark.parametrize("overrides,match", [
    ({"model": {"num_layers": 6}, "parallel": {"pipeline": 4}},
     r"model.num_layers=6 cannot be split into parallel.pipeline\*virtual_stages=4\*1=4"),
    ({"model": MODEL, "train": {"microbatches": 2},
      "parallel": {"pipeline": 4, "schedule": "interleaved", "virtual_stages": 2}},
     r"train.microbatches=2 must be a multiple of parallel.pipeline=4"),
    ({"model": {"seq_len": 12}, "parallel": {"sequence": 8}},
     r"model.seq_len=12 is not divisible by parallel.sequence=8"),
    ({"model": {"seq_len": 12}, "parallel": {"sequence": 2, "tensor": 4, "sequence_parallel": True}},
     r"model.seq_len=12 is not divisible by parallel.sequence\*tensor=8"),
    ({"model": MODEL, "moe": {"first_dense_layers": 1}, "parallel": {"pipeline": 2, "data": 4}},
     r"pipeline stages must have identical layers"),
    ({"model": MODEL, "parallel": {"pipeline": 2, "virtual_stages": 2, "data": 4}},
     r"virtual_stages=2 needs parallel.schedule='interleaved'"),
    ({"model": {**MODEL, "mtp_layers": 1}, "parallel": {"pipeline": 2, "data": 4}},
     r"model.mtp_layers=1 is not supported with pipeline"),
    ({"train": {"batch_size": 8, "microbatches": 3}}, r"not divisible by train.microbatches=3"),
    ({"parallel": {"sequence_parallel": True, "data": 8}}, r"sequence_parallel=true .* size 1"),
    ({"parallel": {"context": "zigzag", "data": 8}}, r"parallel.context='zigzag' is unknown"),
    ({"model": {**MODEL, "num_layers": 4}, "parallel": {"pipeline": 2, "sequence": 2}},
     r"parallel.context='ring' with pipeline parallelism is not supported"),
])
def test_invalid_pipeline_and_sequence_settings_are_rejected(overrides, match):
    overrides = dict(overrides)
    parallel = {"data": 1, **overrides.pop("parallel", {})}
    with pytest.raises(ConfigError, match=match):
        validate(micro(parallel=parallel, **overrides))


def test_config_with_pipeline_and_sequence_axes_validates():
    cfg = micro(model=MODEL, train=TRAIN, parallel={"pipeline": 2, "sequence": 2, "data": 2,
                                                    "context": "all_gather"})
    assert validate(cfg, 8) is cfg
    assert dataclasses.replace(cfg.parallel, data=-1).axis_sizes(8)["data"] == 2

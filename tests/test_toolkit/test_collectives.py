"""Collectives read from compiled HLO: the parser on each spelling, and real train steps."""

import pytest

from toolkit.analysis import count_params
from toolkit.analysis.collectives import Collective, parse_collectives, summarize_collectives
from toolkit.config import apply_overrides, tiny
from toolkit.training.inspect import (
    block_collectives,
    communication_check,
    inspect_train_step,
    render_inspection,
)

# lines as XLA prints them (cut short); the three spellings of replica groups, an async pair
HLO = """
  %all-gather.3 = f32[128,2,32]{2,1,0} all-gather(%param.192), channel_id=7, replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_3'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}
  %all-reduce.1 = (f32[64]{0}, bf16[8,8]{1,0}) all-reduce(%a, %b), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %reduce-scatter = f32[16,4]{1,0} reduce-scatter(%g), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %all-to-all.9 = s32[8,16]{1,0} all-to-all(%x), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}, metadata={op_name="jit(f)/shard_map/expert_exchange/all_to_all" stack_frame_id=5}
  %all-gather-start = (f32[4]{0}, f32[16]{0}) all-gather-start(%p), channel_id=5, replica_groups=[2,4]<=[8], dimensions={0}
  %all-gather-done = f32[16]{0} all-gather-done(%all-gather-start)
  %add.1 = f32[16]{0} add(%all-gather-done, %all-gather-done)
"""  # noqa: E501


def test_parse_reads_each_spelling_of_shapes_and_groups():
    ops = parse_collectives(HLO)
    assert [(o.kind, o.result_bytes, o.group_size) for o in ops] == [
        ("all-gather", 128 * 2 * 32 * 4, 4),
        ("all-reduce", 64 * 4 + 8 * 8 * 2, 2),
        ("reduce-scatter", 16 * 4 * 4, 4),
        ("all-to-all", 8 * 16 * 4, 8),
        ("all-gather", 16 * 4, 4),            # async: the result, not the operand
    ]
    assert ops[3].scope.endswith("expert_exchange/all_to_all") and ops[3].shape == (8, 16)
    assert ops[3].dtype == "s32" and ops[0].scope == ""
    s = summarize_collectives(ops)
    assert s["all-gather"]["count"] == 2
    assert s["all-reduce"]["sent_bytes"] == pytest.approx(2 * (1 / 2) * (64 * 4 + 128))
    assert s["reduce-scatter"]["sent_bytes"] == pytest.approx(3 * 256)
    assert Collective("x", "all-reduce", 100.0, 1).sent_bytes == 0.0


def _train_step_collectives(mesh_overrides):
    cfg = apply_overrides(tiny(), [*mesh_overrides, "model.num_layers=2"])
    return inspect_train_step(cfg)["collectives"], 4 * count_params(cfg)[0]


def test_data_parallel_all_reduces_every_gradient():
    s, param_bytes = _train_step_collectives(["parallel.data=8"])
    assert s["all-reduce"]["result_bytes"] >= param_bytes
    assert s.get("all-gather", {}).get("result_bytes", 0) < 0.1 * param_bytes   # nothing sharded


def test_fsdp_gathers_the_sharded_parameters():
    s, param_bytes = _train_step_collectives(["parallel.data=1", "parallel.fsdp=8"])
    assert s["all-gather"]["result_bytes"] >= 0.9 * param_bytes   # all but norms and biases
    assert all(op > 0 for op in (s["all-gather"]["sent_bytes"], s["all-reduce"]["sent_bytes"]))


def test_inspect_reports_memory_and_collectives_per_device():
    cfg = apply_overrides(tiny(), ["model.num_layers=2"])
    dp = inspect_train_step(apply_overrides(cfg, ["parallel.data=8"]))
    fsdp = inspect_train_step(apply_overrides(cfg, ["parallel.data=1", "parallel.fsdp=8"]))
    params = 4 * count_params(cfg)[0]
    assert dp["param_bytes"] == params    # AdamW adds mu and nu, and a few step counters:
    assert 3 * params <= dp["state_bytes"] <= 3 * params + 64
    assert fsdp["param_bytes"] < params / 4                        # sharded 8 ways (norms not)
    assert fsdp["argument_bytes"] < dp["argument_bytes"] / 4
    assert "all-gather" in fsdp["collectives"] and "all-gather" in render_inspection(fsdp)


def _check(*overrides):
    cfg = apply_overrides(tiny(), ["model.num_layers=2", *overrides])
    return {(r["what"].split()[0], r["kind"]): r for r in communication_check(cfg)}


EP = ["parallel.data=2", "parallel.expert=4", "parallel.recipe=ep"]
CAPACITY = ["moe.dispatch=capacity", "moe.capacity_factor=1.0"]


def test_expert_all_to_all_bytes_match_the_formula_and_bigmac_moves_r_times_less():
    cfg = apply_overrides(tiny(), [*EP, *CAPACITY])
    rows = _check(*EP, *CAPACITY)
    a2a = rows[("expert", "all-to-all")]
    tokens = cfg.train.batch_size * cfg.model.seq_len // 8           # T per device
    k, d, ep = cfg.moe.top_k, cfg.model.d_model, 4
    assert a2a["analytic_bytes"] == 2 * k * (ep - 1) / ep * tokens * d * 4
    assert a2a["measured_bytes"] == pytest.approx(a2a["analytic_bytes"])
    bigmac = _check(*EP, *CAPACITY, "moe.bigmac_ratio=0.25")[("expert", "all-to-all")]
    assert bigmac["measured_bytes"] == pytest.approx(0.25 * a2a["measured_bytes"])


def test_ring_of_experts_gathers_and_scatters_each_token_once_per_peer():
    rows = _check(*EP)                                                 # dropless on CPU
    for kind in ("all-gather", "reduce-scatter"):
        assert rows[("expert", kind)]["measured_bytes"] == pytest.approx(
            rows[("expert", kind)]["analytic_bytes"])
    assert ("expert", "all-to-all") not in rows


def test_tensor_parallel_layer_all_reduces_match_megatron():
    cfg = apply_overrides(tiny(), ["model.num_layers=2", "parallel.data=4", "parallel.tensor=2",
                                   "parallel.recipe=tp"])
    forward = block_collectives(cfg, moe=False, backward=False)
    act = (cfg.train.batch_size // 4, cfg.model.seq_len, cfg.model.d_model)
    assert [o.kind for o in forward if o.shape == act] == ["all-reduce"] * 2   # attention, MLP
    row = _check("parallel.data=4", "parallel.tensor=2", "parallel.recipe=tp")[
        ("tensor", "all-reduce")]
    assert row["measured_bytes"] == pytest.approx(row["analytic_bytes"])   # 8 b s h (t-1)/t

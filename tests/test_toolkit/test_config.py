"""Config presets, overrides and the validation errors for every inconsistent class."""

import dataclasses

import pytest

from toolkit.config import (
    PRESETS,
    ConfigError,
    all_keys,
    apply_overrides,
    describe,
    from_dict,
    preset,
    tiny,
    validate,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = preset(name)
    validate(cfg, num_devices=8)
    assert from_dict(cfg.to_dict()) == cfg
    hash(cfg)


def test_overrides_parse_by_type():
    cfg = apply_overrides(tiny(), ["moe.num_experts=16", "train.learning_rate=1e-4",
                                   "model.tie_embeddings=true", "moe.dispatch=capacity",
                                   "data.paths=a.txt,b", "name=x"])
    assert cfg.moe.num_experts == 16 and cfg.train.learning_rate == 1e-4
    assert cfg.model.tie_embeddings is True and cfg.moe.dispatch == "capacity"
    assert cfg.data.paths == ("a.txt", "b") and cfg.name == "x"
    odd = apply_overrides(tiny(), ["data.paths=007,1e3", "data.domain_weights=1,2.5"])
    assert odd.data.paths == ("007", "1e3") and odd.data.domain_weights == (1.0, 2.5)
    assert tiny().moe.num_experts == 8, "presets are not mutated"


def test_describe_covers_every_key_with_a_meaning():
    rows = describe(tiny())
    assert [k for k, _, _ in rows] == all_keys(tiny())
    assert all(meaning for _, _, meaning in rows)


@pytest.mark.parametrize("overrides,message", [
    (["moe.num_expert=3"], r"unknown config key 'moe.num_expert' \(did you mean 'moe.num_experts'\?\)"),
    (["modle.d_model=3"], r"did you mean 'model.d_model'"),
    (["moe.top_k=two"], r"moe.top_k='two' is not a valid int"),
    (["moe.num_experts"], r"has no '='"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(tiny(), overrides)


@pytest.mark.parametrize("overrides,devices,message", [
    (["parallel.expert=4", "moe.num_experts=6"], 8,
     r"moe.num_experts=6 is not divisible by mesh axis expert=4 \(the expert-parallel group of "
     r"recipe 'fsdp_tp_ep'\); use 4, 8, 12"),
    (["parallel.recipe=folded", "parallel.tensor=4", "parallel.expert=4", "parallel.data=1",
      "moe.num_experts=8"], 16, r"moe.num_experts=8 is not divisible by mesh axis expert\*tensor=16"),
    (["parallel.recipe=zero3"], 8, r"parallel.recipe='zero3' is not a recipe; use one of \['dp', 'ep'"),
    (["parallel.recipe=dp", "parallel.data=4", "parallel.tensor=2"], 8,
     r"parallel.recipe='dp' does not use mesh axis tensor=2 \(it would hold identical copies\); set it "
     r"to 1 or use a recipe that does: \['folded', 'fsdp_tp_ep', 'tp'\]"),
    (["parallel.expert=2", "moe.small_experts=2", "moe.d_small_expert=32"], 8,
     r"moe.small_experts=2 with expert parallelism \(expert=2\) is not supported"),
    (["parallel.expert=2", "moe.dispatch_groups=4"], 8,
     r"moe.dispatch_groups=4 is not divisible by mesh axes data\*fsdp\*expert=8"),
    (["parallel.overlap_chunks=0"], 8, r"parallel.overlap_chunks=0 must be a positive integer"),
    (["parallel.dropless_exchange=nccl"], 8, r"parallel.dropless_exchange='nccl'; use one of"),
    (["moe.top_k=9"], 8, r"moe.top_k=9 exceeds moe.num_experts=8; use 1..8"),
    (["model.num_kv_heads=3"], 8, r"model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    (["parallel.tensor=8", "parallel.data=1"], 8,
     r"model.num_heads=4 is not divisible by mesh axis tensor=8"),
    (["parallel.data=3"], 8, r"has 3 devices but 8 are available"),
    (["parallel.data=2", "parallel.fsdp=2"], 8, r"has 4 devices but 8 are available"),
    (["parallel.fsdp=3"], 8, r"parallel.data=-1 cannot fill 8 devices"),
    (["parallel.fsdp=-1"], 8, r"only one axis may be -1"),
    (["train.batch_size=12"], 8, r"train.batch_size=12 is not divisible by mesh axes data\*fsdp\*expert=8"),
    (["moe.dispatch=magic"], 8, r"moe.dispatch='magic' is unknown; use one of \('dropless', 'capacity'\)"),
    (["moe.capacity_factor=0"], 8, r"moe.capacity_factor=0.0 must be > 0"),
    (["model.dtype=float16"], 8, r"model.dtype='float16' is not supported"),
    (["train.warmup_steps=400"], 8, r"train.warmup_steps=400 must be in 0..299"),
    (["model.vocab_size=100"], 8, r"model.vocab_size=100 is below"),
    (["train.grad_clip=-1"], 8, r"train.grad_clip=-1.0 must be >= 0 \(0 disables clipping\)"),
    (["train.seed=-1"], 8, r"train.seed=-1 must be >= 0"),
    (["train.b2=1.0"], 8, r"train.b2=1.0 must be in \[0, 1\)"),
    (["moe.moe_every=9"], 8, r"moe.moe_every=9 with moe.first_dense_layers=0 leaves no MoE layer"),
    (["data.max_code_bytes=0"], 8, r"data.max_code_bytes=0 must be >= 1"),
    (["kernels.gmm=triton"], 8, r"kernels.gmm='triton' is unknown; use '' \(by platform\) or one of"),
    (["kernels.attention=flash"], 8, r"kernels.attention='flash' is unknown"),
    (["kernels.attention=cudnn"], 8, r"kernels.attention='cudnn' needs an NVIDIA GPU"),
    (["kernels.attention=pallas_gpu", "model.head_dim=24"], 8,
     r"needs a power-of-two model.head_dim >= 16, got 24"),
])
def test_invalid_configs_name_field_value_and_fix(overrides, devices, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(tiny(), overrides), num_devices=devices)


def test_seq_len_beyond_corpus():
    cfg = apply_overrides(tiny(), ["model.seq_len=5000"])
    with pytest.raises(ConfigError, match=r"model.seq_len=5000 is beyond the corpus: val/prose has "
                                          r"only 300 tokens; use model.seq_len <= 299"):
        validate(cfg, 8, domain_tokens={"train/prose": 10_000, "val/prose": 300})


def test_every_problem_is_reported_at_once():
    cfg = apply_overrides(tiny(), ["moe.top_k=9", "model.num_kv_heads=3"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 8)
    assert "moe.top_k=9" in str(err.value) and "num_kv_heads=3" in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        preset("tinny")


def test_mesh_fill_axis():
    cfg = dataclasses.replace(tiny(), parallel=dataclasses.replace(tiny().parallel, fsdp=4))
    assert cfg.parallel.axis_sizes(8) == {"pipeline": 1, "data": 2, "fsdp": 4, "sequence": 1,
                                          "tensor": 1, "expert": 1}


def test_saved_configs_from_before_a_key_moved_still_load():
    old = tiny().to_dict()
    old["moe"]["gmm_impl"] = "ragged_dot"  # where the gmm backend lived before `kernels`
    old["moe"]["router"] = "topk"  # the name topk_softmax had before there were others
    del old["kernels"]
    cfg = from_dict(old)
    assert cfg.kernels.gmm == "ragged_dot" and cfg.moe == tiny().moe
    bad = tiny().to_dict()
    bad["moe"]["num_expertz"] = 3
    with pytest.raises(ConfigError, match=r"unknown keys \['moe.num_expertz'\]"):
        from_dict(bad)

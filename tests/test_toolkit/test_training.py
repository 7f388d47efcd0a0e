"""Training: exact resume, run directories that are never overwritten, outputs, learning."""

import json

import jax
import numpy as np
import pytest
from conftest import micro

from toolkit.config import ConfigError
from toolkit.training import Trainer

ONE = jax.devices()[:1]


def _cfg(**train):
    return micro(train={"steps": 6, "warmup_steps": 1, "checkpoint_every": 3, **train})


class Crash(RuntimeError):
    pass


def _crash_at(step):
    def callback(trainer, rec):
        if rec["step"] == step:
            raise Crash(f"simulated crash after step {step}")
    return callback


def test_resume_continues_with_the_same_losses(tmp_path):
    full = Trainer(_cfg(), out_dir=tmp_path / "full", devices=ONE, progress=False)
    full.run()
    expect = [h["loss"] for h in full.history]

    crashed = Trainer(_cfg(), out_dir=tmp_path / "cut", devices=ONE, progress=False)
    with pytest.raises(Crash):
        crashed.run(callback=_crash_at(4))     # checkpoint at 3, crash after 4
    assert crashed.checkpointer.latest_step() == 3

    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')            # a line torn by the crash
    resumed = Trainer(_cfg(), out_dir=tmp_path / "cut", resume=True, devices=ONE, progress=False)
    assert resumed.step_num == 3
    resumed.run()
    assert [h["loss"] for h in resumed.history] == expect, "bit-identical continuation"
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("split") != "val"] == [1, 2, 3, 4, 5, 6]


def test_run_directory_is_never_overwritten(tmp_path):
    Trainer(_cfg(steps=2, checkpoint_every=0), out_dir=tmp_path, devices=ONE, progress=False).run()
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        Trainer(_cfg(steps=2), out_dir=tmp_path, devices=ONE, progress=False)
    with pytest.raises(ConfigError, match=r"config differs .*\(moe.num_experts: saved 4, given 8\)"):
        Trainer(micro(moe={"num_experts": 8}, train={"steps": 2, "warmup_steps": 1}),
                out_dir=tmp_path, resume=True, devices=ONE, progress=False)
    assert (tmp_path / "summary.json").read_text() == before


def test_run_writes_every_artifact(tmp_path):
    cfg = _cfg(steps=4, eval_every=2, checkpoint_every=2, keep_checkpoints=1)
    summary = Trainer(cfg, out_dir=tmp_path, devices=ONE, progress=False).run()
    for name in ("config.json", "metrics.jsonl", "summary.json", "report.md", "loss.png",
                 "expert_load.png", "domain_preference.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4], "keep_checkpoints=1 keeps only the latest"
    assert set(summary["val_bits_per_byte"]) == {"prose", "code"}
    assert np.array(summary["expert_load"]).shape == (2, 4)
    assert np.allclose(np.sum(summary["expert_load"], -1), 1.0)
    assert summary["drop_rate"] == [0.0, 0.0]
    report = (tmp_path / "report.md").read_text()
    assert "bits per byte" in report and "| prose |" in report and "I(domain; expert)" in report
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "ce", "load_balance_loss", "seq_balance_loss", "z_loss", "router_entropy",
            "tsallis_entropy", "expert_counts", "computed_counts", "drop_rate",
            "experts_per_token", "activation_zeros", "tokens_per_s", "lr", "grad_norm"} <= set(rec)
    # the routing record, summarised: per layer CV, FLOPs spent, affinity between layers
    assert np.array(summary["affinity"]).shape == (1, 4, 4)
    assert np.allclose(np.sum(summary["affinity"], -1), 1.0)
    assert len(summary["load_cv"]) == len(summary["ffn_flops_per_token"]) == 2
    assert summary["experts_per_token"] == [2.0, 2.0]


def test_capacity_run_reports_drops():
    cfg = micro(moe={"dispatch": "capacity", "capacity_factor": 0.5},
                train={"steps": 2, "warmup_steps": 1})
    rec = Trainer(cfg, devices=ONE, progress=False).train_step()
    assert all(0.4 <= d < 1.0 for d in rec["drop_rate"])     # half the slots at best


def test_loss_falls_below_unigram():
    cfg = micro(model={"seq_len": 32}, train={"steps": 150, "warmup_steps": 10, "learning_rate": 1e-2,
                                              "batch_size": 16, "eval_batches": 2})
    trainer = Trainer(cfg, devices=ONE, progress=False)
    summary = trainer.run()
    for dom, bpb in summary["val_bits_per_byte"].items():
        assert bpb < summary["unigram_bits_per_byte"][dom], dom
    assert trainer.history[-1]["ce"] < trainer.history[0]["ce"] - 1.0


def test_ctrl_c_keeps_the_work_done(tmp_path):
    def interrupt(trainer, rec):
        if rec["step"] == 2:
            raise KeyboardInterrupt
    trainer = Trainer(_cfg(checkpoint_every=0), out_dir=tmp_path, devices=ONE, progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(callback=interrupt)
    assert trainer.checkpointer.latest_step() == 2
    resumed = Trainer(_cfg(checkpoint_every=0), out_dir=tmp_path, resume=True, devices=ONE,
                      progress=False)
    assert resumed.step_num == 2 and len(resumed.history) == 2

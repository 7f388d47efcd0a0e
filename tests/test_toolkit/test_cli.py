"""The command line: config listing, clear errors before compiling, and a whole tiny run."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_config_lists_every_key_with_meaning():
    out = _cli("config", "--preset", "tiny", "--set", "moe.num_experts=16")
    assert out.returncode == 0, out.stderr
    assert "moe.num_experts" in out.stdout and "16" in out.stdout
    assert "routed experts per MoE layer" in out.stdout


def test_bad_config_fails_fast_with_a_clear_message(tmp_path):
    out = _cli("train", "--preset", "tiny", "--set", "moe.top_k=9", "--out", str(tmp_path / "r"))
    assert out.returncode == 2
    assert "moe.top_k=9 exceeds moe.num_experts=8; use 1..8" in out.stderr
    assert not (tmp_path / "r").exists()
    out = _cli("train", "--mesh", "data=3", "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "has 3 devices but 8 are available" in out.stderr


def test_train_on_the_8_device_mesh_end_to_end(tmp_path):
    run = tmp_path / "tiny"
    args = ["train", "--preset", "tiny", "--mesh", "data=2,fsdp=4", "--out", str(run),
            "--no-progress", "--set", "model.num_layers=2", "--set", "train.steps=4",
            "--set", "train.warmup_steps=1", "--set", "train.eval_batches=1",
            "--set", "data.max_code_bytes=300000"]
    out = _cli(*args)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Validation bits per byte" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_devices"] == 8 and summary["mesh"] == "data=2,fsdp=4"
    assert summary["steps"] == 4
    again = _cli(*args)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    resumed = _cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_inspect_prints_memory_and_collectives():
    out = _cli("inspect", "--preset", "tiny", "--mesh", "fsdp=8", "--set", "model.num_layers=2", "--costs")
    assert out.returncode == 0, out.stderr
    assert "train step on mesh fsdp=8 (8 devices, recipe fsdp_tp_ep), per device:" in out.stdout
    assert "all-gather" in out.stdout and "parameters + optimizer" in out.stdout
    assert "nothing to check" in out.stdout       # no expert or tensor parallelism on fsdp=8
    args = [line for line in out.stdout.splitlines() if line.strip().startswith("argument bytes")]
    assert len(args) == 1 and args[0].split()[-1] == "1.000", out.stdout     # --costs: model == HLO
    ep = _cli("inspect", "--mesh", "data=2,expert=4", "--recipe", "ep", "--set", "model.num_layers=2",
              "--set", "moe.dispatch=capacity")
    assert ep.returncode == 0, ep.stderr
    row = [line for line in ep.stdout.splitlines() if "expert exchange" in line]
    assert len(row) == 1 and "all-to-all" in row[0]
    hlo, formula = row[0].split()[-4:-2], row[0].split()[-2:]
    assert hlo == formula, row                    # the HLO bytes equal the formula's
    bad = _cli("inspect", "--mesh", "data=3")
    assert bad.returncode == 2 and "parallel mesh" in bad.stderr

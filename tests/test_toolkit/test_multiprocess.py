"""Several JAX processes on one machine: the launcher, and training that matches one process.

    .venv/bin/pytest tests/test_toolkit/test_multiprocess.py
"""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toolkit.sharding.distributed import (
    COORDINATOR,
    NUM_PROCESSES,
    PROCESS_ID,
    child_env,
    free_port,
    initialize_from_env,
    launch,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--preset", "tiny", "--mesh", "data=2,expert=4", "--no-progress",
         "--set", "model.num_layers=2", "--set", "model.seq_len=32", "--set", "train.batch_size=8",
         "--set", "train.steps=3", "--set", "train.warmup_steps=1", "--set", "train.eval_batches=1",
         "--set", "data.max_code_bytes=100000"]


def _cli(*args):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", COORDINATOR, NUM_PROCESSES, PROCESS_ID)}
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _losses(run: Path) -> list:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.multiprocess
def test_two_processes_train_like_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    out = _cli("launch", "--processes", "2", "--", "train", *SMALL, "--out", str(two))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run written to") == 1          # process 0 alone reports
    single = _cli("train", *SMALL, "--out", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(_losses(two)) == 3
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["num_devices"] == 8 and summary["mesh"] == "data=2,expert=4"
    assert (two / "report.md").exists() and (two / "checkpoints" / "3").is_dir()
    # both processes restore the checkpoint they saved together
    again = _cli("launch", "--processes", "2", "--", "train", *SMALL, "--out", str(two),
                 "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "run written to" in again.stdout and len(_losses(two)) == 3


@pytest.mark.multiprocess
def test_two_processes_run_a_pipeline_like_one(tmp_path):
    """Pipeline stages on different processes: the ppermutes cross the process boundary."""
    mesh = ["--mesh", "pipeline=2,data=2,expert=2", "--set", "train.microbatches=2",
            "--set", "parallel.recipe=fsdp_ep"]
    args = [a for a in SMALL if a not in ("--mesh", "data=2,expert=4")] + mesh
    two, one = tmp_path / "two", tmp_path / "one"
    out = _cli("launch", "--processes", "2", "--", "train", *args, "--out", str(two))
    assert out.returncode == 0, out.stderr[-3000:]
    single = _cli("train", *args, "--out", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(_losses(two)) == 3
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)


def test_launch_stops_the_others_when_one_fails():
    script = ("import os, sys, time\n"
              f"if os.environ['{PROCESS_ID}'] == '1':\n"
              "    print('giving up', flush=True); sys.exit(3)\n"
              "time.sleep(120)\n")
    out = io.StringIO()
    t0 = time.monotonic()
    code = launch(["unused"], processes=3, devices=6, out=out, grace_s=2.0,
                  program=[sys.executable, "-c", script])
    assert code == 3
    assert time.monotonic() - t0 < 30
    assert "[process 1] giving up" in out.getvalue()
    assert "process 1 exited with code 3; stopping the others" in out.getvalue()


def test_launch_rejects_devices_that_do_not_split():
    with pytest.raises(ValueError, match="--devices 7 does not split evenly over --processes 2"):
        launch(["train"], processes=2, devices=7)
    with pytest.raises(ValueError, match="nothing to launch"):
        launch(["--"], processes=2)
    out = _cli("launch", "--processes", "3", "--", "train")
    assert out.returncode == 2 and "--devices 8 does not split evenly" in out.stderr


def test_child_env_gives_each_process_its_share():
    env = child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/d"},
                    coordinator="127.0.0.1:1234", num_processes=2, process_id=1, local_devices=4)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/d --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert (env[COORDINATOR], env[NUM_PROCESSES], env[PROCESS_ID]) == ("127.0.0.1:1234", "2", "1")
    kept = child_env({"JAX_PLATFORMS": "cuda"}, coordinator="h:1", num_processes=2,
                     process_id=0, local_devices=1)
    assert kept["JAX_PLATFORMS"] == "cuda"


def test_initialize_from_env_needs_all_three_variables():
    assert initialize_from_env({}) is False
    with pytest.raises(ValueError, match=f"{PROCESS_ID} not; set all three"):
        initialize_from_env({COORDINATOR: "127.0.0.1:1", NUM_PROCESSES: "2"})
    with pytest.raises(ValueError, match=f"{PROCESS_ID}=2 is outside 0..1"):
        initialize_from_env({COORDINATOR: "127.0.0.1:1", NUM_PROCESSES: "2", PROCESS_ID: "2"})


@pytest.mark.multiprocess
def test_auto_detects_a_slurm_job():
    """What `train --distributed` calls: srun's variables, faked here, are enough."""
    code = ("from toolkit.sharding.distributed import initialize_from_env\n"
            "assert initialize_from_env(auto=True)\n"
            "import jax\n"
            "print(jax.process_index(), jax.process_count(), jax.device_count())\n")
    base = {k: v for k, v in os.environ.items()
            if k not in (COORDINATOR, NUM_PROCESSES, PROCESS_ID)}
    base.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                JAX_COORDINATOR_PORT=str(free_port()), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                              env={**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-2000:]
    assert [o.split() for o, _ in outs] == [["0", "2", "4"], ["1", "2", "4"]]

"""Checkpoints: SIGKILL mid-save, exact resume, restore onto other meshes and pipeline
layouts, non-finite steps, and the clear refusals of a resume that cannot be exact."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import micro
from flax import nnx

from toolkit.cli import main
from toolkit.config import ConfigError, ParallelConfig, apply_overrides, preset, validate
from toolkit.training import NonFiniteError, Trainer
from toolkit.training.step import to_host

ROOT = Path(__file__).resolve().parents[2]
ONE = jax.devices()[:1]

# `python -m toolkit train`, whose Orbax save of step 4 writes every file into the tmp
# directory, then drops a marker and hangs before the rename, until the test kills it
_HANG_BEFORE_RENAME = """
import sys, time
from orbax.checkpoint._src.path import atomicity
from toolkit.cli import main
marker, rename = sys.argv[1], atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
    if self._final_path.name == "4":
        open(marker, "w").write(str(self._tmp_path))
        time.sleep(600)
    return await rename(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.exit(main(sys.argv[2:]))
"""

SETS = ["model.num_layers=2", "model.d_model=32", "model.head_dim=8", "model.d_ff=64",
        "moe.num_experts=4", "moe.d_expert=32", "model.seq_len=16", "train.batch_size=8",
        "train.steps=6", "train.warmup_steps=1", "train.checkpoint_every=2", "train.eval_every=0",
        "train.eval_batches=1", "data.max_code_bytes=300000"]


def _train(mesh: str, run: Path) -> list:
    return ["train", "--mesh", mesh, "--no-progress", "--out", str(run),
            *[a for s in SETS for a in ("--set", s)]]


def _train_records(run: Path) -> list:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("split") != "val"]


def test_sigkill_mid_save_then_resume_exactly_on_any_mesh(tmp_path, capsys):
    run, marker, log = tmp_path / "run", tmp_path / "saving", tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _HANG_BEFORE_RENAME, str(marker),
                                 *_train("data=2,expert=4", run)], cwd=ROOT, env=env, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), log.read_text()[-2000:]
    finally:
        proc.kill()                                         # SIGKILL mid-save of step 4
        proc.wait()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4.orbax-checkpoint-tmp"]
    before = _train_records(run)
    assert [r["step"] for r in before] == [1, 2, 3, 4]      # steps 3, 4 ran past the checkpoint
    expect = [r["loss"] for r in before[2:]]

    # the same mesh: bit-identical; other meshes (the state resharded as it is read): 1e-5
    cfg, seen = apply_overrides(preset("tiny"), SETS), []
    for name, parallel, devices in (("same", ParallelConfig(data=2, expert=4), None),
                                    ("data=8", ParallelConfig(data=8), None),
                                    ("1 device", ParallelConfig(data=1), ONE)):
        copy = tmp_path / name
        shutil.copytree(run, copy)
        t = Trainer(dataclasses.replace(cfg, parallel=parallel), out_dir=copy, resume=True,
                    devices=devices, progress=False)
        got = [t.train_step()["loss"], t.train_step()["loss"]]
        seen.append(f"{name}: steps 3, 4 {got} vs {expect}")
        if name == "same":
            assert got == expect, "bit-identical"
            assert [r["step"] for r in _train_records(copy)] == [1, 2, 3, 4], "none lost or repeated"
            assert not (copy / "checkpoints" / "4.orbax-checkpoint-tmp").exists(), "cleaned on open"
        else:
            np.testing.assert_allclose(got, expect, rtol=1e-5)
            assert "the checkpoint is resharded onto the new mesh" in capsys.readouterr().err

    # the command line: --resume --mesh runs the rest of the run on another mesh
    assert main(_train("fsdp=2,tensor=2,expert=2", run) + ["--resume"]) == 0
    after = _train_records(run)
    seen.append(f"fsdp=2,tensor=2,expert=2: steps 3, 4 {[r['loss'] for r in after[2:4]]} vs {expect}")
    print("\n".join(seen))
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6], "no lost or repeated steps"
    np.testing.assert_allclose([r["loss"] for r in after[2:4]], expect, rtol=1e-5)
    assert json.loads((run / "config.json").read_text())["parallel"]["tensor"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "6"]


def _refused(cfg, out_dir, match, devices=ONE):
    with pytest.raises(ConfigError, match=match) as e:
        Trainer(cfg, out_dir=out_dir, resume=True, devices=devices, progress=False)
    print(e.value)


def test_resumes_that_cannot_be_exact_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.nonfinite='maybe' is unknown; use 'skip' or 'stop'"):
        validate(micro(train={"nonfinite": "maybe"}))
    with pytest.raises(ConfigError, match="train.max_skipped_steps=0 must be a positive integer"):
        validate(micro(train={"max_skipped_steps": 0}))
    _refused(micro(), tmp_path / "nothing", r"--resume: '.*nothing' holds no run \(no config.json\); "
                                            r"drop --resume to start a new run there")
    assert main(_train("data=8", tmp_path / "nothing") + ["--resume"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --resume: '{tmp_path / 'nothing'}' holds no run")
    text = tmp_path / "notes.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 2000)
    data = {"corpus": "paths", "paths": (str(text),)}
    cfg = micro(data=data, train={"microbatches": 2})
    Trainer(cfg, out_dir=tmp_path / "run", devices=ONE, progress=False).save_checkpoint()
    _refused(micro(data=data, train={"microbatches": 2, "learning_rate": 1e-2}),
             tmp_path / "run", r"config differs .*\(train.learning_rate: saved 0.003, given 0.01\); .*"
                               r"only parallel.\* and train.nonfinite/max_skipped_steps may change")
    text.write_text("def f(x):\n    return x + 2\n" * 2000)        # same length, other bytes
    _refused(cfg, tmp_path / "run", r"the data stream of the checkpoint at step 0 .* differs \(corpus "
                                    r"train/notes.txt: saved \d+:\w+, now \d+:\w+ \(tokens:hash\)")
    text.write_text("def f(x):\n    return x + 1\n" * 2000)
    for p in (tmp_path / "run/checkpoints/0/state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[:10])              # arrays cut short on disk
    _refused(cfg, tmp_path / "run", r"checkpoint step 0 in .*checkpoints cannot be restored \(ValueError: "
                                    r".*\); "
                                    r"delete .*checkpoints/0 to resume from the step before it")


def _listed(tree: dict) -> dict:
    """`{path: array}` of a pure state dict, stacked blocks (`stages/blocks/j`, `[v, p, ...]`)
    spelled as the listed blocks they hold (block (r*p + s)*per + j is `[r, s]` of j)."""
    flat = {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    out = {}
    for path, x in flat.items():
        if "stages" not in path:
            out[path] = x
            continue
        i = path.index("stages")
        per = 1 + max(q[i + 2] for q in flat if q[:i + 1] == path[:i + 1])
        v, p = x.shape[:2]
        for r in range(v):
            for s in range(p):
                out[path[:i] + ("blocks", (r * p + s) * per + path[i + 2]) + path[i + 3:]] = x[r, s]
    return out


@pytest.mark.parametrize("src, dst", [("listed", "pipelined"), ("pipelined", "listed")])
def test_resume_converts_between_listed_and_pipelined_blocks(tmp_path, src, dst):
    base = micro(model={"num_layers": 4}, train={"microbatches": 2, "batch_size": 16})
    piped = ParallelConfig(pipeline=2, virtual_stages=2, schedule="interleaved", data=4)
    layouts = {"listed": dataclasses.replace(base, parallel=ParallelConfig(data=8)),
               "pipelined": dataclasses.replace(base, parallel=piped)}     # [v=2, p=2] of 1 block
    t = Trainer(layouts[src], out_dir=tmp_path, progress=False)
    rng = np.random.default_rng(0)          # moments and parameters that differ everywhere
    t.state = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype)
                           if x.dtype == np.float32 else x, t.state)
    t.save_checkpoint()
    saved = _listed(nnx.to_pure_dict(to_host(t.state)))
    resumed = Trainer(layouts[dst], out_dir=tmp_path, resume=True, progress=False)
    got = _listed(nnx.to_pure_dict(to_host(resumed.state)))
    assert sorted(got) == sorted(saved) and len(got) > 40
    for path, x in saved.items():
        np.testing.assert_array_equal(got[path], x, err_msg=str(path))
    assert resumed.model().stages is not None if dst == "pipelined" else resumed.model().blocks is not None


def _poison(state):
    """The state with its first floating parameter set to NaN (a diverged weight)."""
    leaves, treedef = jax.tree.flatten(state)
    i = next(i for i, x in enumerate(leaves) if x.dtype == np.float32 and x.ndim >= 1)
    leaves[i] = leaves[i] * np.nan
    return jax.tree.unflatten(treedef, leaves)


def test_non_finite_steps_are_skipped_or_stop_the_run(tmp_path, capsys):
    cfg = micro(train={"steps": 8, "warmup_steps": 1, "max_skipped_steps": 2})
    t = Trainer(cfg, out_dir=tmp_path, devices=ONE, progress=False)
    t.train_step()
    t.save_checkpoint()
    good = to_host(t.state)
    t.state = _poison(t.state)
    poisoned = to_host(t.state)
    rec = t.train_step()
    assert rec["skipped"] and np.isnan(rec["loss"]) and t.skipped_steps == 1
    for a, b in zip(jax.tree.leaves(to_host(t.state)), jax.tree.leaves(poisoned), strict=True):
        np.testing.assert_array_equal(a, b)                 # nothing moved, NaN stays where it was
    with pytest.raises(NonFiniteError, match="step 2: the model or optimizer state holds NaN or inf, "
                                             "so no checkpoint is saved; the last one is step 1"):
        t.save_checkpoint()
    t.state = jax.tree.map(lambda h, x: jax.device_put(h, x.sharding), good, t.state)
    assert not t.train_step()["skipped"] and t.skipped_in_a_row == 0       # one bad step, then on
    t.state = _poison(t.state)
    t.train_step()
    with pytest.raises(NonFiniteError, match=r"step 5: the loss is nan and the gradient norm is nan, "
                                             r"so its update was skipped; 2 steps in a row were skipped "
                                             r"\(train.max_skipped_steps=2\) ends the run"):
        t.train_step()
    stop = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, nonfinite="stop"))
    t.cfg = stop                     # only the loop reads train.nonfinite, not the compiled step
    with pytest.raises(NonFiniteError) as e:
        t.run()
    assert str(e.value).startswith("step 6: the loss is nan and the gradient norm is nan, so its "
                                   "update was skipped; train.nonfinite='stop' ends the run; "
                                   "the last checkpoint, step 1 in ")
    assert [r["skipped"] for r in _train_records(tmp_path)] == [False, True, False, True, True, True]

    resumed = Trainer(stop, out_dir=tmp_path, resume=True, devices=ONE, progress=False)
    assert resumed.step_num == 1 and len(resumed.history) == 1
    for a, b in zip(jax.tree.leaves(to_host(resumed.state)), jax.tree.leaves(good), strict=True):
        np.testing.assert_array_equal(a, b)                 # the last good checkpoint, whole
    assert "train.nonfinite: saved 'skip', given 'stop'" in capsys.readouterr().err
    print(e.value)

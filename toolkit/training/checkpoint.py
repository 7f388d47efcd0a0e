"""Checkpoints with Orbax: atomic, keep-last-N, restored straight onto the mesh.

Orbax writes each step to a temporary directory and renames it when complete, so a
crash mid-save never leaves a half checkpoint that looks whole. A checkpoint holds the
model + optimizer state and a small JSON record (step, config), which is all an exact
resume needs, because batches are a pure function of (seed, step).

    ckpt = Checkpointer(run_dir / "checkpoints", keep=2)
    ckpt.save(step, state, {"config": cfg.to_dict()})
    state, meta = ckpt.restore(abstract_state(cfg, mesh))      # latest step
"""

from pathlib import Path

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self) -> list:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) at `step` (default: the latest), laid out like `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()

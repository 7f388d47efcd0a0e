"""Checkpoints with Orbax: atomic, keep-last-N, restored straight onto any mesh.

Orbax writes step N into `N.orbax-checkpoint-tmp` and renames it to `N` once every file
is written, so a process killed mid-save (even by SIGKILL) leaves the previous steps
whole and a tmp directory that `latest_step()` never lists; opening the directory again
removes such leftovers. A checkpoint holds the model + optimizer state and a small JSON
record (step, config, the data stream's identity), which is all an exact resume needs.

    ckpt = Checkpointer(run_dir / "checkpoints", keep=2)
    ckpt.save(step, state, {"step": step, "data": data_stream(cfg, corpus)})
    state, meta = ckpt.restore(abstract_state(cfg, mesh))      # latest step, on `mesh`

Restoring reads each array straight into the shardings of the abstract state it is given,
so a run saved on `data=2,expert=4` continues on `fsdp=8` or on one device (elastic
resharding). A pipeline stores its blocks stacked `[v, p, ...]` instead of listed;
`restore_relaid` reads a checkpoint of one layout into another (through replicated
arrays, so it needs the whole state in each device's memory once).

The data stream: batch n is a pure function of (seed, n, batch size, sequence length,
domain weights, corpus tokens) (`toolkit.data.Batches`), so the step and the config fix
every future batch provided the corpus is the same. The config cannot see the corpus (a
file under `data.paths` may change between runs), so `data_stream` records a fingerprint
of it, and `check_data_stream` refuses to resume when it differs.
"""

import hashlib
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from toolkit.config import Config, ConfigError
from toolkit.models.transformer import pipeline_chunks, stacked_blocks_state
from toolkit.training.step import abstract_state

_SAMPLE_TOKENS = 1 << 16     # tokens hashed at each end of a stream, and strided through it


def corpus_fingerprint(corpus) -> dict:
    """`{"train/prose": "<tokens>:<sha256 prefix>", ...}`: each stream's length and a hash of
    its first and last 64Ki tokens and 64Ki tokens strided through it. Cheap on a corpus
    of gigabytes; it catches a corpus that grew, shrank, or changed at either end or at
    one of the sampled positions, not every edit of equal length in the middle."""
    out = {}
    for split, per in corpus.streams.items():
        for dom, stream in per.items():
            s = np.ascontiguousarray(stream, dtype=np.int32)
            stride = max(1, len(s) // _SAMPLE_TOKENS)
            h = hashlib.sha256()
            for part in (s[:_SAMPLE_TOKENS], s[-_SAMPLE_TOKENS:], s[::stride]):
                h.update(np.ascontiguousarray(part).tobytes())
            out[f"{split}/{dom}"] = f"{len(s)}:{h.hexdigest()[:16]}"
    return out


def data_stream(cfg: Config, corpus) -> dict:
    """What fixes the batches of every step: the sampling config and the corpus fingerprint."""
    return {"seed": cfg.train.seed, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.model.seq_len, "domain_weights": list(cfg.data.domain_weights),
            "corpus": corpus_fingerprint(corpus)}


def check_data_stream(saved: dict, now: dict, step: int, where) -> None:
    """Raise `ConfigError` naming what changed if `now` would not replay `saved`'s batches."""
    changed = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in now
               if k != "corpus" and saved.get(k) != now[k]]
    before, after = saved.get("corpus", {}), now["corpus"]
    changed += [f"corpus {name}: saved {before.get(name, 'absent')}, now {after.get(name, 'absent')} "
                f"(tokens:hash)" for name in sorted(set(before) | set(after))
                if before.get(name) != after.get(name)]
    if changed:
        raise ConfigError(f"--resume: the data stream of the checkpoint at step {step} in {where} "
                          f"differs ({'; '.join(changed)}); the batches after step {step} would not "
                          f"be the ones an uninterrupted run sees. Resume with the same corpus and "
                          f"data settings, or start a new --out")


def listed_blocks_state(tree: dict, v: int, p: int) -> dict:
    """The inverse of `stacked_blocks_state`: `stages/blocks/j` with leaves `[v, p, ...]`
    becomes `blocks/i`, block i = (r*p + s)*per + j of chunk `[r, s]`."""
    stacked = tree["stages"]["blocks"]
    per = len(stacked)
    blocks = {(r * p + s) * per + j: jax.tree.map(lambda a, r=r, s=s: a[r, s], stacked[j])
              for r in range(v) for s in range(p) for j in range(per)}
    out = {k: val for k, val in tree.items() if k != "stages"}
    return dict(out, blocks=dict(sorted(blocks.items())))


def _relayout(tree, key: str, fn):
    """`fn` applied to every dict of `tree` holding `key` (the model and each Adam moment)."""
    if not isinstance(tree, dict):
        return tree
    if key in tree:
        return fn(tree)
    return {k: _relayout(val, key, fn) for k, val in tree.items()}


def restore_relaid(checkpointer, saved: Config, cfg: Config, mesh, step: int | None = None):
    """(state, meta) of a checkpoint written under `saved` (its blocks listed, or stacked by
    its pipeline), laid out for `cfg` on `mesh`: parameters and optimizer moments alike."""
    replicated = NamedSharding(mesh, P())
    source = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract_state(saved, mesh))
    state, meta = checkpointer.restore(source, step)
    tree = nnx.to_pure_dict(state)
    v0, p0, _ = pipeline_chunks(saved)
    v1, p1, _ = pipeline_chunks(cfg)
    if p0 > 1:
        tree = _relayout(tree, "stages", lambda t: listed_blocks_state(t, v0, p0))
    if p1 > 1:
        tree = _relayout(tree, "blocks", lambda t: stacked_blocks_state(t, v1, p1))
    target = abstract_state(cfg, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, target)
    nnx.replace_by_pure_dict(target, tree)
    return jax.tree.map(jax.device_put, target, shardings), meta


class Checkpointer:
    """The Orbax steps of one run's `checkpoints/`: the last `keep` complete ones."""

    def __init__(self, directory, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True))

    def latest_step(self):
        """The newest complete step, or None (half-written tmp directories never count)."""
        return self.manager.latest_step()

    def all_steps(self) -> list:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) at `step` (default: the latest), laid out like `abstract_state`
        (its shapes, dtypes and shardings). A checkpoint that cannot be read raises
        `ConfigError` naming the step and directory."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {self.directory}; train first, or resume a run "
                              f"that saved one (train.checkpoint_every)")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ConfigError(f"checkpoint step {step} in {self.directory} cannot be restored "
                              f"({type(e).__name__}: {first}); delete {self.directory / str(step)} "
                              f"to resume from the step before it, or start a new --out") from e
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.close()

"""The training loop: validate, build the mesh and model, step, evaluate, checkpoint, report.

A `Trainer` runs step by step, so a notebook can draw between steps and stop at will,
while `run()` is the whole job the CLI uses:

    trainer = Trainer(cfg, out_dir="runs/tiny")           # validates before compiling
    rec = trainer.advance()                               # one step (+ scheduled eval/checkpoint)
    summary = trainer.run()                               # to cfg.train.steps, then report

A run directory holds `config.json`, `metrics.jsonl` (one line per logged step and per
validation pass), `checkpoints/`, and at the end `summary.json`, PNG plots and
`report.md`. An existing run is never overwritten: pass `resume=True` to continue it
from its latest checkpoint, exactly where an uninterrupted run would be (the same losses,
bit for bit, on the same mesh). A resume may change only `parallel.*` (the mesh: the state
is resharded onto the new one as it is read, its blocks converted between listed and
stacked when the pipeline changes) and `train.nonfinite`/`max_skipped_steps`; the new
config is written to `config.json`. The checkpoint also records the data stream
(`toolkit.training.checkpoint.data_stream`), and a resume over a changed corpus is refused.

A step whose loss or gradient norm is not finite is skipped inside the compiled step (the
state stays as it was, see `make_train_step`); `train.nonfinite` says whether the run goes
on ("skip", up to `train.max_skipped_steps` in a row) or stops ("stop") with a
`NonFiniteError` that names the step.

In a multi-process run (`jax.distributed`, see `toolkit.sharding.distributed`) every
process runs the same loop: each builds the whole global batch (a pure function of seed
and step) and places its own devices' slices, and all save checkpoints together, while
only process 0 writes the other run files and shows the progress bar.
"""

import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from toolkit.analysis import (
    count_params,
    domain_mutual_information,
    domain_preferences,
    flops_per_token,
    inter_layer_affinity,
    inter_layer_mutual_information,
    load_cv,
    load_fractions,
    load_imbalance,
)
from toolkit.config import Config, ConfigError, from_dict, validate
from toolkit.data import Batches, load_corpus, unigram_bits_per_byte
from toolkit.models.transformer import moe_layer_indices, pipeline_chunks
from toolkit.precision import describe_mode
from toolkit.sharding.mesh import MESH_AXES, batch_sharding, make_mesh, rules_for
from toolkit.training.checkpoint import Checkpointer, check_data_stream, data_stream, restore_relaid
from toolkit.training.init_from import place_params
from toolkit.training.report import render_report
from toolkit.training.step import (
    abstract_state,
    graphdef_of,
    init_state,
    learning_rate,
    make_eval_step,
    make_train_step,
    to_host,
)
from toolkit.viz import plots


class NonFiniteError(RuntimeError):
    """A run ended because a step's loss or gradient norm was NaN or infinite."""


# config keys a resume may change: the mesh, and what to do about non-finite steps
_RESUMABLE = ("parallel.", "train.nonfinite", "train.max_skipped_steps")


@jax.jit
def _all_finite(state) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# (record key, step metric) of the per-layer router metrics logged each step
_ROUTER_METRICS = (("load_balance_loss", "load_balance_loss"), ("seq_balance_loss", "seq_balance_loss"),
                   ("z_loss", "z_loss"), ("drop_rate", "dropped_fraction"),
                   ("router_entropy", "router_entropy"), ("tsallis_entropy", "tsallis_entropy"),
                   ("experts_per_token", "experts_per_token"),
                   ("activation_zeros", "activation_zeros"), ("expert_counts", "expert_counts"),
                   ("computed_counts", "computed_counts"))


def _flat(cfg: Config):
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            yield from ((f"{key}.{k}", v) for k, v in value.items())
        else:
            yield key, value


class Trainer:
    """One training run over a mesh; its state is plain values a notebook can read.

    Attributes:
      cfg: the validated config.
      mesh: the device mesh built from `cfg.parallel`.
      step_num: optimizer steps done.
      history: one metrics dict per step (host floats and lists).
      val_history: one record per validation pass (loss and bits/byte per domain, counts).
      out_dir: the run directory, or None to write nothing.
      writes_files: whether this process writes run files (process 0 of a multi-process run).
    """

    def __init__(self, cfg: Config, *, out_dir=None, resume: bool = False, devices=None,
                 progress: bool = True, init_params=None):
        """`init_params`: model weights to start from instead of the random init (a nested
        dict as `toolkit.interop.load_hf_params` returns; `toolkit.training.init_from`)."""
        devices = list(devices if devices is not None else jax.devices())
        validate(cfg, len(devices))
        self.corpus = load_corpus(cfg.data)
        validate(cfg, len(devices), domain_tokens=self.corpus.num_tokens())
        self.cfg, self.progress = cfg, progress
        self.out_dir = Path(out_dir) if out_dir else None
        self.writes_files = jax.process_index() == 0
        self.batches = Batches(self.corpus, seq_len=cfg.model.seq_len,
                               batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                               domain_weights=cfg.data.domain_weights)
        self.mesh = make_mesh(cfg.parallel, devices)
        self.moe_layers = moe_layer_indices(cfg)
        self.history, self.val_history = [], []
        self.step_num, self.compile_seconds, self.train_seconds = 0, 0.0, 0.0
        self.skipped_steps, self.skipped_in_a_row = 0, 0
        self.data_stream = data_stream(cfg, self.corpus)
        self._compiled, self._relaid_from = None, None
        self.checkpointer = self._open_run_dir(resume)
        if resume and self.checkpointer and self.checkpointer.latest_step() is not None:
            if self._relaid_from is not None:       # a pipeline added, removed or reshaped
                self.state, meta = restore_relaid(self.checkpointer, self._relaid_from, cfg, self.mesh)
            else:
                self.state, meta = self.checkpointer.restore(abstract_state(cfg, self.mesh))
            self.graphdef = graphdef_of(cfg)
            self.step_num = int(meta["step"])
            if "data" in meta:          # checkpoints written before the data record lack it
                check_data_stream(meta["data"], self.data_stream, self.step_num,
                                  self.checkpointer.directory)
            self.skipped_steps = int(meta.get("skipped_steps", 0))
            self.compile_seconds = float(meta.get("compile_seconds", 0.0))
            self.train_seconds = float(meta.get("train_seconds", 0.0))
            self._reload_metrics()
        else:
            self.graphdef, self.state = init_state(cfg, self.mesh)
            if init_params is not None:
                self.state = place_params(cfg, self.state, init_params)
            if self.out_dir is not None:
                self._reload_metrics()      # a resumed run without checkpoints starts clean
        self.train_fn = make_train_step(cfg, self.graphdef, self.mesh, self.state)
        self.eval_fn = make_eval_step(cfg, self.graphdef, self.mesh, self.state,
                                      len(self.corpus.domains))

    # -- run directory -------------------------------------------------------------------
    def _open_run_dir(self, resume: bool):
        if self.out_dir is None:
            return None
        ckpt_dir = self.out_dir / "checkpoints"
        config_path = self.out_dir / "config.json"
        if config_path.exists() and not resume:
            raise ConfigError(f"run directory {str(self.out_dir)!r} already holds a run; pass "
                              f"--resume to continue it, or choose another --out")
        if resume and not config_path.exists():
            raise ConfigError(f"--resume: {str(self.out_dir)!r} holds no run (no config.json); "
                              f"drop --resume to start a new run there, or give the --out of an "
                              f"existing run")
        if config_path.exists():
            self._check_resumable(from_dict(json.loads(config_path.read_text())), config_path)
        if jax.process_count() > 1:     # every process has checked before process 0 writes
            multihost_utils.sync_global_devices("toolkit: run directory checked")
        if self.writes_files:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(config_path, self.cfg.to_json())
        return Checkpointer(ckpt_dir, keep=self.cfg.train.keep_checkpoints)

    def _check_resumable(self, saved: Config, config_path: Path) -> None:
        """Refuse a resume that changes more than the mesh; note a mesh change, and a change
        of pipeline layout (blocks listed or stacked), which the restore converts."""
        before, after = dict(_flat(saved)), dict(_flat(self.cfg))
        diff = {k: f"{k}: saved {before[k]!r}, given {after[k]!r}" for k in before
                if before[k] != after[k]}
        fixed = [d for k, d in diff.items() if not k.startswith(_RESUMABLE)]
        if fixed:
            raise ConfigError(f"--resume: the config differs from {config_path} ({', '.join(fixed)}); "
                              f"resume with the same --preset/--set values (only parallel.* and "
                              f"train.nonfinite/max_skipped_steps may change), or start a new --out")
        if pipeline_chunks(saved)[:2] != pipeline_chunks(self.cfg)[:2]:
            self._relaid_from = saved
        if diff and self.writes_files:
            mesh = any(k.startswith("parallel.") for k in diff)
            print(f"note: resuming {self.out_dir} with {'; '.join(diff.values())}; "
                  f"{'the checkpoint is resharded onto the new mesh, and ' if mesh else ''}"
                  f"config.json records the new values", file=sys.stderr)

    def _reload_metrics(self):
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash mid-write
                continue
            if rec["step"] <= self.step_num:
                kept.append(line)
                (self.val_history if rec.get("split") == "val" else self.history).append(rec)
        if self.writes_files:
            _write_atomic(path, "".join(k + "\n" for k in kept))

    def _log(self, rec: dict):
        if self.out_dir is not None and self.writes_files:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # -- steps ---------------------------------------------------------------------------
    def _device_batch(self, batch: dict) -> dict:
        """The global batch as sharded arrays (as the steps take them); each process fills
        only its own devices."""
        sh = batch_sharding(self.mesh, rules_for(self.cfg.parallel))
        return {k: jax.make_array_from_callback(v.shape, sh, lambda index, v=v: v[index])
                for k, v in batch.items()}

    def train_step(self) -> dict:
        """Run one optimizer step; return its metrics as host values (also logged)."""
        batch = self._device_batch(self.batches.train(self.step_num))
        if self._compiled is None:
            t0 = time.perf_counter()
            with jax.set_mesh(self.mesh):
                self._compiled = self.train_fn.lower(self.state, batch).compile()
            self.compile_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        new_state, metrics = self._compiled(self.state, batch)
        m = to_host(metrics)
        self.state, self.step_num = new_state, self.step_num + 1   # they move together
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        skipped = bool(m["skipped"])
        rec = {"step": self.step_num, "loss": float(m["loss"]), "ce": float(m["ce"]),
               "grad_norm": float(m["grad_norm"]),
               "lr": learning_rate(self.cfg, self.step_num - 1 - self.skipped_steps),
               "tokens_per_s": self.cfg.train.batch_size * self.cfg.model.seq_len / dt,
               "skipped": skipped}
        if "expert_counts" in m:
            rec.update({key: m[name].tolist() for key, name in _ROUTER_METRICS})
        if "mtp_ce" in m:
            rec["mtp_ce"] = m["mtp_ce"].tolist()
        self.history.append(rec)
        if skipped or self.step_num % self.cfg.train.log_every == 0 or \
                self.step_num == self.cfg.train.steps:
            self._log(rec)
        self.skipped_steps += skipped
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if skipped:
            self._on_nonfinite(rec, m)
        return rec

    def _on_nonfinite(self, rec: dict, m: dict) -> None:
        """After a skipped step: stop if `train.nonfinite` or `max_skipped_steps` says so."""
        t = self.cfg.train
        if t.nonfinite == "skip" and self.skipped_in_a_row < t.max_skipped_steps:
            return
        bad = " and ".join(f"the {name} is {rec[key]}" for name, key, ok in
                           (("loss", "loss", "loss_finite"), ("gradient norm", "grad_norm", "grads_finite"))
                           if not m[ok])
        why = ("train.nonfinite='stop'" if t.nonfinite == "stop" else
               f"{self.skipped_in_a_row} steps in a row were skipped (train.max_skipped_steps="
               f"{t.max_skipped_steps})")
        last = self.checkpointer.latest_step() if self.checkpointer is not None else None
        keep = (f"the last checkpoint, step {last} in {self.checkpointer.directory}, holds the state "
                f"before it; continue with --resume (train.nonfinite and max_skipped_steps may change)"
                if last is not None else "no checkpoint was saved")
        raise NonFiniteError(f"step {self.step_num}: {bad}, so its update was skipped; {why} ends "
                             f"the run; {keep}")

    def model(self):
        """The current model (a `Transformer` over the trained parameters)."""
        return nnx.merge(self.graphdef, self.state)[0]

    def evaluate(self) -> dict:
        """Validation loss and bits per byte per domain, and expert counts per domain."""
        sums = None
        for _, batch in self.batches.validation(self.cfg.train.eval_batches):
            with jax.set_mesh(self.mesh):
                out = to_host(self.eval_fn(self.state, self._device_batch(batch)))
            sums = out if sums is None else jax.tree.map(np.add, sums, out)
        doms = self.corpus.domains
        rec = {"step": self.step_num, "split": "val",
               "val_loss": {d: float(sums["nats"][i] / sums["tokens"][i]) for i, d in enumerate(doms)},
               "val_bits_per_byte": {d: float(sums["byte_nats"][i] / sums["bytes"][i] / np.log(2))
                                     for i, d in enumerate(doms)},
               "val_loss_all": float(sums["nats"].sum() / sums["tokens"].sum())}
        if "domain_counts" in sums:
            rec["domain_counts"] = sums["domain_counts"].tolist()
            rec["affinity_counts"] = sums["affinity_counts"].tolist()
        self.val_history.append(rec)
        self._log(rec)
        return rec

    def save_checkpoint(self) -> None:
        """Save the state and what resuming needs; never a state holding NaN or inf."""
        if self.checkpointer is None:
            return
        if not bool(_all_finite(self.state)):
            raise NonFiniteError(f"step {self.step_num}: the model or optimizer state holds NaN or "
                                 f"inf, so no checkpoint is saved; the last one is step "
                                 f"{self.checkpointer.latest_step()} in {self.checkpointer.directory}")
        self.checkpointer.save(self.step_num, self.state, {
            "step": self.step_num, "compile_seconds": self.compile_seconds,
            "train_seconds": self.train_seconds, "skipped_steps": self.skipped_steps,
            "data": self.data_stream, "config": self.cfg.to_dict()})

    def advance(self) -> dict:
        """One step plus what the schedule asks for at it: validation and checkpoint.

        Returns the step's metrics; when validation ran, its record is under `"val"`.
        """
        t = self.cfg.train
        rec = self.train_step()
        if t.eval_every and self.step_num % t.eval_every == 0 and self.step_num < t.steps:
            rec = {**rec, "val": self.evaluate()}
        if t.checkpoint_every and self.step_num % t.checkpoint_every == 0:
            self.save_checkpoint()
        return rec

    def run(self, callback=None) -> dict:
        """Train to `train.steps` (evaluating and checkpointing on schedule), then finish."""
        t = self.cfg.train
        bar = None
        if self.progress and self.writes_files:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.steps, initial=self.step_num, desc=self.cfg.name, unit="step")
        try:
            while self.step_num < t.steps:
                rec = self.advance()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['ce']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}")
                if callback is not None and callback(self, rec) is False:
                    break
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        finally:
            if bar is not None:
                bar.close()
        return self.finish()

    def _save_on_interrupt(self) -> None:
        """Ctrl-C: keep the work done so far, unless the step in flight consumed the state.

        Not in a multi-process run: the processes may stop at different points, and a save
        that only some of them join would hang; the scheduled checkpoints remain.
        """
        if jax.process_count() > 1:
            return
        alive = not any(x.is_deleted() for x in jax.tree.leaves(self.state))
        if self.checkpointer is not None and alive and \
                self.checkpointer.latest_step() != self.step_num:
            self.save_checkpoint()

    # -- the end of a run ----------------------------------------------------------------
    def summary(self) -> dict:
        cfg, hist = self.cfg, self.history
        if not self.val_history or self.val_history[-1]["step"] != self.step_num:
            self.evaluate()
        val = self.val_history[-1]
        total, active = count_params(cfg)
        sizes = cfg.parallel.axis_sizes(self.mesh.size)
        timed = hist[1:] if len(hist) > 1 else hist
        good = [h["ce"] for h in hist if not h.get("skipped")]      # skipped steps' CE may be NaN
        s = {"name": cfg.name, "steps": self.step_num,
             "tokens_seen": self.step_num * cfg.train.batch_size * cfg.model.seq_len,
             "mesh": ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes[a] > 1) or "1 device",
             "recipe": cfg.parallel.recipe, "num_devices": self.mesh.size,
             "platform": jax.devices()[0].platform,
             "params_total": total, "params_active": active,
             "final_train_ce": float(np.mean(good[-10:])) if good else None,
             "final_val_loss": val["val_loss_all"], "val_loss": val["val_loss"],
             "val_bits_per_byte": val["val_bits_per_byte"],
             "unigram_bits_per_byte": unigram_bits_per_byte(self.corpus),
             "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in timed])) if timed else 0.0,
             "compile_seconds": self.compile_seconds, "domains": list(self.corpus.domains),
             "precision_mode": describe_mode(cfg.precision),
             "moe_layers": self.moe_layers}
        if self.moe_layers and hist:
            tail = hist[-max(10, len(hist) // 10):]
            counts_le = np.sum([h["expert_counts"] for h in tail], axis=0)
            computed_le = np.sum([h.get("computed_counts", h["expert_counts"]) for h in tail], axis=0)
            tokens = len(tail) * cfg.train.batch_size * cfg.model.seq_len
            mean = lambda key: np.mean([h.get(key, np.zeros(len(self.moe_layers))) for h in tail],
                                       axis=0).tolist()
            s.update(expert_counts=counts_le.tolist(), computed_counts=computed_le.tolist(),
                     tokens_counted=tokens,
                     expert_load=load_fractions(counts_le).tolist(),
                     load_imbalance=load_imbalance(counts_le).tolist(),
                     load_cv=load_cv(counts_le).tolist(),
                     drop_rate=mean("drop_rate"), router_entropy=mean("router_entropy"),
                     experts_per_token=mean("experts_per_token"),
                     activation_zeros=mean("activation_zeros"),
                     ffn_flops_per_token=flops_per_token(cfg, computed_le, tokens).tolist(),
                     domain_counts=val["domain_counts"],
                     domain_preferences=domain_preferences(val["domain_counts"], self.corpus.domains),
                     domain_mutual_information=domain_mutual_information(
                         val["domain_counts"]).tolist(),
                     affinity=inter_layer_affinity(val["affinity_counts"]).tolist(),
                     inter_layer_mutual_information=inter_layer_mutual_information(
                         val["affinity_counts"]).tolist())
        return s

    def finish(self) -> dict:
        """Evaluate, checkpoint, and write summary.json, plots and report.md."""
        s = self.summary()
        if self.out_dir is not None:
            if self.checkpointer.latest_step() != self.step_num:
                self.save_checkpoint()
        if self.out_dir is not None and self.writes_files:
            _write_atomic(self.out_dir / "summary.json", json.dumps(s, indent=2))
            plots.save(plots.loss_curves(self.history, self.val_history), self.out_dir / "loss.png")
            if self.moe_layers:
                names = [f"L{i}" for i in self.moe_layers]
                plots.save(plots.expert_load_heatmap(s["expert_counts"], layer_names=names),
                           self.out_dir / "expert_load.png")
                plots.save(plots.domain_preference_heatmap(s["domain_counts"], s["domains"],
                                                           layer_names=names),
                           self.out_dir / "domain_preference.png")
            _write_atomic(self.out_dir / "report.md", render_report(s, with_plots=True))
        return s


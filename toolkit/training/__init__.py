"""Training: loss and steps, the Trainer loop, Orbax checkpoints and the run report.

    trainer = Trainer(cfg, out_dir="runs/tiny")
    summary = trainer.run()
"""

from toolkit.training.checkpoint import Checkpointer, corpus_fingerprint, data_stream
from toolkit.training.report import render_report
from toolkit.training.step import (
                                   abstract_state,
                                   init_state,
                                   loss_fn,
                                   make_eval_step,
                                   make_optimizer,
                                   make_train_step,
)
from toolkit.training.trainer import NonFiniteError, Trainer

__all__ = ["Checkpointer", "NonFiniteError", "Trainer", "abstract_state", "corpus_fingerprint",
           "data_stream", "init_state", "loss_fn",
           "make_eval_step", "make_optimizer", "make_train_step", "render_report"]

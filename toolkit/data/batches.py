"""Deterministic batches: the batch of step n depends only on (seed, n).

Each row is a window of `seq_len + 1` tokens from one domain's stream; `domain` labels
every token with its domain index, so losses and routing can be split by domain. Since
batches are a pure function of the step, resuming at step n replays exactly the batches
an uninterrupted run would have seen.

    batches = Batches(corpus, seq_len=128, batch_size=32, seed=0)
    b = batches.train(step=7)     # {"tokens", "targets", "domain"}: int32 [32, 128]
    for dom, b in batches.validation(num_batches=4): ...   # fixed windows per domain
"""

import numpy as np

from toolkit.config import ConfigError
from toolkit.data.corpus import Corpus


class Batches:
    """Train batches by step and fixed validation batches per domain."""

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_size: int, seed: int,
                 domain_weights=()):
        self.corpus, self.seq_len, self.batch_size, self.seed = corpus, seq_len, batch_size, seed
        n = len(corpus.domains)
        if domain_weights and len(domain_weights) != n:
            raise ConfigError(f"data.domain_weights={tuple(domain_weights)} has "
                              f"{len(domain_weights)} entries for {n} domains {corpus.domains}")
        w = np.asarray(domain_weights or [1.0] * n, np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"data.domain_weights={tuple(domain_weights)} must be >= 0 and "
                              f"not all zero")
        self.weights = w / w.sum()

    def _rows(self, stream, starts):
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return stream[idx]

    def train(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        doms = rng.choice(len(self.corpus.domains), size=self.batch_size, p=self.weights)
        rows = np.empty((self.batch_size, self.seq_len + 1), np.int32)
        for d, name in enumerate(self.corpus.domains):
            sel = np.nonzero(doms == d)[0]
            stream = self.corpus.streams["train"][name]
            starts = rng.integers(0, len(stream) - self.seq_len, size=len(sel))  # last start included
            rows[sel] = self._rows(stream, starts)
        domain = np.repeat(doms[:, None], self.seq_len, axis=1).astype(np.int32)
        return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "domain": domain}

    def validation(self, num_batches: int):
        """`[(domain, batch), ...]`: windows spread evenly over each domain's validation stream."""
        out, span = [], self.seq_len + 1
        count = num_batches * self.batch_size
        for d, name in enumerate(self.corpus.domains):
            stream = self.corpus.streams["val"][name]
            starts = (np.arange(count) * (len(stream) - span)) // max(count - 1, 1)
            for b in range(num_batches):
                rows = self._rows(stream, starts[b * self.batch_size:(b + 1) * self.batch_size])
                domain = np.full((self.batch_size, self.seq_len), d, np.int32)
                out.append((name, {"tokens": rows[:, :-1], "targets": rows[:, 1:], "domain": domain}))
        return out

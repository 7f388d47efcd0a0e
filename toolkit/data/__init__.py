"""Data: byte tokenizer, the embedded two-domain corpus and deterministic batches.

    corpus = load_corpus(DataConfig())                 # prose + code, split by document
    batches = Batches(corpus, seq_len=128, batch_size=32, seed=0)
    batch = batches.train(step=0)                      # tokens, targets, domain labels
"""

from toolkit.data.batches import Batches
from toolkit.data.corpus import Corpus, load_corpus, unigram_bits_per_byte
from toolkit.data.tokenizer import BOS, EOS, PAD, ByteTokenizer

__all__ = ["BOS", "EOS", "PAD", "Batches", "ByteTokenizer", "Corpus", "load_corpus",
           "unigram_bits_per_byte"]

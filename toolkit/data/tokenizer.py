"""A byte-level tokenizer: token ids 0-255 are bytes, then a few special ids.

Byte tokens need no training and no download, and every text (prose, code, any
language) round-trips exactly. Losses per token are therefore losses per byte, which
makes bits per byte directly comparable across models.

    tok = ByteTokenizer()
    ids = tok.encode("def f():")      # [100, 101, 102, 32, 102, 40, 41, 58]
    assert tok.decode(ids) == "def f():"
"""

import numpy as np

BOS, EOS, PAD = 256, 257, 258
NUM_SPECIALS = 3


class ByteTokenizer:
    """UTF-8 bytes plus BOS, EOS and PAD; `vocab_size` is 259 (models round it up to 264)."""

    vocab_size = 256 + NUM_SPECIALS
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        parts = ([np.array([BOS], np.int32)] if bos else []) + [ids] + (
            [np.array([EOS], np.int32)] if eos else [])
        return np.concatenate(parts)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

"""Corpora as labelled domains of documents, split into train and validation by document.

The default corpus exists on every Python install, with no download:

* `prose`: the English reference text of Python's documentation (`pydoc_data.topics`);
* `code`: Python source files of the standard library.

Whole documents, taken in the order of a hash of their names, go to validation until they
hold `val_fraction` of the bytes, so the split never changes between runs or machines with
the same Python. User text comes
from `DataConfig.paths`: each path (a file or a folder) is one domain named after it.

    corpus = load_corpus(DataConfig())
    corpus.domains                         # ("prose", "code")
    corpus.streams["train"]["code"]        # int32 token stream, documents joined by BOS/EOS
"""

import dataclasses
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from toolkit.config import ConfigError, DataConfig
from toolkit.data.tokenizer import ByteTokenizer

_PIECE_BYTES = 16_384
_MAX_PATH_BYTES = 4 << 30


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token streams per split and domain, plus the document names behind them.

    Attributes:
      domains: domain names, in label order (label i is `domains[i]`).
      streams: `{"train"|"val": {domain: int32 tokens}}`.
      documents: `{"train"|"val": {domain: [document names]}}`.
    """

    domains: tuple
    streams: dict
    documents: dict

    def num_tokens(self) -> dict:
        return {f"{split}/{dom}": len(s) for split, per in self.streams.items()
                for dom, s in per.items()}


def _prose_documents():
    from pydoc_data.topics import topics
    return [(f"topic:{name}", text.encode("utf-8")) for name, text in sorted(topics.items())]


def _code_documents(max_bytes: int):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib"))
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: zlib.crc32(str(p.relative_to(root)).encode()))
    docs, total = [], 0
    for path in files:
        data = path.read_bytes()
        if not data or total + len(data) > max_bytes:
            continue
        docs.append((f"stdlib:{path.relative_to(root)}", data))
        total += len(data)
    return docs


def _path_documents(path: Path):
    """Documents of one `data.paths` entry: every regular file under it that holds text, cut
    into pieces of `_PIECE_BYTES` (so a file of one huge line is fine). Empty files and
    binary ones (a NUL byte in the first 4 KiB) are skipped, and named if nothing is left."""
    if not path.exists():
        raise ConfigError(f"data.paths entry {str(path)!r} does not exist; give text files or "
                          f"folders of them, e.g. --set data.paths=notes/,book.txt")
    if not (path.is_dir() or path.is_file()):
        raise ConfigError(f"data.paths entry {str(path)!r} is not a regular file or folder (a device, "
                          f"pipe or socket); give text files or folders of them")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = sum(f.stat().st_size for f in files)
    if total > _MAX_PATH_BYTES:
        raise ConfigError(f"data.paths entry {str(path)!r} holds {total / 2**30:.1f} GiB; the corpus is "
                          f"read into memory, so give at most {_MAX_PATH_BYTES / 2**30:.0f} GiB (a sample)")
    docs, skipped = [], {"empty": [], "binary": []}
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise ConfigError(f"data.paths: cannot read {str(f)!r} ({e.strerror}); fix its permissions "
                              f"or leave it out") from None
        if not data.strip():
            skipped["empty"].append(f.name)
            continue
        if b"\x00" in data[:4096]:
            skipped["binary"].append(f.name)
            continue
        for i in range(0, len(data), _PIECE_BYTES):
            docs.append((f"{f}:{i // _PIECE_BYTES}", data[i:i + _PIECE_BYTES]))
    if not docs:
        why = "; ".join(f"{kind}: {', '.join(names[:5])}" for kind, names in skipped.items() if names)
        raise ConfigError(f"data.paths entry {str(path)!r} holds no text" + (f" (skipped {why})" if why
                                                                            else " (no files)")
                          + "; give UTF-8 or other text files")
    return docs


def _split(docs, val_fraction: float):
    """Whole documents to validation, in hash order, until they hold `val_fraction` of the bytes.

    Hash order makes the split independent of file order and stable across runs; filling by
    bytes keeps a domain of few, uneven documents from getting a near-empty validation set.
    A domain of a single document is cut instead: its last `val_fraction` of bytes validates.
    """
    if len(docs) == 1:  # one document: its tail is the validation text
        (name, data), = docs
        cut = len(data) - max(1, int(len(data) * val_fraction))
        return [(f"{name}#train", data[:cut])], [(f"{name}#val", data[cut:])]
    total = sum(len(data) for _, data in docs)
    val_names, val_bytes = set(), 0
    for name, data in sorted(docs, key=lambda d: zlib.crc32(d[0].encode())):
        if val_bytes >= val_fraction * total or len(val_names) == len(docs) - 1:
            break
        val_names.add(name)
        val_bytes += len(data)
    train = [d for d in docs if d[0] not in val_names]
    val = [d for d in docs if d[0] in val_names] or train
    return train, val


def _stream(docs) -> np.ndarray:
    tok = ByteTokenizer()
    return np.concatenate([tok.encode(data, bos=True, eos=True) for _, data in docs])


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read, split and tokenize the corpus that `cfg` names."""
    if cfg.corpus == "python_docs":
        by_domain = {"prose": _prose_documents(), "code": _code_documents(cfg.max_code_bytes)}
    elif cfg.corpus == "paths":
        by_domain = {}
        for p in cfg.paths:
            name = Path(str(p).rstrip("/")).name or str(p)
            if name in by_domain:
                raise ConfigError(f"data.paths has two domains named {name!r}; each path names "
                                  f"a domain by its last component, so rename or move one")
            by_domain[name] = _path_documents(Path(str(p)))
    else:
        raise ConfigError(f"data.corpus={cfg.corpus!r} is unknown; use 'python_docs' or 'paths'")
    streams, documents = {"train": {}, "val": {}}, {"train": {}, "val": {}}
    for dom, docs in by_domain.items():
        if not docs:
            raise ConfigError(f"domain {dom!r} has no documents; raise data.max_code_bytes="
                              f"{cfg.max_code_bytes} (e.g. 3000000) or add text")
        train, val = _split(docs, cfg.val_fraction)
        for split, part in (("train", train), ("val", val)):
            streams[split][dom] = _stream(part)
            documents[split][dom] = [name for name, _ in part]
    return Corpus(domains=tuple(by_domain), streams=streams, documents=documents)


def unigram_bits_per_byte(corpus: Corpus) -> dict:
    """Cross-entropy (bits/byte) of each validation domain under the training byte unigram.

    The baseline a language model must beat: it knows byte frequencies and nothing else.
    Add-one smoothing keeps unseen bytes finite.
    """
    counts = np.ones(256, np.float64)
    for s in corpus.streams["train"].values():
        counts += np.bincount(s[s < 256], minlength=256)
    logp = np.log2(counts / counts.sum())
    out = {}
    for dom, s in corpus.streams["val"].items():
        byte_ids = s[s < 256]
        out[dom] = float(-logp[byte_ids].mean())
    return out

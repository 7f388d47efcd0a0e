"""Tokenizer, embedded corpus, split and deterministic batches with domain labels."""

import numpy as np
import pytest

from toolkit.config import ConfigError, DataConfig
from toolkit.data import BOS, EOS, Batches, ByteTokenizer, Corpus, load_corpus, unigram_bits_per_byte


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DataConfig(max_code_bytes=300_000))


def test_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "déf f(x):\n    return x ** 2  # 平方"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text


def test_embedded_corpus_has_two_domains_split_by_document(corpus):
    assert corpus.domains == ("prose", "code")
    for dom in corpus.domains:
        train, val = set(corpus.documents["train"][dom]), set(corpus.documents["val"][dom])
        assert train and val and not train & val
        assert len(corpus.streams["val"][dom]) > 2_000
    assert all(n.startswith("topic:") for n in corpus.documents["train"]["prose"])
    assert all(n.startswith("stdlib:") for n in corpus.documents["train"]["code"])
    again = load_corpus(DataConfig(max_code_bytes=300_000))
    assert again.documents == corpus.documents


def test_batches_are_a_function_of_the_step(corpus):
    b = Batches(corpus, seq_len=32, batch_size=8, seed=3)
    one, two = b.train(5), Batches(corpus, seq_len=32, batch_size=8, seed=3).train(5)
    for key in ("tokens", "targets", "domain"):
        np.testing.assert_array_equal(one[key], two[key])
    assert not np.array_equal(b.train(6)["tokens"], one["tokens"])
    np.testing.assert_array_equal(one["tokens"][:, 1:], one["targets"][:, :-1])


def test_domain_labels_match_the_text(corpus):
    batch = Batches(corpus, seq_len=64, batch_size=16, seed=0).train(0)
    for row, dom in zip(batch["tokens"], batch["domain"][:, 0], strict=True):
        stream = corpus.streams["train"][corpus.domains[dom]]
        windows = np.lib.stride_tricks.sliding_window_view(stream, 64)
        assert (windows == row).all(-1).any()
    assert (batch["domain"] == batch["domain"][:, :1]).all()


def test_validation_batches_cover_every_domain(corpus):
    val = Batches(corpus, seq_len=32, batch_size=4, seed=0).validation(2)
    assert [d for d, _ in val] == ["prose", "prose", "code", "code"]


def test_unigram_baseline_is_a_few_bits(corpus):
    bpb = unigram_bits_per_byte(corpus)
    assert set(bpb) == {"prose", "code"} and all(3.5 < v < 6.0 for v in bpb.values())


def test_user_paths_are_domains(tmp_path):
    (tmp_path / "poems").mkdir()
    for i in range(6):
        (tmp_path / "poems" / f"p{i}.txt").write_text(f"roses are red {i}\n" * 200)
    (tmp_path / "log.txt").write_text("GET /index 200\n" * 3000)
    c = load_corpus(DataConfig(corpus="paths", paths=(str(tmp_path / "poems"), str(tmp_path / "log.txt"))))
    assert c.domains == ("poems", "log.txt")
    assert all(len(c.streams[s][d]) > 0 for s in ("train", "val") for d in c.domains)
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(DataConfig(corpus="paths", paths=(str(tmp_path / "nope"),)))


def test_one_document_domain_validates_on_its_tail(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 500)
    c = load_corpus(DataConfig(corpus="paths", paths=(str(tmp_path / "a.txt"),), val_fraction=0.1))
    assert c.documents["train"]["a.txt"] != c.documents["val"]["a.txt"]
    assert 0 < len(c.streams["val"]["a.txt"]) < len(c.streams["train"]["a.txt"])


def test_bad_paths_and_empty_domains_are_config_errors(tmp_path):
    for folder in ("x/data", "y/data"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "t.txt").write_text("some text " * 100)
    with pytest.raises(ConfigError, match="two domains named 'data'"):
        load_corpus(DataConfig(corpus="paths", paths=(str(tmp_path / "x/data"), str(tmp_path / "y/data"))))
    with pytest.raises(ConfigError, match="domain 'code' has no documents; raise data.max_code_bytes=1 "):
        load_corpus(DataConfig(max_code_bytes=1))


def test_a_stream_of_exactly_one_window_is_usable():
    stream = np.arange(10, dtype=np.int32)
    c = Corpus(domains=("d",), streams={"train": {"d": stream}, "val": {"d": stream}},
               documents={"train": {"d": ["x"]}, "val": {"d": ["x"]}})
    batch = Batches(c, seq_len=9, batch_size=2, seed=0).train(0)
    np.testing.assert_array_equal(batch["tokens"][0], stream[:9])

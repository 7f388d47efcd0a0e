"""Bad input through the command line: each mistake is refused before anything compiles,
with exit status 2 and one `error:` line that names the problem (never a traceback).

Model building is patched to fail loudly, so a mistake that slipped through would show up
here as a test failure rather than as a training run.
"""

import json

import pytest

from toolkit import cli


@pytest.fixture
def files(tmp_path):
    """Bad files of every kind, by name."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    (tmp_path / "image.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "nothing").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.bin").write_bytes(b"\x00\x01" * 100)
    (mixed / "b.txt").write_bytes(b"")
    (tmp_path / "not_json.json").write_text('{"moe": {"num_experts": 16,}}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "latin1.json").write_bytes('{"name": "caf\xe9"}'.encode("latin-1"))
    for name, tree in {"unknown_section.json": {"router": {"top_k": 2}},
                       "unknown_key.json": {"moe": {"num_expert": 16}},
                       "wrong_type.json": {"moe": {"num_experts": "sixteen"}},
                       "float_for_int.json": {"moe": {"top_k": 2.5}},
                       "bool_for_int.json": {"train": {"steps": True}},
                       "section_not_object.json": {"moe": 16},
                       "bad_value.json": {"moe": {"num_experts": 6}, "parallel": {"expert": 4}},
                       "empty_name.json": {"name": ""}}.items():
        (tmp_path / name).write_text(json.dumps(tree))
    (tmp_path / "a_file").write_text("I am not a folder")
    return tmp_path


# (argv with {d} for the files' folder, a piece of the message)
CASES = [
    ("train --preset nope", "unknown preset 'nope'; presets:"),
    ("train --set moe.num_experts", "has no '='; write it as section.field=value"),
    ("train --set moe.num_expert=4", "did you mean 'moe.num_experts'?"),
    ("train --set moe.num_experts=four", "moe.num_experts='four' is not a valid int"),
    ("train --set moe.num_experts=6 --mesh data=2,expert=4", "not divisible by mesh axis expert=4"),
    ("train --mesh data=x", "parallel.data='x' is not a valid int"),
    ("train --mesh data", "write axis=size pairs"),
    ("train --mesh data=3", "has 3 devices but 8 are available"),
    ("train --mesh model=2", "unknown config key 'parallel.model'"),
    ("train --devices 0", "0 must be at least 1"),
    ("train --devices two", "'two' is not a whole number"),
    ("train --set train.steps=0", "train.steps=0 must be a positive integer"),
    ("train --set train.batch_size=3", "train.batch_size=3 is not divisible by mesh axes"),
    ("train --set model.seq_len=0", "model.seq_len=0 must be a positive integer"),
    ("train --set train.learning_rate=-1", "train.learning_rate=-1.0 must be > 0"),
    ("train --set model.dtype=float8", "model.dtype='float8' is not supported"),
    ("train --set moe.top_k=9", "moe.top_k=9 exceeds moe.num_experts=8"),
    ("train --set moe.router=topq", "moe.router='topq' is unknown"),
    ("train --set model.num_heads=3", "model.num_heads=3 is not divisible by model.num_kv_heads=2"),
    ("train --set data.val_fraction=1.5", "data.val_fraction=1.5 must be in (0, 1)"),
    ("train --set data.domain_weights=a,b", "not a valid comma-separated list of numbers"),
    ("train --recipe nope", "parallel.recipe='nope' is not a recipe"),
    ("train --out {d}/a_file", "is a file; the run directory must be a folder"),
    ("train --set data.corpus=web", "data.corpus='web' is unknown"),
    ("train --set data.corpus=paths --set data.paths={d}/missing", "does not exist"),
    ("train --set data.corpus=paths --set data.paths={d}/empty.txt", "(skipped empty: empty.txt)"),
    ("train --set data.corpus=paths --set data.paths={d}/blank.txt", "(skipped empty: blank.txt)"),
    ("train --set data.corpus=paths --set data.paths={d}/image.bin", "(skipped binary: image.bin)"),
    ("train --set data.corpus=paths --set data.paths={d}/nothing", "holds no text (no files)"),
    ("train --set data.corpus=paths --set data.paths={d}/mixed", "skipped empty: b.txt; binary: a.bin"),
    ("train --set data.corpus=paths --set data.paths=/dev/null", "is not a regular file or folder"),
    ("train --config {d}/missing.json", "does not exist or is not a file"),
    ("train --config {d}/not_json.json", "is not valid JSON: Expecting property name"),
    ("train --config {d}/list.json", "holds a JSON list; it must be an object"),
    ("train --config {d}/latin1.json", "is not UTF-8 text"),
    ("train --config {d}/unknown_section.json", "unknown key 'router'"),
    ("train --config {d}/unknown_key.json", "unknown key 'moe.num_expert' (did you mean 'moe.num_experts'?)"),
    ("train --config {d}/wrong_type.json", 'moe.num_experts="sixteen" should be a JSON integer like 8'),
    ("train --config {d}/float_for_int.json", "moe.top_k=2.5 should be a JSON integer"),
    ("train --config {d}/bool_for_int.json", "train.steps=true should be a JSON integer"),
    ("train --config {d}/section_not_object.json", "'moe' must be an object of moe fields"),
    ("train --config {d}/bad_value.json --mesh data=2,expert=4", "moe.num_experts=6 is not divisible"),
    ("train --config {d}/empty_name.json", "name='' must be a non-empty string"),
    ("inspect --set parallel.pipeline=3", "the other axes multiply to 3, which does not divide 8; make them"),
    ("plan --cluster zz", "cannot read 'zz'; write DEVICExCOUNT"),
    ("plan --cluster tpu9x8", "cannot read 'tpu9x8'"),
    ("plan --preset mixtral_8x7b --cluster h100x1", "does not fit on h100x1"),
    ("plan --global-batch 4Q", "write a token count such as 4M"),
    ("plan --top 0", "0 must be at least 1"),
    ("plan --fix tensor", "write axis=size pairs"),
    ("config --preset nope", "unknown preset 'nope'"),
    ("launch --processes 0 -- train", "need at least 1"),
    ("frobnicate", "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_clear_message(argv, message, files, capsys, monkeypatch):
    def reached(*_args, **_kwargs):
        raise AssertionError(f"{argv!r} was accepted and reached model building")
    monkeypatch.setattr("toolkit.training.trainer.init_state", reached)
    monkeypatch.setattr("toolkit.training.inspect.make_train_step", reached)
    monkeypatch.chdir(files)
    try:
        rc = cli.main(argv.format(d=files).split())
    except SystemExit as e:       # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert "error:" in err and message in err, err


def test_a_good_config_file_is_applied_under_mesh_and_set(tmp_path, capsys):
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"name": "wide", "moe": {"num_experts": 16, "top_k": 4},
                                "data": {"domain_weights": [0.7, 0.3]}}))
    assert cli.main(["config", "--config", str(path), "--set", "moe.top_k=3"]) == 0
    out = capsys.readouterr().out
    values = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert values["name"] == "'wide'" and values["moe.num_experts"] == "16"
    assert values["moe.top_k"] == "3"                      # --set wins over the file
    assert values["data.domain_weights"] == "(0.7,"


def test_a_file_of_one_huge_line_is_a_corpus(tmp_path):
    from toolkit.config import DataConfig
    from toolkit.data import load_corpus
    line = tmp_path / "line.txt"
    line.write_text("word " * 400_000)                     # 2 MB, no newline
    corpus = load_corpus(DataConfig(corpus="paths", paths=(str(line),)))
    tokens = sum(len(s) for per in corpus.streams.values() for s in per.values())
    assert tokens >= 2_000_000 and corpus.domains == ("line.txt",)

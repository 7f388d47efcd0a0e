"""Notebooks run headless with tiny parameters, and their paired .ipynb files stay clean.

    .venv/bin/python -m pytest -q tests/notebooks

Each notebook is read from its jupytext `.py` source; a cell injected right after the cell
tagged `parameters` shrinks the run (the papermill convention), then nbclient executes it in
the `python3` kernel, which jupyter_client starts with this interpreter (the venv's).
"""

import base64
import re
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"

TINY = {
    "01_train_and_watch": '''\
STEPS = 6
EVAL_EVERY = 3
PLOT_EVERY = 3
DEVICES = 8
EXTRA_OVERRIDES = ["model.num_layers=2", "train.batch_size=8", "model.seq_len=32",
                   "data.max_code_bytes=300000"]
''',
    "02_routing_explorer": '''\
STEPS = 4
DEVICES = 8
EXTRA_OVERRIDES = ["model.num_layers=2", "train.batch_size=8", "model.seq_len=32",
                   "data.max_code_bytes=300000", "train.eval_batches=1"]
''',
    "03_precision_explorer": '''\
STEPS = 3
EXTRA_OVERRIDES = ["model.num_layers=1", "train.batch_size=4", "model.seq_len=32",
                   "data.max_code_bytes=300000", "train.eval_batches=1"]
''',
    "04_parallelism": '''\
DEVICES = 8
EXTRA_OVERRIDES = ["model.num_layers=1", "model.d_model=32", "model.head_dim=8", "model.d_ff=64",
                   "model.seq_len=16", "train.batch_size=8", "moe.d_expert=32",
                   "data.max_code_bytes=300000"]
''',
    "05_sparsity_and_scale": '''\
STEPS = 2
TRAIN = [(8, 2, 0)]
EXTRA_OVERRIDES = ["model.num_layers=1", "train.batch_size=8", "model.seq_len=32",
                   "data.max_code_bytes=300000", "train.eval_batches=1"]
''',
}


def _with_parameters(nb, source: str):
    index = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(index) == 1, f"expected one cell tagged 'parameters', found {len(index)}"
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index[0] + 1, cell)
    return nb


def _outputs(nb, mime: str) -> list:
    return [out["data"][mime] for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if mime in out.get("data", {})]


def _execute(name: str):
    nb = _with_parameters(jupytext.read(NOTEBOOKS / f"{name}.py"), TINY[name])
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def _errors(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if out.output_type == "error"]


@pytest.fixture(scope="module")
def executed_01():
    return _execute("01_train_and_watch")


@pytest.fixture(scope="module")
def executed_02():
    return _execute("02_routing_explorer")


@pytest.fixture(scope="module")
def executed_03():
    return _execute("03_precision_explorer")


@pytest.fixture(scope="module")
def executed_04():
    return _execute("04_parallelism")


def test_01_train_and_watch_runs(executed_01):
    nb = executed_01
    errors = _errors(nb)
    assert not errors, errors
    pngs = _outputs(nb, "image/png")
    # live loss + live load, then final load + domain preference
    assert len(pngs) >= 4, f"expected at least 4 PNG outputs, got {len(pngs)}"
    assert all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    markdown = "\n".join(_outputs(nb, "text/markdown"))
    assert "**step 6**" in markdown  # the live status line took its last frame
    assert "## Validation bits per byte" in markdown
    for dom in ("prose", "code"):
        assert f"| {dom} | " in markdown, f"no bits/byte row for {dom}"
    assert "I(domain; expert) bits" in markdown
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs)
    assert "8 cpu devices" in text
    assert "6 steps" in text


def test_02_routing_explorer_runs(executed_02):
    nb = executed_02
    errors = _errors(nb)
    assert not errors, errors
    pngs = _outputs(nb, "image/png")
    # load over steps, drop rate + experts per token, experts-per-token histogram, affinity
    assert len(pngs) >= 4, f"expected at least 4 PNG outputs, got {len(pngs)}"
    assert all(base64.b64decode(p).startswith(b"\x89PNG") for p in pngs)
    assert _outputs(nb, "application/vnd.jupyter.widget-view+json"), "the widget was not displayed"
    html = "\n".join(_outputs(nb, "text/html"))
    for dom in ("prose", "code"):
        assert f"<b>{dom}: each byte on its top expert" in html, f"no coloured text for {dom}"
    # 2 domains x 2 MoE layers x 32 bytes, each on a valid expert id of the top-p router
    experts = [int(e) for e in re.findall(r'<span class="tok" data-expert="(-?\d+)"', html)]
    assert len(experts) == 2 * 2 * 32 and all(0 <= e < 8 for e in experts)
    markdown = "\n".join(_outputs(nb, "text/markdown"))
    assert "step 4/4 of router top_p" in markdown
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs)
    assert "8 cpu devices" in text and "the config is valid" in text and "moe.top_p = 0.5" in text


def test_03_precision_explorer_runs(executed_03):
    nb = executed_03
    errors = _errors(nb)
    assert not errors, errors
    assert _outputs(nb, "application/vnd.jupyter.widget-view+json"), "the widget was not displayed"
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs)
    for line in ("mxint8 .* INT wins", "mxint6 .* FP wins", "mxint4 .* FP wins", "nvint4 .* INT wins",
                 r"trained 3 steps", r"format nvint4", r"target 18.0 dB: INT8 blocks \d"):
        assert re.search(line, text), (line, text)
    html = "\n".join(_outputs(nb, "text/html"))
    assert "QSNR per tensor class" in html and "acts" in html and "weights" in html
    assert "W+A nvint4, rotation 16" in html and "full precision" in html
    assert _outputs(nb, "image/png"), "the histogram was not drawn"


@pytest.fixture(scope="module")
def executed_05():
    return _execute("05_sparsity_and_scale")


def test_05_sparsity_and_scale_runs(executed_05):
    nb = executed_05
    errors = _errors(nb)
    assert not errors, errors
    assert _outputs(nb, "application/vnd.jupyter.widget-view+json"), "the widget was not displayed"
    assert len(_outputs(nb, "image/png")) >= 2, "the bars and the EL curve"
    html = "\n".join(_outputs(nb, "text/html"))
    assert "designs at equal active compute" in html and "E64 k2 s0" in html
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs)
    assert "EL(A=3.1%, G=12, C=1e22) = 7.24; best granularity 11.3" in text, text
    assert "refine(4): E8 k2 s0 -> E32 k8 s0, d_expert 32, A 0.250 -> 0.250, G 2 -> 8, EL 2.06 -> 2.35" \
        in text, text
    assert re.search(r"each run: 512 tokens, C = \d\.\de\+\d\d FLOPs", text), text
    assert re.search(r"E8 k2 s0: validation loss \d+\.\d+ after 2 steps", text), text
    assert re.search(r"E8 k2 s0</td>.*\d\.\d{3} \(2 steps\)</td>", html), "the trained loss in the table"


def test_04_parallelism_runs(executed_04):
    nb = executed_04
    errors = _errors(nb)
    assert not errors, errors
    assert _outputs(nb, "application/vnd.jupyter.widget-view+json"), "the widget was not displayed"
    html = "\n".join(_outputs(nb, "text/html"))
    assert "logical axis -&gt; mesh axes, per recipe" in html
    # the folded recipe: experts over expert x tensor, attention heads over tensor
    assert "P((&#x27;expert&#x27;, &#x27;tensor&#x27;), &#x27;fsdp&#x27;, None)" in html
    for caption in ("collectives in the compiled step", "bytes one device sends, compiled block vs formula",
                    "tensor parallelism per dense layer", "the mesh vs one device"):
        assert caption in html, caption
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs)
    assert "8 cpu devices" in text and "the config is valid" in text
    assert "recipe folded" in text and "8 MoE dispatch groups" in text
    assert "model.num_kv_heads=2 is not divisible by mesh axis tensor=8" in text   # the bad mesh
    diffs = re.search(r"loss difference (\S+), max gradient difference (\S+)", text)
    assert diffs and float(diffs[1]) < 1e-5 and float(diffs[2]) < 1e-5, text
    # pipelines: the bubble table against theory, the schedule tab, the pipelined equivalence
    assert re.search(r"1f1b\s+8\s+0\.273\s+0\.273\s+0\.375\s+0\.375\s+\[4, 3, 2, 1\]", text), text
    assert re.search(r"interleaved\s+8\s+0\.158\s+0\.158\s+0\.188\s+0\.188", text), text
    assert "mesh pipeline=2 x data=2 x sequence=2" in text
    assert "bubble fraction (idle share of stages x time)" in html
    diffs = re.search(r"pipeline: loss difference (\S+), max gradient difference (\S+)", text)
    assert diffs and float(diffs[1]) < 1e-5 and float(diffs[2]) < 1e-5, text
    # the planner on a real cluster: its ranked table and explanation
    assert re.search(r" 1 \S.*\d+\.\d+%", text), text
    assert "best: pipeline=" in text and "experts laid out" in text, text


@pytest.mark.parametrize("name", sorted(p.stem for p in NOTEBOOKS.glob("*.py")))
def test_ipynb_is_paired_and_clean(name):
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    paired = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(paired)
    fix = f"regenerate it: .venv/bin/jupytext --to ipynb notebooks/{name}.py"
    assert [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in paired.cells] == \
           [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in source.cells], \
        f"notebooks/{name}.ipynb differs from its .py source; {fix}"
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"notebooks/{name}.ipynb holds outputs; {fix}"
    assert paired.metadata.get("kernelspec", {}).get("name") == "python3"

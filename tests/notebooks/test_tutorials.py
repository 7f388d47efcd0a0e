"""Tutorials run headless top to bottom, their exercises' checks pass, and their paired
.ipynb files stay clean.

    .venv/bin/python -m pytest -q tests/notebooks/test_tutorials.py

Each tutorial is read from its jupytext `.py` source and executed with nbclient in the
`python3` kernel, from the `tutorials/` folder, with the small defaults of its `parameters`
cell. Every exercise ends in a check that prints "correct" or raises with a hint.
"""

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NAMES = sorted(p.stem for p in TUTORIALS.glob("[0-9]*.py"))


def _text(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs)


def _errors(nb) -> list:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if out.output_type == "error"]


def test_there_are_tutorials():
    assert NAMES, f"no tutorials in {TUTORIALS}"


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_runs_and_its_exercises_check(name):
    nb = jupytext.read(TUTORIALS / f"{name}.py")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    checks = sum(c.source.count("check_") for c in nb.cells if c.cell_type == "code"
                 and "def check_" not in c.source)
    assert checks >= 2, f"{name}: expected exercises with checks, found {checks} check calls"
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(TUTORIALS)}}).execute()
    errors = _errors(nb)
    assert not errors, errors
    assert _text(nb).count("correct") >= checks, _text(nb)


@pytest.mark.parametrize("name", NAMES)
def test_tutorial_ipynb_is_paired_and_clean(name):
    source = jupytext.read(TUTORIALS / f"{name}.py")
    paired = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    nbformat.validate(paired)
    fix = f"regenerate it: .venv/bin/jupytext --to ipynb tutorials/{name}.py"
    assert [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in paired.cells] == \
           [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in source.cells], \
        f"tutorials/{name}.ipynb differs from its .py source; {fix}"
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"tutorials/{name}.ipynb holds outputs; {fix}"
    assert paired.metadata.get("kernelspec", {}).get("name") == "python3"

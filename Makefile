# make demo   create .venv, install, train the tiny MoE on 8 simulated devices
# make test   create/update .venv (with torch + transformers for the HF parity tests), run all tests
# make lab    JupyterLab on notebooks/ (127.0.0.1 only)
# make bench  the benchmarks in benchmarks/
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := $(shell $(PYTHON) -c 'import sys; print("-c constraints.txt" if sys.version_info[:2] == (3, 11) else "")')

.PHONY: demo test lab bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

$(VENV)/.hf: $(STAMP)
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev,hf]"
	touch $(VENV)/.hf

$(VENV)/.lab: $(STAMP)
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[lab,dev]"
	touch $(VENV)/.lab

demo: $(STAMP)
	$(PY) -m toolkit train --preset tiny --mesh data=2,fsdp=4 --out runs/demo $(if $(wildcard runs/demo/config.json),--resume,)

test: $(VENV)/.hf
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

lab: $(VENV)/.lab
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser --notebook-dir notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/moe_vs_dense.py
	$(PY) benchmarks/pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache

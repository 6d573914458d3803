# Two commands on a fresh clone: `make check` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch/torchvision first (CUDA build on x86-64 Linux), then the project against them.
BASE_PKGS := setuptools wheel "torch>=2.11" "torchvision>=0.26" numpy packaging nvidia-cutlass

.PHONY: check test venv clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(BASE_PKGS)
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

venv: $(VENV)/.installed

check: venv
	$(PY) -m fusedres check
	$(PY) -m fusedres check --mode train --repeats 5

test: venv
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) build dist *.egg-info

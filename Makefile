# make demo / make test do all the set-up on a fresh machine (no GPU needed).
# The oldest supported torch: make test VENV=.venv-2.11 TORCH=2.11.0 (PyPI's wheel, with its CUDA libraries).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fp4_compile-installed

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch $(TORCH) when no torch is there (2.13.0's CPU wheel is found locally on the dev machines),
# then the package in editable mode with its test extras.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==$(TORCH)
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fp4c demo

test: $(STAMP)
	$(PY) -m pytest tests -q

bench: $(STAMP)
	bash benchmarks/run_gpu.sh

clean:
	rm -rf $(VENV) build *.egg-info

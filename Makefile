# Two entry points, each doing its own set-up in a local virtual environment:
#   make demo   the main job (the whole pipeline on the embedded concept world)
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch is pinned and installed first so nothing pulls an unpinned (CUDA) build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# The test suite also runs a grid on a local Ray instance: Ray (an optional extra) is installed for it only
# (measured: 11 s, a 79 MB wheel).
$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $@

demo: setup
	$(BIN)/metaunlearn demo $(ARGS)

test: setup $(VENV)/.installed-ray
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

bench: setup
	$(BIN)/python benchmarks/meta_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache

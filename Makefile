# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# e.g. https://download.pytorch.org/whl/cpu for the CPU build where PyPI offers the CUDA one
TORCH_INDEX ?=

.PHONY: serve test lint bench-ingest demo-data clean

# torch goes in first and pinned: anything that depends on it later must not pull another build.
$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==$(TORCH_VERSION)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/filmless $(if $(CONFIG),--config $(CONFIG)) models build
	$(BIN)/filmless $(if $(CONFIG),--config $(CONFIG)) viewer install --optional
	$(BIN)/filmless $(if $(CONFIG),--config $(CONFIG)) serve

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy

bench-ingest: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks.ingest $(BENCH_ARGS)

# A small synthetic corpus (DX chest, fundus, four-view mammography, CT) for trying things out.
demo-data: $(VENV)/.installed
	$(BIN)/python -m scripts.synthetic_corpus demo-data --patients 3 --scale 0.25 --uncompressed

clean:
	rm -rf $(VENV) build *.egg-info

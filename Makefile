# Quick start: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# extras installed with the package; CI adds the engines: make test EXTRAS=test,mpi,dask,jobqueue,ray
EXTRAS ?= test

.PHONY: demo test test-fast bench bench-quick lint clean dist

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m pytest -q

# The inner loop: unit and contract tests, few hypothesis examples, none marked slow (over
# ~0.5 s) or needing a real scheduler
# (the whole suite, faults and cluster included, is `make test`).
test-fast: $(STAMP)
	PIPEFARM_FAST=1 $(BIN)/python -m pytest -q -m "not slow and not scheduler" tests/unit tests/contract

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench --quick

# The wheel and the sdist in dist/ (their version: src/pipefarm/__init__.py), checked by twine.
# A release: python packaging/release.py VERSION (also writes the version into every recipe).
dist: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dist]'
	rm -rf dist
	$(BIN)/python -m build --no-isolation --sdist --wheel --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

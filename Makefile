# llmtrain: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel by default (it lies on local disk here); elsewhere e.g. make install TORCH='torch==2.5.1'
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=
# pytest processes for make test and test-fast (pytest-xdist); tests that start real processes keep to their own
# folders and ports, so the suite runs in parallel. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: help install train test test-fast mutants lint bench wheel clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv with torch ($(TORCH)) and llmtrain in editable mode

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

train: install  ## pretrain the default tiny GPT on the embedded corpus, scored on the shipped tasks (eval=quick) as it trains (ARGS='key=value ...' to override)
	$(BIN)/python -m llmtrain eval=quick $(ARGS)

test: install  ## run the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(ARGS)

test-fast: install  ## the inner loop: every module, no real-process runs (tests marked slow), under 2 minutes
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow" $(ARGS)

mutants: install  ## the mutation round: break each module as scripts/mutants.yaml lists, see which tests notice (ARGS='--slow --jobs 2', docs/testing.md)
	$(BIN)/python scripts/mutants.py $(ARGS)

bench: install  ## print throughput of llmtrain vs a plain PyTorch loop, MFU, tokenization speed (~5 min on a CPU)
	$(BIN)/python benchmarks/throughput.py $(ARGS)

lint: install  ## ruff
	$(BIN)/ruff check llmtrain tests scripts benchmarks

wheel: install  ## build dist/llmtrain-*.whl, the configs inside: pip install it into any environment
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .
	rm -rf build llmtrain.egg-info

clean:  ## remove what runs and builds produce (outputs/, caches, dist/); keeps .venv
	rm -rf outputs multirun lightning_logs .pytest_cache .ruff_cache build dist llmtrain.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -exec rm -rf {} +

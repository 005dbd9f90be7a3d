# bicascade — `make demo` runs everything end to end, `make test` runs the tests. Both bootstrap .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision pair known to work here (pip takes them from local disk); override on other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: help demo test test-fast bench clean
help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP) ## run the whole system on the embedded default (DEMO_ARGS="--no-serve --json" ...)
	$(BIN)/bicascade demo $(DEMO_ARGS)

test: $(STAMP) ## run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## tests without the slow ones
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP) ## run the benchmarks in bench/ (prints ratios)
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

clean: ## remove the virtualenv and build outputs
	rm -rf $(VENV) build dist *.egg-info work

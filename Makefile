# bicascade — `make demo` runs everything end to end, `make test` runs the tests. Both bootstrap .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision pair known to work here (pip takes them from local disk); override on other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# every direct and transitive dependency pinned to the versions the suite passed with (`make lock` refreshes it;
# `make LOCK= ...` installs without it, e.g. with another TORCH_SPEC)
LOCK ?= constraints.txt
PIP_LOCK := $(if $(LOCK),-c $(LOCK))
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: help demo test test-fast lock mutation lint format browser bench results figures weights clean
help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_LOCK) $(TORCH_SPEC)
	$(BIN)/python -m pip install -q $(PIP_LOCK) -e '.[test]'
	touch $(STAMP)

lock: ## re-resolve every dependency in a scratch virtualenv and pin what it got in constraints.txt
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q $(TORCH_SPEC) && .lock-venv/bin/python -m pip install -q -e '.[test,mutation]'
	{ echo "# pinned by \`make lock\` ($(TORCH_SPEC), Python $$(.lock-venv/bin/python -V | cut -d' ' -f2)); \
	  make installs with it"; .lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt
	rm -rf .lock-venv

demo: $(STAMP) ## run the whole system on the embedded default (DEMO_ARGS="--no-serve --json" ...)
	$(BIN)/bicascade demo $(DEMO_ARGS)

lint: $(STAMP) ## ruff: the rules in pyproject.toml
	$(BIN)/ruff check .

test: lint browser ## lint, then the whole test suite (what CI runs: about 33 min of pytest from a fresh clone here)
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

test-fast: lint ## lint, then the tests that start no Ray and train nothing big (about 2.5 minutes here)
	$(BIN)/python -m pytest -m "not slow and not ray" --durations=25 $(PYTEST_ARGS)

mutation: $(STAMP) ## mutation testing of cascade.py, storage/cache.py, storage/filters.py against their tests (not in `make test`)
	$(BIN)/python -m pip install -q $(PIP_LOCK) -e '.[mutation]'
	$(BIN)/python tests/mutation.py --out bench/results/mutation.json

browser: ## Debian's Chromium for the page's browser test (installed with apt when missing and possible)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) ; } || \
	  echo "no Chromium: the browser test will be skipped (install Debian's chromium to run it)"

format: $(STAMP) ## sort imports and apply ruff's safe fixes
	$(BIN)/ruff check --fix .

bench: $(STAMP) ## the quick benchmarks (serving, and indexing 5,000 images); each prints the ratios it measured
	$(BIN)/python bench/query.py && $(BIN)/python bench/build.py --images 5000

results: $(STAMP) ## docs/RESULTS.md and its plots, rendered from the JSON under bench/results/
	$(BIN)/python bench/results.py

weights: $(STAMP) ## (maintainers) train the default ladder if needed, ship it in bicascade/weights/ (49 min on 2 cores)
	$(BIN)/python -m bicascade.pipelines.lab.train

R := bench/results
figures: $(STAMP) ## re-measure everything docs/RESULTS.md shows (hours on 2 cores; needs `make demo` first), then render it
	$(BIN)/python bench/curves.py --out $(R)/curves.json && $(BIN)/python bench/curves.py --shipped --out $(R)/curves.json
	$(BIN)/bicascade eval --db work/db --json > $(R)/eval_synthetic.json
	$(BIN)/bicascade simulate --db work/db --queries 10000 --report work/report --json > $(R)/simulate_synthetic.json
	$(BIN)/bicascade plan --db work/db --at 1 --report docs --json > $(R)/plan_synthetic.json && mv docs/frontier.png docs/plan_frontier.png
	$(BIN)/bicascade eval --db work/db --plan $(R)/plan_synthetic.json --json > $(R)/eval_synthetic_plan.json
	$(BIN)/bicascade train --ladder synthetic-vit --world work/world && $(BIN)/bicascade distill --ladder synthetic-spds \
	  --world work/world && $(BIN)/bicascade distill --ladder synthetic-vit-patches --world work/world
	for l in synthetic-vit synthetic-spds synthetic-vit-patches; do \
	  $(BIN)/bicascade eval --ladder $$l --world work/world --json > $(R)/eval_$$l.json || exit 1; done
	$(BIN)/python bench/query.py --out $(R)/query_cpu.json
	$(BIN)/python bench/build.py --out $(R)/build_cpu.json
	$(BIN)/python bench/rss.py --out $(R)/rss_cpu.json
	$(BIN)/python bench/audit.py --out $(R)/audit_cpu.json
	$(BIN)/python bench/stream.py --out $(R)/simulate_synthetic_100k.json
	$(BIN)/python bench/million.py --out $(R)/million_cpu.json
	$(BIN)/python bench/results.py

clean: ## remove the virtualenv and build outputs
	rm -rf $(VENV) build dist *.egg-info work mutants .lock-venv

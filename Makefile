# A newcomer needs two commands:  `make demo`  and  `make test`.
# Everything else (virtualenv, Python packages, the pinned reference server) installs itself.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck bench mutate clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "pullwake-runner needs Python 3.11 or newer" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(STAMP)
	$(BIN)/pullwake dev --install-only
	@tools/promtool.sh --install-only || echo "without promtool, tests/test_ops.py skips its check of the alerting rules" >&2

demo: setup
	$(BIN)/pullwake demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: setup lint typecheck
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m bench

# Mutation testing of the lifecycle, the driver, the dispatcher and the claim, judged by the fast
# tests only (configured in pyproject.toml, [tool.mutmut]). Heavy: keep the workers few on a shared machine.
MUTATE_CHILDREN ?= 2
mutate: $(STAMP)
	rm -rf mutants
	@start=$$(date +%s); \
	PULLWAKE_PROPERTY_EXAMPLES=60 $(BIN)/mutmut run --max-children $(MUTATE_CHILDREN) >mutants.log 2>&1 \
		|| { tail -n 40 mutants.log; exit 1; }; \
	mv mutants.log mutants/run.log; \
	echo "mutmut run took $$(( $$(date +%s) - start )) s (log: mutants/run.log)"
	$(BIN)/python tools/mutation_score.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis mutants

# Two commands do everything on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVICES := scripts/services.sh

.PHONY: demo test lint bench chaos services stop-services clean

$(BIN)/syncctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

services:
	bash $(SERVICES) start

stop-services:
	bash $(SERVICES) stop

demo: $(BIN)/syncctl services
	eval "$$(bash $(SERVICES) env)" && $(BIN)/syncctl demo

test: $(BIN)/syncctl services
	eval "$$(bash $(SERVICES) env)" && $(BIN)/pytest -q

# The benchmark suite of SPEC §11 (about 6 minutes): a table on stdout, JSON in
# bench-results.json. See docs/performance.md.
bench: $(BIN)/syncctl services
	$(BIN)/python -m bench --runs 3 --json bench-results.json

# The chaos soak (bench/chaos.py, about 20 minutes): jobs over 100 devices while faults
# are injected, on a 3-node cluster and a PostgreSQL of its own (moved ports, .services/chaos),
# stopped at the end. CHAOS_JOBS=1000 is the short form CI runs; CHAOS_SEED=N repeats a
# schedule. Figures in chaos-results.json; fails when anything was lost, applied twice,
# reordered or stale.
CHAOS_JOBS ?= 10000
CHAOS_SEED ?=
# Kinds of fault to leave out, space-separated (e.g. CHAOS_SKIP="node alarm").
CHAOS_SKIP ?=
chaos: $(BIN)/syncctl
	$(BIN)/python -m bench.chaos --jobs $(CHAOS_JOBS) $(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) \
		$(foreach kind,$(CHAOS_SKIP),--skip $(kind)) --json chaos-results.json

lint: $(BIN)/syncctl
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean: stop-services
	rm -rf .services $(VENV)

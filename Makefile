# The two commands: `make run` (install, then a worker with beat on the embedded
# defaults or whatever OUTBOX_* says) and `make test` (install, then the whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-slow lint format demo bench clean system-deps promtool

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/outbox worker --beat

test: $(STAMP) system-deps promtool
	$(BIN)/pytest -q --ignore=tests/faults

# Debian's Postfix, postgrey and Cyrus SASL for the real-relay tests
# (tests/integration/test_postfix_relay.py); a no-op once installed, and a warning (the
# tests then skip) where they cannot be installed.
system-deps:
	scripts/install-system-deps.sh

# promtool for the alert-rule tests (deploy/prometheus): from Debian's package, when it is
# missing and can be had (root, apt-get); otherwise those tests skip.
promtool:
	bash scripts/install-promtool.sh

# The fault and load suite (kill -9, broker and database loss, 10,000 messages): slower,
# run by CI after `make test`.
test-slow: $(STAMP)
	$(BIN)/pytest -q tests/faults

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/python -m demo

# The delivery benchmark, then the metrics exporter's scrape time at 10k/100k/1M messages.
bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.metrics_scrape

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache

# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test validate bench clean

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

## Start the whole stack (embedded MongoDB, MQTT broker, simulated factory, ingester,
## inference server, dagster dev on http://127.0.0.1:3000). Ctrl-C stops everything.
run: install
	$(VENV)/bin/factory-assets up

## Run the whole test suite against real services started by the fixtures, one pytest-xdist
## worker per core (at most 4), each test file on one worker (its module fixtures started once).
test: install
	$(VENV)/bin/pytest -q -n auto --maxprocesses=4 --dist loadfile

validate: install
	$(VENV)/bin/dagster definitions validate -w workspace.yaml

bench: install
	$(VENV)/bin/python benchmarks/ingest.py

clean:
	rm -rf $(VENV) .factory

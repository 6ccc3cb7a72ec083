# Two commands from a fresh machine: `make run` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test parity parity-quick bench venv venv-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e .

# Test/parity set-up: torch pinned to the CPU wheel, breaching 0.1.2 without its heavy dependencies.
venv-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[parity,test,bench]'
	$(BIN)/pip install -q --no-deps breaching==0.1.2

run: venv
	$(BIN)/fedjax-users run

test: venv-test
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(BIN)/python -m pytest tests
	$(BIN)/python -m parity --quick --json results/parity_quick.json

parity: venv-test
	$(BIN)/python -m parity --json results/parity.json

bench: venv-test
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands from a fresh machine: `make run` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCHVISION_SRC := $(VENV)/torchvision-src

.PHONY: run test test-heavy parity parity-quick bench venv venv-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e .

# Test/parity set-up: torch pinned to the CPU wheel, breaching 0.1.2 without its heavy dependencies.
venv-test: $(BIN)/python $(TORCHVISION_SRC)/torchvision/models/resnet.py
	$(BIN)/pip install -q -e '.[parity,test,bench]'
	$(BIN)/pip install -q --no-deps breaching==0.1.2

# torchvision's wheel does not import beside the CPU torch; parity/reference.py loads its pure-Python
# model files (models/*.py and the modules they import) by path from this folder.
$(TORCHVISION_SRC)/torchvision/models/resnet.py: $(BIN)/python
	$(BIN)/pip download -q --no-deps torchvision==0.28.0 -d $(VENV)/wheels
	$(BIN)/python -c "import glob, zipfile; wheel = zipfile.ZipFile(glob.glob('$(VENV)/wheels/torchvision-0.28.0-*.whl')[0]); \
	wheel.extractall('$(TORCHVISION_SRC)', [n for n in wheel.namelist() if n.endswith('.py') and \
	(n.startswith('torchvision/models/') or n in ('torchvision/_utils.py', 'torchvision/_internally_replaced_utils.py'))])"

run: venv
	$(BIN)/fedjax-users run

# The zoo's name-by-name checks of deep models (`heavy`) take far longer than the rest of the suite on a CPU: `make test-heavy`.
test: venv-test
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(BIN)/python -m pytest tests -m "not heavy" --durations=30
	$(BIN)/python -m parity --quick --json results/parity_quick.json

test-heavy: venv-test
	$(BIN)/python -m pytest tests/models -m heavy

parity: venv-test
	$(BIN)/python -m parity --json results/parity.json

bench: venv-test
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info

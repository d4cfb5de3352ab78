# penaltyd: every workflow is a make target; .ci/run calls `make test` and nothing else.
# The venv and the Debian packages the tests need are installed on first use.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell for p in python3 python3.11 python3.12 python3.13; do \
             $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
             && { echo $$p; break; }; done)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051
PROTOS := proto/penalty/v1/penalty.proto

.PHONY: help venv run test unit integration e2e lint fmt proto proto-check bench redis-server h2load clean

help:
	@echo "make run        penaltyd on $(LISTEN) with the embedded store"
	@echo "make test       lint + the whole test suite (installs what it needs)"
	@echo "make lint       ruff, mypy, and generated code up to date"
	@echo "make proto      regenerate protobuf/gRPC code from proto/"
	@echo "make bench      benchmarks (table + JSON in bench/results/)"

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

# Debian's redis-server (the integration tests start their own on free loopback ports)
# and openssl (the TLS test makes a throwaway certificate).
redis-server:
	@command -v redis-server >/dev/null && command -v openssl >/dev/null || { \
	  echo "installing Debian's redis-server and openssl"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  $(SUDO) apt-get install -y -qq redis-server openssl >/dev/null; }

# h2load (Debian nghttp2-client): the C load generator the benchmarks drive gRPC with.
h2load:
	@command -v h2load >/dev/null || { \
	  echo "installing Debian's nghttp2-client (h2load)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nghttp2-client >/dev/null; }

run: venv
	$(VENV)/bin/penaltyd --listen $(LISTEN)

proto: venv
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=proto --grpc_python_out=proto --mypy_out=proto --mypy_grpc_out=proto $(PROTOS) 2>&1 \
	  | { grep -v '^Writing mypy' || true; }

# Regenerate into a scratch tree and fail if the committed code differs.
proto-check: venv
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp $(PROTOS) 2>/dev/null && \
	for f in $$(cd $$tmp && find . -name '*_pb2*'); do \
	  diff -q $$tmp/$$f proto/$$f >/dev/null || { echo "generated code is stale: $$f (run make proto)" >&2; exit 1; }; \
	done && echo "generated code up to date"

lint: venv proto-check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: venv redis-server lint
	$(PY) -m pytest -m "unit or integration or e2e" -q

unit: venv
	$(PY) -m pytest -m unit -q

integration: venv redis-server
	$(PY) -m pytest -m integration -q

bench: venv redis-server h2load
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench/results

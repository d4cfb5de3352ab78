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
# Each contract's generated code lives in the package whose import path mirrors
# proto/<pkg>/v1/: penalty.v1 beside its .proto (shared by service and clients),
# relaycheck.v1 inside the relaycheck service package.
PROTO_SETS := proto:proto/penalty/v1/penalty.proto services:proto/relaycheck/v1/relaycheck.proto
PROTOC = PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto

.PHONY: help venv run test unit integration e2e lint fmt proto proto-check bench bench-hostile simulate deploy-check deps redis-server h2load clean

help:
	@echo "make run        penaltyd on $(LISTEN) with the embedded store"
	@echo "make test       lint + the whole test suite (installs what it needs)"
	@echo "make lint       ruff, mypy, and generated code up to date"
	@echo "make proto      regenerate protobuf/gRPC code from proto/"
	@echo "make bench      benchmarks (table + JSON in bench/results/), then bench-hostile"
	@echo "make bench-hostile  what hostile clients cost (docs/reliability.md)"
	@echo "make deploy-check  render the kustomize overlays and validate deploy/ offline"
	@echo "make simulate   simulated SMTP traffic through the detector (SIM_ARGS=--quick ...)"

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

# Debian packages the tests need: redis-server (integration tests start their own on free
# loopback ports), openssl (the TLS test makes a throwaway certificate) and postfix (the
# end-to-end test runs a private instance; installed with "No configuration", so the
# machine's own mail setup is left alone).
DEB_PKGS := redis-server:redis-server openssl:openssl postfix:postfix
deps:
	@missing=""; PATH="$$PATH:/usr/sbin"; for pair in $(DEB_PKGS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

redis-server: deps

# h2load (Debian nghttp2-client): the C load generator the benchmarks drive gRPC with.
h2load:
	@command -v h2load >/dev/null || { \
	  echo "installing Debian's nghttp2-client (h2load)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nghttp2-client >/dev/null; }

run: venv
	$(VENV)/bin/penaltyd --listen $(LISTEN)

proto: venv
	@for set in $(PROTO_SETS); do out=$${set%%:*}; src=$${set#*:}; [ -f $$src ] || continue; \
	  $(PROTOC) --python_out=$$out --grpc_python_out=$$out --mypy_out=$$out --mypy_grpc_out=$$out $$src \
	    2>&1 | { grep -v '^Writing mypy' || true; }; done

# Regenerate into a scratch tree and fail if the committed code differs.
proto-check: venv
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	for set in $(PROTO_SETS); do out=$${set%%:*}; src=$${set#*:}; [ -f $$src ] || continue; \
	  mkdir -p $$tmp/$$out && \
	  $(PROTOC) --python_out=$$tmp/$$out --grpc_python_out=$$tmp/$$out --mypy_out=$$tmp/$$out \
	    --mypy_grpc_out=$$tmp/$$out $$src 2>&1 | { grep -v '^Writing mypy' || true; }; \
	done && \
	for f in $$(cd $$tmp && find . -name '*_pb2*'); do \
	  diff -q $$tmp/$$f $$f >/dev/null || { echo "generated code is stale: $$f (run make proto)" >&2; exit 1; }; \
	done && echo "generated code up to date"

lint: venv proto-check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: venv deps lint deploy-check
	$(PY) -m pytest -m "unit or integration or e2e" -q

# Render every kustomize overlay and validate each object against the Kubernetes schemas,
# offline (deploy/check.py).
deploy-check: venv
	$(PY) deploy/check.py

unit: venv
	$(PY) -m pytest -m unit -q

e2e: venv deps
	$(PY) -m pytest -m e2e -q

integration: venv deps
	$(PY) -m pytest -m integration -q

bench: venv redis-server h2load
	$(PY) -m bench $(BENCH_ARGS)
	$(MAKE) --no-print-directory bench-hostile

# What hostile clients cost (docs/reliability.md): floods, stalled watchers, the bounded
# embedded store, forged Received chains, the sidecars under attack.
bench-hostile: venv redis-server
	$(PY) -m bench.hostile
	$(PY) -m bench.hostile --store redis
	$(PY) -m bench.memory_store
	$(PY) -m bench.relaycheck_hostile
	$(PY) -m bench.policyd_bench --rounds 3 --seconds 8 --fairness
	$(PY) -m bench.milter_rss

# In process, on a simulated clock: 2 simulated hours in well under a minute, no servers.
simulate: venv
	$(PY) -m bench.simulate $(SIM_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench/results

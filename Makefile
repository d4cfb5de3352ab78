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
# machine's own mail setup is left alone). Then Exim and Haraka for their end-to-end tests,
# into .cache/ and never installed (make exim, make haraka below).
# systemd-analyze (Debian's systemd) verifies deploy/systemd/ offline in the unit tests;
# promtool and prometheus (Debian's prometheus) run the alerts' unit tests
# (deploy/prometheus/rules_test.yml) and the Prometheus integration test.
DEB_PKGS := redis-server:redis-server openssl:openssl postfix:postfix systemd-analyze:systemd \
            promtool:prometheus
deps:
	@missing=""; PATH="$$PATH:/usr/sbin"; for pair in $(DEB_PKGS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $(SUDO) debconf-set-selections; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi
	@$(MAKE) --no-print-directory exim haraka

redis-server: deps

# Exim for tests/e2e/test_exim.py. Debian's exim4-daemon-light conflicts with postfix, so it
# is downloaded and unpacked into $(EXIM_ROOT), never installed: the package, the shared
# libraries it needs that the machine lacks (its Depends, recursively, not installed), and
# nss_wrapper, which gives the test's Exim a private passwd file naming its compiled-in user.
.PHONY: exim haraka
EXIM_ROOT := .cache/exim4
EXIM_DEBS := exim4-daemon-light libnss-wrapper
exim: $(EXIM_ROOT)/usr/sbin/exim4
	@:
$(EXIM_ROOT)/usr/sbin/exim4:
	@echo "unpacking Debian's exim4-daemon-light into $(EXIM_ROOT) (downloaded, not installed)"
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; cd $$tmp; \
	apt-cache show exim4-daemon-light >/dev/null 2>&1 || $(SUDO) apt-get update -qq; \
	libs=$$(apt-cache depends --important exim4-daemon-light | awk '$$2 ~ /^lib/ {print $$2}'); \
	debs="$(EXIM_DEBS)"; for p in $$(apt-cache depends --recurse --important $$libs | grep '^lib' | sort -u); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || debs="$$debs $$p"; done; \
	apt-get download -qq -o APT::Sandbox::User=root $$debs 2>/dev/null || \
	  { $(SUDO) apt-get update -qq && apt-get download -qq -o APT::Sandbox::User=root $$debs; }; \
	dest=$(abspath $(EXIM_ROOT)); rm -rf $$dest.new; mkdir -p $$dest.new; for deb in *.deb; do dpkg-deb -x $$deb $$dest.new; done; \
	rm -rf $$dest; mv $$dest.new $$dest

# Haraka for tests/e2e/test_haraka.py, from the npm registry into $(HARAKA_DIR) (Haraka 3
# needs Node.js 20+; without npm the test is skipped and says why).
HARAKA_DIR := .cache/haraka
HARAKA_VERSION ?= 3
haraka:
	@dest=$(abspath $(HARAKA_DIR)); \
	if [ -f $$dest/node_modules/Haraka/package.json ]; then :; \
	elif ! command -v npm >/dev/null; then echo "npm not found: tests/e2e/test_haraka.py will be skipped"; \
	else echo "installing Haraka@$(HARAKA_VERSION) from the npm registry into $(HARAKA_DIR)"; \
	  rm -rf $$dest.new && mkdir -p $$dest.new && \
	  npm install --prefix $$dest.new --no-audit --no-fund --loglevel=error Haraka@$(HARAKA_VERSION) >/dev/null && \
	  rm -rf $$dest && mv $$dest.new $$dest; fi

# h2load (Debian nghttp2-client): the C load generator the benchmarks drive gRPC with.
h2load:
	@command -v h2load >/dev/null || { \
	  echo "installing Debian's nghttp2-client (h2load)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nghttp2-client >/dev/null; }

# The Postfix policy servers operators use today, for make bench's `peers` group
# (bench/peers.py runs its own copies in the foreground): Debian's policyd-rate-limit,
# postgrey and postfwd. Their services are kept from starting (a policy-rc.d answering
# 101 while the packages install, when the machine has none) and left stopped and
# disabled; none of them touches Postfix's configuration.
.PHONY: peers-deps bench-peers
PEER_PKGS := policyd-rate-limit postgrey postfwd
POLICY_RC_D ?= /usr/sbin/policy-rc.d
peers-deps:
	@missing=""; for p in $(PEER_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing (their services not started)"; \
	  rc=$(POLICY_RC_D); ours=""; \
	  if [ ! -e $$rc ]; then printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee $$rc >/dev/null && \
	    $(SUDO) chmod 755 $$rc && ours=1; fi; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $(SUDO) apt-get install -y -qq $$missing >/dev/null; status=$$?; \
	  [ -z "$$ours" ] || $(SUDO) rm -f $$rc; \
	  for s in $$missing; do \
	    $(SUDO) service $$s stop >/dev/null 2>&1; $(SUDO) update-rc.d $$s disable >/dev/null 2>&1; \
	  done; exit $$status; fi

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
	$(PY) -m bench.keyed   # what identity_key costs (docs/performance.md#keyed-identities)
	$(PY) -m bench.reputation  # reputation: Redis bytes per identity/neighbourhood, CPU before/after
	$(PY) -m bench.workers # workers=2 against workers=1 on Redis, with the CPU each used
	$(PY) -m bench.visible # a penalty visible on the MX that reported it (policyd + milter)
	$(MAKE) --no-print-directory bench-hostile
	$(MAKE) --no-print-directory bench-peers

# What hostile clients cost (docs/reliability.md): floods, stalled watchers, the bounded
# embedded store, forged Received chains, the sidecars under attack.
bench-hostile: venv redis-server
	$(PY) -m bench.hostile
	$(PY) -m bench.hostile --store redis
	$(PY) -m bench.memory_store
	$(PY) -m bench.relaycheck_hostile
	$(PY) -m bench.policyd_bench --rounds 3 --seconds 8 --fairness
	$(PY) -m bench.milter_rss

# penalty-policyd beside policyd-rate-limit, postgrey and postfwd2 on the same C load
# (bench/peers.py; docs/performance.md). PEERS_ARGS=--quick for a smoke run.
bench-peers: venv peers-deps
	$(PY) -m bench.peers $(PEERS_ARGS)

# In process, on a simulated clock: 2 simulated hours in well under a minute, no servers.
# Default: issue 15's populations over five seeds, each class's worst seed
# (docs/detection.md, "Reputation"); SIM_ARGS="--quick" or "--seed 3" for one run.
SIM_ARGS ?= --scenario reputation --seeds 5
simulate: venv
	$(PY) -m bench.simulate $(SIM_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench/results

# --- Running outside Kubernetes (docs/operations.md, "Running outside Kubernetes")
.PHONY: fleet prometheus image-tools image-base image image-test

# Prometheus (Debian's prometheus, with promtool) for `make fleet`; `make deps` installs it
# too, for the rules tests.
prometheus:
	@command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq prometheus >/dev/null; }

# Redis, three penaltyd replicas, a penalty-policyd round robin over them and Prometheus,
# all on loopback in the foreground; Ctrl-C stops everything (deploy/local_fleet.py).
fleet: venv redis-server prometheus
	$(PY) deploy/local_fleet.py $(FLEET_ARGS)

# The container image, built here without a registry: a python:3.11-slim stand-in made
# from Debian's packages (debootstrap), then deploy/Dockerfile on it with buildah, tagged
# as deploy/k8s/base/kustomization.yaml names the image.
IMAGE_BASE ?= localhost/penaltyd-base:bookworm
image-tools:
	@missing=""; for pair in debootstrap:debootstrap buildah:buildah; do \
	  PATH="$$PATH:/usr/sbin" command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

image-base: image-tools
	$(SUDO) deploy/image/base.sh $(IMAGE_BASE)

image: venv image-tools
	@$(SUDO) buildah inspect --type image $(IMAGE_BASE) >/dev/null 2>&1 || \
	  case "$(IMAGE_BASE)" in localhost/*) $(MAKE) --no-print-directory image-base ;; esac
	$(SUDO) env BASE_IMAGE=$(IMAGE_BASE) PY=$(PY) deploy/image/build.sh

# Build the image if needed and run it: penaltyd and relaycheck in it answer gRPC health.
image-test: image
	$(PY) -m pytest tests/e2e/test_image.py -q -p no:cacheprovider

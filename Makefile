# lclb: build, run and test. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help build test lint unit e2e run certs static soak bench bench-build mutants docker-build docker-run docker-compose
help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## Release build of lclb (target/release/lclb)
	$(CARGO) build --release --locked

lint: ## Formatting and clippy checks, whole workspace (lclb and bench/)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: ## Unit and integration tests, whole workspace (cargo test)
	$(CARGO) test --workspace --locked --all-targets

test: lint unit e2e ## Everything CI checks: fmt, clippy, tests, end-to-end scripts

e2e: ## End to end: fresh certs, 3 demo upstreams + lclb on free ports, the mTLS and load scripts
	scripts/e2e.sh

run: ## Build, make certs if none, run 3 demo upstreams + lclb (lclb.example.toml); Ctrl-C stops all
	scripts/run-demo.sh

certs: ## Development certificates into certs/ (and certs/alt/ for the refusal tests); FORCE=1 redoes them
	certs/generate_certs.sh
	certs/generate_alt_certs.sh

soak: ## 10 minutes of good, refused and hostile traffic; fails unless memory, fds and threads stay flat (SOAK_SECONDS)
	scripts/soak.sh

bench: ## Benchmark lclb against HAProxy and NGINX on 127.0.0.1 (scripts/bench.sh; ROUNDS, DURATION, HOLD, ... see BENCHMARKS.md)
	scripts/bench.sh

bench-build: ## Release builds of lclb and the benchmark tool (target/release/lclb, target/release/lclb-bench)
	$(CARGO) build --release --locked -p lclb -p lclb-bench

mutants: ## Mutation testing of the security/correctness modules, one at a time (scripts/mutants.sh; not in `make test`; see MUTANTS.md)
	scripts/mutants.sh $(MODULES)

static: ## Static, stripped x86_64 musl build of lclb (installs the target and musl-tools if missing)
	scripts/build-static.sh

DOCKER ?= docker
IMAGE ?= lclb:latest
UPSTREAM_IMAGE ?= lclb-upstream:latest

docker-build: ## Build the lclb image (FROM scratch, static binary) and the demo upstream image
	$(DOCKER) build -f docker/Dockerfile --target lclb -t $(IMAGE) .
	$(DOCKER) build -f docker/Dockerfile --target upstream -t $(UPSTREAM_IMAGE) .

docker-run: ## Run the lclb image on the host network with lclb.example.toml and certs/ mounted read-only
	@test -f certs/server/server.key.pem || { echo "no certificates in certs/: run 'make certs' first"; exit 1; }
	$(DOCKER) run --rm --network host --user "$$(stat -c %u:%g certs/server/server.key.pem)" \
		-v "$(CURDIR)/lclb.example.toml:/etc/lclb/lclb.toml:ro" \
		-v "$(CURDIR)/certs:/etc/lclb/certs:ro" \
		$(IMAGE)

docker-compose: ## lclb and three demo upstreams with docker compose (docker/docker-compose.yml)
	@test -f certs/server/server.key.pem || { echo "no certificates in certs/: run 'make certs' first"; exit 1; }
	LCLB_USER="$$(stat -c %u:%g certs/server/server.key.pem)" \
		$(DOCKER) compose -f docker/docker-compose.yml up --build

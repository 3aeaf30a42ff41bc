# lclb: build, run and test. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help build test lint unit e2e run certs static soak bench bench-build mutants docker-build docker-test docker-run docker-compose
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

static: ## Static, stripped musl builds of lclb and the demo upstream (installs the target and musl-tools if missing)
	scripts/build-static.sh

# The engine: DOCKER=docker|podman; unset, scripts/lib/engine.sh picks podman when docker has
# no reachable daemon. It sets the shell's DOCKER and COMPOSE (podman 4 has no `podman compose`:
# it is podman-compose) and, for podman, a containers.conf in target/ (runc, host ulimits).
ENGINE := source scripts/lib/common.sh && source scripts/lib/engine.sh && engine_setup
export IMAGE ?= lclb:latest
export UPSTREAM_IMAGE ?= lclb-upstream:latest

docker-build: ## make static, then the lclb and demo upstream images FROM scratch (nothing pulled); prints their sizes
	scripts/docker-build.sh

docker-test: ## Images, compose demo on a free port, mTLS/load scripts from the host, 65534/read-only/no shell, reload and stop (scripts/docker-test.sh; root)
	scripts/docker-test.sh

docker-run: ## Run the lclb image on the host network with lclb.example.toml and certs/ mounted read-only
	@test -f certs/server/server.key.pem || { echo "no certificates in certs/: run 'make certs' first"; exit 1; }
	$(ENGINE) && "$$DOCKER" run --rm --network host --user "$$(stat -c %u:%g certs/server/server.key.pem)" \
		-v "$(CURDIR)/lclb.example.toml:/etc/lclb/lclb.toml:ro" \
		-v "$(CURDIR)/certs:/etc/lclb/certs:ro" \
		$(IMAGE)

docker-compose: docker-build ## lclb and three demo upstreams with compose (docker/docker-compose.yml), lclb on 127.0.0.1:9443; scripts/docker-compose.sh down stops them
	scripts/docker-compose.sh

# lclb: build, run and test. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help build test lint unit
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## Release build of lclb (target/release/lclb)
	$(CARGO) build --release --locked

lint: ## Formatting and clippy checks
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

unit: ## Unit and integration tests (cargo test)
	$(CARGO) test --locked

test: lint unit ## Everything CI checks: fmt, clippy, tests

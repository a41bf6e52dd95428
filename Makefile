# podbox: the two commands the README promises, and their parts.
#   make demo   boot a podbox microVM and show it beside the host
#   make test   install what the tests need, build, run every test
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps kernel build test demo bench

deps:
	scripts/deps.sh

kernel: deps
	guest-kernel/build.sh

build: deps
	$(CARGO) build --workspace

test: deps
	$(CARGO) test --workspace

demo: deps
	scripts/demo.sh

bench: deps
	$(CARGO) run --release -p podbox-tests --bin podbox-bench

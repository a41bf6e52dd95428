# podbox: the two commands the README promises, and their parts.
#   make demo   boot a podbox microVM and show it beside the host
#   make test   install what the tests need, build, run every test
#   make install  install the shim, VMM, kernel, initramfs and config for the host's containerd
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps kernel build test demo demo-pods bench install

deps:
	scripts/deps.sh

kernel: deps
	guest-kernel/build.sh

build: deps
	$(CARGO) build --workspace

test: deps
	$(CARGO) test --workspace --no-fail-fast

demo: deps
	scripts/demo.sh

# The pod flow of the main job through containerd (runc pod beside a podbox pod).
demo-pods: deps
	scripts/demo-pods.sh

bench: deps
	$(CARGO) build --release -p podbox-vmm
	$(CARGO) run --release -p podbox-tests --bin podbox-bench -- boot

install: deps
	scripts/install.sh

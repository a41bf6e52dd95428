# podbox: the two commands the README promises, and their parts.
#   make demo   a two-container pod under runc and in a podbox microVM, through containerd
#   make test   install what the tests need, build the guest kernel and image (test-assets)
#               and the release shim and VMM, then run every test
#   make install  install the shim, VMM, kernel, initramfs and config for the host's containerd
#   make fuzz   build the cargo-fuzz targets (fuzz/) and run each for FUZZ_SECONDS (60) s; fails on a crash
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: deps kernel test-assets bench-assets build test demo demo-vm bench bench-agent-boot bench-pods bench-net bench-density install fuzz

deps:
	scripts/deps.sh

kernel: deps
	guest-kernel/build.sh

# What the tests boot, built (or found in /var/cache/podbox) before cargo test:
# the podbox guest kernel and the guest image with the static agent (its own
# cargo build, in target/guest). The test harness only looks them up
# (`build.sh --print-path`) and fails naming this target where one is missing.
test-assets: deps
	guest-kernel/build.sh --variant podbox
	guest-image/build.sh

# The benchmarks' extra: the QEMU variant of the guest kernel.
bench-assets: test-assets
	guest-kernel/build.sh --variant qemu

build: deps
	$(CARGO) build --workspace

# The containerd e2e tests run the release shim and VMM from
# $CARGO_TARGET_DIR/release (or target/release); the harness does not build them.
test: test-assets
	$(CARGO) build --release -p podbox-shim -p podbox-vmm
	$(CARGO) test --workspace --no-fail-fast

demo: deps
	scripts/demo.sh

# A plain microVM (busybox init, no containerd) beside the host.
demo-vm: deps
	scripts/demo-vm.sh

bench: bench-assets
	$(CARGO) build --release -p podbox-vmm
	$(CARGO) run --release -p podbox-tests --bin podbox-bench -- boot

# Boot to agent-ready, the guest kernel and agent of before the boot diet
# (issue 11) beside today's, in one run (two guest boots per run).
bench-agent-boot: test-assets
	guest-kernel/build.sh --variant baseline
	guest-image/build.sh --baseline
	$(CARGO) build --release -p podbox-vmm
	$(CARGO) run --release -p podbox-tests --bin podbox-bench -- agent-boot --runs 2

# Pods through containerd: runc, podbox with the guest kernel and image of
# before the boot diet, and today's podbox (several guest boots: minutes).
bench-pods: test-assets
	guest-kernel/build.sh --variant baseline
	guest-image/build.sh --baseline
	$(CARGO) build --release -p podbox-shim -p podbox-vmm
	$(CARGO) build --release -p podbox-tests --bin podbox-bench
	PODBOX_BIN_DIR=$${CARGO_TARGET_DIR:-$$PWD/target}/release $${CARGO_TARGET_DIR:-target}/release/podbox-bench pods --runs 3

# Host <-> pod TCP over the CNI network, podbox beside runc (one guest boot).
bench-net: test-assets
	$(CARGO) build --release -p podbox-shim -p podbox-vmm
	$(CARGO) build --release -p podbox-tests --bin podbox-bench
	PODBOX_BIN_DIR=$${CARGO_TARGET_DIR:-$$PWD/target}/release $${CARGO_TARGET_DIR:-target}/release/podbox-bench net --runs 1

# Host memory per idle pod at 1, 5 and 10 pods, podbox beside runc (ten
# guest boots, minutes).
bench-density: test-assets
	$(CARGO) build --release -p podbox-shim -p podbox-vmm
	$(CARGO) build --release -p podbox-tests --bin podbox-bench
	PODBOX_BIN_DIR=$${CARGO_TARGET_DIR:-$$PWD/target}/release $${CARGO_TARGET_DIR:-target}/release/podbox-bench density

install: deps
	scripts/install.sh

# libFuzzer on the guest- and input-facing parsers (README "Fuzzing"): one
# `cargo fuzz build` of every target in fuzz/, then each runs for
# FUZZ_SECONDS; installs cargo-fuzz where it is missing.
FUZZ_SECONDS ?= 60
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) fuzz/run.sh

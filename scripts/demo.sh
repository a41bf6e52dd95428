#!/usr/bin/env bash
# The main job: build everything, start a private containerd, import a
# locally built busybox image, and run the same two-container pod under
# runc and in a podbox microVM, printing each container's kernel release,
# CPU count, MemTotal, network interfaces, eth0 IP and driver, then a request
# from the runc pod to the podbox pod. (scripts/deps.sh, run by
# `make demo`, installs containerd, runc, CNI plugins, the kernel source
# and virtiofsd.)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building the shim, podbox-vmm, the guest kernel and image" >&2
# Two builds: cargo applies `--bin` to every package named with it.
cargo build --release -q -p podbox-shim -p podbox-vmm
cargo build --release -q -p podbox-tests --bin podbox-demo
guest-kernel/build.sh >/dev/null
guest-image/build.sh >/dev/null
PODBOX_BIN_DIR=${CARGO_TARGET_DIR:-$PWD/target}/release exec "${CARGO_TARGET_DIR:-target}/release/podbox-demo"

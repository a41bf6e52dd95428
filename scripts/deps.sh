#!/usr/bin/env bash
# Installs what podbox's build, tests and demo need on a Debian 12 host.
# Idempotent: packages already present are not fetched again.
set -euo pipefail

# Debian packages: the guest kernel build (its source and toolchain), busybox
# for guest and container root filesystems, cpio, QEMU (benchmark peer),
# containerd + runc + CNI plugins (the shim's real peer in tests, runc beside it),
# protoc (the CRI API test client is generated from .proto at build time).
APT_PACKAGES=(
    linux-source-6.12 bc flex bison libelf-dev libssl-dev make gcc patch xz-utils
    busybox-static cpio file
    qemu-system-x86
    containerd runc containernetworking-plugins protobuf-compiler
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -e /dev/kvm ]; then
    echo "deps: warning: /dev/kvm is absent; VM tests will be skipped" >&2
fi

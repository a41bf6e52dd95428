#!/usr/bin/env bash
# Installs what podbox's build, tests and demo need on a Debian 12 host.
# Idempotent: packages already present are not fetched again.
set -euo pipefail

# Debian packages: the guest kernel build (its source and toolchain), busybox
# for guest and container root filesystems, cpio, QEMU (benchmark peer),
# containerd + runc + CNI plugins (the shim's real peer in tests, runc beside it),
# iptables (the CNI portmap plugin), iproute2 (tests look into pod netns),
# protoc (the CRI API test client is generated from .proto at build time).
APT_PACKAGES=(
    linux-source-6.12 bc flex bison libelf-dev libssl-dev make gcc patch xz-utils
    busybox-static cpio file
    qemu-system-x86
    containerd runc containernetworking-plugins iptables iproute2 protobuf-compiler
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

# virtiofsd (the virtio-fs backend podbox-vmm --shared-dir starts): Debian 12
# has no package, so cargo builds it (~5 min on 2 cores) into ~/.cargo/bin,
# where podbox-vmm and the tests look after PATH. It links libcap-ng and
# libseccomp.
if ! command -v virtiofsd >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" ]; then
    for pkg in libcap-ng-dev libseccomp-dev; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || {
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcap-ng-dev libseccomp-dev >/dev/null
            break
        }
    done
    echo "deps: building virtiofsd (cargo install virtiofsd --locked)" >&2
    cargo install virtiofsd --locked
fi

if [ ! -e /dev/kvm ]; then
    echo "deps: warning: /dev/kvm is absent; VM tests will be skipped" >&2
fi

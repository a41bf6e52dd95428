#!/usr/bin/env bash
# Installs podbox for the host's containerd: the shim and podbox-vmm into
# $PREFIX/bin (default /usr/local/bin; the shim finds the VMM beside itself),
# the guest kernel and initramfs into /usr/share/podbox, virtiofsd into
# /usr/libexec/virtiofsd, and a default /etc/podbox/config.toml (an existing
# one is kept). Builds whatever is missing (release build, cached kernel and
# image builds).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
SHARE=/usr/share/podbox
CONFIG=/etc/podbox/config.toml
CARGO=${CARGO:-cargo}

echo "install: building the shim and podbox-vmm (release)" >&2
$CARGO build --release -q -p podbox-shim -p podbox-vmm
kernel=$(guest-kernel/build.sh | tail -n 1)
initrd=$(guest-image/build.sh | tail -n 1)
virtiofsd=$(command -v virtiofsd || echo "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd")
[ -x "$virtiofsd" ] || { echo "install: no virtiofsd (scripts/deps.sh builds it)" >&2; exit 1; }

target=${CARGO_TARGET_DIR:-target}/release
install -D -m 0755 "$target/containerd-shim-podbox-v2" "$PREFIX/bin/containerd-shim-podbox-v2"
install -D -m 0755 "$target/podbox-vmm" "$PREFIX/bin/podbox-vmm"
install -D -m 0644 "$kernel" "$SHARE/vmlinux"
install -D -m 0644 "$initrd" "$SHARE/initramfs.cpio"
if [ "$(readlink -f "$virtiofsd")" != /usr/libexec/virtiofsd ]; then
    install -D -m 0755 "$virtiofsd" /usr/libexec/virtiofsd
fi
if [ ! -e "$CONFIG" ]; then
    install -d /etc/podbox
    cat > "$CONFIG" <<CONF
# podbox shim config (see shim/src/settings/config.rs). Every key is optional.
kernel = "$SHARE/vmlinux"
initrd = "$SHARE/initramfs.cpio"
virtiofsd = "/usr/libexec/virtiofsd"
default_vcpus = 2
default_memory_mib = 256
log_level = "info"
# virtiofsd cache: always (default; fastest), auto or never (see host changes to volumes at once):
fs_cache = "always"
# io.podbox.* annotations pods may set (none unless listed):
allowed_annotations = []
CONF
fi
echo "install: done: $PREFIX/bin/containerd-shim-podbox-v2, $PREFIX/bin/podbox-vmm, $SHARE/{vmlinux,initramfs.cpio}, /usr/libexec/virtiofsd, $CONFIG" >&2

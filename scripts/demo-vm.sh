#!/usr/bin/env bash
# `make demo-vm`: boot a plain microVM with podbox-vmm (a busybox init, no
# containerd, no agent) on this host's KVM and show it beside the host:
# kernel release, CPUs, memory, network interfaces. The main job with pods
# through containerd is scripts/demo.sh (`make demo`).
set -euo pipefail
cd "$(dirname "$0")/.."

VCPUS=${VCPUS:-2}
MEMORY_MIB=${MEMORY_MIB:-256}

echo "==> building podbox-vmm and the guest kernel" >&2
cargo build --release -q -p podbox-vmm
kernel=$(guest-kernel/build.sh | tail -n 1)

work=$(mktemp -d /tmp/podbox-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys}
cp /bin/busybox "$root/bin/busybox"
for applet in sh mount cat echo grep nproc reboot uname ls tr cut; do ln -s busybox "$root/bin/$applet"; done
cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "guest kernel:     $(uname -r)"
echo "guest CPUs:       $(nproc)"
echo "guest memory:     $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)"
echo "guest interfaces: $(ls /sys/class/net | tr '\n' ' ')"
reboot -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$work/initramfs.cpio"

echo "==> host" >&2
echo "host kernel:      $(uname -r)"
echo "host CPUs:        $(nproc)"
echo "host memory:      $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2-)"
echo "host interfaces:  $(ls /sys/class/net | tr '\n' ' ')"
echo "==> booting a podbox microVM ($VCPUS vCPUs, $MEMORY_MIB MiB); about a minute on PVM hosts" >&2
start=$(date +%s.%N)
target/release/podbox-vmm --kernel "$kernel" --initrd "$work/initramfs.cpio" \
    --vcpus "$VCPUS" --memory-mib "$MEMORY_MIB" --cmdline quiet --serial "$work/serial.log" 2>"$work/vmm.log" \
    || { echo "podbox-vmm failed:" >&2; cat "$work/vmm.log" "$work/serial.log" >&2; exit 1; }
grep -E '^guest ' "$work/serial.log" | tr -d '\r'
printf 'VM ran %.1f s and exited 0 (guest reboot -f)\n' "$(echo "$(date +%s.%N) - $start" | bc)"

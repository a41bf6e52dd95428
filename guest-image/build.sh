#!/usr/bin/env bash
# Build the podbox guest image: an initramfs (newc cpio) whose /init is the
# static podbox-agent, plus the empty directories it mounts on.
#
#   guest-image/build.sh [--baseline] [--print-path]
#
# The kernel boots it with its default `rdinit=/init` (nothing to add to the
# command line; podbox-vmm adds console=ttyS0 reboot=k panic=1). The agent
# mounts /proc, /sys, /dev, /run itself as PID 1 and listens on vsock port
# 1024. /dev/console comes from the kernel's built-in initramfs.
#
# The agent is built with cargo (static, release) in its own target dir,
# $PODBOX_GUEST_TARGET_DIR (default <repo>/target/guest), so that the build
# does not wait on other cargo runs. The image is cached under
# $PODBOX_CACHE_DIR (default /var/cache/podbox)/initramfs/<hash>.cpio, keyed
# by the agent binary and this recipe. Progress goes to stderr; the image
# path is the last stdout line.
#
# --print-path: build and install nothing (no cargo); print the path of the
#   cached image for the agent binary now in the target dir, or fail (status
#   1) if either is missing. The test harness looks the image up this way
#   (`make test-assets`, which `make test` runs first, builds it).
# --baseline: the agent as it was before issue 11 (its source at commit
#   $BASELINE_REV, from this repository's history, built as then: release
#   profile, static-pie), for `podbox-bench agent-boot` and `pods`.
set -euo pipefail

# Bump when the layout of the image changes.
RECIPE_VERSION=2
# The last commit before issue 11's first change (the guest diet):
# the "before" of its benchmarks. The agent protocol has not changed since.
BASELINE_REV=ea20c9b
TARGET=x86_64-unknown-linux-gnu

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
print_path=
baseline=
profile=guest
rustflags='-C target-feature=+crt-static -C relocation-model=static'
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --print-path) print_path=1 ;;
        --baseline) baseline=1; profile=release; rustflags='-C target-feature=+crt-static' ;;
        *) echo "build.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
log() { echo "guest-image: $*" >&2; }

target_dir=${PODBOX_GUEST_TARGET_DIR:-$repo/target/guest}
# The old source gets a target dir of its own: in a shared one cargo would
# take today's build of the same relative paths as up to date.
[ -z "$baseline" ] || target_dir=$target_dir/baseline-$BASELINE_REV
# The `guest` cargo profile (Cargo.toml: size-optimised, LTO) and a non-PIE
# static binary: the image is copied in guest memory at every boot and a
# static-pie binary's start-up relocations dirty pages the guest kernel must
# fault in, both emulated work on PVM hosts (4.1 MB instead of 6.8 MB).
agent=$target_dir/$TARGET/$profile/podbox-agent
if [ -n "$print_path" ]; then
    [ -f "$agent" ] || { log "no agent binary at $agent: run guest-image/build.sh"; exit 1; }
else
    command -v cpio >/dev/null || {
        log "installing cpio"
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cpio >&2
    }
    src=$repo
    if [ -n "$baseline" ]; then
        # The old source, unpacked once beside the target dir.
        src=$target_dir/src
        if [ ! -f "$src/Cargo.lock" ]; then
            git -C "$repo" cat-file -e "$BASELINE_REV^{commit}" 2>/dev/null || {
                log "commit $BASELINE_REV (the baseline agent's source) is not in $repo's history (a shallow clone?): git fetch --unshallow"
                exit 1
            }
            rm -rf "$src.tmp" && mkdir -p "$src.tmp"
            git -C "$repo" archive "$BASELINE_REV" | tar -x -C "$src.tmp"
            mv "$src.tmp" "$src"
        fi
    fi
    log "building the static agent (cargo, $src, $target_dir)"
    (cd "$src" && CARGO_TARGET_DIR="$target_dir" RUSTFLAGS="$rustflags" \
        cargo build --profile "$profile" --target "$TARGET" -p podbox-agent >&2)
    file -L "$agent" 2>/dev/null | grep -q 'static' || { log "$agent is not statically linked"; exit 1; }
fi

key=$( { echo "recipe $RECIPE_VERSION"; sha256sum < "$agent"; } | sha256sum | cut -c1-16)
cache=${PODBOX_CACHE_DIR:-/var/cache/podbox}/initramfs
out=$cache/$key.cpio
if [ -n "$print_path" ]; then
    # No lock: a build renames its finished image into place.
    [ -f "$out" ] || { log "no image built for $agent ($out): run guest-image/build.sh"; exit 1; }
    echo "$out"
    exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -f "$out" ]; then
    log "cached image (key $key)"
    echo "$out"
    exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,run,tmp}
chmod 1777 "$stage/tmp"
install -m 0755 "$agent" "$stage/init"
strip "$stage/init" 2>/dev/null || true
# The guest unpacks the initramfs into 2 MiB folios only where a file
# covers a whole one (initramfs_options=huge=within_size in
# guest-kernel/podbox.config); zeros up to the next 2 MiB put the agent's
# last part in one too, instead of in ~470 single pages (0.3 s of emulated
# guest kernel work at each boot on PVM hosts). The kernel's ELF loader
# reads only the segments, never what follows them.
[ -n "$baseline" ] || truncate -s %2M "$stage/init"
# Sorted names, root ownership and fixed times: the same agent gives the
# same bytes.
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\./||' |
    cpio --quiet -o -H newc --owner 0:0 --reproducible > "$out.tmp")
mv "$out.tmp" "$out"
log "built $out ($(du -k "$out" | cut -f1) KiB)"
echo "$out"

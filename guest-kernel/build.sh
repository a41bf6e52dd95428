#!/usr/bin/env bash
# Build the podbox guest kernel: an uncompressed x86-64 vmlinux from Debian's
# linux-source-6.12, allnoconfig + podbox.config + patches/.
#
#   guest-kernel/build.sh [--variant podbox|qemu|baseline] [--print-path]
#
# --variant podbox (default): the kernel podbox-vmm boots. Its patches/ are
#   only the ones the VMM cannot replace (the PVM syscall completion, which is
#   off unless the command line enables it).
# --variant qemu: the same kernel plus patches/qemu/*, which remove the
#   instructions podbox-vmm's emulation fallback performs on PVM hosts; the
#   benchmark boots it under QEMU microvm, which has no such fallback.
# --variant baseline: the podbox kernel from baseline.config, the fragment
#   before the boot diet, and only the patches from before it, for
#   `podbox-bench agent-boot` and `pods` (before vs after).
# --print-path: build and install nothing; print the path of the cached
#   vmlinux for the current inputs, or fail (status 1) if it is not built
#   yet. The test harness looks the kernel up this way (`make test-assets`,
#   which `make test` runs first, builds it).
#
# The result is cached under $PODBOX_CACHE_DIR (default /var/cache/podbox),
# keyed by a hash of the source package version, the config fragment, the
# patches, the variant and the recipe version below, so a second run takes
# seconds. Progress goes to stderr; the vmlinux path is the last stdout line.
set -euo pipefail

# Bump when the build steps change in a way that changes the output.
RECIPE_VERSION=1
SOURCE_PACKAGE=linux-source-6.12
SOURCE_TARBALL=/usr/src/linux-source-6.12.tar.xz

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
variant=podbox
print_path=
while [ $# -gt 0 ]; do
    case "$1" in
        --variant) variant=${2:-}; shift 2 || { echo "build.sh: --variant needs a value" >&2; exit 2; } ;;
        --variant=*) variant=${1#--variant=}; shift ;;
        --print-path) print_path=1; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
fragment=$here/podbox.config
patch_glob='*.patch'
case "$variant" in
    podbox) patch_dirs=("$here/patches") ;;
    qemu) patch_dirs=("$here/patches" "$here/patches/qemu") ;;
    # 0002 and 0003 change nothing unless a config fragment turns them on;
    # the boot-diet patches after them take effect by themselves, so the
    # kernel from before the diet does not get them.
    baseline) patch_dirs=("$here/patches"); patch_glob='000[1-3]-*.patch'; fragment=$here/baseline.config ;;
    *) echo "build.sh: unknown variant '$variant' (expected podbox, qemu or baseline)" >&2; exit 2 ;;
esac

log() { echo "guest-kernel: $*" >&2; }

# Source and tools: install what is missing (Debian); --print-path installs
# nothing.
need_pkgs=()
if [ -z "$print_path" ]; then
    [ -f "$SOURCE_TARBALL" ] || need_pkgs+=("$SOURCE_PACKAGE")
    for tool_pkg in make:make gcc:gcc bc:bc flex:flex bison:bison xz:xz-utils patch:patch perl:perl; do
        command -v "${tool_pkg%%:*}" >/dev/null || need_pkgs+=("${tool_pkg#*:}")
    done
    [ -f /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
    [ -f /usr/include/openssl/ssl.h ] || need_pkgs+=(libssl-dev)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >&2
fi
source_version=$(dpkg-query -W -f='${Version}' "$SOURCE_PACKAGE" 2>/dev/null) || source_version=
if [ -z "$source_version" ]; then
    log "$SOURCE_PACKAGE is not installed (make deps installs it), so no $variant kernel is built"
    exit 1
fi

patches=()
for dir in "${patch_dirs[@]}"; do
    for p in "$dir"/$patch_glob; do [ -e "$p" ] && patches+=("$p"); done
done

key=$( {
    echo "recipe $RECIPE_VERSION variant $variant source $SOURCE_PACKAGE $source_version"
    cat "$fragment"
    for p in "${patches[@]}"; do echo "patch ${p#"$here"/}"; cat "$p"; done
} | sha256sum | cut -c1-16)

cache=${PODBOX_CACHE_DIR:-/var/cache/podbox}/kernel
out_dir=$cache/$variant-$key
if [ -n "$print_path" ]; then
    # No lock: a build renames its finished output into place.
    if [ ! -f "$out_dir/vmlinux" ]; then
        log "no $variant kernel built for the current inputs ($out_dir/vmlinux): run guest-kernel/build.sh --variant $variant"
        exit 1
    fi
    echo "$out_dir/vmlinux"
    exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

if [ -f "$out_dir/vmlinux" ]; then
    log "cached $variant kernel ($source_version, key $key)"
    echo "$out_dir/vmlinux"
    exit 0
fi

work=$cache/build-$variant-$key
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
log "building $variant kernel from $SOURCE_PACKAGE $source_version in $work (key $key)"
start=$(date +%s)
tar -xf "$SOURCE_TARBALL" -C "$work" --strip-components=1
for p in "${patches[@]}"; do
    log "applying ${p#"$here"/}"
    patch -d "$work" -p1 --quiet --forward < "$p" >&2
done

# allnoconfig with the fragment forced in; then check that every option the
# fragment names kept its value (an unmet dependency drops one silently).
KCONFIG_ALLCONFIG="$fragment" make -C "$work" -s allnoconfig >&2
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) want=$line ;;
        "# CONFIG_"*" is not set") want=$line ;;
        *) continue ;;
    esac
    name=${want#\# }; name=${name%%[= ]*}
    if ! grep -qxF "$want" "$work/.config"; then
        if [[ "$want" == "# "* ]] && ! grep -q "^$name=" "$work/.config"; then
            continue # option absent from this kernel altogether, so it is off
        fi
        log "config: wanted '$want', got '$(grep -E "^(# )?$name[= ]" "$work/.config" || echo absent)'"
        missing=1
    fi
done < "$fragment"
[ "$missing" = 0 ] || { log "config fragment did not apply cleanly"; exit 1; }

make -C "$work" -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out_dir.tmp"
cp "$work/vmlinux" "$work/.config" "$out_dir.tmp/"
rm -rf "$out_dir"
mv "$out_dir.tmp" "$out_dir"
if [ -n "${PODBOX_KEEP_KERNEL_TREE:-}" ]; then trap - EXIT; log "kept build tree $work"; fi
log "built in $(( $(date +%s) - start )) s: $(du -h "$out_dir/vmlinux" | cut -f1) vmlinux"
echo "$out_dir/vmlinux"

#!/usr/bin/env bash
# `make fuzz`: builds every cargo-fuzz target in one build and runs each for
# FUZZ_SECONDS (default 60) with libFuzzer, one after another; fails if any
# target crashes (its input is kept in fuzz/artifacts/<target>/). Corpora
# grow in fuzz/corpus/<target> across runs, seeded from fuzz/seeds/<target>;
# each run's output is in fuzz/logs/<target>.log.
#
# There is no nightly toolchain here: cargo-fuzz's -Z flags are allowed on
# stable through RUSTC_BOOTSTRAP=1.
set -euo pipefail

cd "$(dirname "$0")"
seconds=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    env -u CARGO_TARGET_DIR cargo install cargo-fuzz --locked
fi
export CARGO_TARGET_DIR="$PWD/target"

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
# One build for all targets (sanitizer=address, release with debug
# assertions: cargo-fuzz's defaults).
cargo fuzz build
bin_dir="target/$(rustc -vV | sed -n 's/^host: //p')/release"

mkdir -p logs
failed=()
summary=()
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    dirs=("corpus/$t")
    [ -d "seeds/$t" ] && dirs+=("seeds/$t")
    echo "fuzz: $t for ${seconds}s"
    status=0
    "$bin_dir/$t" "${dirs[@]}" \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"logs/$t.log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "logs/$t.log" | tail -1)
    cov=$(grep -oE '(DONE|pulse|NEW|REDUCE|INITED) +cov: [0-9]+ ft: [0-9]+' "logs/$t.log" |
        tail -1 | sed -E 's/.*cov: ([0-9]+) ft: ([0-9]+)/\1 \2/')
    summary+=("$(printf '%-16s %10s %8s %6s %6s' "$t" "${runs:-?}" "${rate:-?}" ${cov:-? ?})")
    if [ "$status" -ne 0 ]; then
        echo "fuzz: $t FAILED (exit $status); see fuzz/logs/$t.log and fuzz/artifacts/$t/"
        grep -E '^(==[0-9]+==|thread .* panicked|SUMMARY)' "logs/$t.log" | head -5 || true
        failed+=("$t")
    fi
done

printf '%-16s %10s %8s %6s %6s\n' target runs exec/s cov ft
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: crashed: ${failed[*]}"
    exit 1
fi
echo "fuzz: no crashes"

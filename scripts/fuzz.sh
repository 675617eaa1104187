#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of the inference request parser
# (JSON and Triton's binary extension), config.toml, and checkpoints (config.json +
# model.safetensors). The targets are in tests/fuzz (a workspace of its own).
#
#     scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Builds every target once, then runs each for SECONDS_PER_TARGET (default 60),
# starting from its seeds (tests/fuzz/seeds/<target>, in git) and the corpus earlier
# runs grew (tests/fuzz/corpus/<target>, not in git). Prints the executions of each
# and whether it crashed; exits non-zero when one did. A crashing input is kept in
# tests/fuzz/artifacts/<target>/; replay it with
#     tests/fuzz/target/none/x86_64-unknown-linux-gnu/release/<target> <file>
#
# Builds on the stable toolchain: cargo-fuzz passes -Z flags, which RUSTC_BOOTSTRAP=1
# allows. Environment:
#   FUZZ_SANITIZER   none (the default) or address. AddressSanitizer builds and runs
#                    on stable too, but runs these targets 5-7x slower (measured in
#                    docs/MEASUREMENTS.md, "Fuzzing"); the only unsafe code the
#                    targets reach is checkpoint.rs's casts of checked slices.
#   FUZZ_RUNS        also stop each target after this many executions.
#   FUZZ_FRESH=1     start from the seeds only (forget the grown corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

SECONDS_PER_TARGET="${1:-60}"
shift || true
ALL_TARGETS=(protocol_json protocol_binary config_toml checkpoint)
if [ "$#" -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi
CARGO_FUZZ_VERSION=0.13.2
FUZZ_DIR=tests/fuzz
TRIPLE=x86_64-unknown-linux-gnu
SANITIZER="${FUZZ_SANITIZER:-none}"
# A target folder per sanitizer: switching does not rebuild the other.
TARGET_DIR="$FUZZ_DIR/target/$SANITIZER"
export RUSTC_BOOTSTRAP=1
# What `cargo fuzz run` would set (ODR reports are false positives across Rust crates).
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

echo "== building the fuzz targets (sanitizer: $SANITIZER)"
build_start=$SECONDS
# Release (one codegen unit, as cargo-fuzz chooses: faster runs) with debug assertions
# and overflow checks, in a target folder of its own, apart from the workspace's.
cargo fuzz build --fuzz-dir "$FUZZ_DIR" --target "$TRIPLE" --target-dir "$TARGET_DIR" \
    -O --debug-assertions --sanitizer "$SANITIZER"
echo "built in $((SECONDS - build_start)) s"

bin_dir="$TARGET_DIR/$TRIPLE/release"
logs="$FUZZ_DIR/artifacts/logs"
mkdir -p "$logs"
failed=0
summary=()
for target in "${TARGETS[@]}"; do
    corpus="$FUZZ_DIR/corpus/$target"
    artifacts="$FUZZ_DIR/artifacts/$target"
    if [ "${FUZZ_FRESH:-0}" = 1 ]; then rm -rf "$corpus"; fi
    mkdir -p "$corpus" "$artifacts"
    log="$logs/$target.log"
    echo "== $target: ${SECONDS_PER_TARGET} s${FUZZ_RUNS:+ or $FUZZ_RUNS executions}"
    status=0
    # -timeout: an input running 10 s is a hang; -rss_limit_mb (and the malloc
    # limit, the same by default): an input needing 2 GiB is an unbounded allocation.
    "$bin_dir/$target" "$corpus" "$FUZZ_DIR/seeds/$target" \
        -max_total_time="$SECONDS_PER_TARGET" ${FUZZ_RUNS:+-runs="$FUZZ_RUNS"} \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    units=$(find "$corpus" -type f | wc -l)
    if [ "$status" -eq 0 ]; then
        result="no crash"
    else
        failed=1
        crash=$(sed -n 's/^.*Test unit written to //p' "$log" | tail -1)
        result="CRASH (exit $status): ${crash:-see $log}"
        echo "---- last lines of $log"
        tail -n 60 "$log"
        echo "----"
    fi
    took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    line=$(printf '%-16s %12s executions in %5s s %8s exec/s %6s corpus files  %s' \
        "$target" "${runs:-?}" "${took:-?}" "${rate:-?}" "$units" "$result")
    echo "$line"
    summary+=("$line")
done

echo "== fuzzing summary (${SECONDS_PER_TARGET} s per target, sanitizer: $SANITIZER)"
printf '%s\n' "${summary[@]}"
exit "$failed"

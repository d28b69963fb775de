#!/usr/bin/env bash
# Run the fuzz target for a bounded time, seeded with the demo images, and print
# executions, time and crashes. Uses cargo-fuzz (libFuzzer) on the stable
# toolchain via RUSTC_BOOTSTRAP=1 (cargo fuzz needs its unstable flags).
#   fuzz/run.sh [SECONDS]          default 120
# Install once: cargo install cargo-fuzz --locked
# A crash is saved under fuzz/artifacts/image/; turn it into a regression test in
# tests/regressions.rs (the file is read by the test suite).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-120}
corpus=corpus/image
mkdir -p "$corpus"
cp -n ../assets/*.qcow2 "$corpus/" 2>/dev/null || true
export RUSTC_BOOTSTRAP=1
cargo fuzz build image
log=$(mktemp)
set +e
cargo fuzz run image "$corpus" -- -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10 \
    -max_len=2097152 -print_final_stats=1 2>&1 | tee "$log" | grep -E "^#[0-9]+ +(DONE|INITED)|stat::|ERROR|SUMMARY|Test unit written" 
rc=${PIPESTATUS[0]}
set -e
crashes=$(ls artifacts/image 2>/dev/null | wc -l)
execs=$(grep -oE "stat::number_of_executed_units: [0-9]+" "$log" | grep -oE "[0-9]+$" || echo 0)
echo "fuzz: ${secs} s, ${execs} executions, exit ${rc}, ${crashes} crash file(s) in fuzz/artifacts/image"
rm -f "$log"

#!/usr/bin/env bash
# The randomized differential test of `qinspect simulate` against qemu-img and
# qemu-io, run longer than the suite runs it.
#
#   benches/simulate-random.sh [SCENARIOS] [FIRST_SEED]
#
# Prints one line per wrong scenario with the command that reproduces it, then
# the totals: scenarios, exact, refused (with the reasons), wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1500}
first=${2:-1000}
QINSPECT_SIM_SCENARIOS=$n QINSPECT_SIM_FIRST=$first \
    cargo test --release --locked --test simulate_random -- --nocapture 2>&1 |
    grep -E '^(seed|scenarios|  refused|  reproduce)' || true

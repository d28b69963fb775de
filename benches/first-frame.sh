#!/usr/bin/env bash
# Time from starting `qinspect IMAGE` to its first frame, in a real terminal (tmux),
# on a 1 TiB image with every L2 table allocated (preallocation=metadata).
# Not part of the test suite. Usage: benches/first-frame.sh [IMAGE]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
work=$(mktemp -d /var/tmp/qinspect-ff.XXXXXX)
trap 'tmux kill-session -t qiff 2>/dev/null; rm -rf "$work"' EXIT
img=${1:-}
if [ -z "$img" ]; then
    img=$work/big.qcow2
    qemu-img create -q -f qcow2 -o preallocation=metadata "$img" 1T
fi
for run in 1 2 3; do
    tmux kill-session -t qiff 2>/dev/null || true
    tmux new-session -d -s qiff -x 120 -y 40 bash --norc --noprofile
    start=$(date +%s.%N)
    tmux send-keys -t qiff -l "$root/target/release/qinspect $img"
    tmux send-keys -t qiff Enter
    until tmux capture-pane -p -t qiff | grep -q "1 Overview"; do sleep 0.005; done
    first=$(date +%s.%N)
    until tmux capture-pane -p -t qiff | grep -q "check: [0-9]"; do sleep 0.05; done
    done_check=$(date +%s.%N)
    printf 'run %d: first frame %.3f s, background check finished %.3f s\n' \
        "$run" "$(echo "$first - $start" | bc)" "$(echo "$done_check - $start" | bc)"
    tmux send-keys -t qiff q
done

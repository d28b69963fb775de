#!/usr/bin/env bash
# qinspect vs qemu-img: wall-clock time and peak memory, side by side.
#
# What it measures: for each case, the same job done by qemu-img and by
# qinspect on the same image, run alternately (qemu-img first in odd rounds,
# qinspect first in even rounds), the median of $BENCH_RUNS (default 5) wall-clock
# runs each, plus the peak RSS of each tool.  It prints
#   case, qemu-img seconds, qinspect seconds, ratio (qinspect/qemu-img),
#   target ratio, PASS/MISS against the target, peak RSS of both
# and, where it applies, whether the two tools' outputs agree.  The ratio
# targets are goals for qinspect, not hard limits; for the check cases PASS
# also needs qinspect's peak RSS <= qemu-img's.  Wall-clock numbers on a
# small shared machine are noisy: compare ratios, rerun before concluding.
# All cases take about 4-5 minutes on 2 cores, most of it setup.
#
# This is NOT part of the test suite (cargo test never runs it) and it does
# not gate anything: run it by hand when working on performance.
#
# Usage: benches/bench.sh [CASE...]          (default: all cases, in order)
# Cases (the rows of the speed issue, plus no-regression rows):
#   map-1T                    map --json vs qemu-img map --output=json on a
#                             1 TiB image with preallocation=metadata
#                             (128 MiB of L2 tables); outputs compared as JSON
#   read-1G                   read -o vs qemu-img convert -O raw of a 1 GiB
#                             image (random, patterned, zero and unallocated
#                             ranges), the output file existing (as the issue
#                             measures it: each tool's output of the round
#                             before stays; qemu-img truncates it and writes
#                             it anew, qinspect writes over it in place);
#                             outputs compared with cmp
#   read-1G-new               the same into a new file each run (no-regression
#                             row: both tools then fill fresh page-cache pages)
#   check-1T                  check --json vs qemu-img check --output=json on
#                             the 1 TiB image; also peak memory (qinspect must
#                             not use more than qemu-img)
#   check-1T-16snap           the same on a copy with 16 internal snapshots,
#                             each followed by a 64 MiB write (setup takes ~2
#                             minutes on 2 cores: every snapshot of this image
#                             updates 16M refcounts in qemu-img)
#   simulate-snapshot-create  simulate snapshot-create:x --json (read-only) vs
#                             qemu-img snapshot -c x on a fresh sparse copy of
#                             the 1 TiB image (copy time not counted)
#   read-stdout               read IMG | sha256sum vs qemu-img convert -O raw
#                             IMG /dev/stdout >FILE, then sha256sum FILE (it
#                             cannot write to a pipe), on the 1 GiB image
#   simulate-1T               simulate snapshot-create:x snapshot-delete:x
#                             --json vs qemu-img snapshot -c x then -d x for
#                             real on a fresh sparse copy; peak memory both
#   clusters-2T               clusters --json on a 2 TiB, 2 MiB-cluster image
#                             with preallocation=metadata (1 Mi clusters); no
#                             qemu-img counterpart: target is in seconds
#   dump-2T                   dump refcount-block IMG 0 on that image (seconds)
#   info-1T                   info --json vs qemu-img info --output=json on
#                             the 1 TiB image (no-regression row)
# check-16snap is another name for check-1T-16snap.
# A case whose qinspect subcommand does not exist yet (`qinspect help SUB`
# fails) is skipped with a message.
#
# Environment:
#   BENCH_RUNS   runs per tool per case (default 5; the median is kept)
#   BENCH_DIR    where the work directory is made (default /var/tmp; needs
#                about 3.5 GiB free: the 1 TiB images are sparse)
#   QINSPECT     use this binary instead of building target/release/qinspect
#                (e.g. to compare against an older build)
#   BENCH_RSS    force how peak RSS is measured: time, python or none
# Peak RSS comes from /usr/bin/time -v ("Maximum resident set size"), or, without it, from a python3
# getrusage() wrapper (which then also does the timing, so python's start-up
# is not counted); without either RSS is not reported.  Timing is bash
# `date +%s.%N` around each run.  Nothing is installed; hyperfine is not
# needed.  Before each read-1G run `sync` is run (untimed) so write-back of
# the last 1 GiB does not skew the next; before each read-1G-new run the
# previous output is removed too.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${QINSPECT:-}" ]; then
    qi=$(command -v "$QINSPECT") || { echo "bench: QINSPECT=$QINSPECT not found" >&2; exit 1; }
    qi=$(realpath "$qi")
fi
cd "$root"

all_cases=(read-1G read-1G-new read-stdout check-1T check-1T-16snap map-1T simulate-1T clusters-2T dump-2T info-1T simulate-snapshot-create)
runs=${BENCH_RUNS:-5}

usage() {
    echo "usage: $0 [CASE...]" >&2
    echo "cases: ${all_cases[*]}" >&2
    exit 2
}

cases=()
for a in "$@"; do
    case $a in
        -h|--help) usage ;;
    esac
    [ "$a" = check-16snap ] && a=check-1T-16snap
    found=
    for c in "${all_cases[@]}"; do [ "$a" = "$c" ] && found=1; done
    [ -n "$found" ] || { echo "bench: unknown case '$a'" >&2; usage; }
    cases+=("$a")
done
[ ${#cases[@]} -gt 0 ] || cases=("${all_cases[@]}")

for tool in qemu-img qemu-io python3 cmp; do
    command -v "$tool" >/dev/null || { echo "bench: $tool not found" >&2; exit 1; }
done

if [ -n "${QINSPECT:-}" ]; then
    echo "== using QINSPECT=$qi (not building)"
else
    echo "== cargo build --release"
    cargo build --release --quiet
    qi=$root/target/release/qinspect
fi
[ -x "$qi" ] || { echo "bench: $qi was not built" >&2; exit 1; }

work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/qinspect-bench.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
trap 'exit 130' INT TERM
echo "== work directory $work (removed at exit)"

# ---------------------------------------------------------------------------
# Timing.  run_timed OUT ERR CMD... runs CMD once with stdout to OUT and
# stderr to ERR and sets T_SECS, T_RSS (KiB, or "" if unknown) and T_RC.

if [ -n "${BENCH_RSS:-}" ]; then
    rss_mode=$BENCH_RSS
elif [ -x /usr/bin/time ]; then
    rss_mode=time
elif python3 -c 'import resource' 2>/dev/null; then
    rss_mode=python
else
    rss_mode=none
fi
case $rss_mode in
    time|none) ;;
    python)
        cat >"$work/rusage.py" <<'EOF'
# Run a command; write "<wall seconds> <peak RSS KiB>" of it to argv[1].
import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
t1 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
with open(sys.argv[1], "w") as f:
    f.write("%.4f %d\n" % (t1 - t0, rss))
sys.exit(rc)
EOF
        ;;
    *) echo "bench: BENCH_RSS must be time, python or none" >&2; exit 2 ;;
esac
echo "== peak RSS via: $rss_mode"
if [ "$rss_mode" = python ]; then
    # A forked child's peak RSS includes the pages it shared with python
    # before exec, so python's own RSS is a floor under every value.
    python3 "$work/rusage.py" "$work/rss" true
    read -r _ floor <"$work/rss"
    echo "   (values up to about $((floor / 1024)) MiB are python's own floor, not the tool's)"
fi

run_timed() {
    local out=$1 err=$2 t0 t1
    shift 2
    T_RC=0
    T_RSS=
    case $rss_mode in
        time)
            t0=$(date +%s.%N)
            /usr/bin/time -v -o "$work/rss" "$@" >"$out" 2>"$err" || T_RC=$?
            t1=$(date +%s.%N)
            T_SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')
            T_RSS=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/rss")
            ;;
        python)
            # the wrapper times the child itself, so python's start-up is
            # not counted
            python3 "$work/rusage.py" "$work/rss" "$@" >"$out" 2>"$err" || T_RC=$?
            read -r T_SECS T_RSS <"$work/rss"
            ;;
        none)
            t0=$(date +%s.%N)
            "$@" >"$out" 2>"$err" || T_RC=$?
            t1=$(date +%s.%N)
            T_SECS=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }')
            ;;
    esac
}

# median of the arguments
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b + 0 < a + 0) ? b : a }'; }
max() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b + 0 > a + 0) ? b : a }'; }
mib() { [ -n "$1" ] && awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }' || echo "-"; }

# ---------------------------------------------------------------------------
# Results, one entry per case, for the final summary.
r_case=() r_qemu=() r_qi=() r_ratio=() r_target=() r_result=() r_rssq=() r_rssi=() r_mem=() r_note=()

record() { # case qemu qi ratio target result rssq rssi mem note
    r_case+=("$1") r_qemu+=("$2") r_qi+=("$3") r_ratio+=("$4") r_target+=("$5")
    r_result+=("$6") r_rssq+=("$7") r_rssi+=("$8") r_mem+=("$9") r_note+=("${10}")
}

header_fmt='%-25s %9s %9s %7s %7s %-6s %9s %9s %-5s %s\n'
print_header() {
    # shellcheck disable=SC2059
    printf "$header_fmt" case qemu-img qinspect ratio target result "rss-qemu" "rss-qi" mem note
}
print_row() { # index
    local i=$1
    # shellcheck disable=SC2059
    printf "$header_fmt" "${r_case[i]}" "${r_qemu[i]}" "${r_qi[i]}" "${r_ratio[i]}" \
        "${r_target[i]}" "${r_result[i]}" "${r_rssq[i]}" "${r_rssi[i]}" "${r_mem[i]}" "${r_note[i]}"
}

# Does this qinspect subcommand exist?  Records a SKIP row if not.
have_sub() { # case sub
    if "$qi" help "$2" >/dev/null 2>&1; then
        return 0
    fi
    echo "   skipped: qinspect has no '$2' subcommand yet"
    record "$1" - - - - SKIP - - - "no 'qinspect $2'"
    return 1
}

# bench CASE TARGET [MEMCHECK]: time the commands in the arrays QEMU_CMD and
# QI_CMD (stdout to QEMU_OUT / QI_OUT), calling the functions named in
# PREP_QEMU / PREP_QI (untimed) before each run.  With MEMCHECK=mem, also
# require qinspect's peak RSS <= qemu-img's.  Sets B_RESULT (PASS, MISS,
# ERROR) and appends NOTE to the row.
NOTE=
bench() {
    local name=$1 target=$2 memcheck=${3:-} round who first second
    local best_q= best_i= rss_q= rss_i=
    local -a times_q=() times_i=()
    B_RESULT=
    for ((round = 1; round <= runs; round++)); do
        if ((round % 2)); then first=qemu second=qi; else first=qi second=qemu; fi
        for who in $first $second; do
            if [ "$who" = qemu ]; then
                $PREP_QEMU
                run_timed "$QEMU_OUT" "$work/qemu.err" "${QEMU_CMD[@]}"
                if [ "$T_RC" -ne 0 ]; then
                    echo "   qemu-img failed (exit $T_RC): ${QEMU_CMD[*]}"
                    sed 's/^/     /' "$work/qemu.err" | head -n 5
                    record "$name" - - - "$target" ERROR - - - "qemu-img exit $T_RC"
                    B_RESULT=ERROR
                    return 0
                fi
                times_q+=("$T_SECS")
                [ -z "$T_RSS" ] || rss_q=$(max "$rss_q" "$T_RSS")
                printf '   round %d  qemu-img %8.3fs\n' "$round" "$T_SECS"
            else
                $PREP_QI
                run_timed "$QI_OUT" "$work/qi.err" "${QI_CMD[@]}"
                if [ "$T_RC" -ne 0 ]; then
                    echo "   qinspect failed (exit $T_RC): ${QI_CMD[*]}"
                    sed 's/^/     /' "$work/qi.err" | head -n 5
                    record "$name" - - - "$target" ERROR - - - "qinspect exit $T_RC"
                    B_RESULT=ERROR
                    return 0
                fi
                times_i+=("$T_SECS")
                [ -z "$T_RSS" ] || rss_i=$(max "$rss_i" "$T_RSS")
                printf '   round %d  qinspect %8.3fs\n' "$round" "$T_SECS"
            fi
        done
    done
    best_q=$(median "${times_q[@]}")
    best_i=$(median "${times_i[@]}")
    local ratio result mem=-
    ratio=$(awk -v q="$best_q" -v i="$best_i" 'BEGIN { if (q > 0) printf "%.3f", i / q; else print "inf" }')
    result=$(awk -v r="$ratio" -v t="$target" 'BEGIN { print (r != "inf" && r + 0 <= t + 0) ? "PASS" : "MISS" }')
    if [ "$memcheck" = mem ]; then
        if [ -n "$rss_q" ] && [ -n "$rss_i" ]; then
            mem=$(awk -v q="$rss_q" -v i="$rss_i" 'BEGIN { print (i + 0 <= q + 0) ? "PASS" : "MISS" }')
            [ "$mem" = PASS ] || result=MISS
        else
            mem=n/a
        fi
    fi
    record "$name" "$best_q" "$best_i" "$ratio" "$target" "$result" \
        "$(mib "$rss_q")" "$(mib "$rss_i")" "$mem" "$NOTE"
    B_RESULT=$result
}

noop() { :; }

# ---------------------------------------------------------------------------
# Work images, made on first use.

big=$work/big.qcow2
ensure_big() {
    [ -e "$big" ] && return 0
    echo "   creating 1 TiB qcow2 with preallocation=metadata ..."
    local t0=$SECONDS
    qemu-img create -q -f qcow2 -o preallocation=metadata "$big" 1T
    echo "   done in $((SECONDS - t0))s ($(du -h "$big" | cut -f1) on disk)"
}

# ---------------------------------------------------------------------------
# Cases.

case_map_1T() {
    have_sub map-1T map || return 0
    ensure_big
    QEMU_CMD=(qemu-img map --output=json "$big") QEMU_OUT=/dev/null PREP_QEMU=noop
    QI_CMD=("$qi" map --json "$big") QI_OUT=/dev/null PREP_QI=noop
    # compare the outputs first (untimed): a wrong answer makes timing moot
    local same=no
    if qemu-img map --output=json "$big" >"$work/map.qemu.json" 2>/dev/null &&
        "$qi" map --json "$big" >"$work/map.qi.json" 2>"$work/qi.err"; then
        if python3 - "$work/map.qemu.json" "$work/map.qi.json" <<'EOF'; then same=yes; fi
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
sys.exit(0 if a == b else 1)
EOF
    else
        same="n/a (a map run failed)"
    fi
    echo "   map JSON equal (parsed): $same"
    NOTE="json-equal=$same"
    bench map-1T 0.05
    NOTE=
}

read_img=$work/read.qcow2
ensure_read_img() {
    [ -e "$read_img" ] && return 0
    echo "   creating 1 GiB qcow2 (random, patterned, zero and unallocated ranges) ..."
    local t0=$SECONDS
    # 0..384M random (incompressible, converted from a raw file), 384M..768M
    # 0x5a, 768M..800M unallocated, 800M..900M 0xa5, 900M..950M zero
    # clusters, 950M..1G unallocated
    qemu-img create -q -f raw "$work/src.raw" 1G
    dd if=/dev/urandom of="$work/src.raw" bs=1M count=384 conv=notrunc status=none
    qemu-img convert -O qcow2 "$work/src.raw" "$read_img"
    rm -f "$work/src.raw"
    qemu-io -f qcow2 -c 'write -P 0x5a 384M 384M' -c 'write -P 0xa5 800M 100M' \
        -c 'write -z 900M 50M' "$read_img" >/dev/null
    echo "   done in $((SECONDS - t0))s"
}
# read_case CASE TARGET: read -o against qemu-img convert -O raw, with the
# PREP_QEMU/PREP_QI already set
read_case() {
    QEMU_CMD=(qemu-img convert -O raw "$read_img" "$work/out2.raw") QEMU_OUT=/dev/null
    QI_CMD=("$qi" read "$read_img" -o "$work/out1.raw") QI_OUT=/dev/null
    bench "$1" "$2"
    if [ "$B_RESULT" != ERROR ]; then
        local same=no
        cmp -s "$work/out1.raw" "$work/out2.raw" && same=yes
        echo "   outputs identical (cmp): $same"
        r_note[${#r_note[@]} - 1]="cmp-equal=$same"
    fi
    rm -f "$work/out1.raw" "$work/out2.raw"
}
case_read_1G() {
    have_sub read-1G read || return 0
    ensure_read_img
    # the outputs exist from the first round on (made here, untimed)
    qemu-img convert -O raw "$read_img" "$work/out2.raw"
    "$qi" read "$read_img" -o "$work/out1.raw"
    PREP_QEMU=sync PREP_QI=sync
    read_case read-1G 0.5
}
case_read_1G_new() {
    have_sub read-1G-new read || return 0
    ensure_read_img
    PREP_QEMU=prep_read_qemu PREP_QI=prep_read_qi
    read_case read-1G-new 1.0
}
prep_read_qemu() { rm -f "$work/out2.raw"; sync; }
prep_read_qi() { rm -f "$work/out1.raw"; sync; }

check_case() { # case image target
    QEMU_CMD=(qemu-img check --output=json "$2") QEMU_OUT=$work/check.qemu.json
    QI_CMD=("$qi" check --json "$2") QI_OUT=$work/check.qi.json
    PREP_QEMU=noop PREP_QI=noop
    bench "$1" "$3" mem
    [ "$B_RESULT" != ERROR ] || return 0
    # qinspect's JSON may carry more keys; compare the ones both have
    local agree
    agree=$(python3 - "$work/check.qemu.json" "$work/check.qi.json" <<'EOF'
import json, sys
try:
    a, b = (json.load(open(p)) for p in sys.argv[1:3])
except ValueError:
    print("unparsable"); sys.exit()
common = sorted(set(a) & set(b))
bad = [k for k in common if a[k] != b[k]]
print("yes(%d keys)" % len(common) if not bad else "no:" + ",".join(bad))
EOF
)
    echo "   check JSON, keys in both: equal=$agree"
    r_note[${#r_note[@]} - 1]="json-common-equal=$agree"
}

case_check_1T() {
    have_sub check-1T check || return 0
    ensure_big
    check_case check-1T "$big" 0.1
}

case_check_1T_16snap() {
    have_sub check-1T-16snap check || return 0
    ensure_big
    local img=$work/snap16.qcow2 n off t0=$SECONDS
    echo "   creating a copy with 16 snapshots (about 2 minutes) ..."
    cp --sparse=always "$big" "$img"
    for ((n = 1; n <= 16; n++)); do
        # spread the writes over the disk, 64 MiB each, 61 GiB apart (mod 1T)
        off=$(((n * 61) % 1024))G
        qemu-img snapshot -c "s$n" "$img"
        qemu-io -f qcow2 -c "write -P $n $off 64M" "$img" >/dev/null
    done
    echo "   done in $((SECONDS - t0))s ($(du -h "$img" | cut -f1) on disk)"
    check_case check-1T-16snap "$img" 0.03
    rm -f "$img"
}

snap_copy=$work/snapcopy.qcow2
prep_snap_qemu() { rm -f "$snap_copy"; cp --sparse=always "$big" "$snap_copy"; }
case_simulate_snapshot_create() {
    have_sub simulate-snapshot-create simulate || return 0
    ensure_big
    QEMU_CMD=(qemu-img snapshot -c x "$snap_copy") QEMU_OUT=/dev/null PREP_QEMU=prep_snap_qemu
    QI_CMD=("$qi" simulate "$big" snapshot-create:x --json) QI_OUT=/dev/null PREP_QI=noop
    bench simulate-snapshot-create 0.5
    rm -f "$snap_copy"
}

# bench_solo CASE TARGET_SECONDS: time QI_CMD alone (no qemu-img counterpart);
# PASS when the median is at most TARGET_SECONDS.
bench_solo() {
    local name=$1 target=$2 round rss_i=
    local -a times_i=()
    for ((round = 1; round <= runs; round++)); do
        $PREP_QI
        run_timed "$QI_OUT" "$work/qi.err" "${QI_CMD[@]}"
        if [ "$T_RC" -ne 0 ]; then
            echo "   qinspect failed (exit $T_RC): ${QI_CMD[*]}"
            sed 's/^/     /' "$work/qi.err" | head -n 5
            record "$name" - - - "${target}s" ERROR - - - "qinspect exit $T_RC"
            return 0
        fi
        times_i+=("$T_SECS")
        [ -z "$T_RSS" ] || rss_i=$(max "$rss_i" "$T_RSS")
        printf '   round %d  qinspect %8.3fs\n' "$round" "$T_SECS"
    done
    local med result
    med=$(median "${times_i[@]}")
    result=$(awk -v m="$med" -v t="$target" 'BEGIN { print (m + 0 <= t + 0) ? "PASS" : "MISS" }')
    record "$name" - "$med" - "${target}s" "$result" - "$(mib "$rss_i")" - "$NOTE"
}

prep_stdout() { rm -f "$work/stdout.raw"; sync; }
case_read_stdout() {
    have_sub read-stdout read || return 0
    ensure_read_img
    # qemu-img convert cannot write to a pipe (it resizes its output), so its
    # side writes /dev/stdout redirected to a file and sums that file
    QEMU_CMD=(bash -c 'qemu-img convert -O raw "$1" /dev/stdout >"$2" && sha256sum <"$2"' - "$read_img" "$work/stdout.raw")
    QI_CMD=(bash -c 'set -o pipefail; "$1" read "$2" | sha256sum' - "$qi" "$read_img")
    QEMU_OUT=$work/sum.qemu QI_OUT=$work/sum.qi PREP_QEMU=prep_stdout PREP_QI=noop
    bench read-stdout 1.0
    rm -f "$work/stdout.raw"
    if [ "$B_RESULT" != ERROR ]; then
        local same=no
        cmp -s "$work/sum.qemu" "$work/sum.qi" && same=yes
        r_note[${#r_note[@]} - 1]="sha256-equal=$same"
    fi
}

case_simulate_1T() {
    have_sub simulate-1T simulate || return 0
    ensure_big
    QEMU_CMD=(bash -c 'qemu-img snapshot -c x "$1" && qemu-img snapshot -d x "$1"' - "$snap_copy")
    QEMU_OUT=/dev/null PREP_QEMU=prep_snap_qemu
    QI_CMD=("$qi" simulate "$big" snapshot-create:x snapshot-delete:x --json) QI_OUT=/dev/null PREP_QI=noop
    bench simulate-1T 0.1 mem
    rm -f "$snap_copy"
}

big2=$work/big2.qcow2
ensure_big2() {
    [ -e "$big2" ] && return 0
    echo "   creating 2 TiB qcow2, 2 MiB clusters, preallocation=metadata ..."
    qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=2M "$big2" 2T
}

case_clusters_2T() {
    have_sub clusters-2T clusters || return 0
    ensure_big2
    QI_CMD=("$qi" clusters --json "$big2") QI_OUT=/dev/null PREP_QI=noop
    bench_solo clusters-2T 1.0
}

case_dump_2T() {
    have_sub dump-2T dump || return 0
    ensure_big2
    QI_CMD=("$qi" dump refcount-block "$big2" 0) QI_OUT=/dev/null PREP_QI=noop
    bench_solo dump-2T 0.2
}

case_info_1T() {
    have_sub info-1T info || return 0
    ensure_big
    QEMU_CMD=(qemu-img info --output=json "$big") QEMU_OUT=/dev/null PREP_QEMU=noop
    QI_CMD=("$qi" info --json "$big") QI_OUT=/dev/null PREP_QI=noop
    bench info-1T 1.0
}

# ---------------------------------------------------------------------------

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) memory"
echo "== $runs runs per tool per case, alternating, median wall-clock time kept"
for c in "${cases[@]}"; do
    echo
    echo "== $c"
    n_before=${#r_case[@]}
    "case_${c//-/_}"
    if [ ${#r_case[@]} -gt "$n_before" ]; then
        print_header | sed 's/^/   /'
        print_row $((${#r_case[@]} - 1)) | sed 's/^/   /'
    fi
done

echo
echo "== summary (seconds are medians of $runs; ratio = qinspect/qemu-img; rss in MiB)"
print_header
pass=0 miss=0 skip=0 err=0
for i in "${!r_case[@]}"; do
    print_row "$i"
    case ${r_result[i]} in
        PASS) pass=$((pass + 1)) ;;
        MISS) miss=$((miss + 1)) ;;
        SKIP) skip=$((skip + 1)) ;;
        *) err=$((err + 1)) ;;
    esac
done
echo
echo "$pass pass, $miss miss, $skip skipped, $err error"

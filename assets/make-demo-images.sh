#!/usr/bin/env bash
# Build the small demo images that live next to this script in assets/.
#
# Why: qinspect needs a handful of real, qemu-made images to demonstrate and
# test against (backing chains, internal snapshots, compressed clusters,
# subclusters, a deliberately corrupted image).  They are committed as binary
# files so tests and docs do not depend on qemu being installed, and this
# script documents exactly how each one was made so they can be regenerated.
#
# Usage: assets/make-demo-images.sh        (from any directory)
#
# Needs qemu-img and qemu-io (made with 10.0.2) and python3 (for the
# deterministic source data and the corruption patches).  Idempotent: every
# output is removed and rebuilt.  Everything is deterministic except the
# snapshot dates in demo-top.qcow2 (and zlib/zstd output if those libraries
# change).  Every image is well under 1 MiB, both apparent and on-disk size.
#
# Outputs (all in assets/):
#   demo-base.raw          512 KiB raw, patterned data with holes
#   demo-mid.qcow2         qcow2 (64k clusters) over demo-base.raw: writes,
#                          a partial-cluster COW, a zero write, a discard
#   demo-top.qcow2         64 MiB qcow2 (16k clusters, 2 L2 tables) over
#                          demo-mid.qcow2; snapshots snap1, snap3 (snap2 was
#                          taken and deleted), so clusters are shared
#   demo-compressed.qcow2  deflate-compressed (64k clusters), some compressed
#                          clusters straddle host cluster boundaries
#   demo-zstd.qcow2        zstd-compressed, 4k clusters, many compressed
#                          clusters packed into one host cluster, one cluster
#                          stored uncompressed because it does not compress
#   demo-extl2-base.raw    160 KiB raw backing for demo-extl2.qcow2
#   demo-extl2.qcow2       extended L2 (subclusters), 64k clusters, partial
#                          writes, zero subclusters, COW across backing EOF
#   demo-corrupt.qcow2     simple image with two byte patches: one leaked
#                          cluster and one L2 entry missing its COPIED bit
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "make-demo-images: $tool not found" >&2; exit 1; }
done

outputs=(demo-base.raw demo-mid.qcow2 demo-top.qcow2 demo-compressed.qcow2
         demo-zstd.qcow2 demo-extl2-base.raw demo-extl2.qcow2 demo-corrupt.qcow2)
rm -f -- "${outputs[@]}"

tmpdir=$(mktemp -d)
trap 'rm -rf -- "$tmpdir"' EXIT

# qemu-io with its chatter silenced; it still fails loudly on errors.
# -d unmap makes `discard` reach the qcow2 driver (the default ignores it).
qio() {
    local fmt=$1 img=$2
    shift 2
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f "$fmt" -d unmap "${args[@]}" "$img" >/dev/null
}

# --------------------------------------------------------------------------
# demo-base.raw: 512 KiB raw.  Layout (guest offsets):
#   0    .. 4k    hole (zeros; a NUL byte early in the file also makes git
#                 treat the raw files as binary rather than text)
#   4k   .. 128k  0xb1
#   128k .. 192k  hole (zeros)
#   192k .. 256k  0xb2
#   256k .. 320k  hole
#   320k .. 420k  0xb3 (ends mid-cluster)
#   420k .. 512k  hole
qemu-img create -q -f raw demo-base.raw 512K
qio raw demo-base.raw \
    'write -P 0xb1 4k 124k' \
    'write -P 0xb2 192k 64k' \
    'write -P 0xb3 320k 100k'

# --------------------------------------------------------------------------
# demo-mid.qcow2: qcow2 v3, 64k clusters, same 512 KiB size as its backing
# (size taken from the backing file), relative backing name.
#   write -P 0xa1 64k 64k    full cluster 1 over backing 0xb1
#   write -P 0xa2 200k 10k   partial cluster 3: COW of the rest from 0xb2
#   write -P 0xa3 384k 64k   cluster 6 allocated ...
#   discard 384k 64k         ... then discarded: becomes a zero cluster and
#                            its host cluster is freed (refcount 0)
#   write -z 0 64k           zero cluster 0 without allocating (hides 0xb1)
qemu-img create -q -f qcow2 -b demo-base.raw -F raw demo-mid.qcow2
qio qcow2 demo-mid.qcow2 \
    'write -P 0xa1 64k 64k' \
    'write -P 0xa2 200k 10k' \
    'write -P 0xa3 384k 64k' \
    'discard 384k 64k' \
    'write -z 0 64k'

# --------------------------------------------------------------------------
# demo-top.qcow2: 64 MiB (bigger than its 512 KiB backing), 16k clusters so
# one L2 table covers 32 MiB and writes at 40M/48M need a second L2 table.
qemu-img create -q -f qcow2 -b demo-mid.qcow2 -F qcow2 -o cluster_size=16k demo-top.qcow2 64M
qio qcow2 demo-top.qcow2 \
    'write -P 0xc1 0 16k' \
    'write -P 0xc2 100k 4k' \
    'write -P 0xc3 40M 16k'
qemu-img snapshot -c snap1 demo-top.qcow2
#   after snap1: COW of shared clusters (partial and full), a new one
qio qcow2 demo-top.qcow2 \
    'write -P 0xd1 0 8k' \
    'write -P 0xd2 48M 16k' \
    'write -P 0xd3 304k 16k'
qemu-img snapshot -c snap2 demo-top.qcow2
#   after snap2: overwrite a cluster shared by snap1+snap2, zero-write over
#   backing data, discard a cluster that only the active layer and snap2 use
qio qcow2 demo-top.qcow2 \
    'write -P 0xe1 40M 16k' \
    'write -z 64k 32k' \
    'discard 304k 16k'
qemu-img snapshot -c snap3 demo-top.qcow2
qio qcow2 demo-top.qcow2 \
    'write -P 0xf1 48M 8k' \
    'write -P 0xf2 60M 16k'
#   deleting snap2 drops its references: some clusters go back to refcount 1
#   (COPIED set again), others stay shared with snap1/snap3
qemu-img snapshot -d snap2 demo-top.qcow2

# --------------------------------------------------------------------------
# Deterministic source data for the compressed images.  "rand" is a SHA-256
# counter stream (incompressible but reproducible).
python3 - "$tmpdir" <<'EOF'
import hashlib, sys, os

def rand(n, seed):
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%s:%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])

def text(n):
    s = b"".join(b"qinspect demo line %05d: the quick brown fox\n" % i for i in range(n // 40 + 1))
    return s[:n]

def build(cluster, layout, seed):
    buf = bytearray()
    for kind in layout:
        if kind == "zero":
            c = bytes(cluster)
        elif kind == "text":
            c = text(cluster)
        elif kind == "rand":
            c = rand(cluster, seed + b"-%d" % len(buf))
        elif kind.startswith("half"):          # half random, half pattern
            r = rand(cluster // 2, seed + b"-%d" % len(buf))
            c = r + bytes([int(kind[4:], 16)]) * (cluster - len(r))
        elif kind.startswith("quarter"):       # quarter random, rest pattern
            r = rand(cluster // 4, seed + b"-%d" % len(buf))
            c = r + bytes([int(kind[7:], 16)]) * (cluster - len(r))
        else:                                  # single byte pattern
            c = bytes([int(kind, 16)]) * cluster
        buf += c
    return bytes(buf)

d = sys.argv[1]
# deflate image: 1 MiB, 64k clusters (16 clusters)
deflate = ["11", "22", "text", "zero", "half33", "44", "quarter55", "zero",
           "66", "zero", "zero", "77", "half88", "zero", "99", "text"]
# zstd image: 256 KiB, 4k clusters (64 clusters)
zstd = []
for i in range(64):
    if i == 5:
        zstd.append("rand")                     # stored uncompressed
    elif i in (9, 30):
        zstd.append("half%02x" % (0x40 + i))    # ~2 KiB compressed: straddles
    elif i % 7 == 3:
        zstd.append("zero")                     # unallocated
    elif i % 11 == 0:
        zstd.append("text")
    else:
        zstd.append("%02x" % (0x80 + i))
with open(os.path.join(d, "deflate.raw"), "wb") as f:
    f.write(build(65536, deflate, b"deflate"))
with open(os.path.join(d, "zstd.raw"), "wb") as f:
    f.write(build(4096, zstd, b"zstd"))
EOF

# demo-compressed.qcow2: deflate (the default compression_type), 64k clusters.
qemu-img convert -q -c -f raw -O qcow2 "$tmpdir/deflate.raw" demo-compressed.qcow2

# demo-zstd.qcow2: zstd, 4k clusters (sets incompatible feature bit 3).
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd,cluster_size=4k \
    "$tmpdir/zstd.raw" demo-zstd.qcow2

# --------------------------------------------------------------------------
# demo-extl2-base.raw: 160 KiB raw backing, deliberately not cluster-aligned
# (ends halfway through guest cluster 2 of the 64k-cluster overlay).
#   0 .. 2k zeros, 2k .. 64k 0xe0, 64k .. 128k 0xe1, 128k .. 160k 0xe2
qemu-img create -q -f raw demo-extl2-base.raw 160K
qio raw demo-extl2-base.raw \
    'write -P 0xe0 2k 62k' \
    'write -P 0xe1 64k 64k' \
    'write -P 0xe2 128k 32k'

# demo-extl2.qcow2: extended L2 entries (32 subclusters of 2 KiB per 64k
# cluster), 512 KiB, over the 160 KiB raw backing.
#   write -P 0x11 4k 2k     cluster 0: only subcluster 2 allocated
#   write -z 64k 8k         cluster 1: subclusters 0-3 zero, no allocation
#   write -P 0x22 149k 20k  cluster 2: subclusters 10-20, partial at both
#                           ends: the head COW (148k..149k) copies backing
#                           data, the tail COW (169k..170k) lies beyond the
#                           backing file's EOF (160k) and reads zeros
#   write -P 0x33 192k 64k  cluster 3: fully allocated
#   write -z 196k 4k        cluster 3: subclusters 2-3 become zero
qemu-img create -q -f qcow2 -b demo-extl2-base.raw -F raw \
    -o extended_l2=on,cluster_size=64k demo-extl2.qcow2 512K
qio qcow2 demo-extl2.qcow2 \
    'write -P 0x11 4k 2k' \
    'write -z 64k 8k' \
    'write -P 0x22 149k 20k' \
    'write -P 0x33 192k 64k' \
    'write -z 196k 4k'

# --------------------------------------------------------------------------
# demo-corrupt.qcow2: a simple standalone 1 MiB image (64k clusters, 16-bit
# refcounts, no backing) with two data clusters, then patched in place.
#
# qemu-img 10.0.2 lays it out as:
#   0x00000 header      0x10000 refcount table   0x20000 refcount block
#   0x30000 L1 table    0x40000 L2 table
#   0x50000 data for guest 0   (0x5a)   host cluster 5
#   0x60000 data for guest 64k (0xa5)   host cluster 6
#
# Patches (the script checks the old bytes first and fails if the layout
# ever differs):
#   1. refcount block entry of host cluster 5, file offset 0x2000a
#      (0x20000 + 5 * 2 bytes): 00 01 -> 00 02.  Cluster 5 is referenced
#      once but now counts 2: a leaked reference.  Because its L2 entry still
#      has COPIED set while the refcount is no longer 1, qemu-img check also
#      reports an OFLAG_COPIED error for it.
#   2. L2 entry for guest cluster 1, file offset 0x40008 (0x40000 + 1 * 8),
#      first byte 0x80 -> 0x00: the COPIED flag (bit 63) is cleared although
#      the cluster's refcount is 1.
#      The entry goes from 80 00 00 00 00 06 00 00 to 00 00 00 00 00 06 00 00.
#
# `qemu-img check demo-corrupt.qcow2` (10.0.2) reports, exit status 2:
#   Leaked cluster 5 refcount=2 reference=1
#   ERROR OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2
#   ERROR OFLAG_COPIED data cluster: l2_entry=60000 refcount=1
#
#   2 errors were found on the image.
#   Data may be corrupted, or further writes to the image may corrupt it.
#
#   1 leaked clusters were found on the image.
#   This means waste of disk space, but no harm to data.
#   Image end offset: 458752
qemu-img create -q -f qcow2 demo-corrupt.qcow2 1M
qio qcow2 demo-corrupt.qcow2 \
    'write -P 0x5a 0 64k' \
    'write -P 0xa5 64k 64k'
python3 - demo-corrupt.qcow2 <<'EOF'
import sys
path = sys.argv[1]
patches = [
    # (offset, expected old bytes, new bytes, what)
    (0x2000a, bytes.fromhex("0001"), bytes.fromhex("0002"),
     "refcount of host cluster 5: 1 -> 2 (leak)"),
    (0x40008, bytes.fromhex("8000000000060000"), bytes.fromhex("0000000000060000"),
     "L2[1]: clear COPIED"),
]
with open(path, "r+b") as f:
    for off, old, new, what in patches:
        f.seek(off)
        got = f.read(len(old))
        if got != old:
            sys.exit("make-demo-images: unexpected layout at 0x%x: %s (wanted %s) for %s"
                     % (off, got.hex(), old.hex(), what))
        f.seek(off)
        f.write(new)
EOF

# --------------------------------------------------------------------------
# Sanity checks: clean images must be clean, demo-corrupt must not be.
for img in demo-mid.qcow2 demo-top.qcow2 demo-compressed.qcow2 demo-zstd.qcow2 demo-extl2.qcow2; do
    qemu-img check -q "$img" || { echo "make-demo-images: $img is not clean" >&2; exit 1; }
done
rc=0
qemu-img check -q demo-corrupt.qcow2 >/dev/null 2>&1 || rc=$?
if [ "$rc" -ne 2 ]; then
    echo "make-demo-images: expected qemu-img check exit 2 on demo-corrupt.qcow2, got $rc" >&2
    exit 1
fi
for f in "${outputs[@]}"; do
    apparent=$(du --apparent-size -k "$f" | cut -f1)
    real=$(du -k "$f" | cut -f1)
    if [ "$apparent" -ge 1024 ] || [ "$real" -ge 1024 ]; then
        echo "make-demo-images: $f is too big (${apparent}k apparent, ${real}k on disk)" >&2
        exit 1
    fi
done
ls -l -- "${outputs[@]}"

//! The overlap check at a write-back of QEMU's caches within an operation,
//! continued from `simulate_overlap2.rs`: a new L2 table (`l2_allocate`
//! writes the refcount cache back, then the whole L2 cache) and a new
//! refcount block (`alloc_refcount_block` writes the L2 cache back first),
//! each made while QEMU's L2 cache holds a changed slice the check stops;
//! and a repair on open that leaves the image dirty, whose refcounts wait
//! in the refcount cache for a flush the check stops. Each operation is run
//! by a real qemu-io on a copy and compared with the simulation, every byte
//! of the file and `qemu-img check` of the result; each test then asserts
//! what QEMU's copy holds.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::same_bytes;

/// The 8 bytes at `at` of QEMU's copy of `image`.
fn qemu_u64(w: &Work, image: &str, at: u64) -> u64 {
    let bytes = std::fs::read(w.path(&format!("{image}.qemu"))).expect("read QEMU's copy");
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"))
}

/// The refcount of cluster `c` in QEMU's copy of `image`.
fn qemu_refcount(w: &Work, image: &str, c: u64) -> u64 {
    let img = sim_compare::open_path(&w.path(&format!("{image}.qemu"))).expect("open");
    let mut rr = qinspect::image::RefcountReader::new(&img);
    rr.get(c).expect("refcount")
}

/// The length of QEMU's copy of `image`.
fn qemu_len(w: &Work, image: &str) -> u64 {
    std::fs::metadata(w.path(&format!("{image}.qemu")))
        .expect("QEMU's copy")
        .len()
}

/// A 1G image (64k clusters: refcount table 0x10000, refcount block
/// 0x20000, L1 0x30000, guest 0's L2 table 0x40000 and data 0x50000) whose
/// active L1[0] then names the refcount table's cluster as its L2 table:
/// the slice of that "L2 table" lands on the refcount table, so the overlap
/// check stops its write-back. Guest 512M (L1[1]) has no L2 table.
fn l2_over_the_reftable(w: &Work, image: &str) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "1G"]);
    w.qemu_io(image, &["write -P 0x11 0 64k"]);
    w.patch(image, 0x30000, &0x8000_0000_0001_0000_u64.to_be_bytes());
}

/// `write -z` over guest 512M-64k..512M+64k zeroes the last entry of the
/// "L2 table" over the refcount table in QEMU's L2 cache, then needs a new
/// L2 table for guest 512M. `l2_allocate` takes cluster 6 and writes the
/// refcount cache back (the refcount cache waits on nothing: no release):
/// the new table's refcount reaches the file. Then it writes the whole L2
/// cache back: the new table's zeros are written, the overlap check stops
/// the changed slice, the image is marked corrupt and the allocation fails,
/// so L1[1] is never written and the new table stays a leak. (The
/// simulation went on before: it linked the new table in L1[1] and failed
/// only at the flush after the request.)
#[test]
fn a_new_l2_table_writes_its_refcount_then_stops_at_the_held_slice() {
    let w = Work::new();
    let ops = ["write-zeroes:536805376:131072"];
    let (errors, corrupt) = same_bytes(&w, "nt.qcow2", l2_over_the_reftable, &ops);
    assert!(errors[0].is_some());
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "nt.qcow2", 0x30008), 0, "L1[1] unwritten");
    assert_eq!(qemu_u64(&w, "nt.qcow2", 0x1fff8), 0, "the held entry");
    assert_eq!(qemu_refcount(&w, "nt.qcow2", 6), 1, "the new table's");
    assert_eq!(qemu_len(&w, "nt.qcow2"), 0x70000, "the new table written");
}

/// As above with `-u` and the last entry of the "L2 table" naming guest 0's
/// data cluster 5: zeroing it releases cluster 5 (the refcount cache now
/// waits on the L2 cache), and the new L2 table takes cluster 5 again.
/// `l2_allocate`'s write-back of the refcount cache writes the L2 cache
/// first, which the overlap check stops: no refcount reaches the file (the
/// release and the new table's allocation are lost), the new table is never
/// written, and the file keeps its length. (Refused before: "allocated a
/// cluster after it released one".)
#[test]
fn a_new_l2_table_after_a_release_stops_before_any_refcount_is_written() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        l2_over_the_reftable(w, image);
        w.patch(image, 0x1fff8, &0x0000_0000_0005_0000_u64.to_be_bytes());
    };
    let ops = ["write-zeroes:536805376:131072:unmap"];
    let (errors, corrupt) = same_bytes(&w, "nr.qcow2", make, &ops);
    assert!(errors[0].is_some());
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "nr.qcow2", 0x30008), 0, "L1[1] unwritten");
    assert_eq!(
        qemu_u64(&w, "nr.qcow2", 0x1fff8),
        0x5_0000,
        "the held entry"
    );
    assert_eq!(qemu_refcount(&w, "nr.qcow2", 5), 1, "release lost");
    assert_eq!(qemu_len(&w, "nr.qcow2"), 0x60000, "nothing written past");
}

/// 512-byte clusters with 64-bit refcounts: a refcount block counts 64
/// clusters. A 4M image (refcount table 0x200, block 0x400, L1 0x600..0xa00,
/// guest 0's L2 table 0xa00) filled to exactly 64 clusters by `writes`,
/// then its L1[0] made to name the L1 table's first cluster as its L2
/// table: that slice lands on the L1 table, and the next cluster allocated,
/// 64, needs a new refcount block.
fn l2_over_the_l1_at_a_block_end(w: &Work, image: &str, writes: &[&str]) {
    let o = "cluster_size=512,refcount_bits=64";
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, image, "4M"]);
    w.qemu_io(image, writes);
    let len = std::fs::metadata(w.path(image)).expect("stat").len();
    assert_eq!(len, 64 * 512, "the file fills one refcount block");
    w.patch(image, 0x600, &0x8000_0000_0000_0600_u64.to_be_bytes());
}

/// `write -z` of guest 31.5k..32.5k zeroes entry 63 of the "L2 table" over
/// the L1 table in QEMU's L2 cache, then needs a new L2 table for guest 32k,
/// whose cluster (64) needs a new refcount block: `alloc_refcount_block`
/// writes the L2 cache back first, the overlap check stops the slice, and
/// the allocation fails. Nothing but the corrupt bit reaches the file: no
/// refcount block, no refcount table entry, no L2 table. (The simulation
/// made the block, the table and L1[1] before.)
#[test]
fn a_new_refcount_block_for_a_new_l2_table_stops_at_the_held_slice() {
    let w = Work::new();
    let make = |w: &Work, n: &str| {
        l2_over_the_l1_at_a_block_end(w, n, &["write -P 1 0 512", "write -P 2 512 29184"]);
    };
    let (errors, corrupt) = same_bytes(&w, "rb.qcow2", make, &["write-zeroes:32256:1024"]);
    assert!(errors[0].is_some());
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "rb.qcow2", 0x200 + 8), 0, "no refcount block");
    assert_eq!(qemu_u64(&w, "rb.qcow2", 0x600 + 8), 0, "L1[1] unwritten");
    assert_eq!(qemu_u64(&w, "rb.qcow2", 0x7f8), 0, "the held entry");
    assert_eq!(qemu_len(&w, "rb.qcow2"), 64 * 512);
}

/// As above with guest 32k written too (its L2 table 0xe00, its data
/// cluster 8), that entry's COPIED cleared, and the write-zeroes ending
/// 256 bytes into guest 32k: that tail does not read as zeros, so QEMU
/// writes zeros there in a write request of its own, which copies the
/// cluster to a new one, 64. The new refcount block that cluster needs
/// writes the L2 cache back first, where the overlap check stops the slice
/// the write-zeroes changed: the write fails before any of its data or
/// refcounts reach the file. (The simulation made the block and wrote the
/// copy before, and failed only at the flush.)
#[test]
fn a_new_refcount_block_inside_a_write_request_stops_at_the_held_slice() {
    let w = Work::new();
    let make = |w: &Work, n: &str| {
        let writes = [
            "write -P 1 0 512",
            "write -P 3 32768 512",
            "write -P 2 512 28160",
        ];
        l2_over_the_l1_at_a_block_end(w, n, &writes);
        assert_eq!(u64_of(w, n, 0x608), 0x8000_0000_0000_0e00, "layout");
        w.patch(n, 0xe00, &0x0000_0000_0000_1000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "rw.qcow2", make, &["write-zeroes:32256:768"]);
    assert!(errors[0].is_some());
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "rw.qcow2", 0x200 + 8), 0, "no refcount block");
    assert_eq!(
        qemu_u64(&w, "rw.qcow2", 0xe00),
        0x1000,
        "the entry COPIED was to replace"
    );
    assert_eq!(qemu_u64(&w, "rw.qcow2", 0x7f8), 0, "the held entry");
    assert_eq!(qemu_len(&w, "rw.qcow2"), 64 * 512);
}

/// 512-byte clusters, 16-bit refcounts: a 4M image with guest 0 and 32k
/// written (L1 0x600, L2 tables 0xa00 and 0xe00, data 0xc00 and 0x1000;
/// the file ends at 0x1200), L1[0] then naming the L1 table's first
/// cluster as its L2 table, and L1[1] without COPIED, so that a write to
/// guest 32k copies its L2 table first.
fn l2_over_the_l1_with_a_shared_table(w: &Work, image: &str) {
    let o = "cluster_size=512";
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, image, "4M"]);
    w.qemu_io(image, &["write -P 1 0 512", "write -P 3 32768 512"]);
    assert_eq!(u64_of(w, image, 0x608), 0x8000_0000_0000_0e00, "layout");
    w.patch(image, 0x600, &0x8000_0000_0000_0600_u64.to_be_bytes());
    w.patch(image, 0x608, &0x0000_0000_0000_0e00_u64.to_be_bytes());
}

/// `write -z` of guest 31.5k..32.25k zeroes entry 63 of the "L2 table" over
/// the L1 table, then falls back to a write of zeros for the tail in guest
/// 32k, which copies that L2 table to cluster 9: `l2_allocate` writes the
/// refcount cache (cluster 9's refcount reaches the file), then the L2
/// cache, the copy with it, and stops at the changed slice. Its undo frees
/// cluster 9 in the cache and passes the discard down at once, so the copy
/// written there reads as zeros; L1[1] keeps the old table. (The
/// simulation linked the copy before.)
#[test]
fn a_write_of_zeros_copying_an_l2_table_stops_there_and_discards_the_copy() {
    let w = Work::new();
    let ops = ["write-zeroes:32256:768"];
    let (errors, corrupt) = same_bytes(&w, "cp.qcow2", l2_over_the_l1_with_a_shared_table, &ops);
    assert!(errors[0].is_some());
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "cp.qcow2", 0x608), 0xe00, "L1[1] unwritten");
    assert_eq!(qemu_refcount(&w, "cp.qcow2", 9), 1, "the copy's refcount");
    assert_eq!(qemu_len(&w, "cp.qcow2"), 0x1400, "the copy written");
    assert_eq!(qemu_u64(&w, "cp.qcow2", 0x1200), 0, "then discarded");
}

/// As above with `-u`, entry 63 naming guest 0's data cluster 6 (released
/// by the zeroing: the refcount cache now waits on the L2 cache) and guest
/// 0's old L2 table, cluster 5, given refcount 0: the copy takes cluster 5,
/// and `l2_allocate`'s write-back of the refcount cache writes the L2 cache
/// first and stops there, no refcount written, the copy never written. Its
/// undo still discards cluster 5, whose old table then reads as zeros.
#[test]
fn a_write_of_zeros_after_a_release_discards_the_cluster_its_copy_took() {
    let w = Work::new();
    let make = |w: &Work, n: &str| {
        l2_over_the_l1_with_a_shared_table(w, n);
        w.patch(n, 0x7f8, &0x0000_0000_0000_0c00_u64.to_be_bytes());
        w.set_refcount(n, 5, 0);
    };
    let ops = ["write-zeroes:32256:768:unmap"];
    let (errors, corrupt) = same_bytes(&w, "cr.qcow2", make, &ops);
    assert!(errors[0].is_some());
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "cr.qcow2", 0x608), 0xe00, "L1[1] unwritten");
    assert_eq!(qemu_refcount(&w, "cr.qcow2", 5), 0);
    assert_eq!(qemu_refcount(&w, "cr.qcow2", 6), 1, "release lost");
    assert_eq!(qemu_u64(&w, "cr.qcow2", 0xa00), 0, "cluster 5 discarded");
    assert_eq!(qemu_len(&w, "cr.qcow2"), 0x1200);
}

/// A big-endian u64 of the file `name` at `at`.
fn u64_of(w: &Work, name: &str, at: u64) -> u64 {
    let bytes = std::fs::read(w.path(name)).expect("read the image");
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"))
}

/// A 4M image with 1-bit refcounts (`opts` added), guest 0 written (L1
/// 0x30000, L2 0x40000, data 0x50000), iotest 060's patch (L1[0] names the
/// L1 table as its L2 table) and the dirty bit set. QEMU's repair on open
/// frees the old L2 table and data cluster (leaks, clusters 4 and 5) in its
/// refcount cache, and cannot repair the L1 table's cluster, counted three
/// times where a refcount holds at most 1 ("overflow"): the image stays
/// dirty, so QEMU needs no accurate refcounts from then on.
fn dirty_over_l1(w: &Work, image: &str, opts: &str) {
    let o = format!("refcount_bits=1{opts}");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, image, "4M"]);
    w.qemu_io(image, &["write -P 0x11 0 64k"]);
    w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    w.patch(image, 79, &[bytes[79] | 1]);
}

/// A write of guest 64k on such an image takes cluster 4 again (freed by
/// the repair, in the cache) and links entry 1 of the "L2 table" that is
/// the L1 table. The flush after the request writes the L2 cache, which the
/// overlap check stops, and never the refcount cache (the image is dirty):
/// the repair's two releases and the new cluster's refcount are lost, the
/// two leaks stay, and the header keeps the dirty bit beside the corrupt
/// one. Without lazy refcounts the write's link marks nothing dirty: only
/// the repair left the image so.
#[test]
fn a_repair_on_open_left_dirty_loses_its_refcounts_at_a_stopped_flush() {
    let w = Work::new();
    for (image, opts) in [("rd.qcow2", ""), ("rl.qcow2", ",lazy_refcounts=on")] {
        let make = |w: &Work, n: &str| dirty_over_l1(w, n, opts);
        let (errors, corrupt) = same_bytes(&w, image, make, &["write:65536:65536:P=34"]);
        let e = errors[0].as_deref().unwrap_or_default();
        assert!(e.contains("overlaps with active L1 table"), "{image}: {e}");
        assert!(corrupt, "{image}");
        assert_eq!(qemu_u64(&w, image, 72), 3, "{image}: dirty and corrupt");
        assert_eq!(qemu_refcount(&w, image, 4), 1, "{image}");
        assert_eq!(qemu_refcount(&w, image, 5), 1, "{image}");
        assert_eq!(qemu_u64(&w, image, 0x30008), 0, "{image}: the held entry");
        let (_, leaks, _) = sim_compare::qemu_check(w.dir.path(), &format!("{image}.qemu"));
        assert_eq!(leaks, 2, "{image}");
    }
}

/// The same image under a discard of guest 512M-64k..512M+64k: QEMU
/// releases cluster 5 and stops where `l2_allocate` writes its caches back
/// for guest 512M's new table, as the write-zeroes does ("discard failed"
/// and the image marked corrupt). The simulation does not follow QEMU's
/// caches through a discard, so it refuses rather than guess what they
/// held.
#[test]
fn a_discard_that_needs_a_new_l2_table_after_a_held_slice_is_refused() {
    let w = Work::new();
    let image = "dr.qcow2";
    l2_over_the_reftable(&w, image);
    w.patch(image, 0x1fff8, &0x0000_0000_0005_0000_u64.to_be_bytes());
    let img = sim_compare::open_path(&w.path(image)).expect("open");
    let ops = [sim_compare::parse_op("discard:536805376:131072")];
    let sim = qinspect::simulate::simulate(&img, &w.path(image), &ops).expect("sim");
    let r = &sim.records[0];
    assert!(
        matches!(&r.cause, Some(qinspect::simulate::SimError::NotModelled(m)) if m.contains("l2_allocate makes a new L2 table")),
        "{:?}",
        r.error
    );
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "discard 536805376 131072", image])
        .current_dir(w.dir.path())
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("discard failed: Input/output error"),
        "{text}"
    );
    assert!(text.contains("overlaps with refcount table"), "{text}");
    let real = sim_compare::open_path(&w.path(image)).expect("open");
    assert_eq!(real.header.incompatible_features & 2, 2, "marked corrupt");
    assert_eq!(real.l1[1].0, 0, "L1[1] unwritten");
}

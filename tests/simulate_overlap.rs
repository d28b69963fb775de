//! Writes QEMU's overlap check stops only when its caches write them back:
//! L2 entries changed in QEMU's L2 cache are checked, with the whole cached
//! slice, when the slice is written (a cache flush: a new L2 table, the end
//! of the refcount walk, qemu-io's flush after each request), not when the
//! entry changes. Each image is broken as iotest 060 breaks its images (an
//! L1 entry naming a table that is also other metadata); each operation is
//! run by a real qemu-img or qemu-io on a copy and compared with the
//! simulation, every byte of the file and `qemu-img check` of the result.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::same_bytes;

/// A 4M image with guest 0..64k written (L1 at 0x30000, L2 at 0x40000, data
/// at 0x50000) and snapshot `s1` (its L1 at 0x60000, the snapshot table at
/// 0x70000), whose L1 entry 0 then names the active L1 table as its L2
/// table. With `shared`, the active L1 table's cluster is given refcount 2.
fn snapshot_l2_over_active_l1(w: &Work, image: &str, shared: bool) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
    w.qemu_io(image, &["write -P 0x11 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "s1", image]);
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let entry = u64::from_be_bytes(bytes[0x60000..0x60008].try_into().expect("8"));
    assert_eq!(entry, 0x8000_0000_0004_0000, "{image}: layout moved");
    w.patch(image, 0x60000, &0x0000_0000_0003_0000u64.to_be_bytes());
    if shared {
        w.set_refcount(image, 3, 2);
    }
}

/// The snapshot's walk (addend -1) sets COPIED in the "L2 table" that is the
/// active L1 table, in QEMU's L2 cache, then frees that table (its refcount
/// 1 goes to 0), which drops it from the cache: nothing is stopped, and the
/// addend 0 walk over the active L1 writes that table itself.
#[test]
fn a_snapshot_delete_frees_the_table_the_overlap_check_would_stop() {
    let w = Work::new();
    let make = |w: &Work, image: &str| snapshot_l2_over_active_l1(w, image, false);
    let (errors, corrupt) = same_bytes(&w, "df.qcow2", make, &["snapshot-delete:s1"]);
    assert_eq!(errors, [None]);
    assert!(!corrupt);
}

/// As above with the table still referenced after the walk: the flush after
/// it writes the L2 cache first, the overlap check stops the table, and the
/// refcount cache, which waits on the L2 cache with addend -1, is never
/// written: every refcount stays as the file had it, the freed snapshot
/// table's included.
#[test]
fn a_snapshot_delete_the_overlap_check_stops_writes_no_refcount() {
    let w = Work::new();
    let make = |w: &Work, image: &str| snapshot_l2_over_active_l1(w, image, true);
    let (errors, corrupt) = same_bytes(&w, "ds.qcow2", make, &["snapshot-delete:s1"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
}

/// Two snapshots, the first's L1 entry 0 naming the active L1 table (given
/// refcount 2, and the L2 table 0x40000 refcount 2, so that the walk sets
/// COPIED in it): the new snapshot table, whose allocation
/// `qcow2_write_snapshots` flushes, keeps its refcount; the release of the
/// old one, still in QEMU's refcount cache, is lost with the walk's.
#[test]
fn a_snapshot_delete_the_overlap_check_stops_keeps_the_new_snapshot_table() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        w.qemu_io(image, &["write -P 0x11 0 64k"]);
        w.qemu_img(&["snapshot", "-c", "s1", image]);
        w.qemu_img(&["snapshot", "-c", "s2", image]);
        w.patch(image, 0x60000, &0x0000_0000_0003_0000u64.to_be_bytes());
        w.set_refcount(image, 3, 2);
        w.set_refcount(image, 4, 2);
    };
    let (errors, corrupt) = same_bytes(&w, "dt.qcow2", make, &["snapshot-delete:s1"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
}

/// Snapshot `s1`'s L1 table named as its own L2 table (given refcount 3),
/// its second "L2 entry" naming the data cluster (refcount 2): the walk sets
/// COPIED there, in the L1 table's cluster, and leaves that table at
/// refcount 1. QEMU removed the snapshot from its list before the walk, so
/// the overlap check no longer knows that L1 table and the flush writes it.
#[test]
fn a_snapshot_delete_writes_over_the_deleted_snapshots_own_l1_table() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        snapshot_l2_over_active_l1(w, image, false);
        w.patch(image, 0x60000, &0x0000_0000_0006_0000u64.to_be_bytes());
        w.patch(image, 0x60008, &0x0000_0000_0005_0000u64.to_be_bytes());
        w.set_refcount(image, 6, 3);
    };
    let (errors, corrupt) = same_bytes(&w, "do.qcow2", make, &["snapshot-delete:s1"]);
    assert_eq!(errors, [None]);
    assert!(!corrupt);
}

/// iotest 060's image (active L1 entry 0 names the L1 table as its L2
/// table): a write of guest 64k allocates a data cluster and sets entry 1 of
/// that "L2 table" in QEMU's L2 cache. qemu-io's flush at the end of the
/// request writes the refcount cache first (the L2 cache waits on it), then
/// the overlap check stops the table: the new cluster's refcount stays.
#[test]
fn a_guest_write_the_overlap_check_stops_at_the_flush_keeps_its_refcounts() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        w.qemu_io(image, &["write -P 0x11 0 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "gw.qcow2", make, &["write:65536:65536:P=34"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
}

/// The same image, 1G: a write of guest 512M needs a new L2 table for
/// active L1 entry 1. QEMU writes the table, then the L1 entry, which the
/// overlap check stops: the L1 table is also an active L2 table. The new
/// table keeps its refcount (its release after the failure stays in QEMU's
/// refcount cache, never written).
#[test]
fn a_new_l2_tables_l1_entry_onto_an_active_l2_table_is_stopped() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "1G"]);
        w.qemu_io(image, &["write -P 0x11 0 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "nl.qcow2", make, &["write:536870912:65536:P=34"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L2 table"), "{e}");
    assert!(corrupt);
}

/// A 1G image with guest 0 and 512M written (L2 tables at 0x40000 and
/// 0x60000), then iotest 060's patch: one write of guest 512M-64k..512M+128k
/// sets the last entry of the "L2 table" that is the L1 table and entry 1 of
/// the table at 0x60000. The flush writes every refcount and that second
/// slice; the overlap check stops only the first.
#[test]
fn a_guest_write_keeps_the_slices_the_overlap_check_lets_through() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "1G"]);
        w.qemu_io(image, &["write -P 0x11 0 64k", "write -P 0x12 512M 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
    };
    let ops = ["write:536805376:196608:P=34"];
    let (errors, corrupt) = same_bytes(&w, "gs.qcow2", make, &ops);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    let bytes = std::fs::read(w.path("gs.qcow2.qemu")).expect("read QEMU's copy");
    let entry = u64::from_be_bytes(bytes[0x60008..0x60010].try_into().expect("8"));
    assert_ne!(entry, 0, "QEMU did not write the second slice");
}

/// A 1G image with guest 0 and 512M written (L2 tables at 0x40000 and
/// 0x60000), iotest 060's patch, and the last entry of the "L2 table" that
/// is the L1 table naming guest 0's data cluster: guest 512M-64k..512M+64k
/// spans that entry and entry 0 of the table at 0x60000.
fn two_slices_one_over_the_l1_table(w: &Work, image: &str) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "1G"]);
    w.qemu_io(image, &["write -P 0x11 0 64k", "write -P 0x12 512M 64k"]);
    w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
    w.patch(image, 0x3fff8, &0x8000_0000_0005_0000_u64.to_be_bytes());
}

/// The entry at `at` of QEMU's copy of `image`.
fn qemu_entry(w: &Work, image: &str, at: usize) -> u64 {
    let bytes = std::fs::read(w.path(&format!("{image}.qemu"))).expect("read QEMU's copy");
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"))
}

/// A discard is not followed by a flush: QEMU writes its caches at
/// qemu-io's exit, the L2 cache first. The overlap check stops the slice in
/// the L1 table, the other slice is written (entry 0 of 0x60000 now reads
/// as zeros), and the refcount cache, which waits on the L2 cache since the
/// releases, is never written: both released clusters keep refcount 1. The
/// discard itself succeeds.
#[test]
fn a_discard_the_overlap_check_stops_at_exit_writes_no_refcount() {
    let w = Work::new();
    let ops = ["discard:536805376:131072"];
    let (errors, corrupt) = same_bytes(&w, "dd.qcow2", two_slices_one_over_the_l1_table, &ops);
    assert_eq!(errors, [None]);
    assert!(corrupt);
    assert_eq!(qemu_entry(&w, "dd.qcow2", 0x60000), 1);
    assert_eq!(qemu_entry(&w, "dd.qcow2", 0x3fff8), 0x8000_0000_0005_0000);
}

/// `write -z -u` over the same clusters: the flush after the request, with
/// the same outcome; the write fails.
#[test]
fn a_write_zeroes_unmap_the_overlap_check_stops_writes_no_refcount() {
    let w = Work::new();
    let ops = ["write-zeroes:536805376:131072:unmap"];
    let (errors, corrupt) = same_bytes(&w, "zu.qcow2", two_slices_one_over_the_l1_table, &ops);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_entry(&w, "zu.qcow2", 0x60000), 1);
}

/// `write -z` without `-u` keeps the clusters (no refcount changes): the
/// second slice gets its zero flag, the first is stopped.
#[test]
fn a_write_zeroes_keeps_the_slices_the_overlap_check_lets_through() {
    let w = Work::new();
    let ops = ["write-zeroes:536805376:131072"];
    let (errors, corrupt) = same_bytes(&w, "zk.qcow2", two_slices_one_over_the_l1_table, &ops);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_entry(&w, "zk.qcow2", 0x60000), 0x8000_0000_0007_0001);
}

/// iotest 060's image, entry 1 of the "L2 table" that is the L1 table
/// naming guest 0's data cluster without COPIED: a write of guest 64k
/// copies it to a new cluster and releases the old one. The release makes
/// QEMU write the refcount cache (the new cluster's refcount) and then wait
/// on the L2 cache, which the overlap check stops: the old cluster keeps
/// its refcount.
#[test]
fn a_guest_write_stopped_at_the_flush_loses_the_release_of_its_old_cluster() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        w.qemu_io(image, &["write -P 0x11 0 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
        w.patch(image, 0x30008, &0x0000_0000_0005_0000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "gr.qcow2", make, &["write:65536:4096:P=34"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_entry(&w, "gr.qcow2", 0x30008), 0x5_0000);
}

/// An overlay of a 4M base written 0..1M, its guest 0..64k written, and
/// iotest 060's patch (its L1 entry 0 names the L1 table as its L2 table).
/// A copy-on-read of guest 64k writes the base's data to a new cluster and
/// sets entry 1 of that "L2 table" in QEMU's L2 cache. The block layer's
/// copy-on-read write is not followed by a flush: at qemu-io's exit the
/// refcount cache is written first (the L2 cache waits on it), then the
/// overlap check stops the table. The read itself succeeds.
#[test]
fn a_copy_on_read_the_overlap_check_stops_at_exit_keeps_its_refcounts() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "cb.qcow2", "4M"]);
        w.qemu_io("cb.qcow2", &["write -P 0x21 0 1M"]);
        let o = [
            "create", "-q", "-f", "qcow2", "-b", "cb.qcow2", "-F", "qcow2",
        ];
        w.qemu_img(&[&o[..], &[image, "4M"]].concat());
        w.qemu_io(image, &["write -P 0x11 0 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "cr.qcow2", make, &["read:65536:65536"]);
    assert_eq!(errors, [None]);
    assert!(corrupt);
    assert_eq!(qemu_entry(&w, "cr.qcow2", 0x30008), 0);
}

/// iotest 060's image: a compressed write of guest 64k places its bytes in
/// a new cluster and sets entry 1 of the "L2 table" that is the L1 table in
/// QEMU's L2 cache. A compressed write is not followed by a flush: at
/// qemu-io's exit the overlap check stops the table, and the refcount cache
/// is written (nothing waits on the L2 cache). The write itself succeeds.
#[test]
fn a_compressed_write_the_overlap_check_stops_at_exit_keeps_its_refcounts() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        w.qemu_io(image, &["write -P 0x11 0 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
    };
    let ops = ["write-compressed:65536:65536:P=34"];
    let (errors, corrupt) = same_bytes(&w, "wc.qcow2", make, &ops);
    assert_eq!(errors, [None]);
    assert!(corrupt);
    assert_eq!(qemu_entry(&w, "wc.qcow2", 0x30008), 0);
}

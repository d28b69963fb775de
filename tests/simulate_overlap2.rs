//! The overlap check at a cache write-back, continued from
//! `simulate_overlap.rs`: images with lazy refcounts, where a write's link
//! of its L2 entries marks the image dirty (`qcow2_mark_dirty`) and QEMU's
//! L2 cache then no longer waits on its refcount cache. Each image is broken
//! as iotest 060 breaks its images (an L1 entry naming the L1 table as its
//! L2 table); each operation is run by a real qemu-io on a copy and compared
//! with the simulation, every byte of the file and `qemu-img check` of the
//! result.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::same_bytes;

/// The 8 bytes at `at` of QEMU's copy of `image`.
fn qemu_u64(w: &Work, image: &str, at: usize) -> u64 {
    let bytes = std::fs::read(w.path(&format!("{image}.qemu"))).expect("read QEMU's copy");
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"))
}

/// The 16-bit refcount of cluster `c` in QEMU's copy (the first refcount
/// block is at 0x20000 in these images).
fn qemu_refcount(w: &Work, image: &str, c: usize) -> u16 {
    let bytes = std::fs::read(w.path(&format!("{image}.qemu"))).expect("read QEMU's copy");
    u16::from_be_bytes(
        bytes[0x20000 + 2 * c..0x20002 + 2 * c]
            .try_into()
            .expect("2"),
    )
}

/// `qemu-img create` of `image` with lazy refcounts on.
fn create_lazy(w: &Work, image: &str, size: &str) {
    let o = ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on"];
    w.qemu_img(&[&o[..], &[image, size]].concat());
}

/// A 4M image with lazy refcounts, guest 0..64k written (L1 at 0x30000, L2
/// at 0x40000, data at 0x50000), and iotest 060's patch: L1 entry 0 names
/// the L1 table as its L2 table.
fn lazy_l2_over_l1(w: &Work, image: &str) {
    create_lazy(w, image, "4M");
    w.qemu_io(image, &["write -P 0x11 0 64k"]);
    w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
}

/// A write of guest 64k allocates cluster 0x60000 and links entry 1 of the
/// "L2 table" that is the L1 table: the link marks the image dirty, so the
/// L2 cache does not wait on the refcount cache. qemu-io's flush after the
/// request writes the L2 cache first, the overlap check stops it, and
/// `qcow2_write_caches` returns before the refcount cache: the new
/// cluster's refcount is never written, the header keeps the dirty bit
/// beside the corrupt one. (Refused before: "on an image with lazy
/// refcounts".)
#[test]
fn a_guest_write_stopped_at_the_flush_on_a_lazy_refcounts_image_loses_its_refcounts() {
    let w = Work::new();
    let (errors, corrupt) =
        same_bytes(&w, "lz.qcow2", lazy_l2_over_l1, &["write:65536:65536:P=34"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "lz.qcow2", 72), 3, "dirty and corrupt");
    assert_eq!(qemu_refcount(&w, "lz.qcow2", 6), 0);
}

/// The same with entry 1 naming guest 0's data cluster without COPIED: the
/// write copies it to a new cluster and releases the old one. Neither
/// refcount change reaches the file (the refcount cache is never written).
#[test]
fn a_lazy_guest_write_stopped_at_the_flush_loses_its_copy_and_its_release() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        lazy_l2_over_l1(w, image);
        w.patch(image, 0x30008, &0x0000_0000_0005_0000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "lr.qcow2", make, &["write:65536:4096:P=34"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "lr.qcow2", 72), 3, "dirty and corrupt");
    assert_eq!(qemu_u64(&w, "lr.qcow2", 0x30008), 0x5_0000);
    assert_eq!(qemu_refcount(&w, "lr.qcow2", 5), 1);
    assert_eq!(qemu_refcount(&w, "lr.qcow2", 6), 0);
}

/// A copy-on-read of guest 64k on a lazy overlay: its write's link marks
/// the image dirty. At qemu-io's exit the close's flush writes the L2
/// cache, which the overlap check stops, and returns before the refcount
/// cache; the image is unusable then, so the close writes nothing more:
/// the new cluster's refcount is lost, the header keeps the dirty bit
/// (without lazy refcounts the refcounts go first and stay,
/// `simulate_overlap.rs`). The read itself succeeds.
#[test]
fn a_lazy_copy_on_read_stopped_at_exit_loses_its_refcounts_keeps_the_dirty_bit() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "lb.qcow2", "4M"]);
        w.qemu_io("lb.qcow2", &["write -P 0x21 0 1M"]);
        let o = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "-b",
            "lb.qcow2",
            "-F",
            "qcow2",
        ];
        w.qemu_img(&[&o[..], &[image, "4M"]].concat());
        w.qemu_io(image, &["write -P 0x11 0 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "lc.qcow2", make, &["read:65536:65536"]);
    assert_eq!(errors, [None]);
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "lc.qcow2", 72), 3, "dirty and corrupt");
    assert_eq!(qemu_refcount(&w, "lc.qcow2", 6), 0);
}

/// A 1G lazy image with guest 0 and 512M written (L2 tables at 0x40000 and
/// 0x60000), iotest 060's patch, and the last entry of the "L2 table" that
/// is the L1 table naming guest 0's data cluster. `write -z -u` over
/// guest 512M-64k..512M+64k links nothing, so the image stays clean and
/// the flush goes as without lazy refcounts: the other slice is written,
/// the releases (waiting on the L2 cache) are not.
#[test]
fn a_lazy_write_zeroes_unmap_stopped_at_the_flush_writes_no_refcount() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        create_lazy(w, image, "1G");
        w.qemu_io(image, &["write -P 0x11 0 64k", "write -P 0x12 512M 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
        w.patch(image, 0x3fff8, &0x8000_0000_0005_0000_u64.to_be_bytes());
    };
    let ops = ["write-zeroes:536805376:131072:unmap"];
    let (errors, corrupt) = same_bytes(&w, "lu.qcow2", make, &ops);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "lu.qcow2", 72), 2, "corrupt, not dirty");
    assert_eq!(qemu_u64(&w, "lu.qcow2", 0x60000), 1);
}

/// A 1G image with guest 0, 512M and 512M+64k written (L2 tables at 0x40000
/// and 0x60000), iotest 060's patch, the last entry of the "L2 table" that
/// is the L1 table naming guest 0's data cluster, and entry 1 of 0x60000
/// left without COPIED. `write -z -u` over guest 512M-64k..512M+68k zeroes
/// two whole clusters (releasing them: the refcount cache now waits on the
/// L2 cache) and writes zeros over the partial cluster at 512M+64k, which
/// copies it to a new cluster. That write's link makes QEMU write its L2
/// cache back first: the overlap check stops the slice in the L1 table and
/// marks the image corrupt, the other slice is written. QEMU ignores that
/// failure: the new cluster's data is written, its L2 entry and every
/// refcount change from the first release on are not, and the write
/// succeeds. (Refused before: "allocated a cluster after it released one".)
#[test]
fn a_write_zeroes_whose_fallback_write_links_after_a_release_is_stopped_there() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "1G"]);
        let writes = [
            "write -P 0x11 0 64k",
            "write -P 0x12 512M 64k",
            "write -P 0x13 536936448 64k",
        ];
        w.qemu_io(image, &writes);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
        w.patch(image, 0x3fff8, &0x8000_0000_0005_0000_u64.to_be_bytes());
        w.patch(image, 0x60008, &0x0000_0000_0008_0000_u64.to_be_bytes());
    };
    let ops = ["write-zeroes:536805376:135168:unmap"];
    let (errors, corrupt) = same_bytes(&w, "zl.qcow2", make, &ops);
    assert_eq!(errors, [None]);
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "zl.qcow2", 0x60000), 1, "the other slice");
    assert_eq!(
        qemu_u64(&w, "zl.qcow2", 0x60008),
        0x8_0000,
        "the link's entry"
    );
    assert_eq!(qemu_refcount(&w, "zl.qcow2", 7), 1);
    assert_eq!(qemu_refcount(&w, "zl.qcow2", 8), 1);
}

/// A 4M image with guest 0 and 3M written, iotest 060's patch, and entry 48
/// of the "L2 table" that is the L1 table naming guest 3M's data cluster
/// 0x60000. `qemu-img resize --shrink` to 2M discards that entry in QEMU's
/// L2 cache, cuts the file after its last cluster in use (0x60000 is free
/// in the refcount cache) and writes the new size; only then does
/// `qcow2_update_options` write the L2 cache back, which the overlap check
/// stops: the entry stays, the release of 0x60000 (in the refcount cache,
/// never written) is lost, and the resize fails. (The simulation failed at
/// the discard before, leaving size and file as they were.)
#[test]
fn a_shrink_whose_discard_the_overlap_check_stops_at_the_end_keeps_its_cut() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        w.qemu_io(image, &["write -P 0x11 0 64k", "write -P 0x12 3M 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
        w.patch(image, 0x30180, &0x8000_0000_0006_0000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "sh.qcow2", make, &["resize:2097152:shrink"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("Failed to flush the L2 table cache"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "sh.qcow2", 0x30180), 0x8000_0000_0006_0000);
    assert_eq!(qemu_refcount(&w, "sh.qcow2", 6), 1);
    let len = std::fs::metadata(w.path("sh.qcow2.qemu"))
        .expect("QEMU's copy")
        .len();
    assert_eq!(len, 0x60000, "the file is cut");
}

/// As above with guest 1M written too (its cluster 0x70000 last in the
/// file, so nothing is cut): the discarded cluster 0x60000 is punched in
/// the file when its refcount drops to 0 in the cache (a shrink's discard
/// is always passed down) and reads as zeros, while the refcount the file
/// keeps for it stays 1.
#[test]
fn a_shrink_stopped_at_the_end_punches_the_cluster_its_lost_release_freed() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        let writes = [
            "write -P 0x11 0 64k",
            "write -P 0x12 3M 64k",
            "write -P 0x13 1M 64k",
        ];
        w.qemu_io(image, &writes);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
        w.patch(image, 0x30180, &0x8000_0000_0006_0000_u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "sp.qcow2", make, &["resize:2097152:shrink"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("Failed to flush the L2 table cache"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_refcount(&w, "sp.qcow2", 6), 1);
    assert_eq!(qemu_u64(&w, "sp.qcow2", 0x60000), 0, "punched");
    let len = std::fs::metadata(w.path("sp.qcow2.qemu"))
        .expect("QEMU's copy")
        .len();
    assert_eq!(len, 0x80000, "nothing cut");
}

/// iotest 060's image: entry 0 of the "L2 table" that is the L1 table names
/// that table itself. A discard (or `write -z -u`) of guest 0 releases its
/// cluster from within the table, whose refcount drops to 0 while QEMU's
/// L2 cache holds it in use: QEMU 10.0.2 aborts on an assertion in
/// `qcow2_cache_discard`, and the simulation refuses the case instead of
/// predicting an image marked corrupt.
#[test]
fn a_discard_that_frees_the_l2_table_it_changes_is_refused_where_qemu_aborts() {
    let w = Work::new();
    for (image, op, cmd) in [
        ("fa.qcow2", "discard:0:65536", "discard 0 64k"),
        (
            "fz.qcow2",
            "write-zeroes:0:65536:unmap",
            "write -z -u 0 64k",
        ),
    ] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        w.qemu_io(image, &["write -P 0x11 0 64k"]);
        w.patch(image, 0x30000, &0x8000_0000_0003_0000_u64.to_be_bytes());
        let img = sim_compare::open_path(&w.path(image)).expect("open");
        let sim = qinspect::simulate::simulate(&img, &w.path(image), &[sim_compare::parse_op(op)])
            .expect("sim");
        let r = &sim.records[0];
        assert!(
            matches!(&r.cause, Some(qinspect::simulate::SimError::NotModelled(m)) if m.contains("qcow2_cache_discard")),
            "{op}: {:?}",
            r.error
        );
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, image])
            .current_dir(w.dir.path())
            .output()
            .expect("run qemu-io");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}: qemu-io succeeded");
        assert!(
            stderr.contains("qcow2_cache_discard: Assertion"),
            "{cmd}: {stderr}"
        );
    }
}

/// A 4M image with guest 0 written and snapshot `s1` (L2 table 0x40000
/// shared), entry 1 of that table naming the table itself and the table's
/// refcount set to 1: deleting `s1` walks the table with addend -1, and the
/// entry's -1 frees the table while QEMU's L2 cache holds it in use. QEMU
/// 10.0.2 aborts (`qcow2_cache_discard`'s assertion); the simulation
/// refuses, where it predicted a refcount going below 0 before.
#[test]
fn a_snapshot_delete_that_frees_the_l2_table_it_walks_is_refused_where_qemu_aborts() {
    let w = Work::new();
    let image = "fw.qcow2";
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
    w.qemu_io(image, &["write -P 0x11 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "s1", image]);
    w.patch(image, 0x40008, &0x0000_0000_0004_0000_u64.to_be_bytes());
    w.set_refcount(image, 4, 1);
    let img = sim_compare::open_path(&w.path(image)).expect("open");
    let ops = [sim_compare::parse_op("snapshot-delete:s1")];
    let sim = qinspect::simulate::simulate(&img, &w.path(image), &ops).expect("sim");
    let r = &sim.records[0];
    assert!(
        matches!(&r.cause, Some(qinspect::simulate::SimError::NotModelled(m)) if m.contains("qcow2_cache_discard")),
        "{:?}",
        r.error
    );
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-d", "s1", image])
        .current_dir(w.dir.path())
        .output()
        .expect("run qemu-img");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qemu-img succeeded");
    assert!(
        stderr.contains("qcow2_cache_discard: Assertion"),
        "{stderr}"
    );
}

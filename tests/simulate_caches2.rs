//! QEMU's refcount cache after the repair of a dirty image on its open,
//! and after a new refcount table made within an operation, followed
//! through an operation that QEMU stops (an extended-L2 entry whose bits
//! contradict each other, the overlap check), and the close that marks
//! such a repaired image clean, each compared with a real qemu-io on a
//! copy, every byte of the file.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::same_bytes;

/// 16k clusters with 64-bit refcounts: a refcount block counts 2048
/// clusters, 32M of the file.
const OPTS: &str = "extended_l2=on,cluster_size=16k,refcount_bits=64,lazy_refcounts=on";

/// A big-endian u64 of the file `name` at `at`.
fn u64_at(w: &Work, name: &str, at: u64) -> u64 {
    let bytes = std::fs::read(w.path(name)).expect("read the image");
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Make guest `g`'s entry contradictory (16k clusters, extended L2: an L2
/// table of 1024 entries of 16 bytes covers 16M): subcluster 0 allocated
/// and zero.
fn contradict(w: &Work, name: &str, g: u64) {
    let l1 = u64_at(w, name, 40);
    let l2 = u64_at(w, name, l1 + (g >> 24) * 8) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "guest {g:#x} has no L2 table");
    let at = l2 + ((g >> 14) & 1023) * 16;
    assert_ne!(u64_at(w, name, at), 0, "guest {g:#x} is not allocated");
    w.patch(name, at + 8, &0x0000_0001_0000_0001u64.to_be_bytes());
}

/// Set the dirty bit (incompatible feature 0) of the image `name`.
fn dirty(w: &Work, name: &str) {
    let bytes = std::fs::read(w.path(name)).expect("read the image");
    w.patch(name, 79, &[bytes[79] | 1]);
}

/// The host cluster guest `g` is mapped to (16k clusters, extended L2).
fn host_cluster(w: &Work, name: &str, g: u64) -> u64 {
    let l1 = u64_at(w, name, 40);
    let l2 = u64_at(w, name, l1 + (g >> 24) * 8) & 0x00ff_ffff_ffff_fe00;
    let e = u64_at(w, name, l2 + ((g >> 14) & 1023) * 16) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(e, 0, "guest {g:#x} is not allocated");
    e >> 14
}

#[test]
fn a_repair_on_open_that_leaves_a_corruption_keeps_its_refcounts_in_the_cache() {
    let w = Work::new();
    // A dirty image with two leaks (data clusters counted twice) and a
    // contradictory entry at guest 80k, which QEMU's check counts as a
    // corruption it cannot repair: the repair on open lowers the two
    // refcounts in its cache and does not mark the image clean (so the
    // caches are not written back). The write of guest 64k then takes a
    // new cluster (its refcount in the cache too) and meets the entry: the
    // image is marked corrupt, and both repairs and the new refcount are
    // lost; the data stays where it went.
    let make = |w: &Work, n: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", OPTS, n, "64M"]);
        w.qemu_io(n, &["write -P 1 0 64k", "write -P 2 80k 16k"]);
        contradict(w, n, 0x14000);
        dirty(w, n);
        for g in [0u64, 0xc000] {
            let c = host_cluster(w, n, g);
            w.set_refcount(n, c, 2);
        }
    };
    let (errors, corrupt) = same_bytes(&w, "d.qcow2", make, &["write:65536:16896:P=5"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
    // The leaks are still there: QEMU never wrote their repair.
    let real = sim_compare::open_path(&w.path("d.qcow2.qemu")).expect("open QEMU's copy");
    assert!(real.header.dirty());
    let report = qinspect::check::check(&real, &qinspect::check::CheckOptions::default());
    assert!(report.leaks >= 2, "{} leaks", report.leaks);
}

#[test]
fn a_repair_on_open_over_six_refcount_blocks_writes_back_what_its_cache_gave_up() {
    let w = Work::new();
    // 160M preallocated (six refcount blocks, every cluster in use), dirty,
    // with leaks in the first and the fifth refcount block and a
    // contradictory entry at guest 16k. The repair's comparison goes
    // through all six blocks twice, lowering the two refcounts on its
    // second pass, where the fifth block replaces the first (written back);
    // the COPIED check's walk over the data clusters from the first block
    // on then replaces the fifth in turn. The write of guest 0..16k+512, in
    // place, meets the entry: both repairs reached the file.
    let make = |w: &Work, n: &str| {
        let o = format!("{OPTS},preallocation=falloc");
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, n, "160M"]);
        contradict(w, n, 0x4000);
        dirty(w, n);
        for g in [0x8000u64, 159 << 20] {
            let c = host_cluster(w, n, g);
            w.set_refcount(n, c, 3);
        }
    };
    let (errors, corrupt) = same_bytes(&w, "f.qcow2", make, &["write:0:16896:P=5"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
    let real = sim_compare::open_path(&w.path("f.qcow2.qemu")).expect("open QEMU's copy");
    let report = qinspect::check::check(&real, &qinspect::check::CheckOptions::default());
    assert_eq!(report.leaks, 0);
}

#[test]
fn a_write_that_grows_the_refcount_table_then_stopped_by_the_overlap_check() {
    let w = Work::new();
    // 512-byte clusters with 64-bit refcounts: a refcount block counts 64
    // clusters (32k of the file), and the first refcount table, one
    // cluster of 64 entries, 2M. Guest 0..1960k written (the file just
    // under 2M), and one cluster at each end of the L2 table of guest
    // 2560k..2592k, the last one's entry made to name the active L1 table.
    // A write of the 61 clusters between them and that last one: their
    // new clusters run past 2M, so QEMU makes a new refcount table, frees
    // the old one and searches again from there, through every refcount
    // block of the file; the last cluster's data would land on the L1
    // table, so the overlap check marks the image corrupt, and what QEMU's
    // refcount cache still held is lost.
    let last = 2591 * 1024;
    let make = move |w: &Work, n: &str| {
        let o = "cluster_size=512,refcount_bits=64";
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, n, "4M"]);
        let tail = format!("write -P 2 {last} 512");
        w.qemu_io(n, &["write -P 1 0 1960k", "write -P 2 2560k 512", &tail]);
        let l1 = u64_at(w, n, 40);
        let l2 = u64_at(w, n, l1 + (last >> 15) * 8) & 0x00ff_ffff_ffff_fe00;
        let at = l2 + ((last >> 9) & 63) * 8;
        assert_ne!(u64_at(w, n, at), 0, "layout moved");
        w.patch(n, at, &((1u64 << 63) | l1).to_be_bytes());
        let len = std::fs::metadata(w.path(n)).expect("stat").len();
        assert!(len < 2 << 20, "the file is already {len} bytes");
        assert_eq!(u64_at(w, n, 56) >> 32, 1, "one refcount table cluster");
    };
    let from = 2560 * 1024 + 512;
    let write = format!("write:{from}:{}:P=5", last + 512 - from);
    let (errors, corrupt) = same_bytes(&w, "g.qcow2", make, &[&write]);
    let first = errors[0].as_deref().unwrap_or_default();
    assert!(first.contains("overlaps with active L1 table"), "{first}");
    assert!(corrupt);
    // QEMU did make a new refcount table.
    let table = |n: &str| (u64_at(&w, n, 48), u64_at(&w, n, 56) >> 32);
    let (old, new) = (table("g.qcow2"), table("g.qcow2.qemu"));
    assert!(new.0 != old.0 && new.1 > old.1, "{old:?} -> {new:?}");
}

#[test]
fn the_close_marks_clean_an_image_its_repair_on_open_left_dirty() {
    let w = Work::new();
    // The repair on open leaves the contradictory entry at guest 80k (so
    // it does not mark the image clean); a write elsewhere succeeds, and
    // the close (qcow2_inactivate) writes the caches back and marks the
    // image clean all the same.
    let make = |w: &Work, n: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", OPTS, n, "64M"]);
        w.qemu_io(n, &["write -P 1 0 64k", "write -P 2 80k 16k"]);
        contradict(w, n, 0x14000);
        dirty(w, n);
        let c = host_cluster(w, n, 0);
        w.set_refcount(n, c, 2);
    };
    let (errors, corrupt) = same_bytes(&w, "s.qcow2", make, &["write:1048576:16384:P=5"]);
    assert_eq!(errors, [None]);
    assert!(!corrupt);
    let real = sim_compare::open_path(&w.path("s.qcow2.qemu")).expect("open QEMU's copy");
    assert!(!real.header.dirty());
}

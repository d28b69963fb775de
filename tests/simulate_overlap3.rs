//! The overlap check at a write-back of QEMU's L2 cache that its refcount
//! cache asks for, continued from `simulate_overlap.rs`: after a release
//! the refcount cache waits on the L2 cache (`qcow2_cache_set_dependency`),
//! so giving the place of a changed refcount block to another one writes
//! the L2 cache back first (`qcow2_cache_entry_flush` →
//! `qcow2_cache_flush_dependency`). The images have 512-byte clusters and
//! 64-bit refcounts, so that a refcount block counts 64 clusters and a walk
//! goes through more refcount blocks than QEMU's refcount cache holds (4).
//! Each is broken as iotest 060 breaks its images (an L1 entry naming the
//! active L1 table as its L2 table); each operation is run by a real
//! qemu-img on a copy and compared with the simulation, every byte of the
//! file and `qemu-img check` of the result.

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

/// A 1M image of 512-byte clusters and 64-bit refcounts (the refcount table
/// at 0x200, the active L1 table at 0x600, cluster 3) with the first
/// cluster of guest 0, 32k, 64k, ... written, `tables` of them (their L2
/// tables at clusters 4, 6, 8, ..., each followed by its data cluster),
/// then the rest of those L2 tables' ranges, which spread the data over
/// the refcount blocks of clusters 0..64 (at 0x400), 64..128, 128..192 and
/// so on. Then, with `snapshot`, snapshot `s1`, whose L1 table follows the
/// data.
fn spread(w: &Work, image: &str, tables: u64, snapshot: bool) {
    let o = "cluster_size=512,refcount_bits=64";
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, image, "1M"]);
    let mut writes = Vec::new();
    for t in 0..tables {
        writes.push(format!("write -P {:#x} {}k 512", 0x11 + t, 32 * t));
    }
    for t in 0..tables {
        writes.push(format!(
            "write -P {:#x} {} 31k",
            0x21 + t,
            32 * 1024 * t + 512
        ));
    }
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    w.qemu_io(image, &writes);
    if snapshot {
        w.qemu_img(&["snapshot", "-c", "s1", image]);
    }
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let at = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().expect("8"));
    assert_eq!(at(0x28), 0x600, "{image}: layout moved (active L1)");
    for t in 0..tables as usize {
        assert_eq!(
            at(0x600 + 8 * t) & !(1 << 63),
            0x800 + 0x400 * t as u64,
            "{image}: layout moved (L2 tables)"
        );
    }
    if tables == 4 && snapshot {
        // The snapshot table at cluster 265, counted by the block at 0x20e00.
        assert_eq!(at(0x40), 0x21200, "{image}: layout moved (snapshot table)");
        assert_eq!(
            at(0x220),
            0x20e00,
            "{image}: layout moved (refcount blocks)"
        );
    }
}

/// The offset of `s1`'s L1 table in `image`.
fn s1_l1(w: &Work, image: &str) -> u64 {
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let at = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().expect("8"));
    at(at(0x40) as usize)
}

/// [`spread`], then entry `index` of `s1`'s L1 table names the active L1
/// table as its L2 table (given refcount 2), and the L2 tables at clusters
/// `thrice` refcount 3: the walk that deletes `s1` takes each of those
/// twice (through its own entry of `s1`'s L1 and as an entry of the "L2
/// table" that is the active L1), and leaves them at 1, so it sets COPIED
/// in that "L2 table", in QEMU's L2 cache, where the overlap check stops
/// its write-back.
fn spread_over_l1(w: &Work, image: &str, tables: u64, index: u64, thrice: &[u64]) {
    spread(w, image, tables, true);
    let l1 = s1_l1(w, image);
    w.patch(image, l1 + 8 * index, &0x600u64.to_be_bytes());
    w.set_refcount(image, 3, 2);
    for &c in thrice {
        w.set_refcount(image, c, 3);
    }
}

/// `s1`'s L1 entry 0 names the active L1 table: the walk changes that
/// "L2 table" in QEMU's L2 cache first, then goes on through the data of
/// guest 32k and 64k. Its first look at the fifth refcount block (cluster
/// 192's, at entry 55 of the L2 table at 0x1000) has to give the place of a
/// changed one (the old snapshot table's release) to it: the L2 cache,
/// which the refcount cache waits on, is written back first, the overlap
/// check stops the active L1 table there and marks the image corrupt, and
/// the walk fails with EIO. The L2 entries changed until then are written
/// (entry 54 has COPIED, entry 55 not); no refcount is, not even the old
/// snapshot table's. (Refused before: "more refcount blocks than QEMU's
/// refcount cache holds".)
#[test]
fn a_snapshot_delete_fails_where_its_refcount_cache_writes_the_stopped_l2_cache_back() {
    let w = Work::new();
    let make = |w: &Work, image: &str| spread_over_l1(w, image, 4, 0, &[6, 8, 10]);
    let (errors, corrupt) = same_bytes(&w, "ea.qcow2", make, &["snapshot-delete:s1"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("Failed to free the cluster and L1 table"), "{e}");
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(
        qemu_u64(&w, "ea.qcow2", 0x1000 + 54 * 8),
        0x8000_0000_0001_7e00
    );
    assert_eq!(qemu_u64(&w, "ea.qcow2", 0x1000 + 55 * 8), 0x1_8000);
    // The old snapshot table (cluster 265) keeps its refcount 1.
    assert_eq!(qemu_u64(&w, "ea.qcow2", 0x20e00 + 9 * 8), 1);
}

/// `s1`'s L1 entry 31 names the active L1 table: the walk goes through all
/// the data first, its refcount cache giving the places of changed blocks
/// to others while the L2 cache holds nothing the overlap check stops (the
/// L2 cache is written back, then the block: those refcounts stay, the old
/// snapshot table's release among them), and changes the "L2 table" that
/// is the active L1 last, its entries' refcounts all in a block the cache
/// holds. The flush after the walk stops at the L2 cache; what the
/// refcount cache still holds is lost. (Refused before: "more refcount
/// blocks than QEMU's refcount cache holds".)
#[test]
fn a_snapshot_delete_stopped_at_its_flush_keeps_the_refcount_blocks_its_cache_wrote_back() {
    let w = Work::new();
    let make = |w: &Work, image: &str| spread_over_l1(w, image, 4, 31, &[4, 6, 8, 10]);
    let (errors, corrupt) = same_bytes(&w, "eb.qcow2", make, &["snapshot-delete:s1"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("Failed to free the cluster and L1 table"), "{e}");
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    // The old snapshot table's release was written with its block.
    assert_eq!(qemu_u64(&w, "eb.qcow2", 0x20e00 + 9 * 8), 0);
}

/// Five L2 tables, `s1`'s L1 entry 3 naming the active L1 table: the walk
/// goes through the data of guest 0, 32k and 64k first, where its refcount
/// cache gives the place of the changed block that counts the old snapshot
/// table to another one (written back, the L2 cache first, which holds
/// nothing the overlap check stops yet), then changes the "L2 table" that
/// is the active L1, and then, in the data of guest 128k, gives the place
/// of another changed block: that write-back of the L2 cache meets the
/// check, the image is marked corrupt and the walk fails there. The old
/// snapshot table's release stays; the rest of what the cache held is
/// lost. (Refused before: "more refcount blocks than QEMU's refcount cache
/// holds".)
#[test]
fn a_snapshot_delete_fails_at_a_later_write_back_and_keeps_the_earlier_ones() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        spread_over_l1(w, image, 5, 3, &[4, 6, 8, 12]);
        // The snapshot table at cluster 330, counted by the block at 0x29000.
        let bytes = std::fs::read(w.path(image)).expect("read the image");
        let at = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().expect("8"));
        assert_eq!(at(0x40), 0x29400, "{image}: layout moved (snapshot table)");
        assert_eq!(
            at(0x228),
            0x29000,
            "{image}: layout moved (refcount blocks)"
        );
    };
    let (errors, corrupt) = same_bytes(&w, "ec.qcow2", make, &["snapshot-delete:s1"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(e.contains("Failed to free the cluster and L1 table"), "{e}");
    assert!(e.contains("overlaps with active L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "ec.qcow2", 0x29000 + 10 * 8), 0);
}

/// [`spread`] of four L2 tables without a snapshot, then iotest 060's patch
/// (active L1 entry 0 names the L1 table as its L2 table) and L1 entries 4
/// to 8 naming data clusters 20, 80, 150, 210 and 260, one in each refcount
/// block's range: guest 2k..4.5k are those entries of the "L2 table" that
/// is the active L1.
fn own_l1_over_five_blocks(w: &Work, image: &str) {
    spread(w, image, 4, false);
    w.patch(image, 0x600, &0x8000_0000_0000_0600_u64.to_be_bytes());
    for (j, c) in [20u64, 80, 150, 210, 260].into_iter().enumerate() {
        let entry = 0x8000_0000_0000_0000 | (c * 512);
        w.patch(image, 0x620 + 8 * j as u64, &entry.to_be_bytes());
    }
}

/// A discard of guest 2k..4.5k changes those entries of the "L2 table"
/// that is the active L1 in QEMU's L2 cache, each before its cluster's
/// release. The fifth release needs a fifth refcount block: the refcount
/// cache gives the place of a changed block to it, writing the L2 cache it
/// waits on back first, which the overlap check stops; the image is marked
/// corrupt and that release fails ("qcow2_free_clusters failed"), which
/// the discard does not look at. It succeeds; the four clusters released
/// in the cache are punched as it ends (cluster 260 is not), and nothing
/// of QEMU's caches is written after that: the L1 table and every refcount
/// stay as the file had them, so cluster 260 is still in use, not leaked,
/// and the simulation says so. (Refused before: "more refcount blocks than
/// QEMU's refcount cache holds"; then it said the cluster was leaked.)
#[test]
fn a_discard_whose_refcount_cache_writes_the_stopped_l2_cache_back_keeps_its_refcounts() {
    let w = Work::new();
    let (errors, corrupt) = same_bytes(
        &w,
        "fd.qcow2",
        own_l1_over_five_blocks,
        &["discard:2048:2560"],
    );
    assert_eq!(errors, [None]);
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "fd.qcow2", 0x620), 0x8000_0000_0000_2800);
    assert_eq!(qemu_u64(&w, "fd.qcow2", 20 * 512), 0, "punched");
    assert_eq!(qemu_u64(&w, "fd.qcow2", 260 * 512), 0x2424_2424_2424_2424);
    // The refcount of cluster 20 stays 1.
    assert_eq!(qemu_u64(&w, "fd.qcow2", 0x400 + 20 * 8), 1);
    // Cluster 260 is still named by entry 8 of the L1 table taken as an
    // L2 table, with refcount 1.
    assert_eq!(qemu_u64(&w, "fd.qcow2", 0x640), 0x8000_0000_0002_0800);
    assert_eq!(qemu_u64(&w, "fd.qcow2", 0x20e00 + 4 * 8), 1);
    let out = w.qinspect(&["simulate", "fd.qcow2", "discard:2048:2560"]);
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("(EIO); the refcount is not lowered\n"),
        "{out}"
    );
    assert!(
        out.contains("the release of cluster 260 failed, and the L2 entry 0x600[8] that named it keeps it, its change lost with the slice: the cluster stays in use, with refcount 1"),
        "{out}"
    );
    assert!(!out.contains("leaked"), "{out}");
}

/// As above with `write -z -u`: the write succeeds, and the flush after
/// the request finds the image unusable and writes nothing. (Refused
/// before, as the discard was.)
#[test]
fn a_write_zeroes_unmap_whose_refcount_cache_writes_the_stopped_l2_cache_back_keeps_its_refcounts()
{
    let w = Work::new();
    let (errors, corrupt) = same_bytes(
        &w,
        "fz.qcow2",
        own_l1_over_five_blocks,
        &["write-zeroes:2048:2560:unmap"],
    );
    assert_eq!(errors, [None]);
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "fz.qcow2", 0x620), 0x8000_0000_0000_2800);
    assert_eq!(qemu_u64(&w, "fz.qcow2", 0x400 + 20 * 8), 1);
}

/// [`spread`] of four L2 tables with snapshot `s1`, then active L1 entry 0
/// names the active L1 table as its L2 table (given refcount 2) instead of
/// the L2 table at 0x800, which only `s1` keeps (refcount 1).
fn apply_over_own_l1(w: &Work, image: &str) {
    spread(w, image, 4, true);
    w.patch(image, 0x600, &0x600u64.to_be_bytes());
    w.set_refcount(image, 3, 2);
    w.set_refcount(image, 4, 1);
}

/// Applying `s1`: the walk over `s1`'s L1 (+1) and the flush after it
/// stop nothing; then `s1`'s L1 table would be written over the active
/// one, which the overlap check lets through only as the active L1 table:
/// it is also an active L2 table, so the image is marked corrupt and the
/// apply fails there. The active L1 table stays as it was, the refcounts
/// are those the walk gave. (The simulation wrote the table before.)
#[test]
fn a_snapshot_apply_is_stopped_where_its_l1_table_is_an_active_l2_table() {
    let w = Work::new();
    let (errors, corrupt) = same_bytes(&w, "ga.qcow2", apply_over_own_l1, &["snapshot-apply:s1"]);
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(
        e.contains("Failed to load snapshot: Input/output error"),
        "{e}"
    );
    assert!(e.contains("overlaps with active L2 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "ga.qcow2", 0x600), 0x600);
    // Cluster 4 keeps what the walk gave it.
    assert_eq!(qemu_u64(&w, "ga.qcow2", 0x400 + 4 * 8), 2);
}

/// [`spread`] of four L2 tables with snapshot `s1`, then active L1 entry 0
/// names `s1`'s L1 table as its L2 table (given refcount 2) instead of the
/// L2 table at 0x800, which only `s1` keeps (refcount 1).
fn apply_over_snapshot_l1(w: &Work, image: &str) {
    spread(w, image, 4, true);
    let l1 = s1_l1(w, image);
    w.patch(image, 0x600, &l1.to_be_bytes());
    w.set_refcount(image, l1 / 512, 2);
    w.set_refcount(image, 4, 1);
}

/// Applying `s1`: the walk over `s1`'s L1 (+1) stops nothing, and `s1`'s
/// L1 table is written over the active one. The walk over the old active
/// L1 (-1) takes `s1`'s L1 table as the L2 table of its entry 0: the L2
/// table at 0x800 goes to refcount 1, so COPIED is set in that "L2 table"
/// in QEMU's L2 cache, a slice the overlap check stops (an inactive L1
/// table). The walk goes on through the data of guest 32k and 64k, over
/// five refcount blocks; its first look at the fourth of them (cluster
/// 192's) gives the place of a changed one (the block counting `s1`'s L1
/// table) to it, the L2 cache is written back first, the check stops that
/// slice there, the image is marked corrupt and the walk fails with EIO.
/// The active L1 is `s1`'s; no refcount change of the second walk is
/// written.
#[test]
fn a_snapshot_apply_fails_where_its_release_walk_writes_the_stopped_l2_cache_back() {
    let w = Work::new();
    let (errors, corrupt) = same_bytes(
        &w,
        "gb.qcow2",
        apply_over_snapshot_l1,
        &["snapshot-apply:s1"],
    );
    let e = errors[0].as_deref().unwrap_or_default();
    assert!(
        e.contains("Failed to load snapshot: Input/output error"),
        "{e}"
    );
    assert!(e.contains("overlaps with inactive L1 table"), "{e}");
    assert!(corrupt);
    assert_eq!(qemu_u64(&w, "gb.qcow2", 0x600), 0x8000_0000_0000_0800);
    // Cluster 4 keeps what the first walk gave it.
    assert_eq!(qemu_u64(&w, "gb.qcow2", 0x400 + 4 * 8), 2);
}

//! Which releases QEMU passes down to the image file, compared with QEMU
//! (`sim_compare`): a cluster whose refcount a release brings to 0 reads as
//! zeros in the file afterwards when the release's kind passes (a snapshot
//! create, delete or apply, a shrink) and keeps its bytes when it does not
//! (a copy-on-write's old cluster, a grown L1 table's old copy). Each test
//! reads the freed clusters in the original, in QEMU's result and in the
//! simulation's.

mod common;
mod sim_compare;
use common::Work;

const CS: u64 = 65536;

/// Cluster `c` of a file as `img` reads it.
fn cluster(img: &qinspect::image::Qcow2, c: u64) -> Vec<u8> {
    let mut buf = vec![0u8; CS as usize];
    img.src.read_at(&mut buf, c * CS).expect("read");
    buf
}

/// What became of a cluster in QEMU's result.
#[derive(Debug, PartialEq)]
enum After {
    /// It reads as zeros: punched.
    Zeros,
    /// It reads as it did before the operations.
    Kept,
    /// Something else was written there.
    Rewritten,
}

/// Run `ops` on `image` in QEMU and in the simulation; for each cluster of
/// `clusters`: what QEMU's result reads there, after asserting that the
/// simulation's reads the same and that the original did not read as zeros
/// (so that a punch shows).
fn freed_clusters(w: &Work, image: &str, ops: &[&str], clusters: &[u64]) -> Vec<After> {
    let before = sim_compare::open_path(&w.path(image)).expect("open");
    let sim = sim_compare::compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{e}"));
    let real = sim_compare::open_path(&w.path(&format!("{image}.qemu"))).expect("open");
    let simulated = sim.image().expect("image");
    clusters
        .iter()
        .map(|&c| {
            let old = cluster(&before, c);
            assert!(old.iter().any(|&b| b != 0), "cluster {c} was zeros before");
            let qemu = cluster(&real, c);
            assert!(
                cluster(&simulated, c) == qemu,
                "cluster {c} after {ops:?}: the simulation's bytes differ from QEMU's"
            );
            if qemu.iter().all(|&b| b == 0) {
                After::Zeros
            } else if qemu == old {
                After::Kept
            } else {
                After::Rewritten
            }
        })
        .collect()
}

/// 3 the active L1, 4 the L2 table of snapshot s1 (shared until the write
/// after it), 5 its data (0xaa), 6 s1's L1, 7 the snapshot table, 8 the
/// active L1's own L2 table, 9 the data written after the snapshot (0xbb).
fn with_snapshot(w: &Work) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    w.qemu_io("a.qcow2", &["write -P 0xaa 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "a.qcow2"]);
    w.qemu_io("a.qcow2", &["write -P 0xbb 0 64k"]);
    let img = sim_compare::open_path(&w.path("a.qcow2")).expect("open");
    assert_eq!(img.header.l1_table_offset.get(), 3 * CS);
    assert_eq!(img.header.snapshots_offset.get(), 7 * CS);
    assert_eq!(img.snapshots.snapshots[0].l1_table_offset.get(), 6 * CS);
    assert_eq!(img.l1[0].l2_offset().map(|o| o.get()), Some(8 * CS));
}

#[test]
fn a_snapshot_delete_punches_what_it_frees() {
    let w = Work::new();
    with_snapshot(&w);
    // QCOW2_DISCARD_SNAPSHOT: the old snapshot table, the L2 table and the
    // data cluster the walk brings to 0, and the snapshot's L1 table.
    let zeroed = freed_clusters(&w, "a.qcow2", &["snapshot-delete:s1"], &[4, 5, 6, 7]);
    assert_eq!(
        zeroed,
        [After::Zeros, After::Zeros, After::Zeros, After::Zeros]
    );
}

#[test]
fn a_snapshot_create_punches_the_old_snapshot_table() {
    let w = Work::new();
    with_snapshot(&w);
    let zeroed = freed_clusters(&w, "a.qcow2", &["snapshot-create:s2"], &[7]);
    assert_eq!(zeroed, [After::Zeros]);
}

#[test]
fn a_snapshot_apply_punches_the_tables_and_data_only_the_active_l1_named() {
    let w = Work::new();
    with_snapshot(&w);
    let zeroed = freed_clusters(&w, "a.qcow2", &["snapshot-apply:s1"], &[8, 9]);
    assert_eq!(zeroed, [After::Zeros, After::Zeros]);
}

#[test]
fn a_copy_on_write_keeps_the_old_cluster() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "c.qcow2", "1M"]);
    w.qemu_io("c.qcow2", &["write -c -P 0x11 0 64k"]);
    // The compressed data sits in cluster 5; the write over it takes a new
    // cluster and frees it (QCOW2_DISCARD_NEVER): not punched.
    let zeroed = freed_clusters(&w, "c.qcow2", &["write:0:65536:P=34"], &[5]);
    assert_eq!(zeroed, [After::Kept]);
}

#[test]
fn a_grown_l1_table_keeps_its_old_copy() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "g.qcow2", "1M"]);
    w.qemu_io("g.qcow2", &["write -P 0x33 0 64k"]);
    let img = sim_compare::open_path(&w.path("g.qcow2")).expect("open");
    assert_eq!(img.header.l1_table_offset.get(), 3 * CS);
    // The old L1 table is freed (QCOW2_DISCARD_OTHER): not punched.
    let zeroed = freed_clusters(&w, "g.qcow2", &["resize:2147483648"], &[3]);
    assert_eq!(zeroed, [After::Kept]);
}

#[test]
fn a_shrink_punches_the_l2_tables_and_clusters_past_the_new_end() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "s.qcow2", "2G"]);
    // Data at 5, the L2 table of the second GiB at 6 and its data at 7, then
    // data at 8 that keeps the file this long after the shrink.
    w.qemu_io(
        "s.qcow2",
        &[
            "write -P 0x61 0 64k",
            "write -P 0x62 1536M 64k",
            "write -P 0x63 64k 64k",
        ],
    );
    let img = sim_compare::open_path(&w.path("s.qcow2")).expect("open");
    assert_eq!(img.l1[3].l2_offset().map(|o| o.get()), Some(6 * CS));
    // QCOW2_DISCARD_ALWAYS, both.
    let zeroed = freed_clusters(&w, "s.qcow2", &["resize:1073741824:shrink"], &[6, 7]);
    assert_eq!(zeroed, [After::Zeros, After::Zeros]);
}

#[test]
fn a_failed_walk_drops_the_discards_it_queued() {
    let w = Work::new();
    with_snapshot(&w);
    // s1's L2 table names its data cluster (refcount 1 now) twice: the walk
    // of the delete brings it to 0, then fails below 0 ("Invalid
    // argument"). The old snapshot table was freed (and punched) before the
    // walk; the data cluster, queued by the failed walk, is not.
    w.patch("a.qcow2", 4 * CS + 8, &(5 * CS).to_be_bytes());
    let zeroed = freed_clusters(&w, "a.qcow2", &["snapshot-delete:s1"], &[5, 7]);
    assert_eq!(zeroed, [After::Kept, After::Zeros]);
}

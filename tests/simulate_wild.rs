//! Starting images from the wild that the randomized test found the simulator
//! wrong on, each compared with QEMU (`sim_compare`): a version 2 image with a
//! header extension (its header has no feature fields: the bytes after 72 are
//! the extensions), a throw-away overlay over a metadata-preallocated image
//! (QEMU's block status asks the file system about its data clusters), a
//! failed check of a crashed image (its close still marks it clean), and a
//! guest discard (QEMU punches the freed cluster in the file, which shows when
//! a crash had left metadata in it too), and a snapshot of an image whose L1
//! table is its own L2 table (iotest 060: the walk goes on in QEMU's caches,
//! and the overlap check stops the table only when they are flushed).

mod common;
mod sim_compare;
use common::Work;

#[test]
fn a_version_2_image_with_a_backing_file_is_not_taken_for_dirty() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    w.qemu_io("base.qcow2", &["write -P 9 0 1M"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "v2.qcow2",
        "1M",
    ]);
    // The backing format extension's length, 5, sits where a version 3 header
    // keeps incompatible_features: read as bit 0, it would say "dirty".
    let sim = sim_compare::compare(
        w.dir.path(),
        "v2.qcow2",
        &["write:0:4096", "snapshot-create:s", "repair:all"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // No header change at all: QEMU writes no feature bits into a version 2 header.
    let header: Vec<&str> = sim
        .records
        .iter()
        .flat_map(|r| &r.steps)
        .filter(|c| matches!(c.target, qinspect::simulate::Target::Header { .. }))
        .map(|c| c.reason.as_str())
        .filter(|r| r.contains("clean") || r.contains("dirty"))
        .collect();
    assert!(header.is_empty(), "{header:?}");
}

#[test]
fn write_zeroes_on_an_overlay_asks_the_preallocated_image_under_it() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,preallocation=metadata",
        "img.qcow2",
        "4M",
    ]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "img.qcow2",
        "-F",
        "qcow2",
        "ov.qcow2",
    ]);
    let img = sim_compare::open_path(&w.path("img.qcow2")).expect("open");
    let sim = qinspect::simulate::Sim::overlay(&img, &w.path("img.qcow2"), None).expect("sim");
    // A partial cluster of the overlay: the rest reads as zeros in the image
    // below (its data clusters lie in holes of its file), so QEMU writes a
    // zero cluster and allocates nothing.
    let ops = ["write-zeroes:1310720:4096"];
    let sim = sim_compare::compare_sim(w.dir.path(), sim, "ov.qcow2", &ops, &ops)
        .unwrap_or_else(|e| panic!("{e}"));
    // Only the overlay's L2 table: no data cluster.
    assert_eq!(sim.allocated.len(), 1, "{:?}", sim.allocated);
    assert!(
        sim.allocated[0].2.contains("L2 table"),
        "{:?}",
        sim.allocated
    );
}

#[test]
fn a_failed_check_of_a_crashed_image_still_marks_it_clean() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "img.qcow2",
        "1M",
    ]);
    // The crash: a write, then abort() before the refcounts reach the file.
    w.run(
        "sh",
        &[
            "-c",
            "ulimit -c 0; qemu-io -f qcow2 -c 'write -P 6 130048 207872' -c abort img.qcow2; true",
        ],
    );
    // `-r leaks` cannot rebuild the refcounts QEMU needs and fails; closing the
    // image still clears the dirty bit. A write afterwards opens a clean image.
    let sim = sim_compare::compare(
        w.dir.path(),
        "img.qcow2",
        &["repair:leaks", "write:655360:65536"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(sim.records[0].error.is_some(), "{:?}", sim.records[0]);
}

#[test]
fn a_guest_discard_punches_the_freed_cluster_as_qemu_io_does() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "d.qcow2", "1M"]);
    w.qemu_io("d.qcow2", &["write 0 128k"]);
    let sim = sim_compare::compare(w.dir.path(), "d.qcow2", &["discard:0:65536"])
        .unwrap_or_else(|e| panic!("{e}"));
    // Guest 0 was host cluster 5: QEMU passes the discard to the file, so its
    // bytes read as zeros there now (and did not before).
    let host = |img: &qinspect::image::Qcow2| {
        let mut buf = vec![0u8; 65536];
        img.src.read_at(&mut buf, 0x50000).expect("read");
        buf
    };
    let before = sim_compare::open_path(&w.path("d.qcow2")).expect("open");
    assert!(host(&before).iter().all(|&b| b == 0xcd));
    let real = sim_compare::open_path(&w.path("d.qcow2.qemu")).expect("open");
    assert!(host(&real).iter().all(|&b| b == 0));
    let simulated = sim.image().expect("image");
    assert!(host(&simulated).iter().all(|&b| b == 0));
}

/// iotest 060's image: active L1 entry 0 names the L1 table itself as its L2
/// table. `qemu-img snapshot -c` walks it in memory (+1 on the data cluster
/// the "L2 entry" names and on the "L2 table", both cluster 3) and fails when
/// the flush after the walk writes the table over the active L1: the refcount
/// blocks are written first, so cluster 3 ends at 3, the L1 table unwritten.
#[test]
fn a_snapshot_the_overlap_check_stops_leaves_the_refcounts_qemu_flushed() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "c060.qcow2", "4M"]);
    w.qemu_io("c060.qcow2", &["write -P 0x11 0 64k"]);
    w.patch(
        "c060.qcow2",
        0x30000,
        &0x8000_0000_0003_0000_u64.to_be_bytes(),
    );
    let sim = sim_compare::compare_metadata(w.dir.path(), "c060.qcow2", &["snapshot-create:wild"])
        .unwrap_or_else(|e| panic!("{e}"));
    let r = &sim.records[0];
    assert!(
        matches!(r.cause, Some(qinspect::simulate::SimError::Qemu(_))),
        "{:?}",
        r.error
    );
    let img = sim.image().unwrap();
    assert!(img.header.corrupt());
}

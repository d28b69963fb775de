//! The simulator against QEMU: the same operation done for real on a copy
//! (`qemu-img snapshot`, `qemu-io write/discard`) must leave the same refcounts,
//! cluster for cluster, and the same L1/L2 entries as the simulation predicts.

mod common;
use common::Work;
use qinspect::check::{CheckOptions, check};
use qinspect::image::{Qcow2, RefcountReader, Strictness};
use qinspect::simulate::{Op, simulate};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, PartialEq)]
struct Meta {
    header: (u64, u64, u64, u64),
    refcounts: Vec<(u64, u64)>,
    active_l1: Vec<u64>,
    l2: BTreeMap<u64, Vec<(u64, u64)>>,
    snapshots: Vec<(String, String, u64, u32, Option<u64>)>,
}

/// Everything the simulation must predict, read through the library.
fn meta(img: &Qcow2, upto: u64) -> Meta {
    let cs = img.geometry().cluster_size();
    let mut rr = RefcountReader::new(img);
    let refcounts = (0..upto / cs + 64)
        .filter_map(|c| rr.get(c).ok().filter(|r| *r != 0).map(|r| (c, r)))
        .collect();
    let mut l2 = BTreeMap::new();
    let mut tables: Vec<Vec<u64>> = vec![img.l1.iter().map(|e| e.0).collect()];
    for s in &img.snapshots.snapshots {
        tables.push(img.snapshot_l1(s).unwrap().iter().map(|e| e.0).collect());
    }
    for t in &tables {
        for e in t {
            let off = e & qinspect::tables::L1E_OFFSET_MASK;
            if off != 0 {
                let entries = img.l2_table(qinspect::types::HostOffset(off)).unwrap();
                l2.insert(
                    off,
                    entries
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.raw != 0 || e.bitmap != 0)
                        .map(|(i, e)| (i as u64, e.raw))
                        .collect(),
                );
            }
        }
    }
    let h = &img.header;
    Meta {
        header: (
            h.l1_table_offset.get(),
            u64::from(h.l1_size),
            u64::from(h.nb_snapshots),
            h.snapshots_offset.get(),
        ),
        refcounts,
        active_l1: tables[0].clone(),
        l2,
        snapshots: img
            .snapshots
            .snapshots
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    s.name.clone(),
                    s.l1_table_offset.get(),
                    s.l1_size,
                    s.disk_size,
                )
            })
            .collect(),
    }
}

fn open(w: &Work, name: &str) -> Qcow2 {
    let src = Arc::new(qinspect::io::FileSource::open(&w.path(name)).unwrap());
    Qcow2::open(src, Strictness::Qemu).unwrap()
}

/// Run `ops` in the simulator on `image`, and `qemu` (commands on a copy) for real;
/// require the same metadata, a clean check of the simulation (unless
/// `expect_clean` is false), and an untouched original.
fn assert_sim_matches(
    w: &Work,
    image: &str,
    ops: &[&str],
    qemu: &[&[&str]],
) -> qinspect::simulate::Sim {
    let before = w.fingerprint(image);
    let copy = format!("{image}.qemu");
    w.run("cp", &["--sparse=always", image, &copy]);
    for cmd in qemu {
        let args: Vec<String> = cmd
            .iter()
            .map(|a| {
                if *a == "IMG" {
                    copy.clone()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if args[0] == "qemu-io" {
            w.qemu_io(&copy, &args[1..]);
        } else {
            w.run(args[0], &args[1..]);
        }
    }
    let img = open(w, image);
    let parsed: Vec<Op> = ops
        .iter()
        .map(|o| Op::parse(o, &|s: &str| s.parse::<u64>().map_err(|e| e.to_string())).unwrap())
        .collect();
    let sim = simulate(&img, &w.path(image), &parsed).unwrap();
    for r in &sim.records {
        assert!(r.error.is_none(), "{}: {:?}", r.description, r.error);
    }
    let simulated = sim.image().unwrap();
    let real = open(w, &copy);
    let upto = sim.file_len().max(real.file_len());
    let (a, b) = (meta(&simulated, upto), meta(&real, upto));
    assert_eq!(a.refcounts, b.refcounts, "refcounts after {ops:?}");
    assert_eq!(a.header, b.header, "header after {ops:?}");
    assert_eq!(a.active_l1, b.active_l1, "active L1 after {ops:?}");
    assert_eq!(a.l2, b.l2, "L2 tables after {ops:?}");
    assert_eq!(a.snapshots, b.snapshots, "snapshot table after {ops:?}");
    let report = check(&simulated, &CheckOptions::default());
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{:#?}",
        report.findings
    );
    assert_eq!(w.fingerprint(image), before, "the original image changed");
    sim
}

fn base(w: &Work, name: &str, opts: &str) {
    w.qemu_img(&["create", "-f", "qcow2", "-o", opts, name, "1G"]);
    w.qemu_io(name, &["write -P 0xaa 0 128k", "write -P 0xbb 1M 64k"]);
}

#[test]
fn snapshot_create_on_an_image_without_snapshots() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    let sim = assert_sim_matches(
        &w,
        "a.qcow2",
        &["snapshot-create:first"],
        &[&["qemu-img", "snapshot", "-c", "first", "IMG"]],
    );
    // The reference example: L1 in cluster 8, snapshot table in cluster 9.
    assert_eq!(
        sim.allocated
            .iter()
            .map(|a| a.0.get() / 65536)
            .collect::<Vec<_>>(),
        vec![8, 9]
    );
}

#[test]
fn snapshot_create_with_many_snapshots() {
    let w = Work::new();
    base(&w, "m.qcow2", "cluster_size=64k");
    for i in 0..6 {
        w.qemu_img(&["snapshot", "-c", &format!("s{i}"), "m.qcow2"]);
        w.qemu_io("m.qcow2", &[&format!("write -P {i} {}k 64k", i * 192)]);
    }
    assert_sim_matches(
        &w,
        "m.qcow2",
        &["snapshot-create:new"],
        &[&["qemu-img", "snapshot", "-c", "new", "IMG"]],
    );
}

#[test]
fn snapshot_delete_from_the_middle() {
    let w = Work::new();
    base(&w, "d.qcow2", "cluster_size=64k");
    for i in 0..5 {
        w.qemu_img(&["snapshot", "-c", &format!("s{i}"), "d.qcow2"]);
        w.qemu_io("d.qcow2", &[&format!("write -P {i} {}k 64k", i * 64)]);
    }
    assert_sim_matches(
        &w,
        "d.qcow2",
        &["snapshot-delete:s2"],
        &[&["qemu-img", "snapshot", "-d", "s2", "IMG"]],
    );
    // By ID with snapshot-delete-id (qemu-img -d takes the name; ID 4 is s3).
    assert_sim_matches(
        &w,
        "d.qcow2",
        &["snapshot-delete-id:4"],
        &[&["qemu-img", "snapshot", "-d", "s3", "IMG"]],
    );
}

#[test]
fn snapshot_delete_in_compat_010_and_with_4_bit_refcounts() {
    let w = Work::new();
    base(&w, "v2.qcow2", "compat=0.10");
    w.qemu_img(&["snapshot", "-c", "a", "v2.qcow2"]);
    w.qemu_io("v2.qcow2", &["write -P 1 0 4k"]);
    assert_sim_matches(
        &w,
        "v2.qcow2",
        &["snapshot-delete:a"],
        &[&["qemu-img", "snapshot", "-d", "a", "IMG"]],
    );
    base(&w, "r4.qcow2", "refcount_bits=4");
    w.qemu_img(&["snapshot", "-c", "a", "r4.qcow2"]);
    w.qemu_img(&["snapshot", "-c", "b", "r4.qcow2"]);
    w.qemu_io("r4.qcow2", &["write -P 1 64k 4k"]);
    assert_sim_matches(
        &w,
        "r4.qcow2",
        &["snapshot-delete:a"],
        &[&["qemu-img", "snapshot", "-d", "a", "IMG"]],
    );
}

#[test]
fn two_snapshots_with_one_name_delete_the_first() {
    let w = Work::new();
    base(&w, "n.qcow2", "cluster_size=64k");
    w.qemu_img(&["snapshot", "-c", "a", "n.qcow2"]);
    w.qemu_io("n.qcow2", &["write -P 5 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "a", "n.qcow2"]);
    let sim = assert_sim_matches(
        &w,
        "n.qcow2",
        &["snapshot-delete:a"],
        &[&["qemu-img", "snapshot", "-d", "a", "IMG"]],
    );
    let left = sim.image().unwrap();
    assert_eq!(left.snapshots.snapshots[0].id, "2");
}

#[test]
fn snapshot_apply() {
    let w = Work::new();
    base(&w, "p.qcow2", "cluster_size=64k");
    w.qemu_img(&["snapshot", "-c", "one", "p.qcow2"]);
    w.qemu_io("p.qcow2", &["write -P 1 0 4k", "write -P 2 2M 64k"]);
    w.qemu_img(&["snapshot", "-c", "two", "p.qcow2"]);
    w.qemu_io("p.qcow2", &["write -P 3 64k 4k"]);
    assert_sim_matches(
        &w,
        "p.qcow2",
        &["snapshot-apply:one"],
        &[&["qemu-img", "snapshot", "-a", "one", "IMG"]],
    );
}

#[test]
fn chained_snapshot_operations() {
    let w = Work::new();
    base(&w, "c.qcow2", "cluster_size=64k");
    w.qemu_img(&["snapshot", "-c", "x", "c.qcow2"]);
    assert_sim_matches(
        &w,
        "c.qcow2",
        &[
            "snapshot-create:y",
            "snapshot-delete:x",
            "snapshot-create:z",
            "snapshot-apply:y",
        ],
        &[
            &["qemu-img", "snapshot", "-c", "y", "IMG"],
            &["qemu-img", "snapshot", "-d", "x", "IMG"],
            &["qemu-img", "snapshot", "-c", "z", "IMG"],
            &["qemu-img", "snapshot", "-a", "y", "IMG"],
        ],
    );
}

#[test]
fn refusals_carry_qemus_reason() {
    let w = Work::new();
    base(&w, "r1.qcow2", "refcount_bits=1");
    let img = open(&w, "r1.qcow2");
    let sim = simulate(
        &img,
        &w.path("r1.qcow2"),
        &[Op::SnapshotCreate { name: "s".into() }],
    )
    .unwrap();
    let err = sim.records[0].error.as_deref().unwrap();
    assert!(err.contains("overflow") && err.contains("EINVAL"), "{err}");
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "data_file=df.raw",
        "df.qcow2",
        "1M",
    ]);
    let img = open(&w, "df.qcow2");
    let sim = simulate(
        &img,
        &w.path("df.qcow2"),
        &[Op::SnapshotCreate { name: "s".into() }],
    )
    .unwrap();
    assert!(sim.records[0].error.as_deref().unwrap().contains("ENOTSUP"));
}

#[test]
fn refcount_walk_with_each_addend() {
    let w = Work::new();
    base(&w, "w.qcow2", "cluster_size=64k");
    w.qemu_img(&["snapshot", "-c", "s", "w.qcow2"]);
    let img = open(&w, "w.qcow2");
    // Addend 0 changes no refcount.
    let sim = simulate(
        &img,
        &w.path("w.qcow2"),
        &[Op::RefcountUpdate {
            l1: "active".into(),
            addend: 0,
        }],
    )
    .unwrap();
    assert!(
        sim.records[0]
            .steps
            .iter()
            .all(|s| !matches!(s.target, qinspect::simulate::Target::Refcount { .. }))
    );
    // +1 on the active tree: every shared cluster goes from 2 to 3.
    let sim = simulate(
        &img,
        &w.path("w.qcow2"),
        &[Op::RefcountUpdate {
            l1: "active".into(),
            addend: 1,
        }],
    )
    .unwrap();
    let ups: u64 = sim.records[0]
        .steps
        .iter()
        .filter(|s| {
            matches!(s.target, qinspect::simulate::Target::Refcount { .. })
                && s.before == 2
                && s.after == 3
        })
        .map(|s| s.count)
        .sum();
    assert_eq!(ups, 4, "L2 table and three data clusters");
    // -1 on the snapshot: the shared clusters go back to 1 and get COPIED again
    // in the tables (the walk leaves a leak-free image only with a matching delete).
    let sim = simulate(
        &img,
        &w.path("w.qcow2"),
        &[Op::RefcountUpdate {
            l1: "s".into(),
            addend: -1,
        }],
    )
    .unwrap();
    assert!(sim.records[0].error.is_none());
}

#[test]
fn first_write_after_a_snapshot_copies_the_l2_table() {
    let w = Work::new();
    base(&w, "f.qcow2", "cluster_size=64k");
    w.qemu_img(&["snapshot", "-c", "s", "f.qcow2"]);
    let sim = assert_sim_matches(
        &w,
        "f.qcow2",
        &["write:0:4096"],
        &[&["qemu-io", "write -P 1 0 4k"]],
    );
    // The reference example: new L2 in cluster 10, data in 11.
    let clusters: Vec<u64> = sim.allocated.iter().map(|a| a.0.get() / 65536).collect();
    assert_eq!(clusters, vec![10, 11]);
}

#[test]
fn snapshot_then_write_as_a_chain_of_two_operations() {
    let w = Work::new();
    base(&w, "c2.qcow2", "cluster_size=64k");
    assert_sim_matches(
        &w,
        "c2.qcow2",
        &["snapshot-create:before", "write:65536:131072"],
        &[
            &["qemu-img", "snapshot", "-c", "before", "IMG"],
            &["qemu-io", "write -P 2 64k 128k"],
        ],
    );
}

#[test]
fn writes_into_shared_unallocated_and_new_l2_ranges() {
    let w = Work::new();
    base(&w, "s.qcow2", "cluster_size=64k");
    w.qemu_img(&["snapshot", "-c", "s", "s.qcow2"]);
    // A write into a cluster shared with the snapshot, spanning unallocated space.
    assert_sim_matches(
        &w,
        "s.qcow2",
        &["write:32768:196608"],
        &[&["qemu-io", "write -P 3 32k 192k"]],
    );
    // A write that needs a new L2 table in an image with snapshots.
    assert_sim_matches(
        &w,
        "s.qcow2",
        &["write:629145600:4096"],
        &[&["qemu-io", "write -P 4 600M 4k"]],
    );
    // A write into unallocated space of an image without snapshots.
    base(&w, "u.qcow2", "cluster_size=64k");
    assert_sim_matches(
        &w,
        "u.qcow2",
        &["write:3145728:100000"],
        &[&["qemu-io", "write -P 5 3M 100000"]],
    );
    // In place: COPIED clusters are written where they are.
    let sim = assert_sim_matches(
        &w,
        "u.qcow2",
        &["write:0:131072"],
        &[&["qemu-io", "write -P 6 0 128k"]],
    );
    assert!(sim.allocated.is_empty());
}

#[test]
fn overwriting_a_compressed_cluster() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "raw", "src.raw", "1M"]);
    w.qemu_io("src.raw", &["write -P 0x61 0 256k"]);
    w.qemu_img(&["convert", "-c", "-O", "qcow2", "src.raw", "z.qcow2"]);
    assert_sim_matches(
        &w,
        "z.qcow2",
        &["write:65536:4096"],
        &[&["qemu-io", "write -P 7 64k 4k"]],
    );
}

#[test]
fn discards_of_shared_and_unshared_clusters() {
    let w = Work::new();
    base(&w, "d.qcow2", "cluster_size=64k");
    assert_sim_matches(
        &w,
        "d.qcow2",
        &["discard:65536:65536"],
        &[&["qemu-io", "discard 64k 64k"]],
    );
    w.qemu_img(&["snapshot", "-c", "s", "d.qcow2"]);
    assert_sim_matches(
        &w,
        "d.qcow2",
        &["discard:65536:65536"],
        &[&["qemu-io", "discard 64k 64k"]],
    );
    // Unaligned pieces are ignored; an unallocated L1 range still gets an L2 table.
    assert_sim_matches(
        &w,
        "d.qcow2",
        &["discard:4096:200000"],
        &[&["qemu-io", "discard 4k 200000"]],
    );
    assert_sim_matches(
        &w,
        "d.qcow2",
        &["discard:629145600:65536"],
        &[&["qemu-io", "discard 600M 64k"]],
    );
    base(&w, "v2.qcow2", "compat=0.10");
    assert_sim_matches(
        &w,
        "v2.qcow2",
        &["discard:0:131072"],
        &[&["qemu-io", "discard 0 128k"]],
    );
}

#[test]
fn extended_l2_partial_writes() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "e.qcow2",
        "16M",
    ]);
    w.qemu_io("e.qcow2", &["write -P 1 0 64k"]);
    assert_sim_matches(
        &w,
        "e.qcow2",
        &["write:131072:4096"],
        &[&["qemu-io", "write -P 2 128k 4k"]],
    );
    w.qemu_io("e.qcow2", &["write -P 2 128k 4k"]);
    assert_sim_matches(
        &w,
        "e.qcow2",
        &["write:139264:2048"],
        &[&["qemu-io", "write -P 3 136k 2k"]],
    );
    assert_sim_matches(
        &w,
        "e.qcow2",
        &["discard:0:65536"],
        &[&["qemu-io", "discard 0 64k"]],
    );
}

#[test]
fn extended_l2_in_place_writes_in_two_clusters() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "x.qcow2",
        "16M",
    ]);
    w.qemu_io("x.qcow2", &["write -P 1 0 4k", "write -P 2 64k 4k"]);
    assert_sim_matches(
        &w,
        "x.qcow2",
        &["write:32768:4096", "write:98304:4096"],
        &[
            &["qemu-io", "write -P 3 32k 4k"],
            &["qemu-io", "write -P 4 96k 4k"],
        ],
    );
}

#[test]
fn external_data_file_writes() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "data_file=df.raw",
        "x.qcow2",
        "4M",
    ]);
    w.qemu_io("x.qcow2", &["write -P 1 0 64k"]);
    assert_sim_matches(
        &w,
        "x.qcow2",
        &["write:1048576:70000"],
        &[&["qemu-io", "write -P 2 1M 70000"]],
    );
}

#[test]
fn a_different_operation_does_not_match() {
    // The comparison itself can fail: a simulated write at 0 is not QEMU's write at 2M.
    let w = Work::new();
    base(&w, "n.qcow2", "cluster_size=64k");
    let r = std::panic::catch_unwind(|| {
        assert_sim_matches(
            &w,
            "n.qcow2",
            &["write:0:4096"],
            &[&["qemu-io", "write -P 1 2M 4k"]],
        );
    });
    assert!(r.is_err());
}

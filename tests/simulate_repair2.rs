//! `repair:all` and `repair:leaks` of corruptions QEMU's check goes on past
//! (it counts what it can and repairs the refcounts around them), each image
//! broken with a byte patch as the iotests break them, and compared with a
//! real `qemu-img check -r` on a copy (see `sim_compare`).

mod common;
mod sim_compare;
use common::Work;
use sim_compare::{compare, open_path};

/// Overwrite the 8 bytes at `at` of `image` with `value`.
fn poke(w: &Work, image: &str, at: u64, value: u64) {
    w.patch(image, at, &value.to_be_bytes());
}

fn ok(w: &Work, image: &str, ops: &[&str]) -> qinspect::simulate::Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{image}: {e}"))
}

/// As [`ok`], for an image whose guest disk QEMU cannot read after the
/// operations (an L2 table whose offset is not cluster aligned stays): every
/// operation must match, and only the final comparison of the guest bytes
/// fails, as `qemu-img convert` of QEMU's result fails.
fn ok_unreadable(w: &Work, image: &str, ops: &[&str]) {
    let e = match compare(w.dir.path(), image, ops) {
        Ok(_) => panic!("{image}: the guest disk was read"),
        Err(e) => e,
    };
    assert!(
        e.starts_with(&format!("after the {} operations: ", ops.len())) && e.contains("unaligned"),
        "{image}: {e}"
    );
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw", &format!("{image}.qemu"), "out.raw"])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{image}: qemu-img convert read it");
}

/// The reasons of the steps of the first operation's record.
fn reasons(sim: &qinspect::simulate::Sim) -> Vec<String> {
    sim.records[0]
        .steps
        .iter()
        .map(|c| c.reason.clone())
        .collect()
}

#[test]
fn unaligned_l2_table_is_read_where_it_points() {
    let w = Work::new();
    // `write 0 64k` of zeros: L1 at 0x30000, its L2 table at 0x40000, data at
    // 0x50000. The L1 entry then names 0x40200 (iotest 060's "L2 table not
    // cluster aligned"), and the entry QEMU reads first there names the data
    // cluster at 0x50000, which the table itself now also covers.
    for name in ["a.qcow2", "l.qcow2"] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
        w.qemu_io(name, &["write -P 0 0 64k"]);
        poke(&w, name, 0x30000, 0x8000_0000_0004_0200);
        poke(&w, name, 0x40200, 0x8000_0000_0005_0000);
    }
    // -r all raises cluster 5 to its two references and then clears COPIED
    // on the entry at 0x40200; the unaligned table stays (a corruption).
    let img = open_path(&w.path("a.qcow2")).unwrap();
    let mut sim = qinspect::simulate::Sim::new(&img, &w.path("a.qcow2")).unwrap();
    sim.apply(&sim_compare::parse_op("repair:all"));
    assert!(sim.records[0].error.is_none(), "{:?}", sim.records[0].error);
    let r = reasons(&sim);
    assert!(
        r.iter()
            .any(|m| m == "Repairing cluster 5 refcount=1 reference=2")
            && r.iter().any(|m| m
                == "Repairing OFLAG_COPIED data cluster: l2_entry=8000000000050000 refcount=2"),
        "{r:?}"
    );
    ok_unreadable(&w, "a.qcow2", &["repair:all", "repair:all"]);
    // -r leaks has no leak to fix and leaves the refcount too low.
    ok_unreadable(&w, "l.qcow2", &["repair:leaks", "repair:all"]);
}

#[test]
fn refcount_overflow_is_counted_up_to_the_largest_refcount() {
    let w = Work::new();
    // 1-bit refcounts, and the second L2 entry names the first one's data
    // cluster: two references to a cluster whose refcount can hold one. The
    // second data cluster is leaked.
    for name in ["a.qcow2", "l.qcow2"] {
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            name,
            "4M",
        ]);
        w.qemu_io(name, &["write 0 128k"]);
        poke(&w, name, 0x40008, 0x8000_0000_0005_0000);
    }
    let sim = ok(&w, "a.qcow2", &["repair:all", "repair:all"]);
    assert!(
        reasons(&sim).iter().any(|m| m.starts_with(
            "QEMU's repair leaves this corruption as it is: ERROR: overflow cluster offset=0x50000"
        )),
        "{:?}",
        reasons(&sim)
    );
    ok(&w, "l.qcow2", &["repair:leaks", "repair:all"]);
}

#[test]
fn references_past_the_end_of_the_file_are_not_counted() {
    let w = Work::new();
    // The first L2 entry names a cluster 16 MiB in, far past the end of the
    // file: QEMU does not count it, so its old data cluster is leaked, and
    // with -r all the entry loses COPIED (its refcount reads 0).
    for name in ["a.qcow2", "l.qcow2"] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
        w.qemu_io(name, &["write 0 128k"]);
        poke(&w, name, 0x40000, 0x8000_0000_0100_0000);
    }
    let sim = ok(&w, "a.qcow2", &["repair:all", "repair:all"]);
    assert!(
        reasons(&sim)
            .iter()
            .any(|m| m
                == "Repairing OFLAG_COPIED data cluster: l2_entry=8000000001000000 refcount=0"),
        "{:?}",
        reasons(&sim)
    );
    // -r leaks frees the leak and leaves the flag (a corruption remains).
    ok(&w, "l.qcow2", &["repair:leaks", "repair:all"]);
}

#[test]
fn refcount_block_outside_the_image_grows_the_file() {
    let w = Work::new();
    // The refcount table's first entry names a block at 16 MiB, past the end
    // of the file (iotest 060's "refcount block outside the image"): -r all
    // grows the file to hold it, finds every refcount in it 0, and rebuilds.
    for name in ["a.qcow2", "l.qcow2"] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
        w.qemu_io(name, &["write 0 192k"]);
        poke(&w, name, 0x10000, 0x100_0000);
    }
    let sim = ok(
        &w,
        "a.qcow2",
        &["repair:all", "write:3145728:4096", "repair:all"],
    );
    assert!(
        reasons(&sim)
            .iter()
            .any(|m| m.starts_with("Repairing refcount block at 0x1000000, outside the image")),
        "{:?}",
        reasons(&sim)
    );
    let real = std::fs::metadata(w.path("a.qcow2.qemu")).unwrap().len();
    assert_eq!(real, 0x100_0000 + 0x10000);
    assert_eq!(sim.file_len(), real);
    // -r leaks reads the refcounts as 0 there too, and QEMU's check fails:
    // only -r all rebuilds.
    let sim = ok(&w, "l.qcow2", &["repair:leaks", "repair:all"]);
    let e = sim.records[0].error.as_deref().unwrap_or_default();
    assert!(e.contains("Check failed: Input/output error"), "{e}");

    // 4 KiB clusters, and block 1 of the table (covering no cluster of the
    // file) at 256 MiB: -r leaks reads no refcount through it and only leaves
    // it; -r all grows the file, and the rebuild then also counts the grown
    // block's range (a new block there, kept after the old one is freed).
    for name in ["o.qcow2", "lo.qcow2"] {
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            name,
            "4M",
        ]);
        w.qemu_io(name, &["write 0 64k"]);
        poke(&w, name, 0x1008, 0x1000_0000);
    }
    let sim = ok(
        &w,
        "o.qcow2",
        &["repair:all", "write:3145728:4096", "repair:all"],
    );
    assert_eq!(sim.file_len(), 0x1000_2000);
    let sim = ok(&w, "lo.qcow2", &["repair:leaks", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert!(
        reasons(&sim).iter().any(|m| m.starts_with(
            "QEMU's repair leaves this corruption as it is (only -r all grows the file"
        )),
        "{:?}",
        reasons(&sim)
    );

    // A block whose end would be past INT64_MAX: QEMU cannot resize the file
    // ("Invalid argument") and rebuilds without it; the file keeps its size.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "e.qcow2", "4M"]);
    w.qemu_io("e.qcow2", &["write 0 192k"]);
    poke(&w, "e.qcow2", 0x10000, 0x7fff_ffff_ffff_0000);
    let sim = ok(&w, "e.qcow2", &["repair:all", "repair:all"]);
    assert!(
        reasons(&sim)
            .iter()
            .any(|m| m.starts_with("ERROR could not resize image: Invalid argument")),
        "{:?}",
        reasons(&sim)
    );

    // A block 1 TiB in: QEMU would count references for 2^24 clusters and
    // more in memory; the simulator says it does not follow that, at once.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "t.qcow2", "4M"]);
    w.qemu_io("t.qcow2", &["write 0 192k"]);
    poke(&w, "t.qcow2", 0x10000, 1 << 40);
    let img = open_path(&w.path("t.qcow2")).unwrap();
    let mut sim = qinspect::simulate::Sim::new(&img, &w.path("t.qcow2")).unwrap();
    let started = std::time::Instant::now();
    sim.apply(&sim_compare::parse_op("repair:all"));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let e = sim.records[0].error.as_deref().unwrap_or_default();
    assert!(
        e.starts_with("not simulated: ") && e.contains("does not follow a walk over more than"),
        "{e}"
    );
}

#[test]
fn broken_refcount_blocks_are_rebuilt_or_fail_as_in_qemu() {
    let w = Work::new();
    // Each: image, cluster size, refcount table entry (offset, value).
    let cases: [(&str, &str, u64, u64); 3] = [
        // Block 0 not cluster aligned: reading the refcounts through it marks
        // the image corrupt, and the rebuild's first block would land on it
        // (ERROR writing refblock: Input/output error).
        ("u.qcow2", "cluster_size=65536", 0x10000, 0x20200),
        // Block 1, unaligned, covers no cluster of the file: nothing reads
        // through it, and the rebuild succeeds.
        ("v.qcow2", "cluster_size=4096", 0x1008, 0x3200),
        // Reserved bits in entry 5 of the table.
        ("r.qcow2", "cluster_size=512", 0x228, 0x4100),
    ];
    for (name, opts, at, value) in cases {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"]);
        w.qemu_io(name, &["write 0 64k"]);
        poke(&w, name, at, value);
        let copy = format!("l{name}");
        w.run("cp", &[name, &copy]);
        let sim = ok(&w, name, &["repair:all", "repair:all"]);
        let e = sim.records[0].error.as_deref();
        if name == "u.qcow2" {
            assert!(
                e.is_some_and(|e| e.contains("ERROR writing refblock: Input/output error")),
                "{e:?}"
            );
            let h = sim.image().unwrap().header;
            assert_ne!(
                h.incompatible_features & qinspect::header::INCOMPAT_CORRUPT,
                0,
                "{name}"
            );
        } else {
            assert_eq!(e, None, "{name}");
        }
        // -r leaks cannot rebuild: the check fails.
        let sim = ok(&w, &copy, &["repair:leaks"]);
        let e = sim.records[0].error.as_deref().unwrap_or_default();
        assert!(
            e.contains("Check failed: Input/output error"),
            "{name}: {e}"
        );
    }
}

/// `image` with one snapshot `s1` of `write 0 128k`, then the active disk
/// written over: L1 at 0x30000, L2 0x40000, the snapshot's L1 at 0x70000,
/// the snapshot table at 0x80000 (one 67-byte entry).
fn with_snapshot(w: &Work, image: &str) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
    w.qemu_io(image, &["write 0 128k"]);
    w.qemu_img(&["snapshot", "-c", "s1", image]);
    w.qemu_io(image, &["write -P 7 0 64k"]);
    let img = open_path(&w.path(image)).unwrap();
    assert_eq!(img.header.snapshots_offset.get(), 0x80000);
    assert_eq!(img.snapshots.snapshots[0].l1_table_offset.get(), 0x70000);
}

#[test]
fn snapshot_table_findings_as_qemu_repairs_them() {
    let w = Work::new();
    // iotest 261's cases. A snapshot L1 table not cluster aligned: QEMU does
    // not count the snapshot's tables, so what only the snapshot holds is
    // "leaked" and freed (-r leaks too), and the entry stays.
    for name in ["a.qcow2", "la.qcow2"] {
        with_snapshot(&w, name);
        poke(&w, name, 0x80000, 0x70200);
    }
    let sim = ok(&w, "a.qcow2", &["repair:all", "repair:all"]);
    assert!(
        reasons(&sim).iter().any(|m| m.starts_with(
            "QEMU's repair leaves this corruption as it is: ERROR snapshot 1 (s1) l1_offset=0x70200"
        )),
        "{:?}",
        reasons(&sim)
    );
    ok(&w, "la.qcow2", &["repair:leaks", "repair:all"]);

    // An entry with 8 bytes of extra data (a v3 image needs 16): -r all
    // writes the table anew (in a new cluster; the old one is freed) and the
    // image is clean; -r leaks leaves it.
    for name in ["b.qcow2", "lb.qcow2"] {
        with_snapshot(&w, name);
        let f = std::fs::File::open(w.path(name)).unwrap();
        let mut e = vec![0u8; 67];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut e, 0x80000).unwrap();
        e[36..40].copy_from_slice(&8u32.to_be_bytes());
        let mut entry = e[..48].to_vec();
        entry.extend_from_slice(&e[64..67]);
        entry.resize(67, 0);
        w.patch(name, 0x80000, &entry);
    }
    let sim = ok(&w, "b.qcow2", &["repair:all", "repair:all"]);
    assert!(
        reasons(&sim)
            .iter()
            .any(|m| m == "Repairing snapshot table entry 0 is incomplete"),
        "{:?}",
        reasons(&sim)
    );
    let img = sim.image().unwrap();
    assert_ne!(img.header.snapshots_offset.get(), 0x80000);
    assert_eq!(img.snapshots.snapshots[0].extra_data_size, 24);
    ok(&w, "lb.qcow2", &["repair:leaks", "repair:all"]);

    // A snapshot table offset that is not cluster aligned, with one snapshot
    // and with more than QEMU's 65536: the check fails before it repairs
    // anything, with -r all as with -r leaks (which cannot even cut the
    // count). qemu-img check cannot check the result either, so the two are
    // compared here rather than through `compare`.
    for (name, count) in [("c.qcow2", 1u32), ("d.qcow2", 70000)] {
        with_snapshot(&w, name);
        poke(&w, name, 0x40, 0x80200);
        w.patch(name, 0x3c, &count.to_be_bytes());
        let before = std::fs::read(w.path(name)).unwrap();
        for op in ["repair:all", "repair:leaks"] {
            let copy = format!("{name}.qemu");
            std::fs::copy(w.path(name), w.path(&copy)).unwrap();
            let (qemu_ok, line) =
                sim_compare::run_qemu(w.dir.path(), &sim_compare::qemu_command(op, &copy));
            let img = open_path(&w.path(name)).unwrap();
            let mut sim = qinspect::simulate::Sim::new(&img, &w.path(name)).unwrap();
            sim.apply(&sim_compare::parse_op(op));
            let e = sim.records[0].error.as_deref().unwrap_or_default();
            let want = if count > 65536 && op == "repair:leaks" {
                "ERROR snapshot table too large"
            } else {
                "ERROR snapshot table offset invalid"
            };
            assert!(!qemu_ok && line.ends_with(want), "{name} {op}: {line}");
            assert!(e.contains(want), "{name} {op}: {e}");
            assert!(sim.records[0].steps.is_empty(), "{name} {op}");
            assert_eq!(std::fs::read(w.path(&copy)).unwrap(), before, "{name} {op}");
        }
        // Anything but a check fails at QEMU's open, for the same reason.
        let copy = format!("{name}.qemu");
        let (qemu_ok, line) = sim_compare::run_qemu(
            w.dir.path(),
            &sim_compare::qemu_command("write:0:4096", &copy),
        );
        let cause = line.rsplit(": ").next().unwrap_or_default();
        assert!(!qemu_ok && cause.starts_with("Snapshot table "), "{line}");
        let img = open_path(&w.path(name)).unwrap();
        let mut sim = qinspect::simulate::Sim::new(&img, &w.path(name)).unwrap();
        sim.apply(&sim_compare::parse_op("write:0:4096"));
        let e = sim.records[0].error.as_deref().unwrap_or_default();
        assert!(
            e.starts_with("Could not open") && e.contains(cause),
            "{name}: {e}"
        );
        assert_eq!(std::fs::read(w.path(&copy)).unwrap(), before, "{name}");
    }
}

/// `image` with the external data file `data`, `write 0 128k` (L1 at
/// 0x30000, its L2 table at 0x40000), and a snapshot QEMU would never have
/// made there (it refuses to create one): its own L1 table at 0x50000 naming
/// the active L2 table, its entry at 0x60000, both counted once, so that the
/// shared L2 table's refcount (1) is one too low.
fn with_data_file_snapshot(w: &Work, image: &str, data: &str) {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={data}"),
        image,
        "4M",
    ]);
    w.qemu_io(image, &["write 0 128k"]);
    poke(w, image, 0x50000, 0x40000);
    let mut entry = Vec::new();
    entry.extend_from_slice(&0x50000u64.to_be_bytes());
    entry.extend_from_slice(&1u32.to_be_bytes()); // l1_size
    entry.extend_from_slice(&1u16.to_be_bytes()); // id_str_size
    entry.extend_from_slice(&2u16.to_be_bytes()); // name_size
    entry.extend_from_slice(&[0; 20]); // date, vm_clock, vm_state_size
    entry.extend_from_slice(&24u32.to_be_bytes()); // extra_data_size
    entry.extend_from_slice(&0u64.to_be_bytes()); // vm_state_size_large
    entry.extend_from_slice(&0x40_0000u64.to_be_bytes()); // disk_size
    entry.extend_from_slice(&0u64.to_be_bytes()); // icount
    entry.extend_from_slice(b"1s1");
    w.patch(image, 0x60000, &entry);
    w.patch(image, 0x3c, &1u32.to_be_bytes());
    poke(w, image, 0x40, 0x60000);
    w.set_refcount(image, 5, 1);
    w.set_refcount(image, 6, 1);
}

#[test]
fn snapshots_with_an_external_data_file_are_reported_and_counted() {
    let w = Work::new();
    with_data_file_snapshot(&w, "a.qcow2", "a.raw");
    with_data_file_snapshot(&w, "l.qcow2", "l.raw");
    // QEMU's check reports the snapshots ("1 snapshots in image with data
    // file") and counts their tables as any others: -r all raises the shared
    // L2 table to 2 and clears its COPIED flag; the snapshot stays.
    let sim = ok(&w, "a.qcow2", &["repair:all", "repair:all"]);
    let r = reasons(&sim);
    assert_eq!(sim.records[0].error, None);
    assert!(
        r.iter().any(|m| m
            == "QEMU's repair leaves this corruption as it is: ERROR 1 snapshots in image with data file")
            && r.iter()
                .any(|m| m == "Repairing cluster 4 refcount=1 reference=2")
            && r.iter().any(|m| m == "Repairing OFLAG_COPIED L2 cluster: l1_index=0 refcount=2"),
        "{r:?}"
    );
    assert_eq!(sim.image().unwrap().snapshots.snapshots.len(), 1);
    // -r leaks has no leak to free and leaves the refcount too low.
    let sim = ok(&w, "l.qcow2", &["repair:leaks", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert!(
        !reasons(&sim).iter().any(|m| m.starts_with("Repairing")),
        "{:?}",
        reasons(&sim)
    );
}

#[test]
fn compressed_clusters_where_none_may_be_are_left_uncounted() {
    let w = Work::new();
    // With an external data file, the second L2 entry made a compressed
    // descriptor: QEMU reports it, does not count it, and repairs nothing
    // (data clusters of a data file have no refcounts to lower).
    for name in ["c.qcow2", "lc.qcow2"] {
        let data = format!("data_file={name}.raw");
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &data, name, "4M"]);
        w.qemu_io(name, &["write 0 128k"]);
        poke(&w, name, 0x40008, 0x4000_0000_0001_0000);
    }
    for (name, op) in [("c.qcow2", "repair:all"), ("lc.qcow2", "repair:leaks")] {
        let sim = ok(&w, name, &[op, "repair:all"]);
        assert_eq!(sim.records[0].error, None, "{name}");
        assert_eq!(
            reasons(&sim),
            [
                "QEMU's repair leaves this corruption as it is: ERROR compressed cluster 1 with data file, entry=0x4000000000010000"
            ],
            "{name}"
        );
    }
    // With extended L2 entries, a compressed descriptor whose subcluster
    // bitmap is not 0 (the second entry turned compressed, its bitmap kept):
    // not counted, so the data cluster it named (cluster 6) is a leak, freed
    // by -r all and -r leaks alike.
    for name in ["e.qcow2", "le.qcow2"] {
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            name,
            "4M",
        ]);
        w.qemu_io(name, &["write 0 128k"]);
        poke(&w, name, 0x40010, 0x4000_0000_0006_0000);
    }
    for (name, op) in [("e.qcow2", "repair:all"), ("le.qcow2", "repair:leaks")] {
        let img = open_path(&w.path(name)).unwrap();
        let mut sim = qinspect::simulate::Sim::new(&img, &w.path(name)).unwrap();
        sim.apply(&sim_compare::parse_op(op));
        assert_eq!(sim.records[0].error, None, "{name}");
        assert!(
            reasons(&sim)
                .iter()
                .any(|m| m == "Repairing cluster 6 refcount=1 reference=0 (leaked)"),
            "{name}: {:?}",
            reasons(&sim)
        );
        // Every operation matches; only the guest disk cannot be read after
        // them, through such an entry, by QEMU either.
        let e = match compare(w.dir.path(), name, &[op, "repair:all"]) {
            Ok(_) => panic!("{name}: the guest disk was read"),
            Err(e) => e,
        };
        assert!(e.starts_with("after the 2 operations: "), "{name}: {e}");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw", &format!("{name}.qemu"), "out.raw"])
            .current_dir(w.dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name}: qemu-img convert read it");
    }
}

#[test]
fn a_bitmap_table_qemu_cannot_load_fails_the_check() {
    let w = Work::new();
    // `write 0 128k`, the bitmap bm0, `write -z 0 64k` through it: its table
    // (one entry) at 0xa0000, its directory at 0xb0000. The table's entry
    // made unaligned and the bitmap marked in use (so QEMU's open does not
    // load it; only the check does, and fails with "Invalid argument"). In
    // "z" the first L2 entry is also a preallocated zero cluster whose
    // offset is not aligned, which -r all repairs before the check reaches
    // the bitmaps.
    for name in ["b.qcow2", "z.qcow2"] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
        w.qemu_io(name, &["write 0 128k"]);
        w.qemu_img(&["bitmap", "--add", name, "bm0"]);
        w.qemu_io(name, &["write -z 0 64k"]);
        poke(&w, name, 0xa0000, 0x90200);
        w.patch(name, 0xb000c, &3u32.to_be_bytes());
    }
    poke(&w, "z.qcow2", 0x40000, 0x8000_0000_0005_2001);
    for name in ["b.qcow2", "z.qcow2"] {
        for op in ["repair:all", "repair:leaks"] {
            let copy = format!("{name}.qemu");
            std::fs::copy(w.path(name), w.path(&copy)).unwrap();
            let (qemu_ok, line) =
                sim_compare::run_qemu(w.dir.path(), &sim_compare::qemu_command(op, &copy));
            assert!(
                !qemu_ok && line.ends_with("Check failed: Invalid argument"),
                "{name} {op}: {line}"
            );
            let img = open_path(&w.path(name)).unwrap();
            let mut sim = qinspect::simulate::Sim::new(&img, &w.path(name)).unwrap();
            sim.apply(&sim_compare::parse_op(op));
            let e = sim.records[0].error.as_deref().unwrap_or_default();
            assert!(
                matches!(
                    sim.records[0].cause,
                    Some(qinspect::simulate::SimError::Qemu(_))
                ) && e.starts_with("Check failed: Invalid argument"),
                "{name} {op}: {e}"
            );
            // What QEMU wrote before it failed is what the simulation wrote.
            let real = open_path(&w.path(&copy)).unwrap();
            let simulated = sim.image().unwrap();
            let upto = real.file_len();
            assert_eq!(
                sim_compare::meta(&simulated, upto).unwrap(),
                sim_compare::meta(&real, upto).unwrap(),
                "{name} {op}"
            );
            let fixed = name == "z.qcow2" && op == "repair:all";
            assert_eq!(sim.records[0].steps.is_empty(), !fixed, "{name} {op}");
            let entry = real.l2_table(qinspect::types::HostOffset(0x40000)).unwrap()[0].raw;
            assert_eq!(
                entry,
                match (name, fixed) {
                    ("b.qcow2", _) => 0x8000_0000_0005_0001,
                    (_, false) => 0x8000_0000_0005_2001,
                    _ => 0x1,
                },
                "{name} {op}"
            );
        }
    }
}

#[test]
fn more_snapshots_than_qemu_reads_are_cut_to_its_limit() {
    let w = Work::new();
    // `write 0 64k` (clusters 0-5), then a table of 65537 snapshots at
    // 0x60000, each a 64-byte entry with no L1 table and 24 bytes of extra
    // data, its clusters (6-70) counted once. -r all cuts the header's count
    // to 65536 at once; the last entry's cluster then holds no entry QEMU
    // reads, a leak it frees, and the image is clean and opens again.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "v.qcow2", "4M"]);
    w.qemu_io("v.qcow2", &["write 0 64k"]);
    let mut entry = vec![0u8; 36];
    entry.extend_from_slice(&24u32.to_be_bytes());
    entry.extend_from_slice(&0u64.to_be_bytes());
    entry.extend_from_slice(&0x40_0000u64.to_be_bytes());
    entry.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(entry.len(), 64);
    let count: u32 = 65537;
    w.patch("v.qcow2", 0x60000, &entry.repeat(count as usize));
    let end = 0x60000 + 64 * u64::from(count);
    for c in 6..end.div_ceil(0x10000) {
        w.patch("v.qcow2", 0x20000 + 2 * c, &1u16.to_be_bytes());
    }
    w.patch("v.qcow2", 0x3c, &count.to_be_bytes());
    poke(&w, "v.qcow2", 0x40, 0x60000);
    let sim = ok(&w, "v.qcow2", &["repair:all", "repair:all", "write:0:4096"]);
    assert_eq!(sim.records[0].error, None);
    let r = reasons(&sim);
    assert!(
        r.first()
            .is_some_and(|m| m == "Discarding 1 overhanging snapshots")
            && r.iter()
                .any(|m| m == "Repairing cluster 70 refcount=1 reference=0 (leaked)"),
        "{r:?}"
    );
    let img = sim.image().unwrap();
    assert_eq!(img.header.nb_snapshots, 65536);
    assert_eq!(img.snapshots.snapshots.len(), 65536);

    // One real snapshot, its table the last thing in the file, and a count
    // of 65537: entries 1.. are read past the end of the file, as zeros.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "t.qcow2", "4M"]);
    w.qemu_io("t.qcow2", &["write 0 128k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "t.qcow2"]);
    w.patch("t.qcow2", 0x3c, &count.to_be_bytes());
    // QEMU frees (and discards) the table's cluster as leaked, then fails to
    // write the table anew over it; the simulator says it does not follow.
    w.run("cp", &["t.qcow2", "t.qcow2.orig"]);
    let (qemu_ok, line) = sim_compare::run_qemu(
        w.dir.path(),
        &sim_compare::qemu_command("repair:all", "t.qcow2"),
    );
    assert!(
        !qemu_ok && line == "ERROR failed to update snapshot table: Input/output error",
        "{line}"
    );
    let img = open_path(&w.path("t.qcow2.orig")).unwrap();
    let mut sim = qinspect::simulate::Sim::new(&img, &w.path("t.qcow2.orig")).unwrap();
    sim.apply(&sim_compare::parse_op("repair:all"));
    assert!(
        matches!(
            sim.records[0].cause,
            Some(qinspect::simulate::SimError::NotModelled(_))
        ) && sim.records[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("reach past the end of the file")),
        "{:?}",
        sim.records[0].error
    );
}

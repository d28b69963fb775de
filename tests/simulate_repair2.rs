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

    // A block 2 TiB in: QEMU grows the (sparse) file to 2 TiB and counts
    // references for its 2^25 clusters in memory, at once; so does the
    // simulation, with only the clusters in use held.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "t.qcow2", "4M"]);
    w.qemu_io("t.qcow2", &["write 0 192k"]);
    poke(&w, "t.qcow2", 0x10000, 1 << 41);
    let started = std::time::Instant::now();
    let sim = ok(&w, "t.qcow2", &["repair:all", "repair:all"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    let real = std::fs::metadata(w.path("t.qcow2.qemu")).unwrap().len();
    // (the block, then the rebuilt block for its range just after it)
    assert_eq!(real, (1 << 41) + 0x20000);
    assert_eq!(sim.file_len(), real);
    assert!(
        reasons(&sim)
            .iter()
            .any(|m| m.starts_with("Repairing cluster 33554432 refcount=1 reference=0")),
        "{:?}",
        reasons(&sim)
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
            e.starts_with("can't open device ") && e.contains(cause),
            "{name}: {e}"
        );
        assert_eq!(std::fs::read(w.path(&copy)).unwrap(), before, "{name}");
    }
}

#[test]
fn references_the_grown_file_holds_are_counted_only_after_the_rebuild() {
    let w = Work::new();
    // 4M, guest 0 written (clusters 0 to 5, the file 6 clusters long), L2
    // entry 1 naming data at cluster 7 or 8, past the end, and refcount
    // table entry 1 a block at cluster 9, past the end. -r all counts the
    // references (not the one past the end), grows the file to hold the
    // block, counts it, and rebuilds from those counts: the new block and
    // table take clusters 6 and 7. Counted again, cluster 7 is then data and
    // the refcount table (too low, left: only leaks are repaired after a
    // rebuild), or cluster 8 is data with a stored refcount of 0 ("rebuilt
    // refcount structure is still broken"); either way the image is marked
    // consistent (with and without the corrupt bit before).
    for (i, (data, corrupt)) in [(7u64, false), (8, false), (7, true), (8, true)]
        .into_iter()
        .enumerate()
    {
        let name = format!("g{i}.qcow2");
        w.qemu_img(&["create", "-q", "-f", "qcow2", &name, "4M"]);
        w.qemu_io(&name, &["write -P 1 0 64k"]);
        poke(&w, &name, 0x40008, 0x8000_0000_0000_0000 | (data << 16));
        poke(&w, &name, 0x10008, 0x90000);
        if corrupt {
            poke(&w, &name, 72, 2);
        }
        let real = format!("real-{name}");
        w.run("cp", &[&name, &real]);
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-r", "all", &real])
            .current_dir(w.dir.path())
            .output()
            .expect("qemu-img check");
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        // What the check says after the rebuild, up to its last repair (the
        // check of the result that follows says some of it again).
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "Rebuilding refcount structure")
            .collect();
        let last = lines.iter().rposition(|l| l.starts_with("Repairing"));
        let after: Vec<&str> = lines[..last.map_or(0, |i| i + 1)]
            .iter()
            .copied()
            .filter(|l| l.starts_with("ERROR"))
            .collect();
        assert!(!after.is_empty(), "{name}: {text}");
        let sim = ok(&w, &name, &["repair:all", "repair:all"]);
        assert_eq!(sim.records[0].error, None);
        let notes = reasons(&sim);
        let ours: Vec<&str> = notes
            .iter()
            .map(String::as_str)
            .filter(|m| m.starts_with("ERROR cluster") || m.starts_with("ERROR rebuilt"))
            .collect();
        assert_eq!(ours, after, "{name}: {text}");
    }
}

/// `qemu-img check ARGS image` in `w` under an address-space limit of
/// 4 GB (so that a count QEMU cannot have fails rather than takes the
/// machine's memory): its exit code and stderr.
fn qemu_check_limited(w: &Work, args: &str, image: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -v 4000000 && exec qemu-img check {args} {image}"),
        ])
        .current_dir(w.dir.path())
        .output()
        .expect("qemu-img check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_refcount_block_at_the_largest_file_ext4_holds() {
    let w = Work::new();
    // A block ending one cluster short of 16 TiB: the file grows to 2^28
    // clusters less one, all counted. One cluster further it would end at
    // 16 TiB, past ext4's largest file (16 TiB less 4 KiB): "File too
    // large", and QEMU rebuilds without it.
    for (name, block) in [
        ("g.qcow2", (1u64 << 44) - 0x2_0000),
        ("f.qcow2", (1 << 44) - 0x1_0000),
    ] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
        w.qemu_io(name, &["write 0 192k"]);
        poke(&w, name, 0x10000, block);
    }
    let sim = ok(&w, "g.qcow2", &["repair:all", "repair:all"]);
    assert_eq!(sim.file_len(), (1 << 44) - 0x1_0000);
    assert!(
        reasons(&sim)
            .iter()
            .any(|m| m.starts_with("Repairing refcount block at 0xffffffe0000")),
        "{:?}",
        reasons(&sim)
    );
    let sim = ok(&w, "f.qcow2", &["repair:all", "repair:all"]);
    assert!(
        reasons(&sim)
            .iter()
            .any(|m| m.starts_with("ERROR could not resize image: File too large")),
        "{:?}",
        reasons(&sim)
    );
}

#[test]
fn a_count_qemu_cannot_hold_is_said_and_a_file_too_large_to_count_fails() {
    use qinspect::simulate::{Op, Sim, SimError};
    let w = Work::new();
    // 512-byte clusters, refcount block 0 at 4 TiB: QEMU grows the file to
    // 2^33 clusters and asks for 16 GiB at once for their refcounts, which
    // it gets or not depending on the machine: with 4 GB of address space
    // it does not ("Cannot allocate memory"), after the file grew.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "m.qcow2",
        "4M",
    ]);
    w.qemu_io("m.qcow2", &["write 0 4k"]);
    poke(&w, "m.qcow2", 0x200, 1 << 42);
    let img = open_path(&w.path("m.qcow2")).unwrap();
    let mut sim = Sim::new(&img, &w.path("m.qcow2")).unwrap();
    sim.apply(&Op::Repair { all: true });
    assert!(
        matches!(&sim.records[0].cause, Some(SimError::NotModelled(m))
            if m.contains("17179869696 bytes asked for at once")
                && m.contains("Cannot allocate memory depends on the machine")),
        "{:?}",
        sim.records[0].cause
    );
    w.run("cp", &["m.qcow2", "big.qcow2"]);
    let (code, err) = qemu_check_limited(&w, "-r all", "big.qcow2");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.ends_with("qemu-img: Check failed: Cannot allocate memory\n"),
        "{err}"
    );
    let grown = std::fs::metadata(w.path("big.qcow2")).unwrap().len();
    assert_eq!(grown, (1 << 42) + 512);

    // That grown file has more clusters than QEMU's check counts: every
    // check of it fails at once ("File too large"), and so does the
    // simulation's, before it counts anything.
    let img = open_path(&w.path("big.qcow2")).unwrap();
    for all in [false, true] {
        let mut sim = Sim::new(&img, &w.path("big.qcow2")).unwrap();
        let started = std::time::Instant::now();
        sim.apply(&Op::Repair { all });
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let (code, err) =
            qemu_check_limited(&w, if all { "-r all" } else { "-r leaks" }, "big.qcow2");
        assert_eq!(code, Some(1), "{err}");
        assert_eq!(err, "qemu-img: Check failed: File too large\n");
        assert!(
            matches!(&sim.records[0].cause, Some(SimError::Qemu(m))
                if m.starts_with("Check failed: File too large (the file has 8589934593 clusters")),
            "{:?}",
            sim.records[0].cause
        );
        assert!(
            sim.records[0].steps.is_empty(),
            "{:?}",
            sim.records[0].steps
        );
    }
    assert_eq!(std::fs::metadata(w.path("big.qcow2")).unwrap().len(), grown);
}

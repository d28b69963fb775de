//! `repair:all` and `repair:leaks` where QEMU's check reports and leaves a
//! finding beyond refcounts, stops at one, or cuts the snapshot table, each
//! image broken with a byte patch and compared with a real `qemu-img check
//! -r` on a copy (see `sim_compare`). More of them in `simulate_repair2.rs`.

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

/// The reasons of the steps of the first operation's record.
fn reasons(sim: &qinspect::simulate::Sim) -> Vec<String> {
    sim.records[0]
        .steps
        .iter()
        .map(|c| c.reason.clone())
        .collect()
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
    // The command line opens such an image as qemu-img check does.
    let out = w.qinspect(&["simulate", "v.qcow2", "repair:all"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains(
                "header nb_snapshots: 0x10001 -> 0x10000 (Discarding 1 overhanging snapshots)"
            ),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // One real snapshot, its table the last thing in the file, and a count
    // of 65537: entries 1.. are read past the end of the file, as zeros.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "t.qcow2", "4M"]);
    w.qemu_io("t.qcow2", &["write 0 128k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "t.qcow2"]);
    w.patch("t.qcow2", 0x3c, &count.to_be_bytes());
    // QEMU counts only the table's cluster inside the file, so the cluster
    // after the L1 copy is a leak; freeing it discards it (it reads as zeros
    // afterwards, the file keeps its length). The entries read as zeros are
    // incomplete: writing the table anew allocates from that freed cluster,
    // over the table as QEMU holds it, and the overlap check fails the write
    // and marks the image corrupt.
    let sim = ok(&w, "t.qcow2", &["repair:all"]);
    let e = sim.records[0].error.as_deref().unwrap_or_default();
    assert!(
        matches!(
            sim.records[0].cause,
            Some(qinspect::simulate::SimError::Qemu(_))
        ) && e.starts_with("ERROR failed to update snapshot table: Input/output error"),
        "{e}"
    );
    let real = std::fs::read(w.path("t.qcow2.qemu")).unwrap();
    let orig = std::fs::read(w.path("t.qcow2")).unwrap();
    assert_eq!(real.len(), orig.len());
    let table = 0x80000;
    assert!(orig[table..].iter().any(|&b| b != 0));
    assert!(real[table..].iter().all(|&b| b == 0));
    let img = sim.image().unwrap();
    assert_eq!(img.file_len(), orig.len() as u64);
    let mut bytes = vec![0u8; orig.len() - table];
    img.src.read_at(&mut bytes, table as u64).unwrap();
    assert_eq!(bytes, real[table..]);
    assert_eq!(img.header.nb_snapshots, 65536);
    assert_ne!(
        img.header.incompatible_features & qinspect::header::INCOMPAT_CORRUPT,
        0
    );
}

#[test]
fn a_compressed_cluster_with_copied_is_left_and_the_image_stays_corrupt() {
    let w = Work::new();
    // `write -c 0 64k`: L2 entry 0 a compressed descriptor at 0x50000, then
    // given the COPIED flag, and the image marked corrupt. QEMU's check only
    // reports the flag: the corruption stays, so the corrupt bit stays too.
    for name in ["k.qcow2", "lk.qcow2"] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
        w.qemu_io(name, &["write -c 0 64k"]);
        let img = open_path(&w.path(name)).unwrap();
        let raw = img.l2_table(qinspect::types::HostOffset(0x40000)).unwrap()[0].raw;
        assert_eq!(raw >> 62, 1, "{raw:#x}");
        poke(&w, name, 0x40000, raw | 1 << 63);
        poke(&w, name, 0x48, qinspect::header::INCOMPAT_CORRUPT);
    }
    for (name, op) in [("k.qcow2", "repair:all"), ("lk.qcow2", "repair:leaks")] {
        let sim = ok(&w, name, &[op]);
        assert_eq!(sim.records[0].error, None, "{name}");
        assert_eq!(
            reasons(&sim),
            [
                "QEMU's repair leaves this corruption as it is: ERROR: coffset=0x50000: copied flag must never be set for compressed clusters"
            ],
            "{name}"
        );
        let h = sim.image().unwrap().header;
        assert_ne!(
            h.incompatible_features & qinspect::header::INCOMPAT_CORRUPT,
            0
        );
    }
}

#[test]
fn too_much_extra_data_in_a_snapshot_entry_is_cut_by_repair_all() {
    let w = Work::new();
    // `write 0 128k` and the snapshot s1 (its table at 0x80000, the last
    // thing in the file), then its extra data size made 1100, more than the
    // 1024 bytes QEMU reads. -r all keeps the first 1024 bytes (the ID and
    // name are read after all 1100 of them: past the end of the file, empty)
    // and writes the table anew; -r leaks fails ("File too large") with
    // nothing written.
    for name in ["x.qcow2", "lx.qcow2"] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
        w.qemu_io(name, &["write 0 128k"]);
        w.qemu_img(&["snapshot", "-c", "s1", name]);
        w.patch(name, 0x80000 + 36, &1100u32.to_be_bytes());
    }
    let sim = ok(&w, "x.qcow2", &["repair:all", "repair:all", "write:0:4096"]);
    assert_eq!(sim.records[0].error, None);
    let r = reasons(&sim);
    assert!(
        r.iter()
            .any(|m| m
                == "Discarding too much extra metadata in snapshot table entry 0 (1100 > 1024)"),
        "{r:?}"
    );
    let img = sim.image().unwrap();
    assert_eq!(img.header.snapshots_offset.get(), 0x90000);
    let s = &img.snapshots.snapshots;
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].extra_data_size, s[0].id.as_str()), (1024, ""));
    // What QEMU's read of it said.
    let real = open_path(&w.path("x.qcow2.qemu")).unwrap();
    assert_eq!(real.snapshots.snapshots[0].extra_data_size, 1024);

    // (QEMU's JSON check of such an image prints nothing to compare with.)
    w.run("cp", &["lx.qcow2", "lx.qcow2.qemu"]);
    let (qemu_ok, line) = sim_compare::run_qemu(
        w.dir.path(),
        &sim_compare::qemu_command("repair:leaks", "lx.qcow2.qemu"),
    );
    assert!(
        !qemu_ok
            && line.ends_with(
                "ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry 0"
            ),
        "{line}"
    );
    assert_eq!(
        std::fs::read(w.path("lx.qcow2")).unwrap(),
        std::fs::read(w.path("lx.qcow2.qemu")).unwrap()
    );
    let img = open_path(&w.path("lx.qcow2")).unwrap();
    let mut sim = qinspect::simulate::Sim::new(&img, &w.path("lx.qcow2")).unwrap();
    sim.apply(&sim_compare::parse_op("repair:leaks"));
    let e = sim.records[0].error.as_deref().unwrap_or_default();
    assert!(e.contains(line.trim_start_matches("qemu-img: ")), "{e}");
    assert!(
        matches!(
            sim.records[0].cause,
            Some(qinspect::simulate::SimError::Qemu(_))
        ) && sim.records[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("Check failed: File too large")),
        "{:?}",
        sim.records[0].error
    );
    assert!(sim.records[0].steps.is_empty());
}

#[test]
fn a_bitmap_table_qemu_cannot_read_at_all_fails_the_check() {
    let w = Work::new();
    // As in the test above (the table at 0xa0000, the directory at 0xb0000,
    // bm0 marked in use), with the table moved: to 0x7fffffffc0000000,
    // where a read of its 8 bytes ends past the largest offset QEMU's block
    // layer reads, and fails (EIO); and to 64 KiB below it, which QEMU reads
    // as zeros past the end of the file and goes on, as the simulation does.
    for (name, at) in [
        ("u.qcow2", 0x7fff_ffff_c000_0000u64),
        ("p.qcow2", 0x7fff_ffff_bfff_0000),
    ] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "4M"]);
        w.qemu_io(name, &["write 0 128k"]);
        w.qemu_img(&["bitmap", "--add", name, "bm0"]);
        w.qemu_io(name, &["write -z 0 64k"]);
        poke(&w, name, 0xb0000, at);
        w.patch(name, 0xb000c, &3u32.to_be_bytes());
    }
    for (name, op) in [
        ("u.qcow2", "repair:all"),
        ("u.qcow2", "repair:leaks"),
        ("p.qcow2", "repair:all"),
    ] {
        let copy = format!("{name}.qemu");
        std::fs::copy(w.path(name), w.path(&copy)).unwrap();
        let (qemu_ok, line) =
            sim_compare::run_qemu(w.dir.path(), &sim_compare::qemu_command(op, &copy));
        let img = open_path(&w.path(name)).unwrap();
        let mut sim = qinspect::simulate::Sim::new(&img, &w.path(name)).unwrap();
        sim.apply(&sim_compare::parse_op(op));
        let e = sim.records[0].error.as_deref().unwrap_or_default();
        if name == "p.qcow2" {
            assert!(qemu_ok, "{name} {op}: {line}");
            assert!(sim.records[0].error.is_none(), "{name} {op}: {e}");
            let real = open_path(&w.path(&copy)).unwrap();
            let simulated = sim.image().unwrap();
            let upto = real.file_len().max(simulated.file_len());
            assert_eq!(
                sim_compare::meta(&simulated, upto).unwrap(),
                sim_compare::meta(&real, upto).unwrap(),
                "{name} {op}"
            );
            continue;
        }
        assert!(
            !qemu_ok && line.ends_with("Check failed: Input/output error"),
            "{name} {op}: {line}"
        );
        assert!(
            matches!(
                sim.records[0].cause,
                Some(qinspect::simulate::SimError::Qemu(_))
            ) && e.starts_with("Check failed: Input/output error"),
            "{name} {op}: {e}"
        );
        // Nothing is written, by either.
        assert!(sim.records[0].steps.is_empty(), "{name} {op}");
        assert_eq!(
            std::fs::read(w.path(name)).unwrap(),
            std::fs::read(w.path(&copy)).unwrap(),
            "{name} {op}"
        );
    }
}

//! `repair:all` of what `qemu-img check -r all` repairs beyond refcounts and
//! COPIED flags, each image broken as the iotests break it, and compared
//! with a real repair on a copy (see `sim_compare`).

mod common;
mod sim_compare;
use common::Work;
use sim_compare::{compare, open_path};

fn ok(w: &Work, image: &str, ops: &[&str]) -> qinspect::simulate::Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{image}: {e}"))
}

/// Move the host offset of entry `index` of the L2 table under active L1
/// entry 0 by `by` bytes (the rest of the entry as it is).
fn misalign_l2_entry(w: &Work, image: &str, index: u64, by: u64) {
    let img = open_path(&w.path(image)).unwrap();
    let l2 = img.l1[0].0 & qinspect::tables::L1E_OFFSET_MASK;
    let at = l2 + index * img.geometry().l2_entry_size();
    let mut raw = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(w.path(image)).unwrap(),
        &mut raw,
        at,
    )
    .unwrap();
    let e = u64::from_be_bytes(raw) + by;
    w.patch(image, at, &e.to_be_bytes());
}

#[test]
fn unaligned_zero_clusters_become_plain_zero_clusters() {
    let w = Work::new();
    for (name, opts, snapshot) in [
        ("z.qcow2", "cluster_size=65536", false),
        ("s.qcow2", "cluster_size=65536", true),
        ("x.qcow2", "extended_l2=on", false),
        ("r.qcow2", "refcount_bits=1", false),
    ] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"]);
        w.qemu_io(
            name,
            &["write 0 192k", "write -z 0 64k", "write -z 128k 64k"],
        );
        if snapshot {
            w.qemu_img(&["snapshot", "-c", "s", name]);
        }
        // iotest 060's "unaligned zero cluster": a preallocated zero
        // cluster whose offset is no longer cluster aligned.
        misalign_l2_entry(&w, name, 0, 0x2000);
        misalign_l2_entry(&w, name, 2, 0x200);
        let copy = format!("l{name}");
        w.run("cp", &[name, &copy]);
        let sim = ok(&w, name, &["repair:all", "write:0:4096", "repair:all"]);
        assert!(
            sim.records[0]
                .steps
                .iter()
                .any(|c| c.reason.starts_with("Repairing offset=")),
            "{name}: {:?}",
            sim.records[0].steps
        );
        // -r leaks leaves them (and so the COPIED flags and the dirty state).
        // With 1-bit refcounts the misaligned entries also overflow a
        // refcount, which only -r all is simulated for.
        if !opts.starts_with("refcount_bits=1") {
            ok(&w, &copy, &["repair:leaks", "repair:all"]);
        }
    }
}

/// As [`ok`], for an image whose guest disk neither qinspect nor QEMU can
/// read (an unaligned data cluster or a contradictory bitmap stays): every operation must match, and
/// only the final comparison of the guest bytes fails, as `qemu-img convert`
/// of QEMU's result fails.
fn ok_unreadable(w: &Work, image: &str, ops: &[&str]) {
    let e = match compare(w.dir.path(), image, ops) {
        Ok(_) => panic!("{image}: the guest disk was read"),
        Err(e) => e,
    };
    assert!(
        e.starts_with(&format!("after the {} operations: ", ops.len()))
            && (e.contains("unaligned") || e.contains("Invalid cluster entry")),
        "{image}: {e}"
    );
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw", &format!("{image}.qemu"), "out.raw"])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{image}: qemu-img convert read it");
}

/// Overwrite the 8 bytes at `at` of `image` with `value`.
fn poke(w: &Work, image: &str, at: u64, value: u64) {
    w.patch(image, at, &value.to_be_bytes());
}

#[test]
fn corruptions_qemu_leaves_as_they_are() {
    let w = Work::new();
    // Each: image, creation options, (offset, value) patched in after
    // `write 0 192k` (L1 at 0x30000, its L2 table at 0x40000, data from 0x50000).
    let cases: [(&str, &str, u64, u64); 5] = [
        // A data cluster whose offset is not aligned: its neighbour is
        // referenced twice, which -r all counts; the entry stays.
        (
            "a.qcow2",
            "cluster_size=65536",
            0x40000,
            0x8000_0000_0005_2000,
        ),
        // Allocated and zero bits both set in a subcluster bitmap.
        ("b.qcow2", "extended_l2=on", 0x40008, 0x0000_0001_ffff_ffff),
        // Reserved bits in an L2 entry, and in an L1 entry.
        (
            "d.qcow2",
            "cluster_size=65536",
            0x40000,
            0x8000_0000_0005_0002,
        ),
        (
            "e.qcow2",
            "cluster_size=65536",
            0x30000,
            0x8000_0000_0004_0002,
        ),
        // With 512-byte clusters, bit 8 of an L2 entry (reserved there).
        ("s.qcow2", "cluster_size=512", 0, 0),
    ];
    for (name, opts, at, value) in cases {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"]);
        w.qemu_io(name, &["write 0 192k"]);
        if at == 0 {
            misalign_l2_entry(&w, name, 3, 0x100);
        } else {
            poke(&w, name, at, value);
        }
        // A leak besides (past the data with 64k clusters), which both
        // repairs fix.
        if at != 0 {
            w.set_refcount(name, 60, 1);
        }
        let copy = format!("l{name}");
        w.run("cp", &[name, &copy]);
        let ops = ["repair:all", "write:3145728:4096", "repair:all"];
        let leaks = ["repair:leaks", "repair:all"];
        // An unaligned data cluster or a contradictory subcluster bitmap:
        // the guest disk cannot be read.
        if matches!(name, "a.qcow2" | "b.qcow2") {
            ok_unreadable(&w, name, &ops);
            ok_unreadable(&w, &copy, &leaks);
            continue;
        }
        let sim = ok(&w, name, &ops);
        assert!(
            sim.records[0]
                .steps
                .iter()
                .any(|c| c.reason.starts_with("QEMU's repair leaves this corruption")),
            "{name}: {:?}",
            sim.records[0].steps
        );
        ok(&w, &copy, &leaks);
    }
}

/// Rewrite the first bitmap directory entry of `image`: `flags` or'd in, and
/// `extra` bytes of extra data before its name.
fn alter_bitmap(w: &Work, image: &str, flags: u32, extra: &[u8]) {
    let img = open_path(&w.path(image)).unwrap();
    let (ext_at, dir) = img
        .extensions
        .iter()
        .find_map(|e| match e.kind {
            qinspect::header::ExtensionKind::Bitmaps {
                directory_offset, ..
            } => Some((e.offset.get(), directory_offset.get())),
            _ => None,
        })
        .unwrap();
    let f = std::fs::File::open(w.path(image)).unwrap();
    let mut d = vec![0u8; 24];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut d, dir).unwrap();
    let name_len = u16::from_be_bytes([d[18], d[19]]) as usize;
    let mut name = vec![0u8; name_len];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut name, dir + 24).unwrap();
    let old = u32::from_be_bytes([d[12], d[13], d[14], d[15]]);
    d[12..16].copy_from_slice(&(old | flags).to_be_bytes());
    d[20..24].copy_from_slice(&(extra.len() as u32).to_be_bytes());
    d.extend_from_slice(extra);
    d.extend_from_slice(&name);
    while !d.len().is_multiple_of(8) {
        d.push(0);
    }
    w.patch(image, dir, &d);
    // The extension's directory_size (after its 8-byte header, 4+4 bytes in).
    w.patch(image, ext_at + 16, &(d.len() as u64).to_be_bytes());
}

#[test]
fn bitmaps_qemu_will_not_open() {
    let w = Work::new();
    for (name, flags, extra) in [
        ("x.qcow2", 0u32, &[0x11u8; 8][..]),
        ("c.qcow2", 4, &[0x22; 16][..]),
        ("u.qcow2", 8, &[][..]),
    ] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", name, "64M"]);
        w.qemu_io(name, &["write 0 64k"]);
        w.qemu_img(&["bitmap", "--add", name, "b0"]);
        alter_bitmap(&w, name, flags, extra);
        // Every operation fails at the open, as QEMU's does, and nothing
        // changes; only the final comparison of the guest bytes cannot run,
        // since qemu-img cannot open the result either.
        let before = std::fs::read(w.path(name)).unwrap();
        let ops = ["write:4194304:65536", "repair:all", "read:0:4096"];
        let e = match compare(w.dir.path(), name, &ops) {
            Ok(_) => panic!("{name}: qemu-img opened it"),
            Err(e) => e,
        };
        let why = if extra.is_empty() {
            "Bitmap 'b0' doesn't satisfy the constraints"
        } else {
            "Bitmap extra data is not supported"
        };
        assert!(
            e.starts_with("after the 3 operations: ") && e.ends_with(why),
            "{name}: {e}"
        );
        assert_eq!(
            std::fs::read(w.path(&format!("{name}.qemu"))).unwrap(),
            before
        );
        let img = open_path(&w.path(name)).unwrap();
        let mut sim = qinspect::simulate::Sim::new(&img, &w.path(name)).unwrap();
        for op in ops {
            sim.apply(&sim_compare::parse_op(op));
        }
        assert!(
            sim.records
                .iter()
                .all(|r| r.error.as_deref().is_some_and(|m| m.contains(why))),
            "{name}"
        );
    }
    // With the autoclear bit for bitmaps clear QEMU ignores the extension and
    // opens the image (qemu-img info succeeds), so the simulator must not
    // claim it refuses to: the write goes through and the extension is
    // dropped, as QEMU drops it.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]);
    w.qemu_io("a.qcow2", &["write 0 64k"]);
    w.qemu_img(&["bitmap", "--add", "a.qcow2", "b0"]);
    alter_bitmap(&w, "a.qcow2", 0, &[0x11; 8]);
    w.patch("a.qcow2", 88, &0u64.to_be_bytes());
    w.qemu_img(&["info", "a.qcow2"]);
    let sim = compare(w.dir.path(), "a.qcow2", &["write:4194304:65536"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(sim.records[0].error.is_none());
}

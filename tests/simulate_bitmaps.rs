//! Persistent bitmaps the simulator once did not follow, against real
//! qemu-img/qemu-io on a copy, operation by operation (see `sim_compare`):
//! bitmaps marked in use beside bitmaps that are not; a name with a byte
//! that is not UTF-8 and a NUL inside.

mod common;
mod sim_compare;
use common::Work;
use sim_compare::{compare, open_path};

fn ok(w: &Work, image: &str, ops: &[&str]) -> qinspect::simulate::Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{e}"))
}

/// Set flag bits of the directory entry of bitmap `index` (entries of names of
/// two characters, 32 bytes each).
fn set_flags(w: &Work, image: &str, index: u64, flags: u8) {
    let img = open_path(&w.path(image)).unwrap();
    let list = img.bitmaps.as_ref().unwrap().as_ref().unwrap();
    let e = &list[index as usize];
    w.patch(image, e.entry_offset.get() + 15, &[flags]);
}

/// Three bitmaps with data, the middle one marked in use (inconsistent): QEMU
/// marks the other two in use on the open and stores them again on the close,
/// in new clusters; the one in use keeps its table and its directory entry, and
/// a resize fails on it.
#[test]
fn a_bitmap_in_use_beside_bitmaps_that_are_not() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "m.qcow2", "64M"]);
    w.qemu_io("m.qcow2", &["write 0 64k"]);
    for b in ["b0", "b1", "b2"] {
        w.qemu_img(&["bitmap", "--add", "m.qcow2", b]);
    }
    // Every bitmap gets a data cluster.
    w.qemu_io("m.qcow2", &["write 8M 64k"]);
    // b1: in use | auto.
    set_flags(&w, "m.qcow2", 1, 3);
    let before = open_path(&w.path("m.qcow2")).unwrap();
    let b1_table = before.bitmaps.as_ref().unwrap().as_ref().unwrap()[1].table_offset;
    let sim = ok(
        &w,
        "m.qcow2",
        &[
            "write:4194304:65536",
            "discard:0:65536",
            "resize:134217728",
            "write:1048576:4096",
            "snapshot-create:s",
            "repair:leaks",
        ],
    );
    assert!(sim.records[0].error.is_none());
    let e = sim.records[2].error.as_deref().unwrap_or_default();
    assert!(
        e.contains("Bitmap 'b1' is inconsistent and cannot be used"),
        "{e}"
    );
    // What QEMU left: b1 where it was, still in use; b0 and b2 moved.
    let after = open_path(&w.path("m.qcow2.qemu")).unwrap();
    let list = after.bitmaps.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(list[1].table_offset, b1_table);
    assert_eq!(list[1].flags, 3);
    assert_eq!((list[0].flags, list[2].flags), (2, 2));
}

/// Every bitmap in use: nothing of them changes, and a resize fails.
#[test]
fn every_bitmap_in_use() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "f.qcow2", "64M"]);
    for b in ["b0", "b1"] {
        w.qemu_img(&["bitmap", "--add", "f.qcow2", b]);
    }
    w.qemu_io("f.qcow2", &["write 8M 64k"]);
    set_flags(&w, "f.qcow2", 0, 3);
    set_flags(&w, "f.qcow2", 1, 1);
    let sim = ok(
        &w,
        "f.qcow2",
        &["write:4194304:65536", "resize:134217728", "write:0:4096"],
    );
    let e = sim.records[1].error.as_deref().unwrap_or_default();
    assert!(
        e.contains("Bitmap 'b0' is inconsistent and cannot be used"),
        "{e}"
    );
}

/// Cluster 0 of the simulated image and of QEMU's, byte for byte.
fn assert_same_cluster0(w: &Work, sim: &qinspect::simulate::Sim, image: &str, cs: usize) {
    let simulated = sim.image().unwrap();
    let mut ours = vec![0u8; cs];
    simulated.src.read_at(&mut ours, 0).unwrap();
    let theirs = std::fs::read(w.path(&format!("{image}.qemu"))).unwrap();
    assert!(ours == theirs[..cs], "{image}: cluster 0 differs");
    let img = open_path(&w.path(&format!("{image}.qemu"))).unwrap();
    assert!(img.bitmaps.is_none(), "{image}: QEMU kept the extension");
}

/// A bitmaps extension with autoclear bit 0 clear (a program without bitmap
/// support wrote the image): QEMU's read-write open writes the header again
/// without the extension, and the directory, tables and data become leaks,
/// which `qemu-img check -r leaks` then frees. With 64 KiB clusters (QEMU
/// writes its feature name table) and with 4 KiB clusters and a backing file
/// (no feature table; the backing format and name follow the header).
#[test]
fn the_extension_is_dropped_when_autoclear_is_clear() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    for (image, opts) in [
        ("a.qcow2", vec!["-o", "cluster_size=65536"]),
        (
            "b.qcow2",
            vec!["-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2"],
        ),
    ] {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend(opts);
        args.extend([image, "64M"]);
        w.qemu_img(&args);
        w.qemu_img(&["bitmap", "--add", image, "b0"]);
        w.qemu_img(&["bitmap", "--add", image, "b1"]);
        w.qemu_io(image, &["write 8M 64k"]);
        // autoclear_features (bytes 88..96): bit 0 clear, and an unknown bit
        // QEMU clears on the same rewrite.
        w.patch(image, 88, &0x100u64.to_be_bytes());
        let sim = ok(
            &w,
            image,
            &["write:4194304:65536", "write:0:4096", "repair:leaks"],
        );
        assert!(sim.records.iter().all(|r| r.error.is_none()), "{image}");
        assert_same_cluster0(
            &w,
            &sim,
            image,
            if image == "a.qcow2" { 65536 } else { 4096 },
        );
    }
}

/// `qemu-img amend -o compat=0.10` of an image with a bitmap leaves a v2 image
/// with the bitmaps extension (v2 has no autoclear bits): every read-write
/// open warns that the bitmaps must be considered inconsistent and writes the
/// header again without the extension. The warning comes before the error of
/// a failing operation (a snapshot delete by ID), whose cause must still be
/// the one compared.
#[test]
fn a_v2_image_amended_with_a_bitmap_drops_it_on_the_first_open() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "v.qcow2", "1G"]);
    w.qemu_img(&["bitmap", "--add", "-g", "512k", "v.qcow2", "b0"]);
    w.qemu_io("v.qcow2", &["write -P 5 35700224 231936"]);
    w.qemu_img(&["amend", "-f", "qcow2", "-o", "compat=0.10", "v.qcow2"]);
    let before = open_path(&w.path("v.qcow2")).unwrap();
    assert_eq!(before.header.version, 2);
    assert!(before.bitmaps.is_some(), "amend dropped the extension");
    let sim = ok(
        &w,
        "v.qcow2",
        &["snapshot-delete:1", "write:0:4096", "repair:leaks"],
    );
    let e = sim.records[0].error.as_deref().unwrap_or_default();
    assert!(e.contains("snapshot not found"), "{e}");
    // The note gives this image's reason: version 2, not a clear autoclear bit.
    let notes: Vec<&str> = sim.records[0]
        .steps
        .iter()
        .filter(|c| matches!(c.target, qinspect::simulate::Target::Note))
        .map(|c| c.reason.as_str())
        .collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("version 2, which has no autoclear bits")),
        "{notes:?}"
    );
    assert!(sim.records[1..].iter().all(|r| r.error.is_none()));
    let after = open_path(&w.path("v.qcow2.qemu")).unwrap();
    assert!(after.bitmaps.is_none(), "QEMU kept the extension");
}

/// A bitmap name whose second byte is 0xff (not UTF-8) and third a NUL:
/// QEMU keeps it to the NUL, two bytes. Where the directory of names so cut
/// keeps its size, the open marks the bitmap in use in place and the close
/// stores it with that two-byte name, every byte of the file as QEMU's;
/// where it shrinks (40 bytes to 32), the open fails, and the next one
/// ignores the bitmaps.
#[test]
fn a_name_not_utf8_with_a_nul_inside_is_kept_to_its_raw_bytes() {
    let w = Work::new();
    for (image, name, fails) in [
        ("n4.qcow2", "bxab", false),
        ("n11.qcow2", "bxabcdefghi", true),
    ] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        w.qemu_img(&["bitmap", "--add", image, name]);
        let bytes = std::fs::read(w.path(image)).unwrap();
        let at = bytes
            .windows(name.len())
            .position(|s| s == name.as_bytes())
            .unwrap();
        w.patch(image, at as u64 + 1, &[0xff, 0]);
        let ops = ["write:0:512", "write:65536:512"];
        let sim = compare(w.dir.path(), image, &ops).unwrap_or_else(|e| panic!("{image}: {e}"));
        let first = sim.records[0].error.as_deref().unwrap_or_default();
        assert_eq!(
            first.contains("Can't update bitmap directory: Invalid argument"),
            fails,
            "{image}: {first}"
        );
        assert_eq!(sim.records[1].error, None, "{image}");
        // The directory the close wrote (the metadata compared above has
        // the names only as text), every byte.
        let theirs = std::fs::read(w.path(&format!("{image}.qemu"))).unwrap();
        let img = open_path(&w.path(&format!("{image}.qemu"))).unwrap();
        match img.bitmaps {
            Some(Ok(dir)) => {
                assert!(!fails, "{image}: QEMU dropped the bitmaps");
                let e = &dir[0];
                assert_eq!(e.name_size, 2, "{image}");
                let at = e.entry_offset.get() as usize;
                assert_eq!(&theirs[at + 24..at + 26], b"b\xff", "{image}");
                let mut ours = [0u8; 32];
                sim.source().read_at(&mut ours, at as u64).unwrap();
                assert!(ours == theirs[at..at + 32], "{image}: the new directory");
            }
            _ => assert!(fails, "{image}: QEMU kept the bitmaps"),
        }
    }
}

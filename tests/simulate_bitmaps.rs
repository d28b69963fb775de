//! Persistent bitmaps the simulator once did not follow, against real
//! qemu-img/qemu-io on a copy, operation by operation (see `sim_compare`):
//! bitmaps marked in use beside bitmaps that are not.

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

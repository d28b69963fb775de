//! Autoclear feature bits QEMU 10.0.2 does not know, and the bitmap
//! directory its open marks in place, against real qemu-io on a copy: the
//! metadata after each operation (`sim_compare`) and every byte of the file
//! (`sim_bytes`).

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::same_file;
use sim_compare::{compare_metadata, open_path};

/// An unknown autoclear bit (bit 5), as a newer program may set one.
const UNKNOWN: u64 = 1 << 5;

/// Set the autoclear field (header bytes 88..96) of `image` to `bits`.
fn set_autoclear(w: &Work, image: &str, bits: u64) {
    w.patch(image, 88, &bits.to_be_bytes());
}

/// One write on a copy of `image`, compared with QEMU's: the metadata, every
/// byte of the file, and the autoclear bits QEMU left (`want`).
fn one_write(w: &Work, image: &str, want: u64) {
    let sim = compare_metadata(w.dir.path(), image, &["write:1048576:65536"])
        .unwrap_or_else(|e| panic!("{image}: {e}"));
    assert!(sim.records.iter().all(|r| r.error.is_none()), "{image}");
    same_file(w, image, &sim);
    let after = open_path(&w.path(&format!("{image}.qemu"))).unwrap();
    assert_eq!(after.header.autoclear_features, want, "{image}");
}

/// A plain image: the read-write open clears the unknown bit by writing the
/// header cluster again (`qcow2_update_header`), which adds QEMU's feature
/// name table after the header.
#[test]
fn an_unknown_autoclear_bit_is_cleared() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "64M"]);
    w.qemu_io("a.qcow2", &["write 0 64k"]);
    set_autoclear(&w, "a.qcow2", UNKNOWN);
    one_write(&w, "a.qcow2", 0);
}

/// With a bitmap (autoclear bit 0 set): the bitmaps' header updates clear
/// the unknown bit; bit 0 stays.
#[test]
fn an_unknown_autoclear_bit_beside_bitmaps() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "64M"]);
    w.qemu_io("b.qcow2", &["write 0 64k"]);
    w.qemu_img(&["bitmap", "--add", "b.qcow2", "b0"]);
    set_autoclear(&w, "b.qcow2", UNKNOWN | 1);
    one_write(&w, "b.qcow2", 1);
}

/// With a raw external data file (autoclear bit 1, known to QEMU): only the
/// unknown bit goes.
#[test]
fn an_unknown_autoclear_bit_beside_data_file_raw() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=r.raw,data_file_raw=on",
        "r.qcow2",
        "64M",
    ]);
    w.qemu_io("r.qcow2", &["write 0 64k"]);
    set_autoclear(&w, "r.qcow2", UNKNOWN | 2);
    one_write(&w, "r.qcow2", 2);
}

/// A bitmap with data: QEMU's open marks it in use in its directory, in
/// place, and the close stores a new directory and frees the old one, whose
/// cluster keeps the marked bytes.
#[test]
fn the_freed_bitmap_directory_keeps_the_marking() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "d.qcow2", "64M"]);
    w.qemu_io("d.qcow2", &["write 0 64k"]);
    w.qemu_img(&["bitmap", "--add", "d.qcow2", "b0"]);
    one_write(&w, "d.qcow2", 1);
}

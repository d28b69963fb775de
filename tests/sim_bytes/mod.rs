//! The file a simulation predicts against the one QEMU left, every byte (on
//! top of `sim_compare`'s comparison of the metadata).
#![allow(dead_code)]

use crate::common::Work;
use crate::sim_compare::{compare_metadata, open_path};
use qinspect::simulate::Sim;

/// Whether the image QEMU left has the corrupt bit (incompatible feature 1).
pub fn corrupt(w: &Work, name: &str) -> bool {
    let img = open_path(&w.path(&format!("{name}.qemu"))).expect("open QEMU's copy");
    img.header.incompatible_features & 2 != 0
}

/// The file the simulation predicts, every byte, against the one QEMU
/// left (`NAME.qemu`): the data it wrote stays, whatever its caches lost.
pub fn same_file(w: &Work, name: &str, sim: &Sim) {
    let real = std::fs::read(w.path(&format!("{name}.qemu"))).expect("read QEMU's copy");
    let src = sim.source();
    assert_eq!(src.len(), real.len() as u64, "{name}: file length");
    let mut ours = vec![0u8; real.len()];
    let mut done = 0;
    while done < ours.len() {
        let n = src.read_at(&mut ours[done..], done as u64).expect("read");
        assert!(n > 0, "{name}: short read at {done:#x}");
        done += n;
    }
    let first = ours.iter().zip(&real).position(|(a, b)| a != b);
    assert_eq!(first, None, "{name}: first differing byte");
}

/// `ops` on a fresh copy of the image `make` builds, compared with QEMU
/// (metadata after each, then every byte of the file): each operation's
/// error, and whether QEMU marked the image corrupt.
pub fn same_bytes(
    w: &Work,
    name: &str,
    make: impl Fn(&Work, &str),
    ops: &[&str],
) -> (Vec<Option<String>>, bool) {
    make(w, name);
    let sim = compare_metadata(w.dir.path(), name, ops).unwrap_or_else(|e| panic!("{ops:?}: {e}"));
    same_file(w, name, &sim);
    let errors = sim.records.iter().map(|r| r.error.clone()).collect();
    (errors, corrupt(w, name))
}

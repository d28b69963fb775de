//! `repair:all` and `repair:leaks` on images whose check has findings beyond
//! qemu-img's (cross-links, refcounts past the end of the file): QEMU's
//! repair does not see them, so they must not keep the repair from being
//! predicted. Each compared with a real `qemu-img check -r` on a copy (see
//! `sim_compare`).

mod common;
mod sim_compare;
use common::Work;
use qinspect::check::{CheckOptions, FindingDetail, FindingKind, check};
use qinspect::simulate::{Sim, Target};
use sim_compare::{compare, open_path};

/// Overwrite the 8 bytes at `at` of `image` with `value`.
fn poke(w: &Work, image: &str, at: u64, value: u64) {
    w.patch(image, at, &value.to_be_bytes());
}

fn ok(w: &Work, image: &str, ops: &[&str]) -> Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{image}: {e}"))
}

/// A 4M image with two clusters written (L1 at 0x30000, its L2 table at
/// 0x40000, data at 0x50000 and 0x60000; the file ends at 0x70000).
fn written(w: &Work, image: &str) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
    w.qemu_io(image, &["write -P 1 0 64k", "write -P 2 1M 64k"]);
}

/// The details of the findings of `image`'s check that count in no
/// qemu-img total.
fn notes(w: &Work, image: &str) -> Vec<FindingDetail> {
    let img = open_path(&w.path(image)).expect("the image opens");
    check(&img, &CheckOptions::default())
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Note)
        .map(|f| f.detail)
        .collect()
}

/// The refcount changes of record `i`: (cluster, before, after).
fn refcounts(sim: &Sim, i: usize) -> Vec<(u64, u64, u64)> {
    sim.records[i]
        .steps
        .iter()
        .filter_map(|c| match c.target {
            Target::Refcount { cluster } => Some((cluster, c.before, c.after)),
            _ => None,
        })
        .collect()
}

#[test]
fn two_guest_offsets_sharing_a_cluster_are_repaired_as_qemu_repairs_them() {
    let w = Work::new();
    for name in ["a.qcow2", "l.qcow2"] {
        written(&w, name);
        // Guest 1M maps to the cluster of guest 0: cluster 5 has two
        // references and refcount 1, cluster 6 none.
        poke(&w, name, 0x40000 + 16 * 8, 0x8000_0000_0005_0000);
    }
    assert_eq!(notes(&w, "a.qcow2"), [FindingDetail::CrossLink]);
    // -r all raises cluster 5 to 2, frees cluster 6 and clears both COPIED
    // flags; the second check finds nothing.
    let sim = ok(&w, "a.qcow2", &["repair:all", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert_eq!(refcounts(&sim, 0), [(5, 1, 2), (6, 1, 0)]);
    let l2_writes = sim.records[0]
        .steps
        .iter()
        .filter(|c| matches!(c.target, Target::L2Entry { .. }))
        .count();
    assert_eq!(l2_writes, 2, "{:?}", sim.records[0].steps);
    assert!(refcounts(&sim, 1).is_empty(), "{:?}", sim.records[1].steps);
    // -r leaks frees cluster 6 only: cluster 5 stays too low, and with an
    // error left the COPIED flags stay.
    let sim = ok(&w, "l.qcow2", &["repair:leaks", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert_eq!(refcounts(&sim, 0), [(6, 1, 0)]);
    assert_eq!(refcounts(&sim, 1), [(5, 1, 2)]);
}

#[test]
fn refcounts_past_the_end_of_the_file_are_left_by_the_repair() {
    let w = Work::new();
    for name in ["a.qcow2", "l.qcow2"] {
        written(&w, name);
        // Cluster 20 lies past the end of the file (0x70000, 7 clusters);
        // cluster 6 is leaked once.
        w.set_refcount(name, 20, 1);
        w.set_refcount(name, 6, 2);
    }
    assert_eq!(notes(&w, "a.qcow2"), [FindingDetail::RefcountPastEof]);
    for (name, op) in [("a.qcow2", "repair:all"), ("l.qcow2", "repair:leaks")] {
        let sim = ok(&w, name, &[op, op]);
        assert_eq!(sim.records[0].error, None, "{op}");
        // QEMU compares the refcounts of the clusters in the file only.
        assert_eq!(refcounts(&sim, 0), [(6, 2, 1)], "{op}");
        assert!(refcounts(&sim, 1).is_empty(), "{op}");
    }
}

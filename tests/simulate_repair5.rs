//! `repair:all` and `repair:leaks` on images whose check has findings beyond
//! qemu-img's (cross-links, refcounts past the end of the file): QEMU's
//! repair does not see them, so they must not keep the repair from being
//! predicted. Each compared with a real `qemu-img check -r` on a copy (see
//! `sim_compare`); and a read of an L2 table that fails, which no image's
//! bytes make QEMU's read fail for.

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

/// A file whose reads of one range fail as a failing disk's do (EIO).
#[derive(Debug)]
struct Failing {
    inner: qinspect::io::MemSource,
    bad: std::ops::Range<u64>,
}

impl qinspect::io::Source for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && end > self.bad.start {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        self.inner.read_at(buf, offset)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn name(&self) -> &std::path::Path {
        self.inner.name()
    }
}

/// No image's bytes make a read fail, so there is no `qemu-img check -r` to
/// compare with: the second L2 table's reads fail in a wrapper of the file.
/// QEMU's check walks the first L2 table (with `-r all` turning its
/// unaligned zero cluster into a plain one) and then fails at the second.
#[test]
fn a_failing_l2_read_after_an_unaligned_zero_cluster_is_refused_with_what_qemu_does() {
    use qinspect::image::{Qcow2, Strictness};
    use qinspect::simulate::{Op, SimError};
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "two.qcow2", "1G"]);
    // L1 at 0x30000 names L2 tables at 0x40000 (guest 0) and 0x60000
    // (guest 512M).
    w.qemu_io("two.qcow2", &["write -P 1 0 64k", "write -P 2 512M 64k"]);
    // L2[1] of the first table: a zero cluster preallocated at 0x80200.
    poke(&w, "two.qcow2", 0x40008, 0x8_0201);
    let bytes = std::fs::read(w.path("two.qcow2")).expect("read the image");
    let open = |bad: std::ops::Range<u64>| {
        let inner = qinspect::io::MemSource::new(w.path("two.qcow2"), bytes.clone());
        let src = std::sync::Arc::new(Failing { inner, bad });
        Qcow2::open(src, Strictness::Lenient).expect("the image opens")
    };
    let repair = |img: &Qcow2, all: bool| {
        let mut sim = Sim::new(img, &w.path("two.qcow2")).expect("the simulation starts");
        sim.apply(&Op::Repair { all });
        sim
    };
    // Readable, as QEMU reads it: -r all fixes the zero cluster.
    let sim = ok(&w, "two.qcow2", &["repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert!(
        sim.records[0]
            .steps
            .iter()
            .any(|c| matches!(c.target, Target::L2Entry { .. }) && c.after == 1),
        "{:?}",
        sim.records[0].steps
    );
    let img = open(0x6_0000..0x7_0000);
    let sim = repair(&img, true);
    let rec = &sim.records[0];
    assert!(
        matches!(&rec.cause, Some(SimError::NotModelled(m))
            if m.contains("at 0x60000") && m.contains("unaligned zero clusters")),
        "{:?}",
        rec.cause
    );
    // -r leaks fixes nothing on the way: the check fails, nothing written.
    let sim = repair(&img, false);
    let rec = &sim.records[0];
    assert!(
        matches!(&rec.cause, Some(SimError::Qemu(m)) if m.contains("at 0x60000")),
        "{:?}",
        rec.cause
    );
    assert!(rec.steps.is_empty(), "{:?}", rec.steps);
}

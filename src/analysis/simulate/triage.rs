//! Which of the check's findings the repair follows (`repair.rs`): the
//! ones it repairs, the ones QEMU leaves as they are, the ones beyond
//! qemu-img, and the ones QEMU would do more about, refused with what QEMU
//! would do. Each is told by its [`FindingDetail`], set where the check
//! builds the finding.

use super::{Sim, SimError, SimResult};
use crate::check::{CheckReport, Finding, FindingDetail, FindingKind};
use crate::types::HostOffset;

impl Sim {
    /// Refuse, as not simulated, a finding QEMU's repair would do more about
    /// than fix refcounts, COPIED flags and unaligned zero clusters (or fail
    /// at an L2 table its COPIED check cannot read); say first
    /// which corruptions it leaves as they are.
    pub(super) fn refuse_unusual(&mut self, report: &CheckReport, all: bool) -> SimResult<()> {
        let unusual = report
            .findings
            .iter()
            .find(|f| f.kind != FindingKind::Note && !Self::repaired_around(f));
        self.note_kept(report, all);
        match unusual {
            None => Ok(()),
            Some(f) => Err(SimError::NotModelled(format!(
                "QEMU's repair of this would do more than fix refcounts, COPIED flags and unaligned zero clusters: {}",
                f.message
            ))),
        }
    }

    /// Whether the repair follows what QEMU does with finding `f`: repairs
    /// it, leaves it as it is, or (a check error of its own) gets past it.
    /// The check's stops (the snapshot table, the bitmaps) end the repair
    /// before it asks.
    pub(super) fn repaired_around(f: &Finding) -> bool {
        match treatment(f.detail) {
            Treatment::Repaired | Treatment::Unseen => true,
            Treatment::LeftAsIs => Self::left_as_is(f),
            Treatment::Stops => false,
        }
    }

    /// The first L2 table the check could not read (where it sits, when the
    /// check says).
    pub(super) fn unreadable_l2(report: &CheckReport) -> Option<Option<HostOffset>> {
        report
            .findings
            .iter()
            .find(|f| f.detail == FindingDetail::L2TableUnreadable)
            .map(|f| f.offset)
    }

    /// How QEMU's check ends when a read of an L2 table fails: it stops
    /// counting the references there (`check_refcounts_l2` returns the
    /// error) and the check fails before it compares or repairs any
    /// refcount (with `-r all`, the unaligned zero clusters of the tables it
    /// read before are already fixed).
    /// `fixed`: whether it fixed any.
    pub(super) fn check_fails_at_l2(l2: Option<HostOffset>, fixed: bool) -> SimError {
        let at = l2.map_or(String::new(), |o| format!(" at {o:#x}"));
        let left = if fixed {
            "after the unaligned zero clusters of the L2 tables read before it became plain zero clusters; no refcount is repaired"
        } else {
            "nothing is repaired"
        };
        SimError::Qemu(format!(
            "ERROR: I/O error in check_refcounts_l2; Check failed: Input/output error (the read of the L2 table{at} fails; {left})"
        ))
    }

    /// Say which corruptions the repair leaves as they are.
    pub(super) fn note_kept(&mut self, report: &CheckReport, all: bool) {
        if let Some(f) = report.findings.iter().find(|f| Self::left_as_is(f)) {
            self.note(format!(
                "QEMU's repair leaves this corruption as it is: {}",
                f.message
            ));
        }
        if !all && let Some(f) = report.findings.iter().find(|f| Self::refblock_outside(f)) {
            self.note(format!(
                "QEMU's repair leaves this corruption as it is (only -r all grows the file to hold the block): {}",
                f.message
            ));
        }
    }

    /// An L2 entry of a zero cluster whose preallocated offset is not
    /// cluster aligned (which `-r all` turns into a plain zero cluster).
    pub(super) fn fixable_zero_cluster(f: &Finding) -> bool {
        f.kind == FindingKind::Corruption && f.detail == FindingDetail::UnalignedZeroCluster
    }

    /// A v3 snapshot table entry with too little extra data.
    pub(super) fn snapshot_incomplete(f: &Finding) -> bool {
        f.kind == FindingKind::Corruption && f.detail == FindingDetail::SnapshotExtraIncomplete
    }

    /// A refcount block past the end of the file (`check_refblocks`).
    pub(super) fn refblock_outside(f: &Finding) -> bool {
        f.kind == FindingKind::Corruption && f.detail == FindingDetail::RefblockOutside
    }

    /// A refcount table entry or block that makes QEMU's check call for a
    /// rebuild of the refcount structure: reserved bits in the entry, a
    /// block that is not cluster aligned, or one referenced more than once.
    pub(super) fn refblock_broken(f: &Finding) -> bool {
        f.kind == FindingKind::Corruption
            && matches!(
                f.detail,
                FindingDetail::RefblockReservedBits
                    | FindingDetail::RefblockUnaligned
                    | FindingDetail::RefblockRefcount
            )
    }

    /// A corruption `qemu-img check -r all` reports and leaves as it is,
    /// counting the references as it would without it: reserved bits in an
    /// L1 or L2 entry, a corrupt subcluster bitmap, a data cluster whose
    /// offset is not cluster aligned, an L2 table whose offset is not cluster
    /// aligned (QEMU reads and counts the table at that offset all the same),
    /// a snapshot whose L1 table is not cluster aligned or too large (its
    /// tables are not counted, so what only it references looks leaked),
    /// a compressed cluster with the COPIED flag (QEMU's check only reports
    /// it), a compressed cluster where none may be (with an external data file,
    /// or with a subcluster allocation bitmap: not counted), snapshots in an
    /// image with an external data file (counted as any others; QEMU only
    /// reports them), a reference to a region past the end of the file (not
    /// counted), and more references than a refcount can hold (counted up to
    /// the largest refcount).
    pub(super) fn left_as_is(f: &Finding) -> bool {
        f.kind == FindingKind::Corruption && treatment(f.detail) == Treatment::LeftAsIs
    }
}

/// What QEMU's repair does with a finding of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Treatment {
    /// It repairs it, or (a check error of its own) gets past it; or, an
    /// active L2 table its COPIED check cannot read, it repairs the
    /// refcounts first and fails only at that check ([`Sim::fail_copied_read`]).
    Repaired,
    /// A corruption it reports and leaves as it is ([`Sim::left_as_is`]).
    LeftAsIs,
    /// Beyond qemu-img: QEMU's repair does not see it.
    Unseen,
    /// The check stops there (the snapshot table, the bitmaps, an L2 table
    /// it cannot read), before the repair asks.
    Stops,
}

/// The one list of what QEMU's repair does with each kind of finding.
fn treatment(detail: FindingDetail) -> Treatment {
    use FindingDetail as D;
    match detail {
        D::RefcountMismatch
        | D::RefcountUnreadable
        | D::RefblockReservedBits
        | D::RefblockUnaligned
        | D::RefblockOutside
        | D::RefblockRefcount
        | D::CopiedL1
        | D::CopiedL2
        | D::UnalignedZeroCluster
        | D::SnapshotExtraIncomplete
        | D::CopiedL2TableUnreadable => Treatment::Repaired,
        D::L1ReservedBits
        | D::L2ReservedBits
        | D::SubclustersContradict
        | D::SubclustersUnallocated
        | D::CompressedWithDataFile
        | D::CompressedWithSubclusters
        | D::PastEof
        | D::Overflow
        | D::DataClusterUnaligned
        | D::L2TableUnaligned
        | D::CompressedCopied
        | D::SnapshotL1Unaligned
        | D::SnapshotL1TooLarge
        | D::SnapshotsWithDataFile => Treatment::LeftAsIs,
        D::RefcountPastEof | D::CrossLink => Treatment::Unseen,
        D::TooManySnapshots
        | D::SnapshotTableOffset
        | D::SnapshotTableUnreadable
        | D::BitmapDirectory
        | D::BitmapTable
        | D::BitmapTableEntry
        | D::L2TableUnreadable => Treatment::Stops,
    }
}

#[cfg(test)]
mod tests {
    // Test-only code, working on values it made itself.
    #![allow(
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used
    )]

    use crate::check::{CheckOptions, FindingDetail, check};
    use crate::image::{Qcow2, Strictness};
    use crate::io::{MemSource, Source};
    use crate::simulate::{Op, Sim, SimError, Target};
    use crate::testing::ImageBuilder;
    use std::path::Path;
    use std::sync::Arc;

    /// A file whose reads of one range fail as a failing disk's do (EIO).
    #[derive(Debug)]
    struct Failing {
        inner: MemSource,
        bad: std::ops::Range<u64>,
    }

    impl Source for Failing {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            let end = offset.saturating_add(buf.len() as u64);
            if offset < self.bad.end && end > self.bad.start {
                return Err(std::io::Error::from_raw_os_error(5));
            }
            self.inner.read_at(buf, offset)
        }
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn name(&self) -> &Path {
            self.inner.name()
        }
    }

    /// The builder's image with one data cluster (5) behind L2[0] and one
    /// cluster (6) that nothing references (a leak); reads of the L2 table
    /// (cluster 4) fail when `fail` is set.
    fn leaky(fail: bool) -> Qcow2 {
        let mut b = ImageBuilder::new(16, 1 << 20);
        let data = b.cluster(b"data");
        b.cluster(b"leaked");
        let b = b.l2(0, crate::tables::OFLAG_COPIED | data.get(), 0);
        let cs = b.geometry().cluster_size();
        let bad = if fail { 4 * cs..5 * cs } else { 0..0 };
        let src = Failing {
            inner: MemSource::new("built.qcow2", b.bytes()),
            bad,
        };
        Qcow2::open(Arc::new(src), Strictness::Lenient).expect("the image opens")
    }

    fn repaired(img: &Qcow2, all: bool) -> Sim {
        let mut sim = Sim::new(img, Path::new("built.qcow2")).expect("the simulation starts");
        sim.apply(&Op::Repair { all });
        sim
    }

    #[test]
    fn a_failed_read_of_an_l2_table_fails_the_check_before_any_repair() {
        // Readable, the leak is freed.
        let sim = repaired(&leaky(false), true);
        assert_eq!(sim.records[0].error, None);
        assert!(
            sim.records[0]
                .steps
                .iter()
                .any(|c| matches!(c.target, Target::Refcount { .. }) && c.after == 0),
            "{:?}",
            sim.records[0].steps
        );

        let img = leaky(true);
        let report = check(&img, &CheckOptions::default());
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.detail == FindingDetail::L2TableUnreadable
                    && f.offset.map(u64::from) == Some(0x4_0000)),
            "{:?}",
            report.findings
        );
        for all in [false, true] {
            let sim = repaired(&img, all);
            let rec = &sim.records[0];
            assert!(
                matches!(&rec.cause, Some(SimError::Qemu(m))
                    if m.starts_with("ERROR: I/O error in check_refcounts_l2; Check failed: Input/output error")
                        && m.contains("at 0x40000")),
                "{:?}",
                rec.cause
            );
            assert!(rec.steps.is_empty(), "{:?}", rec.steps);
        }
    }
}

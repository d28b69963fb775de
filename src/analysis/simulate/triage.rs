//! Which of the check's findings the repair follows (`repair.rs`): the
//! ones it repairs, the ones QEMU leaves as they are, the ones beyond
//! qemu-img, and the ones QEMU would do more about, refused with what QEMU
//! would do. Each is told by its [`FindingDetail`], set where the check
//! builds the finding.

use super::{Sim, SimError, SimResult};
use crate::check::{CheckReport, Finding, FindingDetail, FindingKind};

impl Sim {
    /// Refuse, as not simulated, a finding QEMU's repair would do more about
    /// than fix refcounts, COPIED flags and unaligned zero clusters; say first
    /// which corruptions it leaves as they are.
    pub(super) fn refuse_unusual(&mut self, report: &CheckReport, all: bool) -> SimResult<()> {
        let unusual = report
            .findings
            .iter()
            .find(|f| f.kind != FindingKind::Note && !Self::repaired_around(f));
        self.note_kept(report, all);
        if let Some(f) = unusual {
            return Err(SimError::NotModelled(format!(
                "QEMU's repair of this would do more than fix refcounts, COPIED flags and unaligned zero clusters: {}",
                f.message
            )));
        }
        Ok(())
    }

    /// Whether the repair follows what QEMU does with finding `f`: repairs
    /// it, leaves it as it is, or (a check error of its own) gets past it.
    /// The check's stops (the snapshot table, the bitmaps) end the repair
    /// before it asks.
    pub(super) fn repaired_around(f: &Finding) -> bool {
        use FindingDetail as D;
        match f.detail {
            D::RefcountMismatch
            | D::RefcountUnreadable
            | D::RefblockReservedBits
            | D::RefblockUnaligned
            | D::RefblockOutside
            | D::RefblockRefcount
            | D::CopiedL1
            | D::CopiedL2
            | D::CompressedCopied
            | D::UnalignedZeroCluster
            | D::SnapshotExtraIncomplete => true,
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
            | D::SnapshotL1Unaligned
            | D::SnapshotL1TooLarge
            | D::SnapshotsWithDataFile => Self::left_as_is(f),
            // Beyond qemu-img: QEMU's repair does not see them.
            D::RefcountPastEof | D::CrossLink => true,
            D::TooManySnapshots
            | D::SnapshotTableOffset
            | D::SnapshotTableUnreadable
            | D::BitmapDirectory
            | D::BitmapTable
            | D::BitmapTableEntry
            | D::L2TableUnreadable
            | D::CopiedL2TableUnreadable => false,
        }
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
        use FindingDetail as D;
        f.kind == FindingKind::Corruption
            && matches!(
                f.detail,
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
                    | D::SnapshotsWithDataFile
            )
    }
}

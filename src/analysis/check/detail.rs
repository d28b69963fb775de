//! What a finding is, for code: set where the check builds the finding, so
//! that callers (the simulator's repair) match on the cause rather than on
//! the words of its message.

/// The cause of a [`Finding`](super::Finding), one for each thing the check
/// reports. Not in the JSON output, which carries the category and QEMU's
/// words for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FindingDetail {
    /// A stored refcount differs from the number of references
    /// (`ERROR cluster N refcount=R reference=C`, or `Leaked cluster ...`).
    RefcountMismatch,
    /// A refcount QEMU cannot read: it lies in a refcount block whose offset
    /// is not cluster aligned (`Can't get refcount for cluster ...`).
    RefcountUnreadable,
    /// Beyond qemu-img: a refcount past the end of the file, or a note about
    /// how many were looked at.
    RefcountPastEof,
    /// A refcount table entry with reserved bits set.
    RefblockReservedBits,
    /// A refcount table entry naming a block that is not cluster aligned.
    RefblockUnaligned,
    /// A refcount block past the end of the file (`is outside image`).
    RefblockOutside,
    /// A refcount block whose own reference count is not 1.
    RefblockRefcount,
    /// An active L1 entry's COPIED flag disagrees with its L2 table's refcount.
    CopiedL1,
    /// An active L2 entry's COPIED flag disagrees with its cluster's refcount.
    CopiedL2,
    /// A compressed cluster with the COPIED flag set.
    CompressedCopied,
    /// An L1 entry with reserved bits set.
    L1ReservedBits,
    /// An L2 entry with reserved bits set.
    L2ReservedBits,
    /// An L1 entry naming an L2 table that is not cluster aligned.
    L2TableUnaligned,
    /// An L2 entry of a data cluster whose offset is not cluster aligned.
    DataClusterUnaligned,
    /// An L2 entry of a zero cluster whose preallocated offset is not
    /// cluster aligned (`Preallocated cluster is not properly aligned`).
    UnalignedZeroCluster,
    /// An allocated cluster whose subcluster bitmap says a subcluster is both
    /// allocated and zero.
    SubclustersContradict,
    /// An unallocated cluster with subclusters marked allocated.
    SubclustersUnallocated,
    /// A compressed cluster in an image with an external data file.
    CompressedWithDataFile,
    /// A compressed cluster with a non-zero subcluster allocation bitmap.
    CompressedWithSubclusters,
    /// A reference to a region past the end of the file by a cluster or more.
    PastEof,
    /// More references to a cluster than its refcount can hold.
    Overflow,
    /// More snapshots than QEMU reads.
    TooManySnapshots,
    /// The snapshot table's offset is invalid.
    SnapshotTableOffset,
    /// The snapshot table cannot be read.
    SnapshotTableUnreadable,
    /// A v3 snapshot table entry with less than 16 bytes of extra data.
    SnapshotExtraIncomplete,
    /// A snapshot whose L1 table is not cluster aligned.
    SnapshotL1Unaligned,
    /// A snapshot whose L1 table is larger than QEMU allows.
    SnapshotL1TooLarge,
    /// Snapshots in an image with an external data file.
    SnapshotsWithDataFile,
    /// The bitmap directory cannot be loaded.
    BitmapDirectory,
    /// A bitmap table cannot be loaded.
    BitmapTable,
    /// A bitmap table entry QEMU refuses.
    BitmapTableEntry,
    /// An L2 table whose read failed while the references were counted
    /// (`ERROR: I/O error in check_refcounts_l2`).
    L2TableUnreadable,
    /// An active L2 table whose read failed in the COPIED check
    /// (`ERROR: Could not read L2 table`).
    CopiedL2TableUnreadable,
    /// Beyond qemu-img: two owners of one host cluster.
    CrossLink,
}

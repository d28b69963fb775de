//! What the check reports: findings, their kinds and the roles clusters play.

use super::{FindingDetail, Imrt, Refusal};
use crate::types::{GuestOffset, HostOffset};
use serde::Serialize;
use std::sync::Arc;

/// Which totals a finding adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// Counts in `corruptions`.
    Corruption,
    /// Counts in `leaks`.
    Leak,
    /// Counts in `check-errors`.
    CheckError,
    /// Something qemu-img does not report; counts in no total.
    Note,
}

/// Which table an L1 table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "l1")]
pub enum L1Id {
    /// The active L1 table.
    Active,
    /// The L1 table of snapshot number `index` (0-based table position).
    Snapshot {
        /// Position in the snapshot table.
        index: usize,
    },
}

/// What a reference to a cluster is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Cluster 0: the header and extensions.
    Header,
    /// An L1 table.
    L1Table,
    /// An L2 table.
    L2Table,
    /// A data cluster.
    Data,
    /// A cluster holding (part of) compressed data.
    Compressed,
    /// The snapshot table.
    SnapshotTable,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The LUKS header.
    CryptoHeader,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table.
    BitmapTable,
    /// Bitmap data.
    BitmapData,
    /// A snapshot's saved VM state (RAM and device state from `savevm`): data
    /// clusters a snapshot's L1 table maps past the end of its disk.
    VmState,
}

impl Role {
    /// Whether the role is metadata (everything but data, compressed data and VM
    /// state).
    pub fn is_metadata(&self) -> bool {
        !matches!(self, Role::Data | Role::Compressed | Role::VmState)
    }
}

/// Who points at a cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Referrer {
    /// What the cluster is to this referrer.
    pub role: Role,
    /// The L1 table involved, for L1/L2/data references.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l1: Option<String>,
    /// Index in that L1 table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l1_index: Option<u64>,
    /// The L2 table, for data references.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_table: Option<HostOffset>,
    /// Index in the L2 table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_index: Option<u64>,
    /// The guest offset mapped, for data references.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_offset: Option<GuestOffset>,
    /// Anything else (refcount table index, bitmap name, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The L1 table `l1` names, for code: the active one, or a snapshot by its
    /// record (position in the snapshot table), which stays apart from another
    /// record with the same ID and name where the label does not. Not in the JSON
    /// output, which names the table by `l1`.
    #[serde(skip)]
    pub l1_table: Option<L1Id>,
}

impl Referrer {
    pub(super) fn plain(role: Role, detail: Option<String>) -> Self {
        Referrer {
            role,
            l1: None,
            l1_index: None,
            l2_table: None,
            l2_index: None,
            guest_offset: None,
            detail,
            l1_table: None,
        }
    }

    /// Whether two referrers read the same (they differ at most in
    /// [`l1_table`](Self::l1_table), the record behind two alike labels).
    pub(super) fn reads_as(&self, other: &Referrer) -> bool {
        Referrer {
            l1_table: other.l1_table,
            ..self.clone()
        } == *other
    }

    /// One line: `data via active L1[0] -> L2 0x40000[16] (guest 0x100000)`.
    pub fn describe(&self) -> String {
        let role = serde_json::to_value(self.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut s = role;
        if let (Some(l1), Some(i)) = (&self.l1, self.l1_index) {
            s.push_str(&format!(" via {l1}[{i}]"));
        }
        if let (Some(t), Some(i)) = (self.l2_table, self.l2_index) {
            s.push_str(&format!(" -> L2 {t:#x}[{i}]"));
        }
        if let Some(g) = self.guest_offset {
            s.push_str(&format!(" (guest {g:#x})"));
        }
        if let Some(d) = &self.detail {
            s.push_str(&format!(" ({d})"));
        }
        s
    }
}

/// What a finding is about: callers match on this; [`Category::name`] is the
/// short name the JSON output and the screens show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// A stored refcount differs from the number of references (`refcount`).
    Refcount,
    /// A refcount table entry or refcount block is wrong, or a block unreadable (`refblock`).
    Refblock,
    /// A refcount past the end of the file, which qemu-img does not look at (`refcount-past-eof`).
    RefcountPastEof,
    /// A COPIED flag that does not match the refcount (`copied`).
    Copied,
    /// Reserved bits set in an L1 or L2 entry (`reserved-bits`).
    ReservedBits,
    /// A table or cluster offset that is not cluster aligned (`unaligned`).
    Unaligned,
    /// A compressed cluster where none may be (`compressed`).
    Compressed,
    /// A corrupt extended-L2 subcluster bitmap (`subclusters`).
    Subclusters,
    /// A reference past the end of the file (`past-eof`).
    PastEof,
    /// More references than the refcount width can hold (`overflow`).
    Overflow,
    /// The snapshot table or one of its entries (`snapshot-table`).
    SnapshotTable,
    /// The bitmap directory or a bitmap table (`bitmaps`).
    Bitmaps,
    /// A read that failed (`io`).
    Io,
    /// Metadata and data, or two guest offsets, sharing a host cluster (`cross-link`).
    CrossLink,
}

impl Category {
    /// The short name: `refcount`, `copied`, `reserved-bits`, ...
    pub fn name(self) -> &'static str {
        match self {
            Category::Refcount => "refcount",
            Category::Refblock => "refblock",
            Category::RefcountPastEof => "refcount-past-eof",
            Category::Copied => "copied",
            Category::ReservedBits => "reserved-bits",
            Category::Unaligned => "unaligned",
            Category::Compressed => "compressed",
            Category::Subclusters => "subclusters",
            Category::PastEof => "past-eof",
            Category::Overflow => "overflow",
            Category::SnapshotTable => "snapshot-table",
            Category::Bitmaps => "bitmaps",
            Category::Io => "io",
            Category::CrossLink => "cross-link",
        }
    }

    /// Every category, in declaration order.
    pub const ALL: [Category; 14] = [
        Category::Refcount,
        Category::Refblock,
        Category::RefcountPastEof,
        Category::Copied,
        Category::ReservedBits,
        Category::Unaligned,
        Category::Compressed,
        Category::Subclusters,
        Category::PastEof,
        Category::Overflow,
        Category::SnapshotTable,
        Category::Bitmaps,
        Category::Io,
        Category::CrossLink,
    ];
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One thing the check found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Which total it adds to.
    pub kind: FindingKind,
    /// What it is about (serialized as its short name: "refcount", "copied", ...).
    pub category: Category,
    /// What it is, for code to match on (not in the JSON output).
    #[serde(skip)]
    pub detail: FindingDetail,
    /// What is wrong, in the words qemu-img check uses where it has words.
    pub message: String,
    /// How many times QEMU counts it (a shared L2 table repeats its problems once per L1 table).
    pub count: u64,
    /// The host cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<u64>,
    /// The host offset (of the cluster, or of the entry at fault).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<HostOffset>,
    /// The stored refcount.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refcount: Option<u64>,
    /// The computed number of references.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<u64>,
    /// Who references the cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub referrers: Vec<Referrer>,
    /// What `qemu-img check -r` would change, where that is clear.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<String>,
}

/// The check's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// Internal errors (qemu-img's `check-errors`).
    pub check_errors: u64,
    /// Corruptions (qemu-img's `corruptions`): refcounts lower than the
    /// references, and references QEMU cannot follow.
    pub corruptions: u64,
    /// Leaked clusters.
    pub leaks: u64,
    /// One past the last cluster in use or with a refcount.
    pub image_end_offset: HostOffset,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Allocated guest clusters (active L1).
    pub allocated_clusters: u64,
    /// Fragmented clusters.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// The check stopped early: why (qemu-img says "Check failed" and exits 1).
    pub aborted: Option<Refusal>,
    /// QEMU would not open the image at all: why.
    pub qemu_refuses: Option<Refusal>,
    /// Warnings that are not findings (dirty bit, ...).
    pub warnings: Vec<String>,
    /// Findings, grouped by kind in QEMU's order of discovery.
    pub findings: Vec<Finding>,
    /// Findings not listed because there were more than [`MAX_FINDINGS`](super::MAX_FINDINGS).
    pub findings_omitted: u64,
    /// Computed references per cluster, for clusters whose refcount is wrong.
    #[serde(skip)]
    pub imrt: Option<Arc<Imrt>>,
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks.
    pub fn exit_code(&self) -> i32 {
        if self.aborted.is_some() || self.check_errors > 0 || self.qemu_refuses.is_some() {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Progress of a long check, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Phase name.
    pub phase: &'static str,
    /// Units done.
    pub done: u64,
    /// Units in this phase.
    pub total: u64,
}

/// How to run a check: where to report progress.
#[derive(Default)]
pub struct CheckOptions<'a> {
    /// Called now and then with progress.
    pub progress: Option<&'a (dyn Fn(Progress) + Sync)>,
    /// Walk the L2 tables on one thread. The second thread keeps counts of
    /// its own (a byte or more per host cluster), so one thread is the
    /// smaller check, for callers that care more for memory than for time.
    pub one_thread: bool,
}

#[cfg(test)]
mod tests {
    use super::Category;

    /// The JSON name of each category is the name screens show.
    #[test]
    fn category_names_are_their_json_names() {
        for c in Category::ALL {
            assert_eq!(
                serde_json::to_value(c).ok(),
                Some(serde_json::json!(c.name()))
            );
        }
        assert_eq!(Category::RefcountPastEof.name(), "refcount-past-eof");
    }
}

//! Why `qemu-img check` would not check an image, or stopped checking it.
//!
//! A [`Refusal`] is the cause, for code to match on, with what QEMU says about it
//! (its `Display` is the message qinspect prints and writes to JSON). It is
//! `Clone` so a report can be copied into a viewer or a simulation's result.

use crate::error::Error;
use crate::types::HostOffset;
use std::path::PathBuf;

/// Why `qemu-img check` fails before (or instead of) counting: it cannot open the
/// image ([`CheckReport::qemu_refuses`](super::CheckReport::qemu_refuses)), or it
/// stops part way ([`CheckReport::aborted`](super::CheckReport::aborted)).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// QEMU's open of the image (with `BDRV_O_CHECK`) fails with this error: a
    /// header field, an extension, the backing file name, the L1 table, ...
    #[error("{0}")]
    Open(Error),
    /// The image is encrypted and no key was given: QEMU opens the decryption
    /// first.
    #[error(
        "Could not open '{}': Parameter 'encrypt.key-secret' is required for cipher",
        path.display()
    )]
    NoKey {
        /// The image, as named on the command line.
        path: PathBuf,
    },
    /// QEMU opens the backing chain and the external data file before checking,
    /// and that open fails.
    #[error("Could not open '{}': {error}", path.display())]
    Chain {
        /// The image, as named on the command line.
        path: PathBuf,
        /// Why the chain does not open.
        error: Error,
    },
    /// The chain loops below the image. QEMU's read-only open does not notice:
    /// it opens the same files again, one backing layer deeper each time,
    /// until the process runs out of file descriptors; `qemu-img check` then
    /// fails with "Too many open files". How long that takes (and how much
    /// memory it holds by then) grows with the open-file limit.
    #[error(
        "qemu-img's read-only open of '{}' follows the backing loop without noticing it ({error}), opening the same files again, one layer deeper each time, until it runs out of file descriptors: it then exits 1 without checking the image, saying \"Could not open backing file: \" once per layer and \"Too many open files\" (the higher the open-file limit, ulimit -n, the longer that takes and the more memory it holds)",
        path.display()
    )]
    BackingLoop {
        /// The image, as named on the command line.
        path: PathBuf,
        /// qinspect's own error for the loop (the files it goes through).
        error: Error,
    },
    /// QEMU's open of the backing chain fails (a backing file missing, a
    /// directory, a loop, an image its driver refuses): QEMU's own words.
    #[error("Could not open '{}': {reason}", path.display())]
    Backing {
        /// The image, as named on the command line.
        path: PathBuf,
        /// Where and why the chain stopped.
        failure: Box<crate::chain::ChainFailure>,
        /// QEMU's reason ([`ChainFailure::qemu_reason`](crate::chain::ChainFailure::qemu_reason)).
        reason: String,
    },
    /// The external data file was found only next to the image, where QEMU does
    /// not look: the chain's note saying so.
    #[error("{0}")]
    DataFileElsewhere(String),
    /// More snapshots than QEMU reads.
    #[error(
        "{count} snapshots is more than QEMU's limit of {} (File too large)",
        crate::snapshot::MAX_SNAPSHOTS
    )]
    TooManySnapshots {
        /// The header's `nb_snapshots`.
        count: u64,
    },
    /// The image file has more clusters than QEMU's check counts
    /// ([`MAX_CHECK_CLUSTERS`](super::MAX_CHECK_CLUSTERS)).
    #[error(
        "File too large (the file has {clusters} clusters, more than the {} QEMU's check counts)",
        super::MAX_CHECK_CLUSTERS
    )]
    FileTooLarge {
        /// The file's length in clusters.
        clusters: u64,
    },
    /// The snapshot table's offset is not aligned to a cluster, or the table would
    /// end past `INT64_MAX`.
    #[error("snapshot table offset invalid (Invalid argument)")]
    SnapshotTableOffset {
        /// The header's `snapshots_offset`.
        offset: HostOffset,
    },
    /// The snapshot table cannot be read.
    #[error("{0}")]
    SnapshotTable(Error),
    /// The bitmap directory cannot be loaded.
    #[error("the bitmap directory cannot be loaded (Invalid argument)")]
    BitmapDirectory {
        /// Where the bitmaps extension says the directory is.
        offset: HostOffset,
        /// Why it cannot be loaded.
        error: Error,
    },
    /// A bitmap's table cannot be loaded.
    #[error("bitmap '{name}' table cannot be loaded")]
    BitmapTable {
        /// The bitmap's name.
        name: String,
        /// Where its directory entry says the table is.
        offset: HostOffset,
        /// Why it cannot be loaded.
        error: Error,
    },
    /// An entry of a bitmap's table is one QEMU refuses, so the whole table
    /// cannot be loaded and the check fails.
    #[error("bitmap '{name}' table cannot be loaded (Invalid argument)")]
    BitmapTableEntry {
        /// The bitmap's name.
        name: String,
        /// Where the entry is.
        offset: HostOffset,
        /// Its index in the table.
        entry: u64,
    },
    /// qinspect stops at this bitmap where `qemu-img check` would go on: the
    /// image's bitmap tables together are more than the open reads of them
    /// ([`TABLE_READ_BUDGET`](crate::image::TABLE_READ_BUDGET)), or they hold
    /// more entries than the check goes through (tables that overlap).
    #[error("qinspect stops at bitmap '{name}': {error}")]
    BitmapTablesNotRead {
        /// The bitmap's name.
        name: String,
        /// Where its directory entry says the table is.
        offset: HostOffset,
        /// Why it was not read.
        error: Error,
    },
    /// A simulated image cannot be opened again to be checked.
    #[error("the simulated image cannot be opened: {0}")]
    SimulatedOpen(Error),
}

impl Refusal {
    /// QEMU's check of a file of `clusters` clusters fails at once ("File
    /// too large") when they are more than it counts
    /// ([`MAX_CHECK_CLUSTERS`](super::MAX_CHECK_CLUSTERS)): the refusal, if so.
    pub fn file_too_large(clusters: u64) -> Option<Refusal> {
        (clusters > super::MAX_CHECK_CLUSTERS).then_some(Refusal::FileTooLarge { clusters })
    }

    /// The error behind the refusal, where there is one.
    pub fn error(&self) -> Option<&Error> {
        match self {
            Refusal::Open(e)
            | Refusal::Chain { error: e, .. }
            | Refusal::BackingLoop { error: e, .. }
            | Refusal::SnapshotTable(e)
            | Refusal::BitmapDirectory { error: e, .. }
            | Refusal::BitmapTable { error: e, .. }
            | Refusal::BitmapTablesNotRead { error: e, .. }
            | Refusal::SimulatedOpen(e) => Some(e),
            Refusal::Backing { failure, .. } => Some(&failure.error),
            Refusal::NoKey { .. }
            | Refusal::DataFileElsewhere(_)
            | Refusal::TooManySnapshots { .. }
            | Refusal::FileTooLarge { .. }
            | Refusal::SnapshotTableOffset { .. }
            | Refusal::BitmapTableEntry { .. } => None,
        }
    }
}

/// Written to JSON as its message, as `qemu-img` would say it.
impl serde::Serialize for Refusal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

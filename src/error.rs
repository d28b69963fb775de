//! Errors that say where.
//!
//! Every error names the structure being read and, where there is one, the byte
//! offset in the file, so a message like
//! `L2 table (active L1[3]) at 0x50200: not aligned to a cluster (65536 bytes)`
//! tells a reader exactly what to look at with `qinspect hexdump --host 0x50200`.

use crate::header::Field;
use crate::types::{GuestOffset, HostOffset};
use std::path::PathBuf;

/// Result with qinspect's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading an image.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused a read or an open.
    #[error("{file}: {what}: {source}")]
    Io {
        /// The file being read.
        file: PathBuf,
        /// What was being done ("open", "read of the L1 table at 0x30000", ...).
        what: String,
        /// The underlying error (shared, so that an `Error` can be cloned).
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },

    /// A structure extends past the end of the file.
    #[error(
        "{what} at {offset:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)"
    )]
    Truncated {
        /// The structure.
        what: String,
        /// Where it starts.
        offset: HostOffset,
        /// How long it should be.
        len: u64,
        /// How long the file is.
        file_len: u64,
    },

    /// A field holds a value the format (or QEMU) does not allow.
    #[error("{what} at {offset:#x}: {reason}")]
    Invalid {
        /// Which structure, for code to match on ([`CorruptKind::Other`] where only
        /// `what` names it).
        kind: CorruptKind,
        /// The structure or field, in words.
        what: String,
        /// Where it is in the file.
        offset: HostOffset,
        /// What is wrong, in QEMU's words where QEMU has them.
        reason: String,
    },

    /// A valid image that uses something qinspect cannot follow.
    #[error("{what}: {reason}")]
    Unsupported {
        /// The feature.
        what: String,
        /// Why it cannot be followed.
        reason: String,
    },

    /// Something wrong with the backing chain as a whole.
    #[error("backing chain {chain}: {reason}")]
    Chain {
        /// The chain so far, top first, joined by " -> ".
        chain: String,
        /// What is wrong.
        reason: String,
    },

    /// A guest read that QEMU would fail with EIO.
    #[error("guest offset {guest:#x} in {layer}: {reason} (QEMU reports an I/O error)")]
    GuestIo {
        /// The guest offset.
        guest: GuestOffset,
        /// The layer that fails.
        layer: String,
        /// Why the layer cannot give the byte (the error from the layer, in words).
        reason: String,
    },

    /// A request the user made that cannot be satisfied (bad snapshot name, ...).
    #[error("{0}")]
    Request(String),
}

/// The structure an [`Error::Invalid`] is about, for callers (and tests) to match on
/// rather than read the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CorruptKind {
    /// The first four bytes are not "QFI\xfb".
    HeaderMagic,
    /// A header field QEMU's open rejects; the error's offset is the field's.
    HeaderField(Field),
    /// The header extension area (an extension too large for it).
    HeaderExtension,
    /// The backing file name (too long for cluster 0 or for QEMU).
    BackingFileName,
    /// The refcount table's place or size (from the header).
    RefcountTable,
    /// An entry of the refcount table.
    RefcountTableEntry,
    /// The internal snapshot table.
    SnapshotTable,
    /// The active L1 table's place or size (from the header).
    L1Table,
    /// A snapshot's L1 table.
    SnapshotL1Table,
    /// A bitmap directory entry QEMU's open refuses.
    BitmapDirectoryEntry,
    /// The bitmap directory's entries do not fit its size: an entry runs
    /// past its end (QEMU's open fails: "Broken bitmap directory").
    BitmapDirectoryBroken,
    /// The bitmap directory ends, its entries filling it, before the count
    /// of bitmaps the header extension gives (QEMU's open fails: "Less
    /// bitmaps found than specified in header extension").
    BitmapDirectoryShort,
    /// The bitmap directory holds more than the count of bitmaps the header
    /// extension gives (QEMU's open fails: "More bitmaps found than specified
    /// in header extension").
    BitmapDirectoryLong,
    /// The bitmap directory ends past the largest offset QEMU reads
    /// ([`BDRV_MAX_LENGTH`](crate::types::BDRV_MAX_LENGTH)): its read fails
    /// (QEMU's open fails: "Failed to read bitmap directory: Input/output
    /// error"). Short of that limit, the part past the end of the file reads
    /// as zeros.
    BitmapDirectoryUnreadable,
    /// A structure named only by the error's `what`.
    Other,
}

impl CorruptKind {
    /// Whether this is a problem of the bitmap directory that QEMU's open
    /// refuses, whatever the command (an entry, or the directory itself).
    pub fn is_bitmap_directory(&self) -> bool {
        matches!(
            self,
            CorruptKind::BitmapDirectoryEntry
                | CorruptKind::BitmapDirectoryBroken
                | CorruptKind::BitmapDirectoryShort
                | CorruptKind::BitmapDirectoryLong
                | CorruptKind::BitmapDirectoryUnreadable
        )
    }

    /// The structure in words, as messages name it.
    pub fn describe(&self) -> String {
        match self {
            CorruptKind::HeaderMagic => "qcow2 header magic".into(),
            CorruptKind::HeaderField(f) => format!("header {}", f.name()),
            CorruptKind::HeaderExtension => "header extension".into(),
            CorruptKind::BackingFileName => "backing file name".into(),
            CorruptKind::RefcountTable => "refcount table".into(),
            CorruptKind::RefcountTableEntry => "refcount table entry".into(),
            CorruptKind::SnapshotTable => "snapshot table".into(),
            CorruptKind::L1Table => "L1 table".into(),
            CorruptKind::SnapshotL1Table => "snapshot L1 table".into(),
            CorruptKind::BitmapDirectoryEntry => "bitmap directory entry".into(),
            CorruptKind::BitmapDirectoryBroken
            | CorruptKind::BitmapDirectoryShort
            | CorruptKind::BitmapDirectoryLong
            | CorruptKind::BitmapDirectoryUnreadable => "bitmap directory".into(),
            CorruptKind::Other => "structure".into(),
        }
    }
}

impl Error {
    /// An `Invalid` error about a structure named in words only
    /// ([`CorruptKind::Other`]); [`Error::corrupt`] names it for code too.
    pub fn invalid(what: impl Into<String>, offset: HostOffset, reason: impl Into<String>) -> Self {
        Error::Invalid {
            kind: CorruptKind::Other,
            what: what.into(),
            offset,
            reason: reason.into(),
        }
    }

    /// An `Invalid` error about structure `kind` at `offset`.
    pub fn corrupt(kind: CorruptKind, offset: HostOffset, reason: impl Into<String>) -> Self {
        Error::Invalid {
            kind,
            what: kind.describe(),
            offset,
            reason: reason.into(),
        }
    }

    /// An `Invalid` error about header field `field`, at the field's offset.
    pub fn header_field(field: Field, reason: impl Into<String>) -> Self {
        Error::corrupt(
            CorruptKind::HeaderField(field),
            HostOffset(field.offset()),
            reason,
        )
    }

    /// The structure an `Invalid` error is about (`None` for other errors).
    pub fn corrupt_kind(&self) -> Option<CorruptKind> {
        match self {
            Error::Invalid { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// An `Unsupported` error.
    pub fn unsupported(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Serialize an optional error as its message (`None` as null), for report fields
/// that hold an [`Error`] but are written to JSON as text.
pub fn serialize_message<S: serde::Serializer>(
    e: &Option<std::sync::Arc<Error>>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match e {
        Some(e) => s.serialize_some(&e.to_string()),
        None => s.serialize_none(),
    }
}

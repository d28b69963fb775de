//! Errors that say where.
//!
//! Every error names the structure being read and, where there is one, the byte
//! offset in the file, so a message like
//! `L2 table (active L1[3]) at 0x50200: not aligned to a cluster (65536 bytes)`
//! tells a reader exactly what to look at with `qinspect hexdump --host 0x50200`.

use std::path::PathBuf;

/// Result with qinspect's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while reading an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system refused a read or an open.
    #[error("{file}: {what}: {source}")]
    Io {
        /// The file being read.
        file: PathBuf,
        /// What was being done ("open", "read of the L1 table at 0x30000", ...).
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A structure extends past the end of the file.
    #[error(
        "{what} at {offset:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)"
    )]
    Truncated {
        /// The structure.
        what: String,
        /// Where it starts.
        offset: u64,
        /// How long it should be.
        len: u64,
        /// How long the file is.
        file_len: u64,
    },

    /// A field holds a value the format (or QEMU) does not allow.
    #[error("{what} at {offset:#x}: {reason}")]
    Invalid {
        /// The structure or field.
        what: String,
        /// Where it is in the file.
        offset: u64,
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
        guest: u64,
        /// The layer that fails.
        layer: String,
        /// Why the layer cannot give the byte (the error from the layer, in words).
        reason: String,
    },

    /// A request the user made that cannot be satisfied (bad snapshot name, ...).
    #[error("{0}")]
    Request(String),
}

impl Error {
    /// An `Invalid` error.
    pub fn invalid(what: impl Into<String>, offset: u64, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            offset,
            reason: reason.into(),
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

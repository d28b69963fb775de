//! Where and why a chain stopped opening, for code to match on, and whether QEMU's
//! own open of the same chain stops there too.

use crate::error::Error;
use std::path::PathBuf;

/// Why opening a chain stopped at one layer ([`Chain::open_detailed`](super::Chain::open_detailed)).
#[derive(Clone, Debug)]
pub struct ChainFailure {
    /// The error, as [`Chain::open`](super::Chain::open) returns it.
    pub error: Error,
    /// The layer that could not be opened: 0 the image itself, 1 its backing
    /// file, 2 that one's backing file, ...
    pub depth: usize,
    /// That layer's file, as resolved from the name above it (for a name that
    /// could not be resolved, the name).
    pub file: PathBuf,
    /// Why, for code to match on.
    pub cause: FailureCause,
    /// What the operating system said when it refused to open the file, as
    /// C's `strerror` says it (QEMU's words for an [`FailureCause::Os`]
    /// refusal).
    pub(super) os_error: Option<String>,
}

/// Why a layer of a chain could not be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureCause {
    /// The operating system refused to open the file (no such file, permission
    /// denied, ...): QEMU's open fails the same way.
    Os(std::io::ErrorKind),
    /// The file is a directory: QEMU's `file` driver requires a regular file.
    NotRegularFile,
    /// The file is already a layer higher up: the chain loops.
    Loop,
    /// The layer's own open refuses it (a qcow2 header or table QEMU's open
    /// rejects, a header shorter than the file).
    Refused,
    /// The layer is in this format, which qinspect does not read (QEMU has a
    /// driver for it).
    Format(String),
    /// Anything else: a name qinspect does not follow (a protocol, a json:
    /// spec), a chain too deep, an external data file, the top image itself.
    Unfollowed,
}

/// The block formats of QEMU 10 other than qcow2 and raw that can be a backing
/// file (`qemu-img --help`'s list, without protocols).
const QEMU_FORMATS: [&str; 12] = [
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// The cause for a backing format name qinspect does not read.
pub(super) fn format_cause(name: &str) -> FailureCause {
    if QEMU_FORMATS.contains(&name) {
        FailureCause::Format(name.to_string())
    } else {
        FailureCause::Unfollowed
    }
}

impl ChainFailure {
    /// Whether QEMU's own open of the image fails here too: a backing file
    /// (not the image itself) that the OS refuses, a directory, a loop, or an
    /// image its driver refuses.
    pub fn qemu_fails(&self) -> bool {
        self.depth >= 1
            && matches!(
                self.cause,
                FailureCause::Os(_)
                    | FailureCause::NotRegularFile
                    | FailureCause::Loop
                    | FailureCause::Refused
            )
    }

    /// What QEMU says after `Could not open 'IMAGE': ` (qemu-img) or `can't
    /// open device IMAGE: ` (qemu-io) when its read-write open fails here:
    /// `Could not open backing file: ` once per layer down to this one, then
    /// the reason. `None` where QEMU's open does not fail ([`Self::qemu_fails`]).
    /// The reason is QEMU's own for a missing or unreadable file, a directory,
    /// a loop and a file without the qcow2 magic; for another image QEMU's
    /// driver refuses it is qinspect's reason for the same refusal.
    pub fn qemu_reason(&self) -> Option<String> {
        if !self.qemu_fails() {
            return None;
        }
        let file = self.file.display();
        let why = match (&self.cause, &self.error) {
            (FailureCause::Os(_), _) if let Some(os) = &self.os_error => {
                format!("Could not open '{file}': {os}")
            }
            (FailureCause::NotRegularFile, _) => {
                format!("'file' driver requires '{file}' to be a regular file")
            }
            // A read-write open takes the image's write lock, and the same
            // file met again below wants to share it.
            (FailureCause::Loop, _) => format!(
                "Failed to get shared \"write\" lock\nIs another process using the image [{file}]?"
            ),
            // QEMU's words, without the magic qinspect found.
            (
                _,
                Error::Invalid {
                    kind: crate::error::CorruptKind::HeaderMagic,
                    ..
                },
            ) => "Image is not in qcow2 format".into(),
            (_, Error::Invalid { reason, .. }) => reason.clone(),
            (_, e) => e.to_string(),
        };
        Some(format!(
            "{}{why}",
            "Could not open backing file: ".repeat(self.depth)
        ))
    }

    /// Whether QEMU's read-only open (`qemu-img info` aside, which opens no
    /// backing file) never ends: it follows a loop without end.
    pub fn read_only_open_loops(&self) -> bool {
        self.depth >= 1 && self.cause == FailureCause::Loop
    }
}

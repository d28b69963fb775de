//! How a simulated operation fails: QEMU's own failure, a read of the image
//! that failed, or a place where the simulator does not follow QEMU.

use crate::error::Error;
use std::sync::Arc;

/// Why a simulated operation fails (or would go where the simulator does not
/// follow). Match on the variant to test a cause; [`SimError::text`] gives the
/// words.
#[derive(Clone, Debug)]
pub enum SimError {
    /// QEMU fails the operation with this message (its own words, or its
    /// errno's with what qinspect knows of why).
    Qemu(String),
    /// Reading the image failed: the crate's error, as QEMU would fail on the
    /// same bad structure.
    Error(Arc<Error>),
    /// QEMU's `-EAGAIN` from `alloc_refcount_block`: a new refcount block was
    /// hooked up, possibly where the caller meant to put its clusters, so the
    /// caller undoes its refcount changes and searches again.
    Again,
    /// QEMU would go on here in a way qinspect does not follow.
    NotModelled(String),
    /// QEMU does not open the image read-write: the corrupt bit is set.
    Corrupt(String),
    /// QEMU's open of the image fails at a backing file (`failure` says which
    /// and why), in the words of the command (`words`).
    BackingOpen {
        /// Where and why the chain stopped.
        failure: Box<crate::chain::ChainFailure>,
        /// The command's message.
        words: String,
    },
}

impl SimError {
    /// The failure in words.
    pub fn text(&self) -> String {
        match self {
            SimError::Qemu(m) | SimError::Corrupt(m) => m.clone(),
            SimError::BackingOpen { words, .. } => words.clone(),
            SimError::Error(e) => e.to_string(),
            SimError::NotModelled(m) => format!("not simulated: {m}"),
            SimError::Again => "a new refcount block was allocated in the middle of an update that cannot be restarted (Resource temporarily unavailable)".into(),
        }
    }
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl std::error::Error for SimError {}

pub(super) type SimResult<T> = std::result::Result<T, SimError>;

impl From<Error> for SimError {
    fn from(e: Error) -> Self {
        SimError::Error(Arc::new(e))
    }
}

impl super::OpRecord {
    /// Whether the operation stopped where qinspect does not follow QEMU
    /// (its `error` is then no failure of QEMU's).
    pub fn not_simulated(&self) -> bool {
        matches!(self.cause, Some(SimError::NotModelled(_)))
    }
}

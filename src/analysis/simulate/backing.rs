//! A backing file that does not open: QEMU's open fails there too (each command
//! fails in its own words), or only qinspect cannot read it (the operations go on,
//! saying so).

use super::{Op, Sim, SimError};
use std::path::Path;

/// The message of the command behind `op` when its open of the image at `path`
/// fails with `reason`: qemu-io's `can't open device IMAGE: ...`, qemu-img's
/// `Could not open 'IMAGE': ...`, or the block layer's reason alone where the
/// operation is no command of either.
pub(super) fn open_words(op: &Op, path: &Path, reason: &str) -> String {
    let path = path.display();
    match op {
        Op::Write { .. }
        | Op::WriteCompressed { .. }
        | Op::WriteZeroes { .. }
        | Op::Read { .. }
        | Op::Discard { .. } => format!("can't open device {path}: {reason}"),
        Op::SnapshotCreate { .. }
        | Op::SnapshotDelete { .. }
        | Op::SnapshotApply { .. }
        | Op::Resize { .. }
        | Op::Repair { .. } => format!("Could not open '{path}': {reason}"),
        Op::SnapshotDeleteId { .. }
        | Op::RefcountUpdate { .. }
        | Op::Trace { .. }
        | Op::Overlay { .. } => reason.to_string(),
    }
}

/// Refuse a backing chain that holds an encrypted image. QEMU opens every
/// image of the chain when it opens the top one, and an encrypted one only
/// with its own key (`backing.encrypt.key-secret=ID`): without it every
/// qemu-img and qemu-io command fails at the open. The simulation takes only
/// the top image's key, so it cannot follow such a chain either way.
pub(super) fn refuse_encrypted(chain: &crate::chain::Chain) -> crate::error::Result<()> {
    let encrypted = chain
        .layers
        .iter()
        .find(|l| l.qcow2().is_some_and(|i| i.header.crypt_method != 0));
    match encrypted {
        Some(l) => Err(crate::error::Error::unsupported(
            "simulation",
            format!(
                "QEMU opens the encrypted backing file {} only with its own key (qemu-img: Could not open backing file: Parameter 'encrypt.key-secret' is required for cipher), and the simulation takes only the top image's key",
                l.path.display()
            ),
        )),
        None => Ok(()),
    }
}

impl Sim {
    /// QEMU's failure to open the backing chain, in the words of `op`'s
    /// command, when QEMU's own open fails there.
    pub(super) fn backing_refused(&self, op: &Op) -> Option<SimError> {
        let f = self.backing_failure.as_ref()?;
        let reason = f.qemu_reason()?;
        Some(SimError::BackingOpen {
            failure: f.clone(),
            words: open_words(op, &self.path, &reason),
        })
    }

    /// The close of an image QEMU opened read-write: it marks it clean
    /// (`qcow2_mark_clean`), so a dirty bit a check-mode open left (it
    /// repairs nothing) is cleared, whether the open then failed at the
    /// backing file or the check itself failed. `why` says which close.
    /// So is the bit `qcow2_mark_dirty` wrote (8 bytes, not the whole
    /// header) when a write was linked on an image with lazy refcounts
    /// ([`Sim::l2_link`]). The marking writes the header cluster anew
    /// ([`Sim::clear_features`]); where that does not fit, the close
    /// ignores the failure and the dirty bit stays on disk.
    pub(super) fn mark_clean_on_close(&mut self, why: &str) -> super::SimResult<()> {
        use crate::header::{Field, INCOMPAT_DIRTY};
        let features = self.header_field(Field::IncompatibleFeatures);
        if features & INCOMPAT_DIRTY != 0 {
            self.why(why);
            self.clear_features(INCOMPAT_DIRTY)?;
            return Ok(());
        }
        if !self.lazy_dirtied() {
            return Ok(());
        }
        self.why("the close marks the image clean again after the write marked it dirty (lazy refcounts)");
        if self.qemu_header_cluster()?.is_some() {
            return self.rewrite_header_rest();
        }
        self.note(format!(
            "qcow2_mark_dirty wrote the dirty bit when the write's L2 entries were linked (lazy refcounts); the close would clear it by writing the header cluster again (qcow2_update_header), but what it writes does not fit the cluster: the update fails ({}) and the bit stays on disk",
            super::update_header::NO_SPACE
        ));
        self.set_header(Field::IncompatibleFeatures, features | INCOMPAT_DIRTY)
    }

    /// Say, before an operation, that the backing chain named is one qinspect
    /// could not open though QEMU's open may not fail. (A chain that stops at
    /// the image itself, such as at its external data file, says nothing of
    /// the backing file.)
    pub(super) fn backing_assumed(&mut self) {
        if self.backing_failure.as_ref().is_some_and(|f| f.depth >= 1) {
            let why = self.backing_unread();
            self.note(format!(
                "qinspect cannot open the backing chain ({why}); this assumes QEMU opens it, and says `not simulated` where the metadata QEMU writes depends on the backing file's bytes or length"
            ));
        }
    }

    /// Why the backing chain named was not opened, for the operations that
    /// need it.
    pub(super) fn backing_unread(&self) -> String {
        match &self.backing_failure {
            Some(f) => f.error.to_string(),
            None => "it was not opened".into(),
        }
    }
}

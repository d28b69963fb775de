//! One command: what a qemu-img or qemu-io process does to the image, in
//! QEMU's order. Its open (the header updates a read-write open makes: a
//! bitmaps extension QEMU ignores dropped, bitmaps marked in use, autoclear
//! bits it does not know cleared; then a dirty image repaired and the
//! backing chain opened), the operation itself, and its close (persistent
//! bitmaps stored again, the image marked clean where QEMU's close marks
//! it), each recorded as the operation's steps.

use super::Op;
use super::ops::qemu_words;
use super::{OpRecord, Sim, SimError, SimResult, backing, data};

impl Sim {
    /// Simulate one operation and record it.
    pub fn apply(&mut self, op: &Op) {
        self.steps.clear();
        self.reason.clear();
        // Each operation is a fresh open of the image (a separate qemu-img or
        // qemu-io command), so QEMU's free-cluster hint starts at 0 again.
        self.free_cluster_index = 0;
        self.unmap = Self::opens_with_unmap(op);
        self.discards.clear();
        self.overlap_stop = None;
        self.unstored_features = 0;
        if let Op::Trace { offset } = op {
            // A look, not a QEMU command: nothing is opened read-write.
            let r = self.trace(*offset);
            self.records.push(OpRecord {
                op: op.clone(),
                description: op.describe(),
                steps: std::mem::take(&mut self.steps),
                error: r.as_ref().err().map(SimError::text),
                cause: r.err(),
            });
            return;
        }
        let features = self.header_field(crate::header::Field::IncompatibleFeatures);
        let checking = matches!(op, Op::Repair { .. });
        self.begin_cache_log(op);
        let r = if let Some(m) = &self.open_fails {
            // qemu-img and qemu-io (check included) stop at the open.
            Err(SimError::Qemu(backing::open_words(op, &self.path, m)))
        } else if let Some(m) = self.check_only.as_ref().filter(|_| !checking) {
            Err(SimError::Qemu(backing::open_words(op, &self.path, m)))
        } else if features & crate::header::INCOMPAT_CORRUPT != 0 && !checking {
            // qemu-img and qemu-io stop at the open: nothing is written.
            Err(SimError::Corrupt(backing::open_words(
                op,
                &self.path,
                "qcow2: Image is corrupt; cannot be opened read/write",
            )))
        } else if let Some(why) = &self.not_modelled {
            Err(SimError::NotModelled(why.clone()))
        } else {
            // A bitmaps extension QEMU ignores is dropped from the header as
            // the open ends; then a dirty image (lazy refcounts) is repaired
            // on a read-write open that is not itself a check.
            let r = self.drop_ignored_bitmaps(op);
            // An open that fails here (a repair on open that fails fails
            // the open) has no close that marks the image clean.
            let mut open_failed = r.is_err();
            let r = if r.is_err() {
                r
            } else if features & crate::header::INCOMPAT_DIRTY != 0 && !checking {
                let lazy = self.header_field(crate::header::Field::CompatibleFeatures) & 1 != 0;
                self.note(format!(
                    "the image is dirty{}: QEMU repairs its refcounts on open, as qemu-img check -r all would",
                    if lazy { " (lazy refcounts)" } else { "" }
                ));
                let r = self.repair(true);
                let r = self.repair_on_open_words(op, r);
                self.repaired_on_open();
                open_failed = r.is_err();
                r
            } else {
                Ok(())
            };
            // The backing file is opened after the image's own open, so
            // what that open writes stays when the backing file fails.
            let r = r.and_then(|()| match self.backing_refused(op) {
                Some(e) => self
                    .mark_clean_on_close(
                        "the failed open closes the image, and the close marks it clean",
                    )
                    .and(Err(e)),
                None => {
                    self.backing_assumed();
                    self.run_op(op)
                }
            });
            // The close: persistent bitmaps are stored again even when the
            // operation failed.
            // A write stopped by the overlap check leaves the image unusable:
            // nothing more is written.
            // The close then marks the image clean (qcow2_inactivate): a
            // check's, also after a failed check, and any other's, which
            // finds it dirty when the repair on open left a corruption.
            let closed = if r.is_err() && self.marked_corrupt() {
                // The bitmaps stay as the open marked them, in use.
                Ok(())
            } else {
                self.store_bitmaps().and_then(|()| {
                    // (A failed open has no close.)
                    if self.marked_corrupt() || self.open_fails.is_some() {
                        Ok(())
                    } else if checking {
                        self.mark_clean_on_close(
                            "the check closes the image, and the close marks it clean",
                        )
                    } else if open_failed {
                        Ok(())
                    } else {
                        self.mark_clean_on_close(
                            "the repair on open left the image dirty; the close marks it clean",
                        )
                    }
                })
            };
            r.and(closed)
        };
        let error = r.as_ref().err().map(|f| qemu_words(op, f));
        self.records.push(OpRecord {
            op: op.clone(),
            description: op.describe(),
            steps: std::mem::take(&mut self.steps),
            error,
            cause: r.err(),
        });
    }

    fn run_op(&mut self, op: &Op) -> SimResult<()> {
        // What a write of this operation puts in its clusters (zeros for the
        // plain writes a write-zeroes falls back to).
        self.data.new = data::NewData::Fill(match op {
            Op::Write { pattern, .. } | Op::WriteCompressed { pattern, .. } => *pattern,
            _ => 0,
        });
        if let Some(why) = op.qemu_io_refusal() {
            return Err(SimError::Qemu(why));
        }
        match op {
            Op::SnapshotCreate { name } => self.snapshot_create(name),
            Op::SnapshotDelete { id_or_name } => self.snapshot_delete(id_or_name, false),
            Op::SnapshotDeleteId { id } => self.snapshot_delete(id, true),
            Op::SnapshotApply { id_or_name } => self.snapshot_apply(id_or_name),
            Op::Write { offset, length, .. } => self.guest_write(*offset, *length),
            Op::Discard { offset, length } => self.discard(*offset, *length),
            Op::Read { offset, length } => self.copy_on_read(*offset, *length),
            Op::WriteCompressed { offset, length, .. } => self.write_compressed(*offset, *length),
            Op::WriteZeroes {
                offset,
                length,
                unmap,
            } => self.write_zeroes(*offset, *length, *unmap),
            Op::Resize { size, shrink } => self.resize(*size, *shrink),
            Op::Repair { all } => self.repair(*all),
            Op::Trace { offset } => self.trace(*offset),
            Op::Overlay { .. } => Err(SimError::Qemu(
                "an overlay starts a new layer: simulate_layers handles it".into(),
            )),
            Op::RefcountUpdate { l1, addend } => self.refcount_walk(l1, *addend),
        }
    }
}

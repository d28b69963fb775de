//! The overlap check of a shrink's discard (`qemu-img resize --shrink`).
//! `qcow2_co_truncate` discards the clusters past the new end in QEMU's L2
//! cache (`qcow2_cluster_discard`, a full discard), shrinks the L1 table and
//! the refcount table, cuts the file after its last cluster in use (as the
//! refcount cache counts them), writes the new size into the header, and
//! only then has its caches written back (`qcow2_update_options`: the L2
//! cache first, then the refcount cache). A changed slice the overlap
//! check stops there is not written, the image is marked corrupt and the
//! resize fails ("Failed to flush the L2 table cache"); the refcount cache
//! is never written, so every refcount change from the discard's first
//! release on is lost, while the L1 entries, the refcount table, the cut
//! and the new size, written at once, stay.

use super::super::invalid::REFCOUNT_CACHE_ENTRIES;
use super::super::{Change, Sim, SimError, SimResult, Target};
use crate::types::HostOffset;

impl Sim {
    /// The operation's first step that lowers a refcount (a release), if
    /// any: from there on QEMU's refcount cache waits on its L2 cache
    /// (`qcow2_cache_set_dependency`), so a write-back the overlap check
    /// stops at the L2 cache loses the refcount changes from that step on
    /// ([`Sim::walk_refcounts_lost`]).
    pub(in crate::analysis::simulate) fn first_release(&self) -> Option<usize> {
        self.steps.iter().position(|c: &Change| {
            matches!(c.target, Target::Refcount { .. }) && c.after < c.before
        })
    }

    /// The write-back at the end of a shrink from `old` to `size` bytes of
    /// the L2 entries its discard `held` back (table, index, word and
    /// bitmap before). Not followed when QEMU's caches may have written
    /// back on their own before: more L2 slices in the discarded range than
    /// the L2 cache holds, more refcount blocks than the refcount cache
    /// holds (`qcow2_shrink_reftable` reads every one).
    pub(in crate::analysis::simulate) fn shrink_flush(
        &mut self,
        held: Vec<(HostOffset, u64, u64, u64)>,
        size: u64,
        old: u64,
    ) -> SimResult<()> {
        let span = self.slice_entries().max(1).saturating_mul(self.cs).max(1);
        let from = size.div_ceil(self.cs).saturating_mul(self.cs);
        let slices = old
            .saturating_sub(1)
            .checked_div(span)
            .unwrap_or(0)
            .saturating_sub(from.checked_div(span).unwrap_or(0))
            .saturating_add(1);
        let entries = self.l2_cache_entries();
        if slices > entries {
            return Err(SimError::NotModelled(format!(
                "a shrink whose discard changed an L2 slice the overlap check stops when QEMU writes it back, through more L2 slices than QEMU's L2 cache holds ({entries}): evicting it would meet the check during the discard"
            )));
        }
        let dropped = self
            .steps
            .iter()
            .filter(|c| matches!(c.target, Target::RefcountTableEntry { .. }))
            .count() as u64;
        let blocks = (0..self.reftable_len())
            .filter(|&ti| self.read_u64(self.reftable_entry_offset(ti)) != 0)
            .count() as u64;
        if blocks.saturating_add(dropped) > REFCOUNT_CACHE_ENTRIES {
            return Err(SimError::NotModelled(format!(
                "a shrink whose discard changed an L2 slice the overlap check stops when QEMU writes it back, on an image with more refcount blocks than QEMU's refcount cache holds ({REFCOUNT_CACHE_ENTRIES}): evicting a changed one writes the L2 cache back during the shrink"
            )));
        }
        // A table the shrink freed leaves QEMU's L2 cache unwritten
        // (`update_refcount` discards a cached table at a freed cluster).
        let mut live = Vec::new();
        let saved = self.reason.clone();
        self.why("not written: the shrink freed this L2 table, which QEMU then dropped from its L2 cache");
        for h in held {
            let (l2, index, raw, bitmap) = h;
            if self.get_refcount(self.cluster_of(l2))? != 0 {
                live.push(h);
                continue;
            }
            let (now, now_bm) = self.l2_entry_at(l2, index);
            let off = self.l2_entry_offset(l2, index);
            let target = Target::L2Entry {
                table_offset: l2,
                index,
            };
            if now != raw {
                self.write_u64(off, raw)?;
                self.record(target.clone(), now, raw);
            }
            if self.geo.extended_l2 && now_bm != bitmap {
                self.write_u64(off.saturating_add(8), bitmap)?;
                self.record(target, now_bm, bitmap);
            }
        }
        self.reason = saved;
        let Some((m, at)) = self.held_restored(&live)? else {
            return Ok(());
        };
        if let Some(first) = self.first_release() {
            self.walk_refcounts_lost(first)?;
        }
        match self.overlap_stopped(m, at) {
            SimError::Qemu(e) => Err(SimError::Qemu(format!(
                "Failed to flush the L2 table cache: Input/output error ({e})"
            ))),
            e => Err(e),
        }
    }
}

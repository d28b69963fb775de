//! The flush after the refcount walk (`bdrv_flush` at the end of
//! `qcow2_update_snapshot_refcount`) when the overlap check stops an L2
//! slice the walk changed in QEMU's L2 cache (`qcow2_cache_entry_flush`
//! checks the cached slice it writes, the active L2 tables aside, over the
//! whole clusters it touches: a slice is stopped as its table would be).

use super::super::Sim;
use super::super::SimError;
use super::super::SimResult;
use super::super::change::Target;
use super::super::invalid::REFCOUNT_CACHE_ENTRIES;
use crate::types::HostOffset;

impl Sim {
    /// The L2 slice (where it starts), of those `held` whose changes the
    /// walk kept from the file because the overlap check will stop their
    /// write, that QEMU's L2 cache still holds at the flush: a -1 walk that
    /// frees a table (its refcount now 0) drops the slice at the table's
    /// start from the cache (`update_refcount` discards a cached slice at a
    /// freed cluster's offset), so its changes are never written and it
    /// stops nothing; the table's other slices stay. `walked` tables were
    /// walked from the first held one on: when more slices than the cache
    /// holds, QEMU may evict a held one and meet the overlap check during
    /// the walk, which is not followed.
    pub(super) fn walk_stopped_table(
        &mut self,
        held: &[HostOffset],
        walked: u64,
    ) -> SimResult<Option<HostOffset>> {
        let Some(&first) = held.first() else {
            return Ok(None);
        };
        self.walk_held_evictable(first, walked)?;
        for &at in held {
            let first_slice = at.is_multiple_of(self.cs);
            if !first_slice || self.get_refcount(self.cluster_of(at))? != 0 {
                return Ok(Some(at));
            }
        }
        Ok(None)
    }

    /// Refused when the walk went through more L2 slices than QEMU's L2
    /// cache holds in the `walked` tables from the one in which it changed
    /// the slice at `first`, which the overlap check stops: QEMU may evict
    /// that slice and meet the check there, which is not followed.
    pub(super) fn walk_held_evictable(&self, first: HostOffset, walked: u64) -> SimResult<()> {
        let per_table = self
            .geo
            .l2_entries()
            .checked_div(self.slice_entries())
            .unwrap_or(1);
        let entries = self.l2_cache_entries();
        if walked.saturating_mul(per_table) > entries {
            return Err(SimError::NotModelled(format!(
                "a refcount walk that changed the L2 slice at {first:#x}, which the overlap check stops when QEMU writes it back, then went through more L2 slices than QEMU's L2 cache holds ({entries}): evicting it would meet the overlap check during the walk"
            )));
        }
        Ok(())
    }

    /// The step from which QEMU's refcount cache holds the changes of an
    /// operation's release from step `start` on: the new snapshot table
    /// written before it (`qcow2_write_snapshots` flushes after allocating
    /// it, and then releases the old table), or `start`.
    pub(in crate::analysis::simulate) fn refcount_cache_clean_from(&self, start: usize) -> usize {
        self.steps
            .iter()
            .rposition(|c| matches!(c.target, Target::SnapshotTable { .. }))
            .map_or(start, |i| i.min(start))
    }

    /// The flush after an operation's release ([`Sim::held_flush`], the
    /// shrink) stops at an L2 table: QEMU's refcount cache, which waits on
    /// its L2 cache when refcounts decrease (`qcow2_cache_set_dependency`),
    /// is never written. Every refcount change it held is undone, from step
    /// `start` (and from the new snapshot table on,
    /// [`Sim::refcount_cache_clean_from`]). A refcount walk with addend -1
    /// follows the cache block by block instead ([`Sim::release_watch_lost`]).
    pub(in crate::analysis::simulate) fn walk_refcounts_lost(
        &mut self,
        start: usize,
    ) -> SimResult<()> {
        let mark = self.refcount_cache_clean_from(start);
        let lost: Vec<(u64, u64, u64, u64)> = self
            .steps
            .iter()
            .skip(mark)
            .filter_map(|c| match c.target {
                Target::Refcount { cluster } => Some((cluster, c.count, c.before, c.after)),
                _ => None,
            })
            .collect();
        let bb = self.block_bits();
        let mut blocks: Vec<u64> = lost.iter().map(|&(c, ..)| c >> bb).collect();
        blocks.sort_unstable();
        blocks.dedup();
        if blocks.len() as u64 > REFCOUNT_CACHE_ENTRIES {
            return Err(SimError::NotModelled(format!(
                "an operation that released clusters (a discard, a write-zeroes) whose flush the overlap check stops, after it changed refcounts in more refcount blocks than QEMU's refcount cache holds ({REFCOUNT_CACHE_ENTRIES}): evicting one writes the L2 tables it waits on first, during the operation"
            )));
        }
        let saved = self.reason.clone();
        self.why("lost: after a release QEMU's refcount cache waits on its L2 cache, whose write the overlap check stops, so the change is never written");
        let mut restored = std::collections::HashSet::new();
        for (cluster, count, before, after) in lost.into_iter().rev() {
            for k in 0..count {
                let c = cluster.saturating_add(k);
                self.put_refcount(c, before)?;
                self.record(Target::Refcount { cluster: c }, after, before);
                restored.insert(c);
            }
        }
        self.reason = saved;
        self.keep_freed_not_restored(&restored);
        Ok(())
    }

    /// What was freed only in QEMU's refcount cache is not: of the clusters
    /// freed so far, those whose refcount was put back (`restored`) to more
    /// than 0 leave the list of freed clusters.
    pub(in crate::analysis::simulate) fn keep_freed_not_restored(
        &mut self,
        restored: &std::collections::HashSet<u64>,
    ) {
        let freed = std::mem::take(&mut self.freed);
        for e in freed {
            if !restored.contains(&e.0) || self.get_refcount(e.0).map_or(true, |r| r == 0) {
                self.freed.push(e);
            }
        }
    }
}

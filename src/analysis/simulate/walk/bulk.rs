//! The refcount walk's bulk path: an L2 table whose entries' refcount updates
//! can neither land on the table nor fail is read once, its words updated in a
//! buffer and written back once, instead of entry by entry. The per-entry path
//! in the parent module is the reference; `tests` compares the two.

use super::{DATA, Sim, Walk};
use crate::analysis::simulate::alloc::Discard;
use crate::analysis::simulate::change::Target;
use crate::analysis::simulate::overlap::Meta;
use crate::refcount::get_refcount;
use crate::tables::{ClusterType, L2Entry};
use crate::types::HostOffset;
use crate::types::low_mask;

/// An L2 table taken in bulk: its entry words read once and written back once
/// (nothing else reads or writes the table meanwhile), and the refcount block
/// of the last cluster counted.
pub(super) struct Bulk {
    /// The table's cluster.
    table: u64,
    /// The first word of every entry, as the walk has left it.
    words: Vec<u64>,
    /// Whether any word changed.
    changed: bool,
    /// The refcount table index last looked up and its block's cluster.
    block: Option<(u64, Option<u64>)>,
}

#[cfg(test)]
thread_local! {
    /// Every table entry by entry, to compare the two paths.
    pub(super) static PER_ENTRY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the bulk path is switched off (only ever by a test).
fn bulk_disabled() -> bool {
    #[cfg(test)]
    {
        PER_ENTRY.with(std::cell::Cell::get)
    }
    #[cfg(not(test))]
    {
        false
    }
}

#[cfg(test)]
thread_local! {
    /// How many entries went in bulk on this thread.
    pub(super) static BULK_ENTRIES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Sim {
    /// The table at `l2` in bulk, if the walk's writes can neither land on it
    /// nor fail: it is clear of every structure the overlap check knows (so it
    /// is no refcount block, not the refcount table, no L1 table, not the
    /// header), and a write anywhere in it is one QEMU can make. While only
    /// bulk entries run, the refcount table and the blocks stay where they
    /// are, so the overlap check of each entry's write passes as this one did.
    pub(super) fn bulk_start(&mut self, l2: HostOffset) -> Option<Bulk> {
        if bulk_disabled() {
            return None;
        }
        self.write_end(l2, self.cs).ok()?;
        if self.overlap_of(Some(Meta::ActiveL2), l2, self.cs).is_some() {
            return None;
        }
        let step = self.geo.l2_entry_size() as usize;
        let tc = self.cluster_of(l2);
        let words: Vec<u64> = self
            .cluster_ro(tc)
            .chunks_exact(step.max(8))
            .map(|c| crate::bytes::be64(c, 0))
            .collect();
        Some(Bulk {
            table: tc,
            words,
            changed: false,
            block: None,
        })
    }

    /// Entry `j` in bulk, with the same effects, records and reasons as
    /// [`Sim::walk_entry`], the table's write left for [`Sim::bulk_finish`].
    /// False, with nothing done, when the entry is not for the bulk path: a
    /// compressed or unaligned cluster, a refcount block that would have to
    /// be allocated or that is unaligned, a refcount that would overflow or
    /// go below 0.
    pub(super) fn bulk_entry(&mut self, b: &mut Bulk, w: &mut Walk, j: u64) -> bool {
        let Some(&old) = b.words.get(j as usize) else {
            return false;
        };
        let entry = L2Entry::from_word(old).with_copied(false).raw;
        let e = L2Entry {
            raw: entry,
            bitmap: 0,
        };
        let refcount = match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Compressed => return false,
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let off = e.host_offset();
                if !off.is_multiple_of(self.cs) {
                    return false;
                }
                let c = self.cluster_of(off);
                // The table naming itself: one by one ([`Sim::walk_entry`]).
                if c == b.table && w.addend != 0 {
                    return false;
                }
                let ti = c >> self.block_bits();
                let block = match b.block {
                    Some((t, blk)) if t == ti => blk,
                    _ => {
                        let blk = match self.refcount_block_of(ti) {
                            Ok(blk) => blk,
                            Err(_) => return false,
                        };
                        b.block = Some((ti, blk));
                        blk
                    }
                };
                let idx = c & low_mask(self.block_bits());
                let order = self.order;
                match (block, w.addend) {
                    (None, 0) => 0,
                    // The block would be allocated.
                    (None, _) => return false,
                    (Some(bc), 0) => get_refcount(self.cluster_ro(bc), order, idx),
                    (Some(bc), addend) => {
                        // A look at the cache that writes a changed
                        // refcount block back: one by one.
                        if self.release_watch_evicts(bc) {
                            return false;
                        }
                        self.refcount_block_used(bc, true);
                        let slot = self.clusters.slot(bc, &self.base, self.zero_from);
                        let cur = get_refcount(self.clusters.at(slot, false), order, idx);
                        let Some(new) = self.refcount_after(cur, 1, addend < 0) else {
                            return false;
                        };
                        if new == 0 && self.release_watch_holds(c) {
                            return false;
                        }
                        self.release_watch_changed(bc, c, cur, new);
                        w.reasons.put(&mut self.reason, DATA);
                        self.store_refcount(slot, idx, c, cur, new, Discard::Snapshot);
                        new
                    }
                }
            }
            _ => 0,
        };
        #[cfg(test)]
        BULK_ENTRIES.with(|n| n.set(n.get().saturating_add(1)));
        let new = L2Entry::from_word(entry).with_copied(refcount == 1).raw;
        if new != old {
            self.copied_reason(w, new, refcount);
            let eoff = w.l2.saturating_entry(j, self.geo.l2_entry_size());
            // What the write of the entry does besides its bytes.
            self.written(eoff, eoff.saturating_add(8));
            if let Some(slot) = b.words.get_mut(j as usize) {
                *slot = new;
            }
            b.changed = true;
            self.record(
                Target::L2Entry {
                    table_offset: w.l2,
                    index: j,
                },
                old,
                new,
            );
        }
        true
    }

    /// Write the bulk entries' words into the table.
    pub(super) fn bulk_finish(&mut self, b: &Bulk) {
        if !b.changed {
            return;
        }
        let step = self.geo.l2_entry_size() as usize;
        let table = self.cluster(b.table);
        for (dst, w) in table.chunks_exact_mut(step.max(8)).zip(&b.words) {
            if let Some(d) = dst.get_mut(..8) {
                d.copy_from_slice(&w.to_be_bytes());
            }
        }
    }
}

//! The refcount walk (`qcow2_update_snapshot_refcount`): addend +1, 0 or -1
//! over every L2 table and cluster an L1 table names, then the COPIED flags.

use super::Sim;
use super::SimError;
use super::SimResult;
use super::alloc::Discard;
use super::change::Target;
use super::overlap::Meta;
use crate::tables::ClusterType;
use crate::tables::CompressedDescriptor;
use crate::tables::L1Entry;
use crate::tables::L2Entry;
use crate::types::HostOffset;

mod bulk;
mod flush;
#[cfg(test)]
use bulk::{BULK_ENTRIES, PER_ENTRY};

/// The reasons the walk over one L2 table gives: the addend on a data
/// cluster, on compressed data, and the COPIED change.
const DATA: usize = 0;
const COMPRESSED: usize = 1;
const COPIED: usize = 2;

/// A walk alternates between reasons on every entry (a refcount, then the
/// entry's COPIED flag): they are moved in and out of `Sim::reason` rather
/// than copied each time. `Sim::reason` always holds the one put last.
struct Reasons {
    text: [String; 3],
    /// Which one is in `Sim::reason` now (its slot holds what was there).
    out: Option<usize>,
}

impl Reasons {
    /// Make `reason` read reason `k`.
    fn put(&mut self, reason: &mut String, k: usize) {
        if self.out == Some(k) {
            return;
        }
        if let Some(o) = self.out.and_then(|o| self.text.get_mut(o)) {
            std::mem::swap(reason, o);
        }
        if let Some(t) = self.text.get_mut(k) {
            std::mem::swap(reason, t);
            self.out = Some(k);
        }
    }

    /// Reason `k` now reads `text`.
    fn set(&mut self, reason: &mut String, k: usize, text: String) {
        if self.out == Some(k) {
            *reason = text;
        } else if let Some(t) = self.text.get_mut(k) {
            *t = text;
        }
    }
}

/// One L2 table's walk: what its entries share.
struct Walk {
    l2: HostOffset,
    addend: i32,
    reasons: Reasons,
    /// The refcount the COPIED reason was written for.
    copied_for: u64,
    /// The slices of this table (where each starts) whose write the
    /// overlap check will stop: QEMU changes the entries in its L2 cache
    /// and checks each slice when it writes it, at the flush after the
    /// walk, so the walk goes on and the slice stays as it was on disk (see
    /// [`Sim::update_snapshot_refcount`]).
    unwritten: Vec<HostOffset>,
}

impl Sim {
    // ---- the refcount walk ---------------------------------------------------

    pub(super) fn l1_label(&self, offset: HostOffset) -> String {
        if offset == self.l1_table_offset {
            return "active L1".into();
        }
        match self.snapshots.iter().find(|s| s.l1_table_offset == offset) {
            Some(s) => format!("snapshot {} '{}' L1", s.id, s.name),
            None => format!("L1 at {offset:#x}"),
        }
    }

    /// QEMU's `qcow2_update_snapshot_refcount`. `active` selects the in-memory
    /// active table (QEMU uses it when the offset is the active L1's).
    pub(super) fn update_snapshot_refcount(
        &mut self,
        l1_offset: HostOffset,
        l1_size: u64,
        addend: i32,
    ) -> SimResult<()> {
        let label = self.l1_label(l1_offset);
        let active = l1_offset == self.l1_table_offset;
        // The snapshot record the label names (the first at this offset).
        let record = (!active)
            .then(|| {
                self.snapshots
                    .iter()
                    .position(|s| s.l1_table_offset == l1_offset)
            })
            .flatten();
        // QEMU keeps a snapshot's VM state in the L1 range past its disk
        // (qcow2_vm_state_offset): entries from this index on name VM state.
        let disk = record
            .and_then(|k| self.snapshots.get(k))
            .map_or(self.size, |s| s.disk_size);
        let vm_from = self.geo.l1_entries_for(disk);
        let mut table: Vec<L1Entry> = if active {
            self.l1.clone()
        } else {
            let raw = self.read_bytes(l1_offset, l1_size.saturating_mul(8));
            raw.chunks_exact(8)
                .map(|c| L1Entry(crate::bytes::be64(c, 0)))
                .collect()
        };
        let mut l1_modified = false;
        let mut result = Ok(());
        // What the walk frees is discarded (QCOW2_DISCARD_SNAPSHOT) once the
        // whole walk is done.
        self.cache_discards = true;
        // The L2 slices whose writes the overlap check will stop, in the
        // order walked, and how many tables were walked from the first on.
        let mut held: Vec<HostOffset> = Vec::new();
        let mut walked_since = 0u64;
        let start = self.steps.len();
        if addend < 0 {
            let from = self.refcount_cache_clean_from(start);
            self.release_watch_start(from);
        }
        for i in 0..table.len() {
            let Some(&old_l1) = table.get(i) else { break };
            if old_l1 == L1Entry::UNALLOCATED {
                continue;
            }
            let l2 = old_l1.l2_offset().unwrap_or_default();
            if !l2.is_multiple_of(self.cs) {
                result = Err(SimError::Qemu(format!(
                    "L2 table offset {l2:#x} unaligned (L1 index: {i:#x}) (EIO)"
                )));
                break;
            }
            let vm = if (i as u64) >= vm_from {
                " (VM state, past the disk)"
            } else {
                ""
            };
            match self.walk_l2(l2, addend, &label, i, vm) {
                Ok(stopped) => {
                    for at in stopped {
                        if !held.contains(&at) {
                            held.push(at);
                        }
                    }
                    if !held.is_empty() {
                        walked_since = walked_since.saturating_add(1);
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if addend != 0 {
                self.why(format!(
                    "{}: the L2 table named by {label}[{i}]{vm}",
                    if addend > 0 { "+1" } else { "-1" }
                ));
                if let Err(e) =
                    self.update_one(self.cluster_of(l2), 1, addend < 0, Discard::Snapshot)
                {
                    result = Err(e);
                    break;
                }
            }
            let r = match self.get_refcount(self.cluster_of(l2)) {
                Ok(r) => r,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            // Only the offset and COPIED are kept: reserved bits are dropped.
            let new_l1 = L1Entry::l2_table(l2, r == 1);
            if new_l1 != old_l1 {
                if let Some(slot) = table.get_mut(i) {
                    *slot = new_l1;
                }
                l1_modified = true;
                self.why(if r == 1 {
                    "COPIED set: the L2 table's refcount is exactly 1".to_string()
                } else if r == 0 {
                    "COPIED cleared: the L2 table's refcount is now 0 (freed)".to_string()
                } else {
                    format!("COPIED cleared: the L2 table's refcount is {r} (shared)")
                });
                self.record(
                    Target::L1Entry {
                        table: label.clone(),
                        table_offset: l1_offset,
                        index: i as u64,
                        snapshot: record,
                    },
                    old_l1.0,
                    new_l1.0,
                );
            }
        }
        self.cache_discards = false;
        let watch = self.release_watch_end();
        // A look at QEMU's refcount cache failed where the overlap check
        // stopped the L2 cache's write-back: the walk ends there, the queued
        // discards are dropped, and what the refcount cache held is lost.
        if matches!(result, Err(SimError::Qemu(_)))
            && let Some(first) = watch.as_ref().and_then(|w| w.failed_after())
        {
            // The table under way counts as walked.
            self.walk_held_evictable(first, walked_since.saturating_add(1))?;
            self.process_discards(false);
            if let Some(w) = watch {
                self.release_watch_lost(w)?;
            }
            if l1_modified {
                self.note(format!(
                    "the {label} changes above stay in QEMU's memory: the walk fails, so the table is not written"
                ));
            }
            return result;
        }
        // The walk done, QEMU flushes its caches (`bdrv_flush`): with a
        // positive addend the refcount blocks first (the L2 tables depend on
        // them), then every L2 table the overlap check lets through; with
        // addend -1 the L2 tables first, and the refcount blocks, which
        // depend on them, only if all were written. A table it stops fails
        // the operation there (the queued discards are dropped), and the L1
        // table is not written; the in-memory one it changed goes with the
        // process.
        let stopped = match &result {
            Ok(()) => match self.walk_stopped_table(&held, walked_since) {
                Ok(s) => s,
                Err(e) => {
                    result = Err(e);
                    None
                }
            },
            Err(_) => None,
        };
        self.process_discards(result.is_ok() && stopped.is_none());
        if let Some(at) = stopped {
            if let Some(w) = watch {
                self.release_watch_lost(w)?;
            }
            if l1_modified {
                self.note(format!(
                    "the {label} changes above stay in QEMU's memory: the flush after the walk fails, so the table is not written"
                ));
            }
            let len = self.slice_of(at, 0).1;
            return Err(match self.overlap_check(Some(Meta::ActiveL2), at, len) {
                Err(e) => e,
                Ok(()) => SimError::NotModelled(format!(
                    "the L2 slice at {at:#x} overlapped metadata during the walk but not at the flush after it, where QEMU writes it with the walk's changes"
                )),
            });
        }
        if active {
            // QEMU modified its in-memory table in place.
            self.l1.clone_from(&table);
        }
        if result.is_ok() && addend >= 0 && l1_modified {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            result = self.write_bytes(l1_offset, &bytes);
        } else if l1_modified && addend < 0 {
            self.note(format!(
                "the {label} is not written back: with addend -1 QEMU does not write it (snapshot-delete frees this L1 next; in snapshot-apply the snapshot's L1 is already written over it)"
            ));
        }
        result
    }

    /// The L2 pass of the walk over the table at `l2` (named by `label[i]`):
    /// the addend on every cluster it names, then COPIED on every entry whose
    /// cluster's refcount is now exactly 1.
    ///
    /// Entries go in bulk (see [`Bulk`]) while the walk's own writes cannot
    /// land on the table; any other entry goes through [`Sim::walk_entry`],
    /// and so does the rest of its table. The slices whose write the
    /// overlap check will stop.
    fn walk_l2(
        &mut self,
        l2: HostOffset,
        addend: i32,
        label: &str,
        i: usize,
        vm: &str,
    ) -> SimResult<Vec<HostOffset>> {
        let entries = self.geo.l2_entries();
        let sign = if addend > 0 { "+1" } else { "-1" };
        let mut walk = Walk {
            l2,
            addend,
            reasons: Reasons {
                text: [
                    format!("{sign}: data cluster named by {label}[{i}] -> L2 {l2:#x}{vm}"),
                    format!("{sign}: compressed data named by {label}[{i}] -> L2 {l2:#x}{vm}"),
                    String::new(),
                ],
                out: None,
            },
            copied_for: u64::MAX,
            unwritten: Vec::new(),
        };
        let mut bulk = self.bulk_start(l2);
        for j in 0..entries {
            if let Some(b) = bulk.as_mut() {
                if self.bulk_entry(b, &mut walk, j) {
                    continue;
                }
                // This entry and the rest of the table, one by one, on the
                // table as the bulk entries left it.
                self.bulk_finish(b);
                bulk = None;
            }
            self.walk_entry(&mut walk, j)?;
        }
        if let Some(b) = bulk.as_ref() {
            self.bulk_finish(b);
        }
        Ok(walk.unwritten)
    }

    /// Entry `j` of the walk's table, as QEMU takes it: read, the addend on its
    /// cluster, COPIED written back through the overlap check.
    fn walk_entry(&mut self, w: &mut Walk, j: u64) -> SimResult<()> {
        let (l2, addend) = (w.l2, w.addend);
        let step = self.geo.l2_entry_size();
        let eoff = l2.saturating_entry(j, step);
        let old = self.read_u64(eoff);
        let entry = L2Entry::from_word(old).with_copied(false).raw;
        let off = L2Entry::from_word(entry).host_offset();
        let e = L2Entry {
            raw: entry,
            bitmap: 0,
        };
        let refcount = match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Compressed => {
                if addend != 0 {
                    let d = CompressedDescriptor::decode(entry, &self.geo);
                    w.reasons.put(&mut self.reason, COMPRESSED);
                    self.update_refcount(d.offset, d.size, 1, addend < 0, Discard::Snapshot)?;
                }
                2
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                if !off.is_multiple_of(self.cs) {
                    return Err(SimError::Qemu(format!(
                        "Cluster allocation offset {off:#x} unaligned (L2 offset: {l2:#x}, L2 index: {j:#x}) (EIO)"
                    )));
                }
                if addend != 0 {
                    w.reasons.put(&mut self.reason, DATA);
                    let c = self.cluster_of(off);
                    let r = self.update_one_to(c, 1, addend < 0, Discard::Snapshot)?;
                    // The table's own cluster freed while its first slice is
                    // in use: `qcow2_cache_discard` asserts, QEMU aborts.
                    if r == 0 && c == self.cluster_of(l2) && j < self.slice_entries().max(1) {
                        return Err(SimError::NotModelled(format!(
                            "a refcount walk that frees the L2 table at {l2:#x} from within that table (its entry {j} names it) while QEMU's L2 cache holds it in use: QEMU 10.0.2 aborts there (qcow2_cache_discard: Assertion `c->entries[i].ref == 0' failed)"
                        )));
                    }
                    r
                } else {
                    self.get_refcount(self.cluster_of(off))?
                }
            }
            _ => 0,
        };
        let new = L2Entry::from_word(entry).with_copied(refcount == 1).raw;
        if new != old {
            self.copied_reason(w, new, refcount);
            // Written at the flush after the walk, its slice (one L2 cache
            // entry) through the overlap check.
            let (at, len) = self.slice_of(l2, j);
            if w.unwritten.contains(&at) {
                return Ok(());
            }
            if self.overlap_of(Some(Meta::ActiveL2), at, len).is_some() {
                w.unwritten.push(at);
                self.release_watch_slice(at);
                return Ok(());
            }
            self.write_u64(eoff, new)?;
            self.record(
                Target::L2Entry {
                    table_offset: l2,
                    index: j,
                },
                old,
                new,
            );
        }
        Ok(())
    }

    /// Make the reason read why entry word `new` has COPIED as it has, for a
    /// cluster whose refcount is now `refcount`.
    fn copied_reason(&mut self, w: &mut Walk, new: u64, refcount: u64) {
        if w.copied_for != refcount {
            w.copied_for = refcount;
            let text = if L2Entry::from_word(new).copied() {
                "COPIED set: refcount is now exactly 1".to_string()
            } else if refcount == 0 {
                "COPIED cleared: refcount is now 0 (freed)".to_string()
            } else {
                format!("COPIED cleared: refcount is now {refcount} (shared)")
            };
            w.reasons.set(&mut self.reason, COPIED, text);
        }
        w.reasons.put(&mut self.reason, COPIED);
    }

    pub(super) fn refcount_walk(&mut self, l1: &str, addend: i32) -> SimResult<()> {
        if l1 == "active" {
            return self.update_snapshot_refcount(
                self.l1_table_offset,
                self.l1.len() as u64,
                addend,
            );
        }
        let Some(i) = self.find_snapshot(l1) else {
            return Err(SimError::Qemu(format!(
                "no snapshot '{l1}' (use 'active' or a snapshot ID or name)"
            )));
        };
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| SimError::Qemu("no snapshot".into()))?;
        self.check_snapshot_l1(&sn)?;
        self.update_snapshot_refcount(sn.l1_table_offset, u64::from(sn.l1_size), addend)
    }
}

#[cfg(test)]
mod tests;

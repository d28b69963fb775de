//! Refcount updates: reading and changing one cluster's refcount, hooking up
//! new refcount blocks and growing the refcount table (`update_refcount`,
//! `alloc_refcount_block`, `qcow2_refcount_area`).

use super::Sim;
use super::SimError;
use super::SimResult;
use super::alloc::Discard;
use super::change::Target;
use crate::header::Field;
use crate::refcount::get_refcount;
use crate::refcount::set_refcount;
use crate::types::{HostOffset, low_mask};

impl Sim {
    // ---- refcounts ---------------------------------------------------------

    pub(super) fn reftable_len(&self) -> u64 {
        self.clusters_bytes(u64::from(self.refcount_table_clusters)) / 8
    }

    pub(super) fn block_bits(&self) -> u32 {
        self.geo
            .cluster_bits
            .saturating_add(3)
            .saturating_sub(self.order)
    }

    /// Where refcount table entry `ti` is (saturating: the table offset comes
    /// from the header).
    pub(super) fn reftable_entry_offset(&self, ti: u64) -> HostOffset {
        self.refcount_table_offset.saturating_entry(ti, 8)
    }

    /// The cluster of the refcount block table entry `ti` names, as
    /// [`Sim::get_refcount`] finds it: None past the table or for an empty
    /// entry (every refcount it would hold reads 0), an error when unaligned.
    pub(super) fn refcount_block_of(&mut self, ti: u64) -> SimResult<Option<u64>> {
        if ti >= self.reftable_len() {
            return Ok(None);
        }
        let e = self.read_u64(self.reftable_entry_offset(ti));
        let block = crate::refcount::RefTableEntry(e)
            .block_offset()
            .unwrap_or_default();
        if block == HostOffset(0) {
            return Ok(None);
        }
        if !block.is_multiple_of(self.cs) {
            return Err(SimError::Qemu(format!(
                "Refblock offset {block:#x} unaligned (reftable index: {ti:#x}) (EIO)"
            )));
        }
        Ok(Some(self.cluster_of(block)))
    }

    /// Cluster `c`'s refcount as QEMU holds it now, looked at without going
    /// through its refcount cache (for what a note says); `None` when its
    /// refcount block cannot be read.
    pub(super) fn peek_refcount(&mut self, c: u64) -> Option<u64> {
        let Some(bc) = self.refcount_block_of(c >> self.block_bits()).ok()? else {
            return Some(0);
        };
        let idx = c & low_mask(self.block_bits());
        let order = self.order;
        Some(get_refcount(self.cluster_ro(bc), order, idx))
    }

    /// The refcounts of the clusters `first..end` as QEMU holds them now
    /// ([`Sim::peek_refcount`]), for a note: "cluster 20 at 1, cluster 21
    /// at 0", the first eight named and the rest counted.
    pub(super) fn refcounts_named(&mut self, first: u64, end: u64) -> String {
        const NAMED: u64 = 8;
        let mut out: Vec<String> = Vec::new();
        for c in (first..end).take(NAMED as usize) {
            out.push(match self.peek_refcount(c) {
                Some(r) => format!("cluster {c} at {r}"),
                None => format!("cluster {c} (its refcount block cannot be read)"),
            });
        }
        let more = end.saturating_sub(first).saturating_sub(NAMED);
        if more > 0 {
            out.push(format!("{more} more"));
        }
        out.join(", ")
    }

    /// QEMU's `qcow2_get_refcount`.
    pub(super) fn get_refcount(&mut self, c: u64) -> SimResult<u64> {
        let Some(bc) = self.refcount_block_of(c >> self.block_bits())? else {
            return Ok(0);
        };
        self.refcount_block_used(bc, false);
        let idx = c & low_mask(self.block_bits());
        let order = self.order;
        Ok(get_refcount(self.cluster_ro(bc), order, idx))
    }

    /// QEMU's `update_refcount`: add or subtract `addend` on every cluster the byte
    /// range touches, a release of `kind` (see [`Discard`]); on failure, undo
    /// this call's earlier clusters. The discards it queued are punched as it
    /// returns (dropped when it fails), unless a walk keeps them for its end.
    ///
    /// The undo is QEMU's: this same update with the opposite sign, of the
    /// bytes from `offset` to the cluster that failed (nothing when that is
    /// the first: a length below 0 is refused, one of 0 does nothing). It can
    /// fail too, where a refcount block made on the way took a cluster this
    /// update had freed (a 1-bit refcount cannot count it again): it stops
    /// there and undoes its own part, as any update does.
    pub(super) fn update_refcount(
        &mut self,
        offset: HostOffset,
        length: u64,
        addend: u64,
        decrease: bool,
        kind: Discard,
    ) -> SimResult<()> {
        if length == 0 {
            return Ok(());
        }
        if decrease {
            self.refcounts_released();
        }
        let first = self.cluster_of(offset);
        let last = self.cluster_of(offset.saturating_add(length.saturating_sub(1)));
        let mut result = Ok(());
        for c in first..=last {
            if let Err(e) = self.update_one(c, addend, decrease, kind) {
                if matches!(e, SimError::Again) {
                    // The search restarts from the first cluster of this update.
                    self.free_cluster_index = self.free_cluster_index.min(first);
                }
                // The queue goes (dropped) before the undo, which is an
                // update of its own.
                if !self.cache_discards {
                    self.process_discards(false);
                }
                // "Try do undo any updates if an error is returned": an
                // update of its own, whose own failure is not looked at.
                if let Some(done) = self.cluster_start(c).get().checked_sub(offset.get()) {
                    let _ = self.update_refcount(offset, done, addend, !decrease, Discard::Never);
                }
                result = Err(e);
                break;
            }
        }
        if result.is_ok() && !self.cache_discards {
            self.process_discards(true);
        }
        result
    }

    pub(super) fn update_one(
        &mut self,
        c: u64,
        addend: u64,
        decrease: bool,
        kind: Discard,
    ) -> SimResult<()> {
        self.update_one_to(c, addend, decrease, kind).map(|_| ())
    }

    /// [`Sim::update_one`], giving the cluster's new refcount (what
    /// [`Sim::get_refcount`] reads right after).
    pub(super) fn update_one_to(
        &mut self,
        c: u64,
        addend: u64,
        decrease: bool,
        kind: Discard,
    ) -> SimResult<u64> {
        let ti = c >> self.block_bits();
        let block = match self.refcount_block_for(ti, c) {
            Ok(b) => b,
            Err(SimError::Again) => {
                self.free_cluster_index = self.free_cluster_index.min(c);
                return Err(SimError::Again);
            }
            Err(e) => return Err(e),
        };
        let idx = c & low_mask(self.block_bits());
        let order = self.order;
        let bc = self.cluster_of(block);
        self.refcount_block_used(bc, true);
        if !decrease && self.release_watch_pending() {
            self.release_watch_refuse(
                "an allocation in which QEMU's refcount cache, waiting on its L2 cache since a release, meets the overlap check in the write-back of the L2 cache".into(),
            );
        }
        if let Some(e) = self.release_watch_stop() {
            return Err(e);
        }
        // One cache look-up for the read and the write of the refcount: nothing
        // in between reads a cluster.
        let slot = self.clusters.slot(bc, &self.base, self.zero_from);
        let cur = get_refcount(self.clusters.at(slot, false), order, idx);
        let Some(new) = self.refcount_after(cur, addend, decrease) else {
            return Err(SimError::Qemu(format!(
                "refcount of cluster {c} would {} ({cur} {} {addend}, {}-bit refcounts) (EINVAL)",
                if decrease { "go below 0" } else { "overflow" },
                if decrease { "-" } else { "+" },
                1u32 << order
            )));
        };
        if new == 0 && self.release_watch_holds(c) {
            self.release_watch_refuse(format!(
                "a release that frees cluster {c}, a refcount block QEMU's refcount cache holds: QEMU drops it from the cache with the changes it held (qcow2_cache_discard)"
            ));
            if let Some(e) = self.release_watch_stop() {
                return Err(e);
            }
        }
        self.release_watch_changed(bc, c, cur, new);
        self.store_refcount(slot, idx, c, cur, new, kind);
        Ok(new)
    }

    /// Set cluster `c`'s refcount back to `value` in the block that holds it
    /// now, without a record.
    pub(super) fn put_refcount(&mut self, c: u64, value: u64) -> SimResult<()> {
        let block = self.refcount_block_for(c >> self.block_bits(), c)?;
        let idx = c & low_mask(self.block_bits());
        let bc = self.cluster_of(block);
        let slot = self.clusters.slot(bc, &self.base, self.zero_from);
        set_refcount(self.clusters.at(slot, true), self.order, idx, value);
        Ok(())
    }

    /// A refcount of `cur` after adding (or, `decrease`, subtracting)
    /// `addend`: None when it would go below 0 or past the largest refcount.
    pub(super) fn refcount_after(&self, cur: u64, addend: u64, decrease: bool) -> Option<u64> {
        if decrease {
            cur.checked_sub(addend)
        } else {
            cur.checked_add(addend).filter(|&n| n <= self.max_refcount)
        }
    }

    /// Cluster `c`'s refcount goes from `cur` to `new` in a release or
    /// allocation of `kind`: entry `idx` of the refcount block in cache slot
    /// `slot` (from `Store::slot`), the free-cluster hint, the record, the
    /// list of freed clusters and the queue of discards.
    pub(super) fn store_refcount(
        &mut self,
        slot: usize,
        idx: u64,
        c: u64,
        cur: u64,
        new: u64,
        kind: Discard,
    ) {
        if new == 0 && c < self.free_cluster_index {
            self.free_cluster_index = c;
        }
        let order = self.order;
        set_refcount(self.clusters.at(slot, true), order, idx, new);
        self.record(Target::Refcount { cluster: c }, cur, new);
        if new == 0 {
            let r = self.reason.clone();
            self.freed.push((c, r));
            self.queue_discard(c, kind);
            self.l2_cluster_freed(c);
        }
    }

    /// The refcount block for table index `ti` (QEMU's `alloc_refcount_block`,
    /// for the case where the table has room).
    pub(super) fn refcount_block_for(
        &mut self,
        ti: u64,
        for_cluster: u64,
    ) -> SimResult<HostOffset> {
        if ti >= self.reftable_len() {
            return self.new_refcount_block(ti, for_cluster);
        }
        let e = self.read_u64(self.reftable_entry_offset(ti));
        let block = crate::refcount::RefTableEntry(e)
            .block_offset()
            .unwrap_or_default();
        if block != HostOffset(0) {
            if !block.is_multiple_of(self.cs) {
                return Err(SimError::Qemu(format!(
                    "Refblock offset {block:#x} unaligned (EIO)"
                )));
            }
            return Ok(block);
        }
        self.new_refcount_block(ti, for_cluster)
    }

    /// A missing refcount block: QEMU allocates one. If the new block would itself
    /// be described by the block being created, it describes itself.
    pub(super) fn new_refcount_block(
        &mut self,
        ti: u64,
        for_cluster: u64,
    ) -> SimResult<HostOffset> {
        // Either way the caller restarts: this returns `SimError::Again` once the
        // block is hooked up.
        let saved = self.reason.clone();
        self.held_stops_new_refblock()?;
        self.l2_flushed_for_refblock();
        // alloc_clusters_noref: the lowest free cluster (refcounts as they stand).
        let new_c = self.find_free(1)?;
        let bb = self.block_bits();
        let new_off = self.cluster_start(new_c);
        // The clusters block ti describes: ti << bb ..= last (the same bits, all ones below bb).
        let last = (ti << bb) | low_mask(bb);
        if new_c >> bb == ti {
            // Self-describing: the block counts itself.
            self.why(format!(
                "new refcount block for clusters {}..{last} (describes itself)",
                ti << bb,
            ));
            let zero = vec![0u8; self.cs as usize];
            self.write_bytes(new_off, &zero)?;
            let idx = new_c & low_mask(bb);
            let order = self.order;
            self.refcount_block_used(new_c, true);
            set_refcount(self.cluster(new_c), order, idx, 1);
            self.record(Target::Refcount { cluster: new_c }, 0, 1);
        } else {
            self.why(format!(
                "new refcount block for clusters {}..{last}",
                ti << bb,
            ));
            let other_ti = new_c >> bb;
            // Its own refcount lives in another block, which must exist. It
            // is raised by an update of its own (`update_refcount`), whose
            // end punches the discards queued so far, unless a walk holds
            // them.
            let _ = self.refcount_block_for(other_ti, new_c)?;
            self.update_refcount(new_off, self.cs, 1, false, Discard::Never)?;
            self.refcounts_flushed();
            self.refcount_block_used(new_c, true);
            let zero = vec![0u8; self.cs as usize];
            self.write_bytes(new_off, &zero)?;
        }
        self.allocated
            .push((new_off, self.cs, "refcount block".into()));
        self.record(
            Target::Allocate {
                offset: new_off,
                length: self.cs,
                purpose: format!(
                    "refcount block (refcount table entry {ti}, needed for cluster {for_cluster})"
                ),
            },
            new_c,
            new_c,
        );
        self.refcounts_flushed();
        if ti >= self.reftable_len() {
            // No room in the table for the block: a new, larger table with
            // self-describing blocks after everything counted so far.
            let rbs = 1u64 << bb;
            let blocks_used = for_cluster
                .saturating_add(1)
                .max(new_c.saturating_add(1))
                .div_ceil(rbs);
            let meta = self.clusters_bytes(blocks_used.saturating_mul(rbs));
            self.refcount_area(HostOffset(meta), ti, new_off)?;
            self.reason = saved;
            return Err(SimError::Again);
        }
        let entry_off = self.reftable_entry_offset(ti);
        let before = self.read_u64(entry_off);
        self.write_u64(entry_off, new_off.get())?;
        self.reason = format!("refcount table entry {ti} now points at the new block");
        self.record(
            Target::RefcountTableEntry {
                index: ti,
                at: entry_off,
            },
            before,
            new_off.get(),
        );
        self.note(
            "the new refcount block may sit where the clusters being counted were meant to go: QEMU undoes this update and searches again (EAGAIN)"
            .to_string(),
        );
        self.reason = saved;
        Err(SimError::Again)
    }

    /// QEMU's `qcow2_refcount_metadata_size`: how many refcount blocks it
    /// takes to count `clusters` clusters plus the blocks and the table
    /// themselves (with half the table again to spare when `generous`).
    pub(super) fn refcount_blocks_needed(&self, mut clusters: u64, mut generous: bool) -> u64 {
        let per_table_cluster = self.cs / 8;
        let per_block = 1u64 << self.block_bits();
        let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
        loop {
            let last = n;
            blocks = clusters
                .saturating_add(table)
                .saturating_add(blocks)
                .div_ceil(per_block);
            table = blocks.div_ceil(per_table_cluster);
            n = clusters.saturating_add(blocks).saturating_add(table);
            if n == last && generous {
                clusters = clusters.saturating_add(table.div_ceil(2));
                n = 0;
                generous = false;
            }
            if n == last {
                return blocks;
            }
        }
    }

    /// QEMU's `qcow2_refcount_area` as `alloc_refcount_block` calls it: from
    /// `start` on, the refcount blocks still missing, then a new refcount table
    /// (half as large again as needed), all counted by themselves; the header
    /// switches to it and the old table is freed. Each block from the area's
    /// table index on goes through QEMU's refcount cache, in order (a new one
    /// and one that counts the new clusters changed there), the cache is
    /// written back before the table, and `alloc_refcount_block` then takes
    /// the new block `new_block` from the cache again.
    pub(super) fn refcount_area(
        &mut self,
        start: HostOffset,
        new_ti: u64,
        new_block: HostOffset,
    ) -> SimResult<()> {
        let cs = self.cs;
        let bb = self.block_bits();
        let rbs = 1u64 << bb;
        let total = self.refcount_blocks_needed(self.cluster_of(start), true);
        let per_cluster = cs / 8;
        let table_size = total
            .saturating_add(total.div_ceil(2))
            .div_ceil(per_cluster)
            .saturating_mul(per_cluster);
        if table_size.saturating_mul(8) > crate::refcount::MAX_REFTABLE_BYTES {
            return Err(SimError::Qemu(
                "the refcount table would grow past 8 MiB (EFBIG)".into(),
            ));
        }
        let table_clusters = table_size.checked_div(per_cluster).unwrap_or(0);
        let old_len = self.reftable_len();
        let mut table: Vec<u64> = (0..table_size.min(old_len))
            .map(|i| self.read_u64(self.reftable_entry_offset(i)))
            .collect();
        table.resize(table_size as usize, 0);
        if let Some(slot) = table.get_mut(new_ti as usize) {
            *slot = new_block.get();
        }
        let area_ti = self.cluster_of(start) >> bb;
        let missing = (area_ti..total)
            .filter(|&i| table.get(i as usize).is_some_and(|&e| e == 0))
            .count() as u64;
        let table_offset = start.saturating_add(self.clusters_bytes(missing));
        let end = table_offset.saturating_add(self.clusters_bytes(table_clusters));
        self.why(format!(
            "the refcount table is full: {missing} new refcount block(s) at {start:#x} and a table of {table_clusters} cluster(s) at {table_offset:#x}, counting themselves"
        ));
        let mut block_offset = start;
        let order = self.order;
        for i in area_ti..total {
            let existing = table.get(i as usize).copied().unwrap_or(0);
            let block = if existing != 0 {
                crate::refcount::RefTableEntry(existing)
                    .block_offset()
                    .unwrap_or_default()
            } else {
                let b = block_offset;
                self.write_bytes(b, &vec![0u8; cs as usize])?;
                if let Some(slot) = table.get_mut(i as usize) {
                    *slot = b.get();
                }
                self.allocated.push((b, cs, "refcount block".into()));
                self.record(
                    Target::Allocate {
                        offset: b,
                        length: cs,
                        purpose: format!("refcount block (new refcount table entry {i})"),
                    },
                    self.cluster_of(b),
                    self.cluster_of(b),
                );
                block_offset = block_offset.saturating_add(cs);
                b
            };
            let first = HostOffset(self.clusters_bytes(i.saturating_mul(rbs)));
            self.refcount_block_used(self.cluster_of(block), existing == 0 || first < end);
            if first < end {
                let j0 = if first < start {
                    self.cluster_of(start.saturating_sub(first))
                } else {
                    0
                };
                let j1 = self.cluster_of(end.saturating_sub(first)).min(rbs);
                let bc = self.cluster_of(block);
                for j in j0..j1 {
                    let cur = get_refcount(self.cluster(bc), order, j);
                    set_refcount(self.cluster(bc), order, j, 1);
                    self.record(
                        Target::Refcount {
                            cluster: i.saturating_mul(rbs).saturating_add(j),
                        },
                        cur,
                        1,
                    );
                }
            }
        }
        self.refcounts_flushed();
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_bytes(table_offset, &bytes)?;
        self.allocated.push((
            table_offset,
            self.clusters_bytes(table_clusters),
            "the new refcount table".into(),
        ));
        self.record(
            Target::Allocate {
                offset: table_offset,
                length: self.clusters_bytes(table_clusters),
                purpose: format!("the new refcount table ({table_size} entries)"),
            },
            self.cluster_of(table_offset),
            self.cluster_of(table_offset),
        );
        let (old_off, old_clusters) = (self.refcount_table_offset, self.refcount_table_clusters);
        self.why("the header points at the new refcount table");
        self.set_header(Field::RefcountTableOffset, table_offset)?;
        self.set_header(Field::RefcountTableClusters, table_clusters)?;
        self.refcount_table_offset = table_offset;
        self.refcount_table_clusters = table_clusters as u32;
        self.file_len = self.file_len.max(end.get());
        self.free_clusters(
            old_off,
            self.clusters_bytes(u64::from(old_clusters)),
            "the old refcount table",
            Discard::Other,
        );
        // load_refcount_block: the new block, for the caller's update.
        self.refcount_block_used(self.cluster_of(new_block), false);
        Ok(())
    }
}

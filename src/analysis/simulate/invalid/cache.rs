//! QEMU's refcount block cache as one operation uses it (`qcow2-cache.c`,
//! `MIN_REFCOUNT_CACHE_SIZE` entries, the default): each look at a refcount
//! takes its block from the cache and puts it back, which stamps it with
//! the next number of the cache's counter; a block not in the cache takes
//! the place of the entry with the lowest stamp (the first such entry, in
//! order, when several have never been used), and that entry, if it was
//! changed, is written back first. A release (a refcount going down)
//! makes the refcount cache depend on the L2 cache, and linking a write's
//! L2 entries makes the L2 cache depend on the refcount cache: before a
//! cache with a dependency writes an entry back, it writes the whole cache
//! it depends on back, and forgets the dependency. Setting one dependency
//! first writes back the cache the other way round.
//!
//! A new refcount table (`qcow2_refcount_area`) goes through the cache as
//! well: each refcount block from the new area's first table index on is
//! taken and put back in order (a new one, and one that counts the new
//! clusters, changed), then the whole cache is written back, the old table
//! is freed (a release) and the block the allocation asked for is taken
//! again. The rebuild of a check empties the cache first
//! (`qcow2_cache_empty`: written back, every entry forgotten). A repair on
//! open that leaves a corruption does not mark the image clean: it stays
//! dirty in QEMU's memory, QEMU then needs no accurate refcounts
//! (`qcow2_need_accurate_refcounts`), and linking L2 entries sets no
//! dependency.
//!
//! The model counts steps of the operation's record: an entry written back
//! at step `s` carries every change recorded before `s`.

use std::collections::BTreeMap;

use super::super::Sim;

/// Entries of QEMU's refcount cache.
pub(in crate::analysis::simulate) const ENTRIES: usize = 4;

/// One entry of the cache.
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// The cluster of the refcount block it holds.
    block: Option<u64>,
    /// Its stamp: the cache's counter when it was last put back.
    lru: u64,
    /// Changed since it was read (or last written back).
    dirty: bool,
}

/// QEMU's refcount cache, for one operation (one command: the cache starts
/// empty at the open).
#[derive(Debug, Default)]
pub(in crate::analysis::simulate) struct RefcountCache {
    entries: [Entry; ENTRIES],
    counter: u64,
    /// The refcount cache depends on the L2 cache (a release).
    on_l2: bool,
    /// The L2 cache depends on the refcount cache (linked L2 entries).
    l2_on: bool,
    /// Per refcount block, the step at which it was last written back.
    written: BTreeMap<u64, usize>,
    /// The image is dirty in QEMU's memory (`qcow2_need_accurate_refcounts`
    /// is false): linking L2 entries sets no dependency.
    lazy: bool,
    /// Why what the cache wrote back is not known, once it is not.
    unknown: Option<String>,
}

impl RefcountCache {
    /// A look at (or, `dirty`, a change of) a refcount in the block at
    /// cluster `block`, at step `step`. True when the L2 cache had to be
    /// written back first (an eviction of a changed entry while the cache
    /// depends on it).
    pub(in crate::analysis::simulate) fn use_block(
        &mut self,
        block: u64,
        dirty: bool,
        step: usize,
    ) -> bool {
        let mut l2 = false;
        let at = self.entries.iter().position(|e| e.block == Some(block));
        let i = match at {
            Some(i) => i,
            None => {
                // The lookup starts at entry (offset / cluster size * 4) % 4,
                // which is 0: the first entry with the lowest stamp goes.
                let mut victim = 0usize;
                let mut lowest = u64::MAX;
                for (k, e) in self.entries.iter().enumerate() {
                    if e.lru < lowest {
                        lowest = e.lru;
                        victim = k;
                    }
                }
                l2 = self.write_back(victim, step);
                if let Some(e) = self.entries.get_mut(victim) {
                    *e = Entry {
                        block: Some(block),
                        lru: e.lru,
                        dirty: false,
                    };
                }
                victim
            }
        };
        self.counter = self.counter.saturating_add(1);
        if let Some(e) = self.entries.get_mut(i) {
            e.lru = self.counter;
            e.dirty |= dirty;
        }
        l2
    }

    /// Write entry `i` back if it changed; true when the L2 cache went
    /// first.
    fn write_back(&mut self, i: usize, step: usize) -> bool {
        let Some(e) = self.entries.get_mut(i) else {
            return false;
        };
        let (Some(block), true) = (e.block, e.dirty) else {
            return false;
        };
        e.dirty = false;
        self.written.insert(block, step);
        std::mem::take(&mut self.on_l2)
    }

    /// QEMU writes the whole refcount cache back (`qcow2_cache_flush`);
    /// true when the L2 cache went first.
    pub(in crate::analysis::simulate) fn flush(&mut self, step: usize) -> bool {
        let mut l2 = false;
        for i in 0..ENTRIES {
            l2 |= self.write_back(i, step);
        }
        l2
    }

    /// `qcow2_cache_empty`: the cache is written back, then every entry is
    /// forgotten and the counter starts again; true when the L2 cache went
    /// first.
    pub(in crate::analysis::simulate) fn empty(&mut self, step: usize) -> bool {
        let l2 = self.flush(step);
        self.entries = [Entry::default(); ENTRIES];
        self.counter = 0;
        l2
    }

    /// A release: the refcount cache now depends on the L2 cache (first
    /// writing itself back if the L2 cache depended on it).
    pub(in crate::analysis::simulate) fn release(&mut self, step: usize) {
        if std::mem::take(&mut self.l2_on) {
            self.flush(step);
        }
        self.on_l2 = true;
    }

    /// A write's L2 entries are linked: the L2 cache now depends on the
    /// refcount cache. True when the L2 cache is written back first (the
    /// refcount cache depended on it).
    pub(in crate::analysis::simulate) fn l2_linked(&mut self) -> bool {
        if self.lazy {
            return false;
        }
        let l2 = std::mem::take(&mut self.on_l2);
        self.l2_on = true;
        l2
    }

    /// QEMU writes the whole L2 cache back; `l2_dirty` says whether it held
    /// changes (only an entry written back looks at the dependency, which
    /// writes the refcount cache back first).
    pub(in crate::analysis::simulate) fn l2_flushed(&mut self, l2_dirty: bool, step: usize) {
        if l2_dirty && std::mem::take(&mut self.l2_on) {
            self.flush(step);
        }
    }

    /// Whether [`Self::flush`] would write the L2 cache first: the cache
    /// depends on it and holds a change.
    pub(in crate::analysis::simulate) fn flush_writes_l2_first(&self) -> bool {
        self.on_l2 && self.entries.iter().any(|e| e.dirty)
    }

    /// The image stays dirty in QEMU's memory from here on (a repair on
    /// open that did not mark it clean): refcounts need not be accurate.
    pub(in crate::analysis::simulate) fn set_lazy(&mut self) {
        self.lazy = true;
    }

    /// Whether the image is dirty in QEMU's memory after a repair on open
    /// ([`Self::set_lazy`]).
    pub(in crate::analysis::simulate) fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// What the cache wrote back is not known, for `why`.
    pub(in crate::analysis::simulate) fn give_up(&mut self, why: String) {
        self.unknown.get_or_insert(why);
    }

    /// The step from which changes of the block at cluster `block` are
    /// still only in the cache.
    pub(in crate::analysis::simulate) fn held_from(&self, block: u64) -> usize {
        self.written.get(&block).copied().unwrap_or(0)
    }

    /// Why what the cache wrote back is not known, if it is not.
    pub(in crate::analysis::simulate) fn unknown(&self) -> Option<&str> {
        self.unknown.as_deref()
    }
}

impl Sim {
    /// A refcount in the refcount block at cluster `block` is looked at (or,
    /// `dirty`, changed) through QEMU's refcount cache.
    pub(in crate::analysis::simulate) fn refcount_block_used(&mut self, block: u64, dirty: bool) {
        if !self.unflushed.on {
            return;
        }
        let step = self.steps.len();
        if self.unflushed.rc.use_block(block, dirty, step) {
            self.l2_written_back();
        }
    }

    /// `update_refcount` lowers refcounts: the refcount cache depends on
    /// the L2 cache from here on.
    pub(in crate::analysis::simulate) fn refcounts_released(&mut self) {
        let step = self.steps.len();
        self.unflushed.rc.release(step);
    }

    /// QEMU writes its refcount cache back (`qcow2_cache_flush`).
    pub(in crate::analysis::simulate) fn refcounts_flushed(&mut self) {
        let step = self.steps.len();
        if self.unflushed.rc.flush(step) {
            self.l2_written_back();
        }
    }

    /// QEMU empties its refcount cache (`qcow2_cache_empty`, as the rebuild
    /// of the refcount structure starts).
    pub(in crate::analysis::simulate) fn refcount_cache_emptied(&mut self) {
        let step = self.steps.len();
        if self.unflushed.rc.empty(step) {
            self.l2_written_back();
        }
    }

    /// The first block status of the operation (QEMU's
    /// `qcow2_co_block_status`, which on its first call in an open runs
    /// `qcow2_detect_metadata_preallocation`): refcounts are read from
    /// cluster 0 on, one cluster at a time, until as many clusters are in
    /// use as the file has stored on disk and a ninth more (or two more),
    /// or the file ends (its length as it stands now, grown by data and
    /// metadata writes alike: `bdrv_co_getlength` of the host file). With
    /// fewer clusters in use than that, every refcount block of the file
    /// is read, in order; what the file has on
    /// disk now is only known as far as a lower bound (as the file was,
    /// less every cluster freed since and what a cut took): QEMU asks the
    /// host file system (`bdrv_co_get_allocated_file_size`, st_blocks),
    /// whose answer depends on how it allocates (its block size, room it
    /// preallocates past the end, holes a punch leaves). So when the count
    /// may stop earlier than the last block the cache is not followed; the
    /// count itself stops at the cluster that reaches the lower bound's
    /// threshold.
    pub(in crate::analysis::simulate) fn block_status_asked(&mut self) {
        let log = &mut self.unflushed;
        if !log.on || std::mem::replace(&mut log.detected, true) {
            return;
        }
        let cs = self.cs;
        // Every cluster freed may have been punched, and a file cut short
        // lost what it held past the cut.
        let freed = (self.freed.len() as u64).saturating_mul(cs);
        let cut = self.base.len().saturating_sub(self.zero_from);
        let real = self
            .base
            .allocated_size()
            .saturating_sub(freed)
            .saturating_sub(cut)
            .checked_div(cs)
            .unwrap_or(0);
        let threshold = real
            .saturating_mul(10)
            .checked_div(9)
            .unwrap_or(0)
            .max(real.saturating_add(2));
        let end = self.file_len.div_ceil(cs);
        let bb = self.block_bits();
        let last_block = end.saturating_sub(1) >> bb;
        if last_block > 1 << 20 {
            self.unflushed.rc.give_up(
                "after block status read refcounts through more than 2^20 refcount blocks".into(),
            );
            return;
        }
        if end == 0 {
            return;
        }
        let mut in_use = 0u64;
        for ti in 0..=last_block {
            let bc = match self.refcount_block_of(ti) {
                Ok(Some(bc)) => bc,
                Ok(None) => continue,
                Err(e) => {
                    self.unflushed.rc.give_up(format!(
                        "after block status met a refcount block it cannot read ({})",
                        e.text()
                    ));
                    return;
                }
            };
            self.refcount_block_used(bc, false);
            let from = ti << bb;
            let to = from.saturating_add(1 << bb).min(end);
            let order = self.order;
            let data = self.cluster_ro(bc);
            // Cluster by cluster, as QEMU counts: it stops at the cluster
            // that brings the count to the threshold.
            for c in from..to {
                let idx = c & crate::types::low_mask(bb);
                if crate::refcount::get_refcount(data, order, idx) != 0 {
                    in_use = in_use.saturating_add(1);
                    if in_use >= threshold {
                        break;
                    }
                }
            }
            if in_use >= threshold {
                if ti < last_block {
                    self.unflushed.rc.give_up(
                        "after block status, whose first look at the image reads refcounts until as many clusters are in use as the file has allocated on disk (st_blocks) and a ninth more: that may stop before the last refcount block, and how many blocks the host file system allocates for the file (its block size, preallocation past the end, holes it keeps) is not known here".into(),
                    );
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_put_entry_goes_and_a_changed_one_is_written_back() {
        let mut c = RefcountCache::default();
        // Blocks 10, 11, 12, 13 fill the four entries; 10 changed.
        assert!(!c.use_block(10, true, 1));
        for b in [11, 12, 13] {
            assert!(!c.use_block(b, false, 2));
        }
        assert_eq!(c.held_from(10), 0);
        // 11 is used again, so 14 replaces 10 (the oldest), written at 5.
        c.use_block(11, false, 3);
        c.use_block(14, false, 5);
        assert_eq!(c.held_from(10), 5);
        // 12 goes next, unchanged: nothing written.
        c.use_block(15, false, 6);
        assert_eq!(c.held_from(12), 0);
        assert!(c.unknown().is_none());
    }

    #[test]
    fn dependencies_write_the_other_cache_back_first() {
        let mut c = RefcountCache::default();
        c.use_block(1, true, 0);
        // A release: evicting block 1 writes the L2 cache back first, once.
        c.release(1);
        for b in [2, 3, 4] {
            assert!(!c.use_block(b, false, 2));
        }
        assert!(c.use_block(5, true, 3));
        assert_eq!(c.held_from(1), 3);
        // Linked L2 entries, then a release: the refcount cache is written.
        assert!(!c.l2_linked());
        c.release(4);
        assert_eq!(c.held_from(5), 4);
        // Linking while the refcount cache depends on L2: L2 goes first.
        assert!(c.l2_linked());
        c.use_block(5, true, 5);
        // A clean L2 cache written back leaves the refcounts alone.
        c.l2_flushed(false, 6);
        assert_eq!(c.held_from(5), 4);
        c.l2_flushed(true, 7);
        assert_eq!(c.held_from(5), 7);
    }

    #[test]
    fn an_emptied_cache_writes_its_changes_and_fills_from_the_first_entry() {
        let mut c = RefcountCache::default();
        for b in 1..=4 {
            c.use_block(b, b == 2, 0);
        }
        assert!(!c.empty(3));
        assert_eq!(c.held_from(2), 3);
        // Block 5 takes entry 0, then 2 (read again), 6 and 7 the others;
        // block 8 replaces the least recently used, 5, written back then.
        c.use_block(5, true, 4);
        for b in [2, 6, 7] {
            c.use_block(b, false, 5);
        }
        c.use_block(8, false, 6);
        assert_eq!(c.held_from(5), 6);
    }

    #[test]
    fn a_dirty_image_links_l2_entries_without_a_dependency() {
        let mut c = RefcountCache::default();
        c.set_lazy();
        c.use_block(1, true, 0);
        c.release(1);
        // No write-back of the L2 cache first, and none of the refcounts
        // when the L2 cache is written back.
        assert!(!c.l2_linked());
        c.l2_flushed(true, 2);
        assert_eq!(c.held_from(1), 0);
    }
}

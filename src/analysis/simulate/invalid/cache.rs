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
    /// After a new refcount table (`qcow2_refcount_area`, whose use of the
    /// cache is not followed), which entry a block would replace is not
    /// known.
    adrift: bool,
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
                if self.adrift && self.entries.iter().any(|e| e.dirty) {
                    self.unknown.get_or_insert_with(|| {
                        "after a new refcount table (which refcount block QEMU's refcount cache then gave up is not followed)".into()
                    });
                }
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

    /// A new refcount table was made: from here on, which entry a block
    /// replaces is not followed.
    pub(in crate::analysis::simulate) fn set_adrift(&mut self) {
        self.adrift = true;
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

    /// A new refcount table replaced the old one.
    pub(in crate::analysis::simulate) fn refcount_table_replaced(&mut self) {
        self.unflushed.rc.set_adrift();
    }

    /// The first block status of the operation (QEMU's
    /// `qcow2_co_block_status`, which on its first call in an open runs
    /// `qcow2_detect_metadata_preallocation`): refcounts are read from
    /// cluster 0 on, one cluster at a time, until as many clusters are in
    /// use as the file has stored on disk and a ninth more (or two more),
    /// or the file ends. With fewer clusters in use than that, every
    /// refcount block of the file is read, in order; what the file has on
    /// disk now is only known as far as a lower bound (as the file was,
    /// less every cluster freed since and what a cut took), so when the
    /// count may stop earlier than the last block the cache is not
    /// followed.
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
        let end = self.written_len.div_ceil(cs);
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
            for c in from..to {
                let idx = c & crate::types::low_mask(bb);
                if crate::refcount::get_refcount(data, order, idx) != 0 {
                    in_use = in_use.saturating_add(1);
                }
            }
            if in_use >= threshold && ti < last_block {
                self.unflushed.rc.give_up(
                    "after block status, whose first look at the image reads refcounts until as many clusters are in use as the file stores on disk (and a ninth more), which may stop before the last refcount block".into(),
                );
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
    fn after_a_new_refcount_table_an_eviction_of_a_change_is_not_followed() {
        let mut c = RefcountCache::default();
        c.set_adrift();
        for b in 1..=4 {
            c.use_block(b, false, 0);
        }
        c.use_block(5, false, 1);
        assert!(c.unknown().is_none());
        c.use_block(5, true, 2);
        c.use_block(6, false, 3);
        assert!(c.unknown().is_some());
    }
}

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

use super::super::overlap::Meta;
use super::super::{Sim, SimError, SimResult, Target};
use crate::types::HostOffset;

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

    /// The changed block a look at the block at cluster `block` would write
    /// back first: none when the block is in the cache, or when the entry
    /// whose place it takes is unchanged.
    fn evicts_changed(&self, block: u64) -> Option<u64> {
        if self.entries.iter().any(|e| e.block == Some(block)) {
            return None;
        }
        let mut victim: Option<&Entry> = None;
        for e in &self.entries {
            if victim.is_none_or(|v| e.lru < v.lru) {
                victim = Some(e);
            }
        }
        victim.filter(|e| e.dirty).and_then(|e| e.block)
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

/// Why a look at a refcount block in a [`ReleaseWatch`] fails.
#[derive(Clone, Debug)]
enum Stop {
    /// The eviction of a changed block writes the L2 cache back first,
    /// which the overlap check stops at the slice starting here.
    Slice(HostOffset),
    /// What the eviction does is not followed (the reason).
    Refused(String),
}

/// QEMU's refcount cache through an operation's releases (a refcount walk
/// with addend -1, a discard, a write-zeroes with unmap), from a point
/// where it held nothing changed (the flush of a new snapshot table, the
/// start of the walk, the open). From a release on it waits on the L2
/// cache (`qcow2_cache_set_dependency` in `update_refcount`): the eviction
/// of a changed block (`qcow2_cache_do_get` → `qcow2_cache_entry_flush`)
/// writes the whole L2 cache back first. While the L2 cache holds a
/// changed slice the overlap check stops, that write-back fails there: the
/// image is marked corrupt (the first time), the eviction fails with EIO
/// and so does the look at the refcount (nothing is changed in the block
/// asked for), which ends a walk; a discard's or write-zeroes' release
/// only reports it, and the operation goes on in the caches. Otherwise the
/// L2 cache is written (and waited on no more until the next release) and
/// then the evicted block, with every change it held. What the cache still
/// holds when the walk fails, when the flush after the operation stops at
/// the L2 cache, or once the image is marked corrupt, is never written.
#[derive(Debug, Default)]
pub(in crate::analysis::simulate) struct ReleaseWatch {
    rc: RefcountCache,
    /// Per refcount block (its cluster), each refcount changed since the
    /// block was last written, with the value the file has for it, in the
    /// order changed (a cluster changed twice: its first entry has the
    /// file's value).
    disk: BTreeMap<u64, Vec<(u64, u64)>>,
    /// The changed L2 slices (where each starts) whose write-back the
    /// overlap check stops, in the order they were changed.
    stopped: Vec<HostOffset>,
    /// The first changed slice the overlap check stops, even if its table
    /// was freed since.
    first_stopped: Option<HostOffset>,
    /// Why the first look that failed did, once one has, and the step.
    stop: Option<(Stop, usize)>,
    /// A look failed whose error has not been given yet.
    pending: bool,
    /// The first failure's error was given (the image marked corrupt).
    given: bool,
    /// The changed blocks written back to make room for others, in order.
    written: Vec<u64>,
    /// The step it started at.
    from: usize,
    /// The blocks whose write the overlap check was found to let through
    /// (nothing it knows of moves in a release).
    clear: std::collections::HashSet<u64>,
    /// How many looks failed where the overlap check stopped the L2
    /// cache's write-back (each error given).
    failures: usize,
    /// The clusters whose release (`qcow2_free_clusters`) failed so.
    unfreed: Vec<u64>,
}

impl ReleaseWatch {
    /// When a look at a refcount block failed where the overlap check
    /// stopped the L2 cache's write-back: the first slice the walk changed
    /// of those the check stops.
    pub(in crate::analysis::simulate) fn failed_after(&self) -> Option<HostOffset> {
        match self.stop {
            Some((Stop::Slice(_), _)) => self.first_stopped,
            _ => None,
        }
    }

    /// Why the case is not followed, when a look met one that is not.
    pub(in crate::analysis::simulate) fn refused(&self) -> Option<String> {
        match &self.stop {
            Some((Stop::Refused(why), _)) => Some(why.clone()),
            _ => None,
        }
    }

    /// The clusters whose release failed at a look that met the check.
    pub(in crate::analysis::simulate) fn unfreed(&self) -> &[u64] {
        &self.unfreed
    }

    /// The step at which the first look failed (the image was marked
    /// corrupt), if one did.
    pub(in crate::analysis::simulate) fn failed_at(&self) -> Option<usize> {
        self.stop.as_ref().map(|s| s.1)
    }
}

impl Sim {
    /// Follow QEMU's refcount cache through an operation's releases
    /// ([`ReleaseWatch`]), which held nothing changed at step `from`: the
    /// refcount changes recorded since (the release of an old snapshot
    /// table) are taken first, in order.
    pub(in crate::analysis::simulate) fn release_watch_start(&mut self, from: usize) {
        let changes: Vec<(u64, u64, u64, u64)> = self
            .steps
            .iter()
            .skip(from)
            .filter_map(|c| match c.target {
                Target::Refcount { cluster } => Some((cluster, c.count, c.before, c.after)),
                _ => None,
            })
            .collect();
        self.unflushed.watch = Some(ReleaseWatch {
            from,
            ..Default::default()
        });
        let bb = self.block_bits();
        for (cluster, count, before, after) in changes {
            if after < before
                && let Some(w) = self.unflushed.watch.as_mut()
            {
                w.rc.release(self.steps.len());
            }
            for k in 0..count {
                let c = cluster.saturating_add(k);
                if let Ok(Some(bc)) = self.refcount_block_of(c >> bb) {
                    self.release_watch_use(bc, true);
                    self.release_watch_changed(bc, c, before, after);
                }
            }
        }
    }

    /// A [`ReleaseWatch`] from the start of an operation that releases
    /// clusters in QEMU's caches (a discard, a write-zeroes with unmap),
    /// whose refcount cache is empty at the open: not when the open changed
    /// anything (a repair).
    pub(in crate::analysis::simulate) fn release_watch_from_open(&mut self) {
        if self.steps.is_empty() && !self.repair_left_dirty() {
            self.release_watch_start(0);
        }
    }

    /// Whether an operation followed by watch `w` raised a refcount (an
    /// allocation, which the watch does not follow: it takes every change
    /// as a release).
    pub(in crate::analysis::simulate) fn release_watch_allocated(&self, w: &ReleaseWatch) -> bool {
        self.steps
            .iter()
            .skip(w.from)
            .any(|c| matches!(c.target, Target::Refcount { .. }) && c.after > c.before)
    }

    /// The walk is over: what the watch knows, if one was under way.
    pub(in crate::analysis::simulate) fn release_watch_end(&mut self) -> Option<ReleaseWatch> {
        self.unflushed.watch.take()
    }

    /// In a [`ReleaseWatch`], a look at the refcount block at cluster
    /// `block` (changed, `dirty`).
    fn release_watch_use(&mut self, block: u64, dirty: bool) {
        let step = self.steps.len();
        let Some(w) = self.unflushed.watch.as_mut() else {
            return;
        };
        if matches!(w.stop, Some((Stop::Refused(_), _))) {
            return;
        }
        // Each change is a release, which makes the cache wait on the L2
        // cache again before the block is looked up.
        if dirty {
            w.rc.release(step);
        }
        let Some(victim) = w.rc.evicts_changed(block) else {
            w.rc.use_block(block, dirty, step);
            return;
        };
        if w.rc.on_l2
            && let Some(&at) = w.stopped.first()
        {
            w.stop.get_or_insert((Stop::Slice(at), step));
            w.pending = true;
            return;
        }
        let known = w.clear.contains(&victim);
        let voff = self.cluster_start(victim);
        if !known && let Some(m) = self.overlap_of(Some(Meta::RefcountBlock), voff, self.cs) {
            if let Some(w) = self.unflushed.watch.as_mut() {
                w.stop = Some((
                    Stop::Refused(format!(
                        "a release in which QEMU's refcount cache writes the changed refcount block at {voff:#x} back to make room for another, a write the overlap check stops (it overlaps the {})",
                        m.name()
                    )),
                    step,
                ));
                w.pending = true;
            }
            return;
        }
        if let Some(w) = self.unflushed.watch.as_mut() {
            if w.clear.insert(victim) {
                w.written.push(victim);
            }
            w.disk.remove(&victim);
            w.rc.use_block(block, dirty, step);
        }
    }

    /// Why the last look at a refcount block failed in a [`ReleaseWatch`],
    /// if it did: the overlap check stopped the L2 cache's write-back (the
    /// first time, the image is marked corrupt), or the case is not
    /// followed.
    pub(in crate::analysis::simulate) fn release_watch_stop(&mut self) -> Option<SimError> {
        let w = self.unflushed.watch.as_mut()?;
        if !std::mem::take(&mut w.pending) {
            return None;
        }
        let (stop, _) = w.stop.clone()?;
        if matches!(stop, Stop::Slice(_)) {
            w.failures = w.failures.saturating_add(1);
        }
        if matches!(stop, Stop::Slice(_)) && std::mem::replace(&mut w.given, true) {
            return Some(SimError::Qemu("Input/output error (QEMU's refcount cache gives the place of a changed block to another one, and the L2 cache it waits on, written back first, is stopped again by the overlap check)".into()));
        }
        Some(match stop {
            Stop::Refused(why) => SimError::NotModelled(why),
            Stop::Slice(at) => {
                let len = self.slice_of(at, 0).1;
                match self.overlap_of(Some(Meta::ActiveL2), at, len) {
                    Some(m) => {
                        self.note(format!("QEMU's refcount cache gives the place of a changed refcount block to another one: it waits on the L2 cache since a release, so the L2 cache is written back first, and the overlap check stops its changed slice at {at:#x}; the look at the refcount fails with EIO"));
                        self.overlap_stopped(m, at)
                    }
                    None => SimError::NotModelled(format!(
                        "the L2 slice at {at:#x} overlapped metadata when the walk changed it but not when QEMU's refcount cache wrote the L2 cache back"
                    )),
                }
            }
        })
    }

    /// Whether, in a [`ReleaseWatch`], a look at the refcount block at
    /// cluster `block` would write a changed block back (the walk's bulk
    /// path leaves such an entry to the one-by-one path).
    pub(in crate::analysis::simulate) fn release_watch_evicts(&self, block: u64) -> bool {
        self.unflushed
            .watch
            .as_ref()
            .is_some_and(|w| w.stop.is_some() || w.rc.evicts_changed(block).is_some())
    }

    /// How many looks at a refcount block in a [`ReleaseWatch`] failed
    /// where the overlap check stopped the L2 cache's write-back.
    pub(in crate::analysis::simulate) fn release_watch_failures(&self) -> usize {
        self.unflushed.watch.as_ref().map_or(0, |w| w.failures)
    }

    /// In a [`ReleaseWatch`], the release of the clusters from `first`
    /// (`count` of them) failed at such a look.
    pub(in crate::analysis::simulate) fn release_watch_unfreed(&mut self, first: u64, count: u64) {
        if let Some(w) = self.unflushed.watch.as_mut() {
            w.unfreed
                .extend((0..count).map_while(|k| first.checked_add(k)));
        }
    }

    /// Whether the last look at a refcount block in a [`ReleaseWatch`]
    /// failed (its error not given yet).
    pub(in crate::analysis::simulate) fn release_watch_pending(&self) -> bool {
        self.unflushed.watch.as_ref().is_some_and(|w| w.pending)
    }

    /// What a [`ReleaseWatch`] met is not followed, for `why`: the
    /// operation is refused.
    pub(in crate::analysis::simulate) fn release_watch_refuse(&mut self, why: String) {
        let step = self.steps.len();
        if let Some(w) = self.unflushed.watch.as_mut() {
            if !matches!(w.stop, Some((Stop::Refused(_), _))) {
                w.stop = Some((Stop::Refused(why), step));
            }
            w.pending = true;
        }
    }

    /// Whether QEMU's refcount cache holds the block at cluster `c` in a
    /// [`ReleaseWatch`]: freeing that cluster drops the block from the
    /// cache with what it held (`qcow2_cache_discard`), which is not
    /// followed.
    pub(in crate::analysis::simulate) fn release_watch_holds(&self, c: u64) -> bool {
        self.unflushed
            .watch
            .as_ref()
            .is_some_and(|w| w.rc.entries.iter().any(|e| e.block == Some(c)))
    }

    /// In a [`ReleaseWatch`], cluster `c`'s refcount, which the file has as
    /// `disk` when not changed since its block (at cluster `block`) was
    /// written, is set to `new`: a table freed (0) leaves QEMU's L2 cache,
    /// with the changes of its first slice.
    pub(in crate::analysis::simulate) fn release_watch_changed(
        &mut self,
        block: u64,
        c: u64,
        disk: u64,
        new: u64,
    ) {
        let start = self.cluster_start(c);
        let Some(w) = self.unflushed.watch.as_mut() else {
            return;
        };
        w.disk.entry(block).or_default().push((c, disk));
        if new == 0 {
            w.stopped.retain(|&at| at != start);
        }
    }

    /// In a [`ReleaseWatch`], the walk changed the L2 slice at `at`, whose
    /// write-back the overlap check stops.
    pub(in crate::analysis::simulate) fn release_watch_slice(&mut self, at: HostOffset) {
        if let Some(w) = self.unflushed.watch.as_mut()
            && !w.stopped.contains(&at)
        {
            w.first_stopped.get_or_insert(at);
            w.stopped.push(at);
        }
    }

    /// What the refcount cache of watch `w` still held is never written
    /// (the walk failed, or the flush after it stopped at the L2 cache):
    /// each refcount changed since its block was last written goes back to
    /// what the file has.
    pub(in crate::analysis::simulate) fn release_watch_lost(
        &mut self,
        w: ReleaseWatch,
    ) -> SimResult<()> {
        if !w.written.is_empty() {
            const NAMED: usize = 8;
            let mut blocks: Vec<String> = w
                .written
                .iter()
                .take(NAMED)
                .map(|&b| format!("{:#x}", self.cluster_start(b)))
                .collect();
            if let Some(more) = w.written.len().checked_sub(NAMED).filter(|&n| n > 0) {
                blocks.push(format!("{more} more"));
            }
            self.note(format!(
                "QEMU's refcount cache wrote changed refcount blocks back during the walk, each when its place went to another block (the L2 cache it waits on written first, holding nothing the overlap check stops), so the changes each held then stay: the block(s) at {}",
                blocks.join(", ")
            ));
        }
        let mut lost: Vec<(u64, u64)> = w.disk.into_values().flatten().collect();
        // Stable: of a cluster's entries the first, the file's value, stays.
        lost.sort_by_key(|&(c, _)| c);
        lost.dedup_by_key(|&mut (c, _)| c);
        let saved = self.reason.clone();
        self.why("lost: after a release QEMU's refcount cache waits on its L2 cache, whose write the overlap check stops, so the change is never written");
        let mut restored = std::collections::HashSet::new();
        for (c, disk) in lost {
            let now = self.get_refcount(c)?;
            if now != disk {
                self.put_refcount(c, disk)?;
                self.record(Target::Refcount { cluster: c }, now, disk);
                restored.insert(c);
            }
        }
        self.reason = saved;
        self.keep_freed_not_restored(&restored);
        Ok(())
    }

    /// A refcount in the refcount block at cluster `block` is looked at (or,
    /// `dirty`, changed) through QEMU's refcount cache.
    pub(in crate::analysis::simulate) fn refcount_block_used(&mut self, block: u64, dirty: bool) {
        if self.unflushed.watch.is_some() {
            self.release_watch_use(block, dirty);
        }
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
        if let Some(w) = self.unflushed.watch.as_mut() {
            w.rc.release(step);
        }
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
    fn a_miss_names_the_changed_block_it_would_write_back() {
        let mut c = RefcountCache::default();
        // Room left: nothing written back.
        c.use_block(1, true, 0);
        assert_eq!(c.evicts_changed(2), None);
        for b in [2, 3, 4] {
            c.use_block(b, b != 2, 1);
        }
        // Full: block 1 is the oldest and changed; a hit writes nothing.
        assert_eq!(c.evicts_changed(5), Some(1));
        assert_eq!(c.evicts_changed(3), None);
        // Block 1 used again: block 2 goes next, unchanged.
        c.use_block(1, false, 2);
        assert_eq!(c.evicts_changed(5), None);
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

//! An L2 entry QEMU calls invalid (`QCOW2_SUBCLUSTER_INVALID`, extended L2
//! only): a data cluster whose bitmap has a subcluster both allocated and
//! zero, or an unallocated cluster with allocation bits. Whatever subcluster
//! of it QEMU asks about, the answer is the same: every path that looks at
//! its subcluster type (block status, which a partial write-zeroes and a
//! copy-on-read ask; a guest write's `calculate_l2_meta`, for the first and
//! the last cluster it covers; `qcow2_get_host_offset`) calls
//! `qcow2_signal_corruption`, fatal: the corrupt bit is set in the header at
//! once ([`Sim::mark_corrupt`]: `qcow2_update_header` writes the header
//! cluster anew, the disk size rounded down to 512 bytes), and the image is unusable from then on, so nothing QEMU holds
//! in its caches is written afterwards.
//!
//! What the operation changed before it got there is sorted by where QEMU
//! keeps it ([`Unflushed`]): data, new L2 tables, L1 entries, new refcount
//! blocks and refcount table entries are written to the file as they are
//! made, and stay; L2 entries and refcounts sit in QEMU's L2 and refcount
//! caches until something writes the caches back (a new L2 table: both; a
//! new refcount block: both; a grown L1 table: the refcounts), or the
//! refcount cache, four blocks, gives a changed block's place to another
//! one ([`cache`], which follows it block by block, and the L2 cache it
//! writes back first after a release), or the L2 cache gives a changed
//! slice's place to another one ([`l2cache`], slice by slice), and what is
//! still there is lost. A guest write's own L2 entries are later still:
//! QEMU sets them once the request's data is written, after every piece of
//! the request has been placed, so a piece that meets the entry finds none
//! of them in the cache.

mod backs;
mod cache;
mod l2cache;
mod lazy;

/// QEMU's refcount cache entries (`MIN_REFCOUNT_CACHE_SIZE` blocks, its default).
pub(super) const REFCOUNT_CACHE_ENTRIES: u64 = cache::ENTRIES as u64;
pub(super) use cache::ReleaseWatch;

use std::collections::HashMap;

use super::{Sim, SimError, SimResult, Target};
use crate::header::Field;
use crate::tables::{L1Entry, L2Entry, SubclusterType};
use crate::types::{GuestOffset, HostOffset};

/// The most L2 entry changes the log keeps at once (those QEMU's L2 cache
/// holds unwritten, and a write request's entries waiting for its data),
/// to bound its memory; past it, meeting an invalid entry is not simulated.
const MAX_LOGGED: usize = 1 << 22;

/// One L2 entry an operation changed through QEMU's L2 cache.
#[derive(Clone, Copy, Debug)]
struct L2Write {
    /// Its place in the log.
    seq: u64,
    table: HostOffset,
    index: u64,
    raw: u64,
    bitmap: u64,
    /// The step from which the change sits in QEMU's cache (a cache write
    /// back at an earlier step does not carry it); `usize::MAX` while it
    /// waits for its write request's data.
    live_from: usize,
}

/// What of one operation's metadata changes QEMU would still hold in its
/// caches, for the case that it meets an invalid entry and drops them.
#[derive(Debug, Default)]
pub(super) struct Unflushed {
    /// Whether this operation's use of the caches is followed (a write, a
    /// write-zeroes or a copy-on-read), for an invalid entry (extended L2)
    /// or the overlap check to stop it.
    on: bool,
    /// On an image with lazy refcounts, a write's L2 entries were linked,
    /// which marks the image dirty ([`Sim::l2_link`]).
    dirtied: bool,
    /// L2 entries changed that QEMU's L2 cache holds unwritten, by the
    /// offset of their slice, with their values before.
    l2: HashMap<u64, Vec<L2Write>>,
    /// A write request's L2 entries that wait for its data, in order.
    deferred: Vec<L2Write>,
    /// Entries in `l2` and `deferred`, and entries logged so far.
    logged: usize,
    seq: u64,
    /// More were changed than the log keeps.
    overflow: bool,
    /// QEMU's L2 cache.
    l2c: l2cache::L2Cache,
    /// A changed slice the overlap check stops was evicted (QEMU's
    /// operation fails at that look at the cache).
    evicted_held: Option<u64>,
    /// The step at which QEMU last wrote the L2 cache back.
    written_at: usize,
    /// The write-backs of the whole L2 cache, in order: the step, whether a
    /// write's link made it, and the slices it carried ([`backs`]).
    l2_backs: Vec<(usize, bool, Vec<u64>)>,
    /// QEMU's refcount cache.
    rc: cache::RefcountCache,
    /// QEMU's refcount cache through an operation's releases.
    watch: Option<cache::ReleaseWatch>,
    /// The first block status of the operation has read its refcounts.
    detected: bool,
    /// `allocated` and `freed` as the operation found them.
    lists_from: (usize, usize),
    /// The write request under way: its pieces so far, the piece that set
    /// the first of its deferred entries, and the later pieces in which the
    /// caches were written back.
    request: Option<(u64, Option<u64>, Vec<u64>)>,
}

impl Unflushed {
    /// The whole L2 cache was written back: every change it held is in the
    /// file.
    fn all_written(&mut self) {
        self.l2c.flushed();
        let carried: usize = self.l2.values().map(Vec::len).sum();
        self.logged = self.logged.saturating_sub(carried);
        self.l2.clear();
    }

    /// An eviction wrote the slice at `slice` back: the changes it held
    /// are in the file.
    fn slice_written(&mut self, slice: u64) {
        if let Some(v) = self.l2.remove(&slice) {
            self.logged = self.logged.saturating_sub(v.len());
        }
    }
}

impl Sim {
    /// Start the log of operation `op` (before its open's work).
    pub(super) fn begin_cache_log(&mut self, op: &super::Op) {
        use super::Op;
        let on = matches!(
            op,
            Op::Write { .. } | Op::WriteZeroes { .. } | Op::Read { .. }
        );
        self.unflushed = Unflushed {
            on,
            l2c: l2cache::L2Cache::new(usize::try_from(self.l2_cache_entries()).unwrap_or(1)),
            lists_from: (self.allocated.len(), self.freed.len()),
            ..Default::default()
        };
    }

    /// Whether this operation's use of QEMU's caches is followed.
    pub(super) fn caches_followed(&self) -> bool {
        self.unflushed.on
    }

    /// The open's repair of a dirty image is done. Its refcount changes
    /// went through QEMU's refcount cache as any operation's do (a
    /// rebuild's new blocks and table aside, written directly; the check
    /// reads and writes L2 tables directly, never through the L2 cache).
    /// Unless it marked the image clean, which writes the caches back, the
    /// image stays dirty in QEMU's memory for the operation.
    pub(super) fn repaired_on_open(&mut self) {
        let features = self.header_field(Field::IncompatibleFeatures);
        if features & crate::header::INCOMPAT_DIRTY != 0 {
            self.unflushed.rc.set_lazy();
        }
    }

    /// Whether the open's repair left the image dirty in QEMU's memory
    /// ([`Sim::repaired_on_open`]): refcounts need not be accurate
    /// (`qcow2_need_accurate_refcounts`), so the flush after a request
    /// (`qcow2_write_caches`) writes the L2 cache only.
    pub(super) fn repair_left_dirty(&self) -> bool {
        self.unflushed.rc.is_lazy()
    }

    /// Entry `index` of the L2 table at `table` is about to change from
    /// `raw`/`bitmap` through QEMU's L2 cache.
    pub(super) fn log_l2_write(&mut self, table: HostOffset, index: u64, raw: u64, bitmap: u64) {
        let steps = self.steps.len();
        let slice = self.slice_key(table, index);
        let log = &mut self.unflushed;
        if !log.on || log.overflow {
            return;
        }
        if log.logged >= MAX_LOGGED {
            log.overflow = true;
            log.l2 = HashMap::new();
            log.deferred = Vec::new();
            return;
        }
        log.logged = log.logged.saturating_add(1);
        log.seq = log.seq.saturating_add(1);
        let mut w = L2Write {
            seq: log.seq,
            table,
            index,
            raw,
            bitmap,
            live_from: steps,
        };
        if let Some((piece, first, _)) = &mut log.request {
            first.get_or_insert(*piece);
            w.live_from = usize::MAX;
            log.deferred.push(w);
            return;
        }
        log.l2.entry(slice).or_default().push(w);
        self.l2_slice_changed(table, index);
    }

    /// QEMU writes the whole L2 cache back (`qcow2_cache_flush` of the L2
    /// cache, as `l2_allocate` ends: the new slices among them). The
    /// refcount cache, which the L2 cache may depend on, goes first.
    pub(super) fn l2_cache_flushed(&mut self) {
        let step = self.steps.len();
        self.unflushed.rc.l2_flushed(true, step);
        self.l2_written_back();
    }

    /// `alloc_refcount_block` writes the L2 cache back before it makes a
    /// new refcount block; like every write-back of the L2 cache, it counts
    /// as one inside the write request under way.
    pub(super) fn l2_flushed_for_refblock(&mut self) {
        let step = self.steps.len();
        let dirty = self.l2_dirty();
        self.unflushed.rc.l2_flushed(dirty, step);
        self.l2_written_back();
    }

    /// Whether the slice holding entry `index` of the L2 table at `l2`
    /// holds changes QEMU's L2 cache has not written back; `None` when that
    /// is not known (the operation's use of the cache is not followed, or
    /// its log overflowed).
    pub(super) fn l2_slice_unwritten(&self, l2: HostOffset, index: u64) -> Option<bool> {
        let log = &self.unflushed;
        if !log.on || log.overflow {
            return None;
        }
        Some(log.l2.contains_key(&self.slice_key(l2, index)))
    }

    /// Whether a write-back of QEMU's whole refcount cache now writes the L2
    /// cache first (the refcount cache waits on it since a release).
    pub(super) fn refcount_flush_writes_l2_first(&self) -> bool {
        self.unflushed.rc.flush_writes_l2_first()
    }

    /// Whether a write request is under way.
    pub(super) fn in_write_request(&self) -> bool {
        self.unflushed.request.is_some()
    }

    /// Whether QEMU's L2 cache holds changes not yet written back.
    fn l2_dirty(&self) -> bool {
        let log = &self.unflushed;
        log.overflow || log.l2c.any_dirty()
    }

    /// QEMU's L2 cache is written back, all of it.
    pub(super) fn l2_written_back(&mut self) {
        let log = &mut self.unflushed;
        log.written_at = self.steps.len();
        if log.l2_backs.len() < MAX_LOGGED {
            let carried: Vec<u64> = log.l2.keys().copied().collect();
            log.l2_backs.push((log.written_at, false, carried));
        }
        log.all_written();
        if let Some((piece, Some(first), later)) = &mut log.request
            && *piece > *first
            && later.last() != Some(piece)
        {
            later.push(*piece);
        }
    }

    /// A guest write request starts; `false` when one is under way already.
    pub(super) fn request_begin(&mut self) -> bool {
        if self.unflushed.request.is_some() {
            return false;
        }
        self.unflushed.request = Some((0, None, Vec::new()));
        true
    }

    /// The request's next piece (`qcow2_alloc_host_offset`) starts.
    pub(super) fn request_piece(&mut self) {
        if let Some((piece, _, _)) = &mut self.unflushed.request {
            *piece = piece.saturating_add(1);
        }
    }

    /// The request ends: its L2 entries are set now, in the cache (linked:
    /// the L2 cache depends on the refcount cache from here on, unless the
    /// link marked an image with lazy refcounts dirty), each slice taken
    /// from the cache in turn (`qcow2_alloc_cluster_link_l2`).
    pub(super) fn request_end(&mut self) {
        let steps = self.steps.len();
        let linked = !self.unflushed.deferred.is_empty();
        if linked && self.unflushed.on && !self.unflushed.dirtied && self.unflushed.rc.l2_linked() {
            self.l2_written_back();
            if let Some(last) = self.unflushed.l2_backs.last_mut() {
                last.1 = true;
            }
        }
        self.unflushed.request = None;
        for mut w in std::mem::take(&mut self.unflushed.deferred) {
            w.live_from = steps;
            self.l2_slice_get(w.table, w.index);
            let slice = self.slice_key(w.table, w.index);
            self.unflushed.l2.entry(slice).or_default().push(w);
            self.l2_slice_put(w.table, w.index, true);
        }
    }

    /// Why the operation is not simulated, when QEMU's L2 cache gave the
    /// place of a changed slice whose write-back the overlap check stops
    /// to another slice: the operation fails at that look at the cache, with
    /// what was written back until then, which is not followed.
    pub(super) fn held_evicted(&self) -> Option<String> {
        self.unflushed.evicted_held.map(|slice| {
            format!(
                "QEMU's L2 cache gave the place of the changed L2 slice at {slice:#x}, whose write-back the overlap check stops, to another slice (the operation fails there)"
            )
        })
    }

    /// The L2 table the active L1 table names for guest `g`, if any (none
    /// past the end of the L1 table, or for an entry of offset 0).
    pub(super) fn l2_table_of(&self, g: GuestOffset) -> Option<HostOffset> {
        self.l1
            .get(self.geo.l1_index(g) as usize)
            .and_then(L1Entry::l2_offset)
            .filter(|&o| o != HostOffset(0))
    }

    /// QEMU meets the invalid L2 entry of guest `g` in `what` (an operation,
    /// in words): what its caches hold of this operation's changes is lost,
    /// the image is marked corrupt and the operation fails as `failure`
    /// says. When what the caches hold is not known, it is not simulated.
    pub(super) fn invalid_entry_met(
        &mut self,
        g: GuestOffset,
        what: &str,
        failure: String,
    ) -> SimError {
        if let Some(e) = self.caches_lost(|| {
            format!(
                "{what} that meets the L2 entry of guest {g:#x}, whose bits contradict each other,"
            )
        }) {
            return e;
        }
        let l2 = self.l2_table_of(g).unwrap_or_default();
        // QEMU names the entry by its index in the L2 slice it loaded.
        let slice = self.slice_entries().max(1);
        let index = self.geo.l2_index(g).checked_rem(slice).unwrap_or(0);
        let r = self.mark_corrupt(format!(
            "Marking image as corrupt: Invalid cluster entry found (L2 offset: {l2:#x}, L2 index: {index:#x})"
        ));
        match r {
            Ok(()) => SimError::Qemu(failure),
            Err(e) => e,
        }
    }

    /// QEMU stops this operation for good (`qcow2_signal_corruption`: the
    /// image is unusable from then on): what its caches hold of the
    /// operation's changes is lost, and undone here. `Some` with the error
    /// when what they hold is not known (the operation is not simulated:
    /// `what` names it, in words) or the undoing fails.
    pub(super) fn caches_lost(&mut self, what: impl FnOnce() -> String) -> Option<SimError> {
        if self.steps.iter().any(|c| !matches!(c.target, Target::Note)) {
            let (l2_mark, rc_mark) = self.cache_marks();
            if let Some(why) = self.cache_unknown() {
                return Some(SimError::NotModelled(format!("{} {why}", what())));
            }
            if let Err(e) = self.drop_cached(l2_mark, rc_mark) {
                return Some(e);
            }
        }
        None
    }

    /// The step from which QEMU's caches still hold what changed: for L2
    /// entries (from the last write-back of the L2 cache), and for
    /// refcounts (a floor: [`cache::RefcountCache`] says, block by block,
    /// what its write-backs carried).
    fn cache_marks(&self) -> (usize, usize) {
        let mut all = 0;
        let mut refcounts = 0;
        for (i, c) in self.steps.iter().enumerate() {
            match c.target {
                // alloc_refcount_block writes both caches back before it
                // hooks a new block up; a new refcount table likewise.
                Target::RefcountTableEntry { .. }
                | Target::Header {
                    field: Field::RefcountTableOffset,
                } => all = all.max(i),
                // qcow2_grow_l1_table writes the refcounts back.
                Target::Header {
                    field: Field::L1TableOffset,
                } => refcounts = refcounts.max(i),
                _ => {}
            }
        }
        (all.max(self.unflushed.written_at), refcounts.max(all))
    }

    /// Why what QEMU's caches hold at this point is not known, if it is not.
    fn cache_unknown(&self) -> Option<String> {
        let log = &self.unflushed;
        if !log.on {
            return Some("in an operation whose use of QEMU's caches is not followed".into());
        }
        if log.overflow {
            return Some(format!(
                "after QEMU's L2 cache came to hold more than {MAX_LOGGED} changed L2 entries of it at once (not kept, to bound the simulation's memory)"
            ));
        }
        if log
            .request
            .as_ref()
            .is_some_and(|(_, _, later)| later.len() > 1)
        {
            return Some("after two later pieces of its write request wrote QEMU's caches back while its first L2 entries waited for their data (whether QEMU set those entries in between, to be written back by the second, depends on when its data writes finished)".into());
        }
        if let Some(why) = self.held_evicted() {
            return Some(format!("after {why}"));
        }
        self.unflushed.rc.unknown().map(str::to_owned)
    }

    /// Put back, newest first, every L2 entry changed since step `mark`
    /// that QEMU's L2 cache still holds (or that waits for a write's data),
    /// each change recorded with the reason `lost` gives it; `per_bitmap`
    /// names a subcluster bitmap's change as such.
    fn undo_l2_from(
        &mut self,
        mark: usize,
        lost: impl Fn(&L2Write) -> &'static str,
        per_bitmap: bool,
    ) -> SimResult<()> {
        let log = &self.unflushed;
        let mut l2: Vec<L2Write> = log
            .l2
            .values()
            .flatten()
            .chain(log.deferred.iter())
            .filter(|w| w.live_from >= mark)
            .copied()
            .collect();
        l2.sort_unstable_by_key(|w| w.seq);
        for w in l2.iter().rev() {
            let why = lost(w);
            self.why(why);
            let (raw, bitmap) = self.l2_entry_at(w.table, w.index);
            let off = self.l2_entry_offset(w.table, w.index);
            let target = Target::L2Entry {
                table_offset: w.table,
                index: w.index,
            };
            if raw != w.raw {
                self.write_u64(off, w.raw)?;
                self.record(target.clone(), raw, w.raw);
            }
            if self.geo.extended_l2 && bitmap != w.bitmap {
                self.write_u64(off.saturating_add(8), w.bitmap)?;
                if per_bitmap {
                    self.why(format!("{why} (subcluster bitmap)"));
                }
                self.record(target, bitmap, w.bitmap);
            }
        }
        Ok(())
    }

    /// Undo what QEMU's caches held since steps `l2_mark` (L2 entries) and
    /// `rc_mark` (refcounts): the file keeps what it had.
    fn drop_cached(&mut self, l2_mark: usize, rc_mark: usize) -> SimResult<()> {
        let saved = self.reason.clone();
        self.undo_l2_from(
            l2_mark,
            |w| {
                if w.live_from == usize::MAX {
                    "lost: QEMU sets this entry once the request's data is written, after the image is marked corrupt, in a cache never written"
                } else {
                    "lost: the change sat in QEMU's L2 cache, never written once the image is marked corrupt"
                }
            },
            true,
        )?;
        self.reason = saved;
        self.drop_refcounts_cached(rc_mark)
    }

    /// Undo the refcount changes QEMU's refcount cache held since step
    /// `rc_mark` (those its block was written back with after them stay).
    pub(in crate::analysis::simulate) fn drop_refcounts_cached(
        &mut self,
        rc_mark: usize,
    ) -> SimResult<()> {
        let lost: Vec<(usize, Target, u64, u64, u64)> = self
            .steps
            .iter()
            .enumerate()
            .skip(rc_mark)
            .filter(|(_, c)| matches!(c.target, Target::Refcount { .. }))
            .map(|(i, c)| (i, c.target.clone(), c.count, c.before, c.after))
            .collect();
        let saved = self.reason.clone();
        self.why("lost: the change sat in QEMU's refcount cache, never written once the image is marked corrupt");
        let bb = self.block_bits();
        for (step, target, count, before, after) in lost.into_iter().rev() {
            let Target::Refcount { cluster } = target else {
                continue;
            };
            for k in 0..count {
                let c = cluster.saturating_add(k);
                // Written back with its block after the change: it stays.
                let block = self.refcount_block_of(c >> bb).ok().flatten();
                if block.is_some_and(|b| step < self.unflushed.rc.held_from(b)) {
                    continue;
                }
                self.put_refcount(c, before)?;
                self.record(Target::Refcount { cluster: c }, after, before);
            }
        }
        self.reason = saved;
        // What was allocated or freed only in the caches is not.
        let (a, f) = self.unflushed.lists_from;
        let allocated = self.allocated.split_off(a.min(self.allocated.len()));
        for e in allocated {
            let c = self.cluster_of(e.0);
            if self.get_refcount(c).map_or(true, |r| r != 0) {
                self.allocated.push(e);
            }
        }
        let freed = self.freed.split_off(f.min(self.freed.len()));
        for e in freed {
            if self.get_refcount(e.0).map_or(true, |r| r == 0) {
                self.freed.push(e);
            }
        }
        Ok(())
    }

    /// `calculate_l2_meta`'s look at a piece of a guest write from `pos`
    /// covering `count` clusters, entries `index..` of the L2 table at `l2`:
    /// the first and the last of them must not be invalid.
    pub(super) fn write_piece_valid(
        &mut self,
        l2: HostOffset,
        index: u64,
        count: u64,
        pos: GuestOffset,
    ) -> SimResult<()> {
        let start = self.guest_cluster_start(pos);
        for k in [0, count.saturating_sub(1)] {
            let (raw, bitmap) = self.l2_entry_at(l2, index.saturating_add(k));
            let ty = L2Entry { raw, bitmap }.subcluster_type(&self.geo, self.has_data_file, 0);
            if ty == SubclusterType::Invalid {
                let g = start.saturating_add(k.saturating_mul(self.cs));
                return Err(self.invalid_entry_met(
                    g,
                    "a write",
                    format!(
                        "write failed: Input/output error (the L2 entry of guest {g:#x} has contradictory bits: the image is marked corrupt)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

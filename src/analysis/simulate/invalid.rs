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
//! writes back first after a release), and what is still there is lost. A guest write's own L2 entries are later still:
//! QEMU sets them once the request's data is written, after every piece of
//! the request has been placed, so a piece that meets the entry finds none
//! of them in the cache.

mod backs;
mod cache;

/// QEMU's refcount cache entries (`MIN_REFCOUNT_CACHE_SIZE` blocks, its default).
pub(super) const REFCOUNT_CACHE_ENTRIES: u64 = cache::ENTRIES as u64;

use super::{Sim, SimError, SimResult, Target};
use crate::header::Field;
use crate::tables::{L1Entry, L2Entry, SubclusterType};
use crate::types::{GuestOffset, HostOffset};

/// The most L2 entry changes an operation's log keeps; past it, meeting an
/// invalid entry is not simulated (QEMU's small caches would have written
/// some of them back on their own long before).
const MAX_LOGGED: usize = 1 << 16;

/// One L2 entry an operation changed through QEMU's L2 cache.
#[derive(Clone, Copy, Debug)]
struct L2Write {
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
    /// The open's repair of a dirty image changed metadata first.
    repaired: bool,
    /// On an image with lazy refcounts, a write's L2 entries were linked,
    /// which marks the image dirty ([`Sim::l2_link`]).
    dirtied: bool,
    /// The guest range of the operation.
    range: (u64, u64),
    /// L2 entries changed, in order, with their values before.
    l2: Vec<L2Write>,
    /// More were changed than the log keeps.
    overflow: bool,
    /// The step at which QEMU last wrote the L2 cache back.
    written_at: usize,
    /// The steps at which QEMU wrote the L2 cache back, in order, each
    /// with whether a write's link made it ([`backs`]).
    l2_backs: Vec<(usize, bool)>,
    /// QEMU's refcount cache.
    rc: cache::RefcountCache,
    /// The first block status of the operation has read its refcounts.
    detected: bool,
    /// `allocated` and `freed` as the operation found them.
    lists_from: (usize, usize),
    /// The write request under way: its pieces so far, the piece that set
    /// the first of its deferred entries, and the later pieces in which the
    /// caches were written back.
    request: Option<(u64, Option<u64>, Vec<u64>)>,
}

impl Sim {
    /// Start the log of operation `op` (before its open's work).
    pub(super) fn begin_cache_log(&mut self, op: &super::Op) {
        use super::Op;
        let range = match op {
            Op::Write { offset, length, .. }
            | Op::WriteZeroes { offset, length, .. }
            | Op::Read { offset, length } => Some((offset.get(), *length)),
            _ => None,
        };
        self.unflushed = Unflushed {
            on: range.is_some(),
            range: range.unwrap_or_default(),
            lists_from: (self.allocated.len(), self.freed.len()),
            ..Default::default()
        };
    }

    /// Whether this operation's use of QEMU's caches is followed.
    pub(super) fn caches_followed(&self) -> bool {
        self.unflushed.on
    }

    /// The open's repair of a dirty image is done.
    pub(super) fn repaired_on_open(&mut self) {
        self.unflushed.repaired = self.steps.iter().any(|c| !matches!(c.target, Target::Note));
    }

    /// `qcow2_alloc_cluster_link_l2` is about to set a write's L2 entries
    /// (any write: a guest write, copy-on-read's, a write-zeroes' or a
    /// compressed write's fallback to one). On an image with lazy refcounts
    /// QEMU first marks the image dirty (`qcow2_mark_dirty`: the dirty bit
    /// written to the header, once per open). From then on its refcounts
    /// need not be accurate (`qcow2_need_accurate_refcounts`): the L2 cache
    /// no longer waits on the refcount cache, and the flush after a request
    /// (`qcow2_write_caches`) writes the L2 cache only. QEMU clears the bit
    /// at the close (`qcow2_mark_clean`), so it stays only when the image
    /// is marked corrupt before that ([`Sim::mark_corrupt`]).
    pub(super) fn l2_link(&mut self) {
        if self.header_field(Field::CompatibleFeatures) & 1 != 0 {
            self.unflushed.dirtied = true;
        }
    }

    /// Whether this operation marked an image with lazy refcounts dirty.
    pub(super) fn lazy_dirtied(&self) -> bool {
        self.unflushed.dirtied
    }

    /// Entry `index` of the L2 table at `table` is about to change from
    /// `raw`/`bitmap` through QEMU's L2 cache.
    pub(super) fn log_l2_write(&mut self, table: HostOffset, index: u64, raw: u64, bitmap: u64) {
        let steps = self.steps.len();
        let log = &mut self.unflushed;
        if !log.on || log.overflow {
            return;
        }
        if log.l2.len() >= MAX_LOGGED {
            log.overflow = true;
            log.l2 = Vec::new();
            return;
        }
        let live_from = match &mut log.request {
            Some((piece, first, _)) => {
                first.get_or_insert(*piece);
                usize::MAX
            }
            None => steps,
        };
        log.l2.push(L2Write {
            table,
            index,
            raw,
            bitmap,
            live_from,
        });
    }

    /// QEMU writes both caches back (`l2_allocate`: the refcounts, then
    /// the L2 slices, the new ones among them).
    pub(super) fn caches_written(&mut self) {
        self.refcounts_flushed();
        let step = self.steps.len();
        self.unflushed.rc.l2_flushed(true, step);
        self.l2_written_back();
    }

    /// `alloc_refcount_block` writes the L2 cache back before it makes a
    /// new refcount block.
    pub(super) fn l2_flushed_for_refblock(&mut self) {
        let step = self.steps.len();
        let dirty = self.l2_dirty();
        self.unflushed.rc.l2_flushed(dirty, step);
    }

    /// Whether QEMU's L2 cache holds changes not yet written back.
    fn l2_dirty(&self) -> bool {
        let log = &self.unflushed;
        log.overflow
            || log
                .l2
                .iter()
                .any(|w| w.live_from != usize::MAX && w.live_from >= log.written_at)
    }

    /// QEMU's L2 cache is written back, all of it.
    fn l2_written_back(&mut self) {
        let log = &mut self.unflushed;
        log.written_at = self.steps.len();
        if log.l2_backs.len() < MAX_LOGGED {
            log.l2_backs.push((log.written_at, false));
        }
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
    /// link marked an image with lazy refcounts dirty).
    pub(super) fn request_end(&mut self) {
        let steps = self.steps.len();
        let linked = self.unflushed.l2.iter().any(|w| w.live_from == usize::MAX);
        if linked && self.unflushed.on && !self.unflushed.dirtied && self.unflushed.rc.l2_linked() {
            self.l2_written_back();
            if let Some(last) = self.unflushed.l2_backs.last_mut() {
                last.1 = true;
            }
        }
        let log = &mut self.unflushed;
        log.request = None;
        for w in log.l2.iter_mut().filter(|w| w.live_from == usize::MAX) {
            w.live_from = steps;
        }
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
            if let Some(why) = self.cache_unknown(l2_mark) {
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
    fn cache_unknown(&mut self, l2_mark: usize) -> Option<String> {
        let log = &self.unflushed;
        if log.repaired {
            return Some("after the repair of a dirty image on its open changed metadata (QEMU does not write the refcounts that repair left in its cache, and they are lost)".into());
        }
        if !log.on {
            return Some("in an operation whose use of QEMU's caches is not followed".into());
        }
        if log.overflow {
            return Some(format!(
                "after it changed more than {MAX_LOGGED} L2 entries (QEMU's caches would have written some of them back on their own)"
            ));
        }
        if log
            .request
            .as_ref()
            .is_some_and(|(_, _, later)| later.len() > 1)
        {
            return Some("after two later pieces of its write request wrote QEMU's caches back while its first L2 entries waited for their data (whether QEMU set those entries in between, to be written back by the second, depends on when its data writes finished)".into());
        }
        if let Some(why) = self.l2_cache_unknown(l2_mark) {
            return Some(why);
        }
        self.unflushed.rc.unknown().map(str::to_owned)
    }

    /// Why QEMU's L2 cache may have written back changes it held since step
    /// `l2_mark` on its own (evicting them), if it may.
    fn l2_cache_unknown(&mut self, l2_mark: usize) -> Option<String> {
        let log = &self.unflushed;
        let (offset, length) = log.range;
        // Only an L2 slice changed in the cache can be written back by
        // eviction: when, from the first such change on, the operation goes
        // through more slices (and old tables it copies) than the cache
        // holds.
        let first = log
            .l2
            .iter()
            .find(|w| w.live_from != usize::MAX && w.live_from >= l2_mark)
            .copied();
        if let Some(w) = first {
            let slice = self.slice_entries().max(1);
            let span = slice.saturating_mul(self.cs).max(1);
            let from = self
                .l1
                .iter()
                .position(|e| e.l2_offset() == Some(w.table))
                .map_or(offset, |i| {
                    (i as u64)
                        .saturating_mul(self.geo.l2_coverage())
                        .saturating_add(w.index.saturating_mul(self.cs))
                });
            let slices = offset
                .saturating_add(length.max(1))
                .saturating_sub(1)
                .checked_div(span)
                .unwrap_or(0)
                .saturating_sub(from.checked_div(span).unwrap_or(0))
                .saturating_add(1);
            let copies = self
                .steps
                .iter()
                .skip(w.live_from)
                .filter(|c| matches!(c.target, Target::L1Entry { .. }))
                .count() as u64;
            let entries = self.l2_cache_entries();
            if slices.saturating_add(copies) > entries {
                return Some(format!(
                    "after it changed L2 entries and then went through more L2 slices than QEMU's L2 cache holds ({entries}), which may have written some of them back"
                ));
            }
        }
        None
    }

    /// Undo what QEMU's caches held since steps `l2_mark` (L2 entries) and
    /// `rc_mark` (refcounts): the file keeps what it had.
    fn drop_cached(&mut self, l2_mark: usize, rc_mark: usize) -> SimResult<()> {
        let l2: Vec<L2Write> = self
            .unflushed
            .l2
            .iter()
            .filter(|w| w.live_from >= l2_mark)
            .copied()
            .collect();
        let saved = self.reason.clone();
        for w in l2.iter().rev() {
            let lost = if w.live_from == usize::MAX {
                "lost: QEMU sets this entry once the request's data is written, after the image is marked corrupt, in a cache never written"
            } else {
                "lost: the change sat in QEMU's L2 cache, never written once the image is marked corrupt"
            };
            self.why(lost);
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
                self.why(format!("{lost} (subcluster bitmap)"));
                self.record(target, bitmap, w.bitmap);
            }
        }
        self.reason = saved;
        self.drop_refcounts_cached(rc_mark)
    }

    /// The flush (after the request, or at qemu-io's exit) of an operation
    /// that marked an image with lazy refcounts dirty ([`Sim::l2_link`]) is
    /// stopped at the L2 cache by the overlap check: `qcow2_write_caches`
    /// returns before it gets to the refcount cache (which it would skip on
    /// a dirty image anyway), and QEMU, the image now unusable, never
    /// writes that cache.
    /// What it holds of the operation's refcount changes is lost, as at
    /// [`Sim::caches_lost`] (the L2 entries are the flush's to sort).
    pub(super) fn lazy_refcounts_lost(&mut self) -> SimResult<()> {
        let (_, rc_mark) = self.cache_marks();
        let log = &self.unflushed;
        let unknown = if log.repaired {
            Some(
                "after the repair of a dirty image on its open changed metadata (QEMU does not write the refcounts that repair left in its cache)",
            )
        } else if !log.on {
            Some("in an operation whose use of QEMU's refcount cache is not followed")
        } else {
            log.rc.unknown()
        };
        if let Some(why) = unknown {
            return Err(SimError::NotModelled(format!(
                "an operation whose flush the overlap check stops, on an image with lazy refcounts it marked dirty, {why}"
            )));
        }
        self.drop_refcounts_cached(rc_mark)
    }

    /// Undo the refcount changes QEMU's refcount cache held since step
    /// `rc_mark` (those its block was written back with after them stay).
    fn drop_refcounts_cached(&mut self, rc_mark: usize) -> SimResult<()> {
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

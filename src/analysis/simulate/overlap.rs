//! QEMU's metadata overlap check (`qcow2_check_metadata_overlap` with the
//! default `overlap-check=cached`): before a write to the image file, the
//! written clusters are compared with every metadata structure QEMU knows
//! about without reading more of the file. A write that would land on one is
//! not made: the image is marked corrupt ("Preventing invalid write on
//! metadata"), the operation fails with EIO, and QEMU makes the image
//! unusable, so nothing more is written, not even the persistent bitmaps,
//! and what its L2 and refcount caches held of a guest write's,
//! write-zeroes' or copy-on-read's changes is lost ([`Sim::caches_lost`]).
//!
//! The simulator checks where QEMU's writes of the kinds below happen: the
//! copy of the active L1 table for a new snapshot, the new snapshot table,
//! a new L2 table's L1 entry, L2 entries (which QEMU writes back from its L2
//! cache, not checked against the active L2 tables) and guest data clusters.
//! An L2 entry is checked with its cache slice when QEMU writes the slice
//! back: for a guest write or write-zeroes at qemu-io's flush after the
//! request, for a discard, copy-on-read or compressed write at qemu-io's
//! exit ([`Sim::held_flush`]), for the refcount walk at the flush after the
//! walk (`walk/flush.rs`), for a shrink's discard at the end of the
//! truncate ([`Sim::shrink_flush`]); a repair's COPIED fixes check it as it
//! changes.

mod shrink;
mod within;

use super::invalid::ReleaseWatch;
use super::{Sim, SimError, SimResult, Target};
use crate::header::Field;
use crate::refcount::RefTableEntry;
use crate::types::HostOffset;

/// A kind of metadata, in the order QEMU checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Meta {
    /// The header cluster.
    Header,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table the active L1 table names.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    InactiveL1,
}

impl Meta {
    /// QEMU's name for it (`metadata_ol_names`).
    pub(super) fn name(self) -> &'static str {
        match self {
            Meta::Header => "qcow2_header",
            Meta::ActiveL1 => "active L1 table",
            Meta::ActiveL2 => "active L2 table",
            Meta::RefcountTable => "refcount table",
            Meta::RefcountBlock => "refcount block",
            Meta::SnapshotTable => "snapshot table",
            Meta::InactiveL1 => "inactive L1 table",
        }
    }
}

/// What the overlap check of an L2-entry write depends on, apart from the
/// active L2 tables it ignores: where the L1 table, the refcount table and its
/// blocks, the snapshot table and the snapshots' L1 tables are. While it stays
/// the same, a cluster found clear stays clear, so a walk that rewrites every
/// entry of a large image checks each L2 table once instead of once per entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Layout {
    l1: (HostOffset, usize),
    reftable: (HostOffset, u32, u64),
    snapshot_table: (HostOffset, u64),
    snapshot_l1s: Vec<(HostOffset, u32)>,
}

impl Sim {
    /// The metadata layout the overlap memo is valid for.
    fn layout(&self) -> Layout {
        Layout {
            l1: (self.l1_table_offset, self.l1.len()),
            reftable: (
                self.refcount_table_offset,
                self.refcount_table_clusters,
                self.reftable_writes,
            ),
            snapshot_table: (self.snapshots_offset, self.snapshots_size),
            snapshot_l1s: self
                .snapshots
                .iter()
                .map(|s| (s.l1_table_offset, s.l1_size))
                .collect(),
        }
    }

    /// Whether the layout is still `l`: [`Sim::layout`] compared field by
    /// field, without building one (the memo is consulted on every L2-entry
    /// write of a walk).
    fn layout_is(&self, l: &Layout) -> bool {
        l.l1 == (self.l1_table_offset, self.l1.len())
            && l.reftable
                == (
                    self.refcount_table_offset,
                    self.refcount_table_clusters,
                    self.reftable_writes,
                )
            && l.snapshot_table == (self.snapshots_offset, self.snapshots_size)
            && l.snapshot_l1s.len() == self.snapshots.len()
            && l.snapshot_l1s
                .iter()
                .zip(&self.snapshots)
                .all(|(&(o, n), s)| o == s.l1_table_offset && n == s.l1_size)
    }

    /// The first metadata structure the clusters of `offset..offset + size`
    /// overlap, `ignore` aside.
    fn overlapping(&mut self, ignore: Option<Meta>, offset: HostOffset, size: u64) -> Option<Meta> {
        if size == 0 {
            return None;
        }
        let start = self.cluster_start(self.cluster_of(offset));
        let end = HostOffset(
            offset
                .get()
                .saturating_add(size)
                .next_multiple_of(self.cs.max(1)),
        );
        let hits = |o: HostOffset, len: u64| len != 0 && o < end && start < o.saturating_add(len);
        let want = |m: Meta| ignore != Some(m);
        if want(Meta::Header) && start.get() < self.cs {
            return Some(Meta::Header);
        }
        if want(Meta::ActiveL1)
            && hits(
                self.l1_table_offset,
                (self.l1.len() as u64).saturating_mul(8),
            )
        {
            return Some(Meta::ActiveL1);
        }
        if want(Meta::ActiveL2)
            && self
                .l1
                .iter()
                .any(|e| e.l2_offset().is_some_and(|o| hits(o, self.cs)))
        {
            return Some(Meta::ActiveL2);
        }
        let table_len = self.clusters_bytes(u64::from(self.refcount_table_clusters));
        if want(Meta::RefcountTable) && hits(self.refcount_table_offset, table_len) {
            return Some(Meta::RefcountTable);
        }
        if want(Meta::RefcountBlock) {
            for ti in 0..self.reftable_len() {
                let entry = RefTableEntry(self.read_u64(self.reftable_entry_offset(ti)));
                if entry.block_offset().is_some_and(|b| hits(b, self.cs)) {
                    return Some(Meta::RefcountBlock);
                }
            }
        }
        if want(Meta::SnapshotTable) && hits(self.snapshots_offset, self.snapshots_size) {
            return Some(Meta::SnapshotTable);
        }
        if want(Meta::InactiveL1)
            && self.snapshots.iter().any(|s| {
                // QEMU keeps this size in 32 bits.
                let len = u64::from(s.l1_size.wrapping_mul(8));
                hits(s.l1_table_offset, len)
            })
        {
            return Some(Meta::InactiveL1);
        }
        None
    }

    /// The metadata structure a write of `offset..offset + size` would land
    /// on, what [`Sim::overlap_check`] fails for; nothing is marked.
    pub(super) fn overlap_of(
        &mut self,
        ignore: Option<Meta>,
        offset: HostOffset,
        size: u64,
    ) -> Option<Meta> {
        // An L2-entry write inside one cluster: remembered per layout.
        let memo = (ignore == Some(Meta::ActiveL2)
            && size != 0
            && self.cluster_of(offset)
                == self.cluster_of(offset.saturating_add(size.saturating_sub(1))))
        .then(|| self.cluster_of(offset));
        if let Some(c) = memo {
            if !self.layout_is(&self.overlap_memo.0) {
                self.overlap_memo = (self.layout(), Default::default());
            }
            if self.overlap_memo.1.contains(&c) {
                return None;
            }
        }
        let m = self.overlapping(ignore, offset, size);
        if m.is_none()
            && let Some(c) = memo
        {
            self.overlap_memo.1.insert(c);
        }
        m
    }

    /// `qcow2_pre_write_overlap_check`: fail, and mark the image corrupt, when
    /// the write would land on metadata.
    pub(super) fn overlap_check(
        &mut self,
        ignore: Option<Meta>,
        offset: HostOffset,
        size: u64,
    ) -> SimResult<()> {
        let Some(m) = self.overlap_of(ignore, offset, size) else {
            return Ok(());
        };
        self.overlap_stop = Some(m);
        // Fatal as an invalid L2 entry is: what QEMU's caches hold of a
        // guest write's, write-zeroes' or copy-on-read's changes is lost.
        if self.caches_followed()
            && let Some(e) = self.caches_lost(|| {
                format!(
                    "an operation stopped by QEMU's overlap check (a write of {offset:#x} onto the {}),",
                    m.name()
                )
            })
        {
            return Err(e);
        }
        Err(self.overlap_stopped(m, offset))
    }

    /// The overlap check stops a write of `offset` onto `m`: the image is
    /// marked corrupt, and the error the operation fails with.
    pub(super) fn overlap_stopped(&mut self, m: Meta, offset: HostOffset) -> SimError {
        self.overlap_stop = Some(m);
        if let Err(e) = self.mark_corrupt(format!(
            "Marking image as corrupt: Preventing invalid write on metadata (overlaps with {}) at {offset:#x}",
            m.name()
        )) {
            return e;
        }
        SimError::Qemu(format!(
            "Preventing invalid write on metadata (overlaps with {}) at {offset:#x}; the image is marked corrupt (EIO)",
            m.name()
        ))
    }

    /// Where the L2 cache slice holding entry `index` of the table at `l2`
    /// starts, and its length: what QEMU writes back, and checks, for it.
    pub(super) fn slice_of(&self, l2: HostOffset, index: u64) -> (HostOffset, u64) {
        let slice = self.slice_entries().max(1);
        let first = index.checked_div(slice).unwrap_or(0).saturating_mul(slice);
        (
            self.l2_entry_offset(l2, first),
            slice.saturating_mul(self.geo.l2_entry_size()),
        )
    }

    /// In a guest write (`held_l2` is set), whether the change of entry
    /// `index` of the table at `l2` (now `raw`/`bitmap`) waits in QEMU's L2
    /// cache for a write-back the overlap check will stop: its slice lands
    /// on other metadata. The entry is changed all the same (the request
    /// reads it as QEMU's cache holds it) and remembered, to be put back
    /// when the slice's write-back is stopped ([`Sim::guest_write`]).
    pub(super) fn held_back(&mut self, l2: HostOffset, index: u64, raw: u64, bitmap: u64) -> bool {
        if self.held_l2.is_none() {
            return false;
        }
        let (at, len) = self.slice_of(l2, index);
        if self.overlap_of(Some(Meta::ActiveL2), at, len).is_none() {
            return false;
        }
        if let Some(held) = self.held_l2.as_mut()
            && !held.iter().any(|h| h.0 == l2 && h.1 == index)
        {
            held.push((l2, index, raw, bitmap));
        }
        self.release_watch_slice(at);
        true
    }

    /// A guest write request as qemu-io makes it (`qcow2_co_pwritev_part`),
    /// then the flush qemu-io's default writethrough mode makes after it
    /// (`qcow2_write_caches`), as [`Sim::held_flush`] follows it.
    pub(super) fn guest_write(
        &mut self,
        offset: crate::types::GuestOffset,
        length: u64,
    ) -> SimResult<()> {
        self.held_flush(false, |s| s.write(offset, length))
    }

    /// An operation that changes L2 entries in QEMU's L2 cache (a write, a
    /// write-zeroes, a discard, a copy-on-read, a compressed write), then
    /// the flush of its caches: after the request for a write or
    /// write-zeroes (writethrough), at qemu-io's exit for the others
    /// (`at_close`: the operation itself succeeds).
    /// `qcow2_write_caches` writes the L2 cache, then the refcount cache.
    /// Refcounts an allocation changed are written first (the L2 cache
    /// waits on the refcount cache, `qcow2_alloc_cluster_link_l2`); from a
    /// release on, the refcount cache waits on the L2 cache
    /// (`update_refcount`). On an image with lazy refcounts that a write's
    /// link marked dirty ([`Sim::l2_link`]) the L2 cache waits on nothing:
    /// the flush stops at it before the refcount cache, so the refcounts
    /// that cache holds are lost. (At qemu-io's exit the flush is the
    /// close's `bdrv_flush`, the same `qcow2_write_caches`; once it fails
    /// the image is unusable and `qcow2_inactivate`, which would write the
    /// refcount cache on its own, never runs.) Each changed L2 slice goes
    /// through the overlap check over the whole slice (the active L2 tables
    /// aside). A slice it stops is not written, its entries stay as the
    /// file had them, the image is marked corrupt and the flush fails; the
    /// other slices are written, the refcounts waiting on them are not.
    /// A write's link after a release writes the L2 cache back earlier,
    /// within the operation, and meets the check there
    /// ([`Sim::held_stopped_at_link`]).
    pub(super) fn held_flush(
        &mut self,
        at_close: bool,
        op: impl FnOnce(&mut Sim) -> SimResult<()>,
    ) -> SimResult<()> {
        self.held_l2 = Some(Vec::new());
        let r = op(self);
        let held = self.held_l2.take().unwrap_or_default();
        let watch = self.release_watch_end();
        if matches!(r, Err(SimError::NotModelled(_))) {
            return r;
        }
        if let Some(why) = self.held_evicted() {
            return Err(SimError::NotModelled(why));
        }
        let watch = match watch {
            Some(w) if w.failed_at().is_some() => return self.held_stopped_in_op(w, held, r),
            w => w,
        };
        let keys: Vec<(HostOffset, u64)> = held.iter().map(|h| (h.0, h.1)).collect();
        let first_back = if held.is_empty() {
            None
        } else {
            self.first_write_back_of(&keys)
        };
        let at_link = first_back.and_then(|(at, link)| link.then_some(at));
        // Stopped already: QEMU's caches were dropped then (unless the
        // simulation stopped only after a link QEMU would have stopped at).
        if held.is_empty() || self.marked_corrupt() {
            if let Some(at) = at_link
                && self.steps.iter().skip(at).any(|c| {
                    matches!(
                        c.target,
                        Target::Header {
                            field: Field::IncompatibleFeatures
                        }
                    )
                })
            {
                return Err(SimError::NotModelled("an operation whose L2 cache the overlap check stops where a write's link writes it back, and which QEMU then stops again later".into()));
            }
            return r;
        }
        if let Some(at) = at_link {
            self.held_stopped_at_link(at, held)?;
            return r;
        }
        // A new L2 table or refcount block stops at such a write-back
        // itself (`overlap/within.rs`); what is left is the write-back a
        // refcount cache waiting on the L2 cache (since a release) makes
        // first, where QEMU stops too.
        if first_back.is_some() {
            return Err(SimError::NotModelled("an operation that changed an L2 slice the overlap check stops, then wrote QEMU's refcount cache back within the operation while it waited on the L2 cache (since a release): QEMU's L2 cache is written first there, and the check stops it there, which is not followed".into()));
        }
        // A failed request skips qemu-io's flush; the close's flush then
        // meets the same stop, and the request's own error is reported.
        match (r, self.held_l2_stopped(held, watch)) {
            (_, Err(e @ SimError::NotModelled(_))) | (Err(e), _) => Err(e),
            (Ok(()), Err(e)) if at_close => {
                self.note(format!(
                    "at qemu-io's exit the flush of QEMU's caches fails: {}",
                    e.text()
                ));
                Ok(())
            }
            (Ok(()), f) => f,
        }
    }

    /// The flush of [`Sim::held_flush`] over the entries `held` back.
    fn held_l2_stopped(
        &mut self,
        held: Vec<(HostOffset, u64, u64, u64)>,
        watch: Option<ReleaseWatch>,
    ) -> SimResult<()> {
        let Some((m, at)) = self.held_restored(&held)? else {
            return Ok(());
        };
        // A dirty image (marked so by this operation on lazy refcounts, or
        // left so by the open's repair) never has its refcount cache
        // written at this flush; on a clean one the L2 cache's write-back
        // writes the refcount cache first when it depends on it, and only
        // what waits on the L2 cache (after a release) is lost.
        if self.lazy_dirtied() || self.repair_left_dirty() {
            self.lazy_refcounts_lost()?;
        } else {
            self.release_refcounts_lost(watch)?;
        }
        Err(self.overlap_stopped(m, at))
    }

    /// A look at QEMU's refcount cache within the operation failed where
    /// the L2 cache it waits on met the overlap check ([`ReleaseWatch`]):
    /// the image was marked corrupt there and is unusable, so QEMU writes
    /// nothing of its caches after it, not even at qemu-io's exit. A release
    /// that fails so is only reported (`qcow2_free_clusters`), and the
    /// operation goes on in the caches; its result is `r`. The entries
    /// `held` back keep what the file has, and what the refcount cache
    /// held is lost. An L2 change after the failure outside the slices the
    /// check stops is not followed: a later failed eviction writes the L2
    /// cache back again.
    fn held_stopped_in_op(
        &mut self,
        w: ReleaseWatch,
        held: Vec<(HostOffset, u64, u64, u64)>,
        r: SimResult<()>,
    ) -> SimResult<()> {
        if let Some(why) = w.refused() {
            return Err(SimError::NotModelled(why));
        }
        r?;
        if self.release_watch_allocated(&w) {
            return Err(SimError::NotModelled("an operation that allocated a cluster and released others, in which QEMU's refcount cache met the overlap check in a write-back of the L2 cache (allocations through that cache are not followed)".into()));
        }
        let at = w.failed_at().unwrap_or_default();
        let slices: Vec<HostOffset> = held.iter().map(|h| self.slice_of(h.0, h.1).0).collect();
        let later = self.steps.iter().skip(at).any(|c| match c.target {
            Target::L2Entry {
                table_offset,
                index,
            } => !slices.contains(&self.slice_of(table_offset, index).0),
            _ => false,
        });
        if later {
            return Err(SimError::NotModelled("an operation that changed an L2 slice the overlap check lets through after QEMU's refcount cache met the check in a write-back of the L2 cache (whether a later failed write-back wrote it is not followed)".into()));
        }
        self.held_restored(&held)?;
        let unfreed = w.unfreed().to_vec();
        self.release_watch_lost(w)?;
        self.note("QEMU's caches are not written after that (the image is unusable once marked corrupt): the L2 slice the check stops keeps what the file has, and so do the refcounts its refcount cache still held".into());
        for c in unfreed {
            self.unfreed_note(c, &held);
        }
        Ok(())
    }

    /// What a cluster whose release failed in [`Sim::held_stopped_in_op`]
    /// is left as: still named by an entry `held` back (whose change is
    /// lost with its slice), or not, and its refcount.
    fn unfreed_note(&mut self, c: u64, held: &[(HostOffset, u64, u64, u64)]) {
        let start = self.cluster_start(c);
        let named = held.iter().find(|h| {
            let e = crate::tables::L2Entry {
                raw: h.2,
                bitmap: h.3,
            };
            !e.compressed() && e.host_offset() == start
        });
        let r = self.peek_refcount(c).map_or_else(
            || "its refcount block cannot be read".to_string(),
            |r| format!("refcount {r}"),
        );
        self.note(match named {
            Some(&(l2, index, ..)) => format!(
                "the release of cluster {c} failed, and the L2 entry {l2:#x}[{index}] that named it keeps it, its change lost with the slice: the cluster stays in use, with {r}"
            ),
            None => format!(
                "the release of cluster {c} failed, and no L2 entry the check stops names it; it keeps {r}"
            ),
        });
    }

    /// The entries `held` back whose slices the overlap check stops, put
    /// back as the file has them; the first stop (the structure, the
    /// slice's offset), if any.
    fn held_restored(
        &mut self,
        held: &[(HostOffset, u64, u64, u64)],
    ) -> SimResult<Option<(Meta, HostOffset)>> {
        let mut stop: Option<(Meta, HostOffset)> = None;
        let saved = self.reason.clone();
        self.why("not written: the overlap check stops this L2 slice when QEMU writes it back from its L2 cache");
        for &(l2, index, raw, bitmap) in held.iter().rev() {
            let (at, len) = self.slice_of(l2, index);
            let Some(m) = self.overlap_of(Some(Meta::ActiveL2), at, len) else {
                continue;
            };
            stop = Some((m, at));
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
        Ok(stop)
    }

    /// The L2 cache write-back of a write's link at step `at` (after a
    /// release: [`Sim::first_write_back_of`]) meets a slice held back:
    /// the overlap check stops it and marks the image corrupt, the other
    /// changed slices are written. QEMU ignores the failure
    /// (`qcow2_alloc_cluster_link_l2` does not look at what
    /// `qcow2_cache_set_dependency` returns) and the operation goes on in
    /// its caches, its data still written, and succeeds; the flush after it
    /// finds the image unusable and does nothing. So the L2 entries changed
    /// from the link on (the link's own) are lost, and so is every refcount
    /// change from the first release on, the refcount cache waiting on the
    /// L2 cache from then. What QEMU writes to the file at once (an L1
    /// entry, a refcount table entry, the header) after the stop is not
    /// followed.
    fn held_stopped_at_link(
        &mut self,
        at: usize,
        held: Vec<(HostOffset, u64, u64, u64)>,
    ) -> SimResult<()> {
        let direct = self.steps.iter().skip(at).any(|c| {
            !matches!(
                c.target,
                Target::L2Entry { .. }
                    | Target::Refcount { .. }
                    | Target::Allocate { .. }
                    | Target::Free { .. }
                    | Target::Copy { .. }
                    | Target::Note
            )
        });
        // The layout the check sees at the link is the one at the end: what
        // changes it after the link is refused here.
        let mut stops = false;
        for &(l2, index, ..) in &held {
            let (slice, len) = self.slice_of(l2, index);
            stops |= self.overlap_of(Some(Meta::ActiveL2), slice, len).is_some();
        }
        if !stops {
            return Ok(());
        }
        if direct {
            return Err(SimError::NotModelled("an operation whose L2 cache the overlap check stops where a write's link writes it back (after a release), which then goes on to write metadata QEMU writes to the file at once (an L1 entry, a refcount table entry, the header)".into()));
        }
        self.l2_changes_lost_from(at)?;
        let Some((m, offset)) = self.held_restored(&held)? else {
            return Ok(());
        };
        if let Some(first) = self.first_release() {
            self.walk_refcounts_lost(first)?;
        }
        match self.overlap_stopped(m, offset) {
            SimError::Qemu(e) => {
                self.note(format!(
                    "QEMU's L2 cache is written back where a write links its L2 entries (the refcount cache waits on it since a release): {e}; QEMU goes on without looking at that failure, so the operation succeeds and nothing more of its metadata is written"
                ));
                Ok(())
            }
            e => Err(e),
        }
    }

    /// The flush stopped at the L2 cache: the refcount changes from the
    /// operation's first release on, which QEMU's refcount cache holds
    /// waiting on its L2 cache, are never written. (Those of allocations
    /// before it were: the release made the refcount cache write them
    /// first, `qcow2_cache_set_dependency`.)
    fn release_refcounts_lost(&mut self, watch: Option<ReleaseWatch>) -> SimResult<()> {
        let refcount = |c: &super::Change| matches!(c.target, Target::Refcount { .. });
        let Some(first) = self.first_release() else {
            return Ok(());
        };
        if self
            .steps
            .iter()
            .skip(first)
            .any(|c| refcount(c) && c.after > c.before)
        {
            return Err(SimError::NotModelled(
                "an operation that allocated a cluster after it released one, whose flush the overlap check stops (the L2 cache, which the refcount cache then waits on, is written in between)".into(),
            ));
        }
        match watch {
            Some(w) if !self.release_watch_allocated(&w) => self.release_watch_lost(w),
            _ => self.walk_refcounts_lost(first),
        }
    }

    /// Whether QEMU has marked the image corrupt in this operation (then it
    /// writes nothing more).
    pub(super) fn marked_corrupt(&mut self) -> bool {
        self.header_field(Field::IncompatibleFeatures) & crate::header::INCOMPAT_CORRUPT != 0
    }
}

//! Guest write-zeroes (`qemu-io -c 'write -z [-u] OFFSET LENGTH'`): the block
//! layer's split into an unaligned head, whole (sub)clusters and an unaligned
//! tail (`bdrv_co_do_pwrite_zeroes`, aligned to qcow2's subclusters), qcow2's
//! zero (sub)clusters for what it can (`qcow2_co_pwrite_zeroes`,
//! `qcow2_subcluster_zeroize`, `zero_in_l2_slice`, `zero_l2_subclusters`),
//! and a plain write of zeros where it cannot.
//!
//! A partial subcluster becomes a zero subcluster only when the rest of it
//! already reads as zeros by block status (`is_zero`): through this image's
//! own tables first, then down the backing chain, where a layer's data (even
//! data that happens to be zeros) counts as not zero and bytes past the end
//! of a shorter layer count as zeros.

use super::alloc::Discard;
use super::{Sim, SimError, SimResult};
use crate::chain::{Chain, LayerKind, OpenOptions};
use crate::io::Extent;
use crate::lookup::{Status, layer_run};
use crate::tables::{ClusterType, L2Entry, SubclusterType};
use crate::types::GuestOffset;

/// QEMU's `MAX_BOUNCE_BUFFER` (32768 sectors): the most one fallback write of
/// zeros covers.
const MAX_BOUNCE: u64 = 32768 * 512;

impl Sim {
    /// `write -z` (`unmap`: with `-u`, clusters may be released), then
    /// the flush after it ([`Sim::held_flush`]). With `-u`, QEMU's refcount
    /// cache is followed through the releases ([`Sim::release_watch_start`])
    /// unless the open's repair left changes in it.
    pub(super) fn write_zeroes(
        &mut self,
        offset: GuestOffset,
        length: u64,
        unmap: bool,
    ) -> SimResult<()> {
        if unmap {
            self.release_watch_from_open();
        }
        self.held_flush(false, |s| s.zeroes_request(offset, length, unmap))
    }

    /// The write-zeroes request itself (`blk_co_pwrite_zeroes`).
    pub(super) fn zeroes_request(
        &mut self,
        offset: GuestOffset,
        length: u64,
        unmap: bool,
    ) -> SimResult<()> {
        let disk = self.disk_end();
        let Some(end) = offset.checked_add(length).filter(|e| e.get() <= disk) else {
            return Err(SimError::Qemu(format!(
                "write failed: Input/output error (the request ends past the end of the disk, {disk} bytes, so the block layer refuses all of it)"
            )));
        };
        // An external data file changes only what QEMU writes to it (zeros
        // there first, with data_file_raw): the L2 entries change as without.
        self.mark_dirty(offset, length);
        // qcow2's pwrite_zeroes_alignment is its subcluster size.
        let unit = self.geo.subcluster_size().max(1);
        let off_in = |x: GuestOffset| x.get().checked_rem(unit).unwrap_or(0);
        // bdrv_co_do_pwrite_zeroes: the head up to the first aligned offset,
        // then the rest, less an unaligned tail when more than a unit is left.
        let mut pos = offset;
        let mut head = off_in(offset);
        while pos < end {
            let rest = end.saturating_sub(pos);
            let tail = off_in(end);
            let n = if head != 0 {
                let n = rest.min(unit.saturating_sub(head));
                head = 0;
                n
            } else if tail != 0 && rest > unit {
                rest.saturating_sub(tail)
            } else {
                rest
            };
            // A fallback write covers at most one bounce buffer; the rest
            // goes round again.
            let done = self.pwrite_zeroes(pos, n, unmap)?.max(1);
            pos = pos.saturating_add(done);
        }
        Ok(())
    }

    /// `qcow2_co_pwrite_zeroes` for one piece; a plain write of zeros when
    /// qcow2 says ENOTSUP (the block layer's bounce-buffer fallback, of at
    /// most `MAX_BOUNCE` bytes). Returns how many bytes of the piece it did.
    fn pwrite_zeroes(&mut self, off: GuestOffset, n: u64, unmap: bool) -> SimResult<u64> {
        let unit = self.geo.subcluster_size().max(1);
        let total = self.disk_end();
        let end = off.saturating_add(n);
        let head = off.get().checked_rem(unit).unwrap_or(0);
        let mut tail = end
            .get()
            .div_ceil(unit)
            .saturating_mul(unit)
            .saturating_sub(end.get());
        if end.get() == total {
            tail = 0;
        }
        let (mut start, mut stop) = (off, end);
        if head != 0 || tail != 0 {
            // Only when the rest of the subcluster already reads as zeros
            // does qcow2 make the whole subcluster read as zeros.
            let s0 = GuestOffset(off.get().saturating_sub(head));
            let before = self.reads_as_zero(s0, off, total)?;
            let after = self.reads_as_zero(end, end.saturating_add(tail), total)?;
            if !(before && after) {
                let why = format!(
                    "guest {off:#x}..{end:#x} is not a whole {} and the rest of it does not read as zeros{}",
                    if self.geo.extended_l2 {
                        "subcluster"
                    } else {
                        "cluster"
                    },
                    if self.backing.is_some() || self.overlay_of.is_some() {
                        " (here or below)"
                    } else {
                        ""
                    }
                );
                return self.fallback(off, n, &why);
            }
            // qcow2_get_host_offset of the whole subcluster: an invalid
            // entry marks the image corrupt there too (EIO, no fallback).
            let ty = self.top_subcluster_type(s0);
            if ty == SubclusterType::Invalid {
                return Err(self.invalid_entry_met(
                    s0,
                    "a partial write-zeroes",
                    format!(
                        "write failed: Input/output error (the L2 entry of guest {s0:#x} has contradictory bits: the image is marked corrupt)"
                    ),
                ));
            }
            if !matches!(
                ty,
                SubclusterType::UnallocatedPlain
                    | SubclusterType::UnallocatedAlloc
                    | SubclusterType::ZeroPlain
                    | SubclusterType::ZeroAlloc
            ) {
                return self.fallback(off, n, &format!("guest {s0:#x} holds data here"));
            }
            start = s0;
            stop = s0.saturating_add(unit);
            self.note(format!(
                "the rest of guest {start:#x}..{stop:#x} already reads as zeros{}: all of it is made to read as zeros",
                if self.backing.is_some() || self.overlay_of.is_some() {
                    " (here and below)"
                } else {
                    ""
                }
            ));
        }
        match self.zeroize(start, stop, unmap, total)? {
            None => Ok(n),
            Some(why) => self.fallback(off, n, &why),
        }
    }

    /// The block layer's fallback for a piece qcow2 cannot zero: the first
    /// `MAX_BOUNCE` bytes of it written as zeros.
    fn fallback(&mut self, off: GuestOffset, n: u64, why: &str) -> SimResult<u64> {
        let n = n.min(MAX_BOUNCE);
        self.note(format!(
            "{why}: QEMU writes zeros at guest {off:#x}..{:#x} (ENOTSUP fallback)",
            off.saturating_add(n)
        ));
        self.write_zeros(off, n)?;
        Ok(n)
    }

    /// A write of `n` bytes of zeros at `off` as a guest write makes it (the
    /// block layer's fallback, or qcow2 zero-filling a grown disk): the data
    /// is a buffer of zeros, not the guest's.
    pub(super) fn write_zeros(&mut self, off: GuestOffset, n: u64) -> SimResult<()> {
        let first = self.steps.len();
        let r = self.write(off, n);
        for c in self.steps.iter_mut().skip(first) {
            if let super::Target::Copy { from, .. } = &mut c.target
                && from == "the guest"
            {
                *from = "a buffer of zeros".into();
                c.reason = "the zeros QEMU writes, no guest data".into();
            }
        }
        r
    }

    /// QEMU's `qcow2_subcluster_zeroize` over `start..stop` (subcluster
    /// aligned, but for an end at `total`, the disk's end as the block layer
    /// counts it): a partial cluster at either end by its subcluster bits,
    /// whole clusters by `zero_in_l2_slice`. `Some(reason)` is its ENOTSUP.
    pub(super) fn zeroize(
        &mut self,
        start: GuestOffset,
        stop: GuestOffset,
        unmap: bool,
        total: u64,
    ) -> SimResult<Option<String>> {
        if self.version < 3 {
            if self.backing.is_some() || self.backing_named {
                return Ok(Some(
                    "compat=0.10 with a backing file has no zero clusters".into(),
                ));
            }
            // Without a backing file, version 2 discards instead.
            self.discard_clusters(start, stop, false)?;
            return Ok(None);
        }
        let cs = self.cs;
        let next_cluster = GuestOffset(start.get().div_ceil(cs).saturating_mul(cs));
        let head = stop.min(next_cluster).saturating_sub(start);
        let from = start.saturating_add(head);
        let tail = if stop.get() >= total {
            0
        } else {
            stop.saturating_sub(from.max(self.guest_cluster_start(stop)))
        };
        let to = GuestOffset(stop.get().saturating_sub(tail));
        if head != 0
            && let Some(why) = self.zero_subclusters(start, head)?
        {
            return Ok(Some(why));
        }
        if to > from {
            self.zero_clusters(from, to, unmap)?;
        }
        if tail != 0 {
            return self.zero_subclusters(to, tail);
        }
        Ok(None)
    }

    /// QEMU's `zero_l2_subclusters`: `len` bytes of subclusters from `off`,
    /// inside one cluster, made to read as zeros by their bitmap bits.
    fn zero_subclusters(&mut self, off: GuestOffset, len: u64) -> SimResult<Option<String>> {
        let bits = self.geo.subcluster_bits();
        let sc = self.within(off) >> bits;
        let count = len.div_ceil(self.geo.subcluster_size().max(1));
        self.why("write-zeroes");
        let l2 = self.cluster_table(off)?;
        let index = self.geo.l2_index(off);
        let (raw, bm) = self.l2_entry_at(l2, index);
        if (L2Entry { raw, bitmap: bm }).cluster_type(&self.geo, self.has_data_file)
            == ClusterType::Compressed
        {
            return Ok(Some(format!(
                "guest {:#x} is a compressed cluster, which qcow2 cannot zero in part",
                self.guest_cluster_start(off)
            )));
        }
        let new = L2Entry { raw, bitmap: bm }
            .with_subclusters_zeroed(sc, count)
            .bitmap;
        if new != bm {
            let last = sc.saturating_add(count).saturating_sub(1);
            self.why(format!(
                "guest {off:#x}: subclusters {sc}..={last} now read as zeros"
            ));
            self.set_l2_entry(l2, index, raw, new)?;
        }
        Ok(None)
    }

    /// The type of the subcluster at guest `g` in this image's own tables.
    fn top_subcluster_type(&mut self, g: GuestOffset) -> SubclusterType {
        self.l2_table_of(g)
            .map_or(SubclusterType::UnallocatedPlain, |l2| self.top_type(l2, g))
    }

    /// QEMU's `is_zero`: whether guest bytes `a..b` (inside one subcluster,
    /// cut at `total`) read as zeros by block status, through this image and
    /// the layers below.
    fn reads_as_zero(&mut self, a: GuestOffset, b: GuestOffset, total: u64) -> SimResult<bool> {
        let b = b.min(GuestOffset(total));
        if a >= b {
            return Ok(true);
        }
        self.block_status_asked();
        match self.top_subcluster_type(a) {
            SubclusterType::Normal | SubclusterType::Compressed => Ok(false),
            SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc => Ok(true),
            SubclusterType::UnallocatedPlain | SubclusterType::UnallocatedAlloc => {
                self.below_reads_zero(a, b)
            }
            // Block status fails (EIO) and marks the image corrupt: is_zero
            // says no, and the fallback write of zeros finds the image gone.
            SubclusterType::Invalid => Err(self.invalid_entry_met(
                a,
                "a partial write-zeroes",
                format!(
                    "write failed: No medium found (QEMU asks whether the rest of the subcluster at guest {a:#x} reads as zeros; its L2 entry has contradictory bits, so the image is marked corrupt and unusable, and the fallback write of zeros finds none)"
                ),
            )),
        }
    }

    /// Whether guest bytes `a..b` read as zeros by block status in the layers
    /// under this image: its backing chain, or for a throw-away overlay the
    /// image (or snapshot) under it.
    fn below_reads_zero(&mut self, a: GuestOffset, b: GuestOffset) -> SimResult<bool> {
        let (a, b) = (a.get(), b.get());
        if let Some((base, snap)) = &self.overlay_of {
            let opts = OpenOptions {
                snapshot: snap.clone(),
                snapshot_active_size: true,
                ..Default::default()
            };
            let chain = Chain::open(base, &opts)?;
            return chain_reads_zero(&chain, a, b);
        }
        match &self.backing {
            Some(chain) => chain_reads_zero(chain, a, b),
            None if self.backing_named => Err(SimError::NotModelled(format!(
                "a partial write-zeroes over a backing file qinspect could not open (QEMU asks it whether the rest reads as zeros): {}",
                self.backing_unread()
            ))),
            None => Ok(true),
        }
    }

    /// `zero_in_l2_slice` over whole clusters `start..stop` (`stop` may be the
    /// unaligned end of the disk).
    fn zero_clusters(
        &mut self,
        mut start: GuestOffset,
        stop: GuestOffset,
        unmap: bool,
    ) -> SimResult<()> {
        let cs = self.cs;
        let slice = self.slice_entries();
        while start < stop {
            let l2_index = self.geo.l2_index(start);
            let n = stop
                .saturating_sub(start)
                .div_ceil(cs)
                .min(slice.saturating_sub(l2_index.checked_rem(slice).unwrap_or(0)))
                .max(1);
            self.why("write-zeroes");
            let l2 = self.cluster_table(start)?;
            for k in 0..n {
                let index = l2_index.saturating_add(k);
                let (raw, bm) = self.l2_entry_at(l2, index);
                let ty = L2Entry { raw, bitmap: bm }.cluster_type(&self.geo, self.has_data_file);
                let allocated = matches!(
                    ty,
                    ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed
                );
                let release = ty == ClusterType::Compressed || (unmap && allocated);
                let kept = if release { 0 } else { raw };
                // With extended L2 entries the bitmap says "zeros" for every
                // subcluster; else the entry's zero flag does.
                let zeroed = L2Entry {
                    raw: kept,
                    bitmap: bm,
                }
                .with_zero(&self.geo);
                let (new, new_bm) = (zeroed.raw, zeroed.bitmap);
                if new == raw && new_bm == bm {
                    continue;
                }
                let g = start.saturating_add(k.saturating_mul(cs));
                self.why(format!(
                    "guest {g:#x} is now a zero cluster{}",
                    if release {
                        ", its cluster released"
                    } else if allocated {
                        ", keeping its cluster"
                    } else {
                        ""
                    }
                ));
                self.set_l2_entry(l2, index, new, new_bm)?;
                if release {
                    self.free_any_cluster(
                        raw,
                        &format!("the zeroed cluster of guest {g:#x}"),
                        Discard::Request,
                    );
                    self.freed_own_table(l2, index, raw)?;
                }
            }
            start = start.saturating_add(n.saturating_mul(cs));
        }
        Ok(())
    }
}

/// Whether guest bytes `a..b` read as zeros by block status in `chain`
/// (`bdrv_block_status_above` from its top): the first layer that allocates a
/// byte answers (data: no; a zero (sub)cluster: yes), bytes past the end of a
/// layer read as zeros, and bytes no layer allocates read as zeros.
fn chain_reads_zero(chain: &Chain, a: u64, b: u64) -> SimResult<bool> {
    let mut pos = a;
    while pos < b {
        let mut len = b.saturating_sub(pos);
        for layer in &chain.layers {
            if pos >= layer.size() {
                break;
            }
            len = len.min(layer.size().saturating_sub(pos));
            let LayerKind::Qcow2 { image, view, .. } = &layer.kind else {
                // A raw file's block status is its file system's holes
                // (`SEEK_DATA`, as QEMU's file-posix driver asks): a hole
                // reads as zeros, anything allocated (zeros written too) as
                // data. Past the end of the file (a raw layer's size is
                // rounded up to 512 bytes) the rest of the layer is a hole.
                match layer.src.extent_at(pos) {
                    Extent::Hole(0) => break,
                    Extent::Hole(hole) => {
                        len = len.min(hole);
                        break;
                    }
                    Extent::Data(_) => return Ok(false),
                }
            };
            let run = layer_run(image, view, GuestOffset(pos), len, &layer.label())?;
            len = len.min(run.len.max(1));
            match run.status {
                Status::Unallocated { .. } => continue,
                Status::Zero { .. } => break,
                // With metadata preallocation QEMU asks the file system about
                // a data cluster too (BDRV_BLOCK_RECURSE): one in a hole of
                // its file reads as zeros, as `map` shows it.
                Status::Data { host, .. } => {
                    match crate::map::preallocated_data_extent(layer, host) {
                        Some((true, n)) => {
                            len = n.map_or(len, |n| len.min(n));
                            break;
                        }
                        Some((false, _)) | None => return Ok(false),
                    }
                }
                Status::Compressed { .. } => return Ok(false),
            }
        }
        pos = pos.saturating_add(len);
    }
    Ok(true)
}

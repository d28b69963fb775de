//! The full refcount rebuild (`rebuild_refcount_structure` in QEMU's
//! `block/qcow2-refcount.c`): what `qemu-img check -r all`, and a read-write
//! open of a dirty lazy-refcounts image, do when a cluster in use has a stored
//! refcount of 0.
//!
//! QEMU throws the old refcount structure away and writes a new one from its
//! in-memory count of references (the checker's table):
//!
//! 1. For every refcount block's range holding a cluster in use, in order, it
//!    finds a free cluster (first fit in the in-memory table, never before the
//!    start of that range) for the block, counts it there, grows the new
//!    refcount table to whole clusters when the block's index is past its end,
//!    and writes the block: the in-memory counts of its range as they are then.
//!    A block placed past the range being written extends that range, so its
//!    own count is written too.
//! 2. It finds room for the new refcount table (first fit from cluster 0),
//!    counts it, and writes again the blocks covering the table. When that
//!    needs a new block past the table's end, the table grows and a new place
//!    is found; the place found before stays counted (a leak, repaired next).
//! 3. It writes the table and points the header at it
//!    (`refcount_table_offset`, `refcount_table_clusters`).
//!
//! The old table and blocks were counted as in use, so nothing new lands on
//! them; the check that follows finds them leaked and lowers them to 0.
//!
//! The counts are held in the checker's own chunked table ([`Imrt`]), whose
//! chunks exist only where something is counted, and the walks jump from one
//! cluster with a count to the next: a file grown to terabytes for a refcount
//! block far past its end costs what its clusters in use cost.

use super::change::Target;
use super::{Sim, SimError, SimResult};
use crate::check::Imrt;
use crate::header::Field;
use crate::refcount::set_refcount;
use crate::types::HostOffset;
use std::sync::Arc;

/// The most memory QEMU's in-memory refcount array (one refcount of the
/// image's width per cluster of the grown file, in whole clusters) may take
/// for the simulator to say what QEMU does (2 GiB: every file of 64 KiB
/// clusters ext4 holds). QEMU asks for it at once (`g_try_realloc`, then
/// zeroed); whether it gets more depends on the machine it runs on: it fails
/// with "Cannot allocate memory" where the allocator refuses.
const MAX_QEMU_ARRAY_BYTES: u64 = 1 << 31;

/// The in-memory reference counts and the new refcount table being built.
struct Rebuild {
    /// References per cluster (QEMU's in-memory refcount table).
    refs: Imrt,
    /// How many clusters QEMU's table covers: it grows when an allocation
    /// goes past its end.
    len: u64,
    /// New refcount table: host offset of each block, 0 for none.
    reftable: Vec<u64>,
    /// log2 of the refcount entries per block.
    block_bits: u32,
    /// Cluster size.
    cs: u64,
}

impl Rebuild {
    fn get(&self, c: u64) -> u64 {
        self.refs.get(c)
    }

    fn len(&self) -> u64 {
        self.len
    }

    /// The first cluster from `c` with a count, if any.
    fn next_used(&self, c: u64) -> Option<u64> {
        self.refs.next_counted(c)
    }

    /// QEMU's `alloc_clusters_imrt`: `count` contiguous clusters free in the
    /// in-memory table, first fit from `*first_free` (which moves to the first
    /// free cluster seen), counted 1 each; the table grows when the run reaches
    /// its end. Returns the first cluster.
    ///
    /// When no free cluster was seen, every cluster from `*first_free` to
    /// the end of the clusters taken is in use, and nothing here is ever
    /// freed: `*first_free` moves past them, where QEMU's next search would
    /// find its first free cluster all the same (a search that walked them
    /// again would cost each block of a full image the whole image).
    fn alloc(&mut self, count: u64, first_free: &mut u64) -> SimResult<u64> {
        let mut cluster = *first_free;
        let mut run = 0u64;
        let mut first_gap = true;
        while cluster < self.len() && run < count {
            if self.get(cluster) == 0 {
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
                // Every cluster up to the next one counted is free.
                let free = self
                    .next_used(cluster)
                    .unwrap_or(self.len)
                    .min(self.len)
                    .saturating_sub(cluster);
                let take = free.min(count.saturating_sub(run));
                run = run.saturating_add(take);
                cluster = cluster.saturating_add(take);
            } else {
                run = 0;
                cluster = cluster.saturating_add(1);
            }
        }
        if run < count {
            let want = cluster.saturating_add(count).saturating_sub(run);
            if want > 1 << 40 {
                return Err(SimError::Qemu(
                    "Cannot allocate memory (the rebuilt refcount table would be too large) (ENOMEM)".into(),
                ));
            }
            self.len = want;
        }
        let start = cluster.saturating_sub(run);
        for c in start..start.saturating_add(count) {
            self.refs.set(c, 1);
        }
        if first_gap {
            *first_free = (*first_free).max(start.saturating_add(count));
        }
        Ok(start)
    }
}

impl Sim {
    /// QEMU's `compare_refcounts` before any repair: whether a cluster it
    /// finds in use has a stored refcount of 0 (which calls for a rebuild of
    /// the refcount structure), and whether a stored refcount could not be
    /// read ("Can't get refcount for cluster", a check error). The first
    /// such read, through a refcount block that is not cluster aligned,
    /// marks the image corrupt (`qcow2_signal_corruption`); the check goes on.
    pub(super) fn needs_rebuild(&mut self, imrt: &Imrt) -> SimResult<(bool, bool)> {
        let mut zero_in_use = false;
        let mut unreadable = false;
        for c in self.compared_clusters(imrt) {
            match self.get_refcount(c) {
                Ok(stored) => zero_in_use |= stored == 0 && imrt.get(c) != 0,
                Err(e) => {
                    if !unreadable {
                        self.mark_corrupt(format!(
                            "Marking image as corrupt: {} (Can't get refcount for cluster {c})",
                            e.text().trim_end_matches(" (EIO)")
                        ))?;
                    }
                    unreadable = true;
                }
            }
        }
        Ok((zero_in_use, unreadable))
    }

    /// The clusters `compare_refcounts` can find a difference at, in
    /// order: those below the count's `nb_clusters` that the count touched
    /// or that a refcount table entry names a block for. Every other
    /// cluster's stored refcount and count are both 0, so a file grown far
    /// for a refcount block is not walked cluster by cluster.
    pub(super) fn compared_clusters(&mut self, imrt: &Imrt) -> impl Iterator<Item = u64> + use<> {
        let nb = imrt.nb_clusters;
        let bb = self.block_bits();
        let mut ranges = imrt.counted_ranges();
        for ti in 0..self.reftable_len() {
            if self.read_u64(self.reftable_entry_offset(ti)) != 0 {
                let start = ti.checked_shl(bb).unwrap_or(u64::MAX);
                let end = ti.saturating_add(1).checked_shl(bb).unwrap_or(u64::MAX);
                ranges.push((start.min(nb), end.min(nb)));
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        merged.into_iter().flat_map(|(start, end)| start..end)
    }

    /// [`Sim::grow_for_refblock`] for each block at `offsets`: whether the
    /// file grew for any, and whether it could not for any.
    pub(super) fn grow_for_refblocks(&mut self, offsets: &[u64]) -> SimResult<(bool, bool)> {
        let (mut grew, mut failed) = (false, false);
        for off in offsets.iter().copied() {
            if self.grow_for_refblock(off)? {
                grew = true;
            } else {
                failed = true;
            }
        }
        Ok((grew, failed))
    }

    /// The references QEMU counted in a pass that grew the file for refcount
    /// blocks past its end: `now`, as counted in the grown file, but for the
    /// clusters the file did not hold before (`before`: the counts then, the
    /// file's clusters then, the blocks' clusters), where QEMU has what it
    /// counted before it grew the file (a reference there was past the end)
    /// and the blocks, counted once the file holds them.
    pub(super) fn counts_before_growth(now: &Imrt, before: (Arc<Imrt>, u64, Vec<u64>)) -> Imrt {
        let (first, from, blocks) = before;
        let end = now.nb_clusters;
        let mut imrt = now.clone();
        // Only where either count can be other than 0: each cluster once,
        // past the ranges already done (the two tables' ranges are whole
        // chunks, one list of them per table, so only a chunk both count in
        // comes twice).
        let mut ranges = now.counted_ranges();
        ranges.extend(first.counted_ranges());
        ranges.sort_unstable();
        let mut done = from;
        for (start, stop) in ranges {
            let stop = stop.min(end);
            for c in start.max(done)..stop {
                imrt.set(c, first.get(c));
            }
            done = done.max(stop);
        }
        // Then each block once more where it is (a cluster outside every
        // range counted 0 in both).
        for b in blocks.into_iter().filter(|&b| b >= from && b < end) {
            imrt.set(b, imrt.get(b).saturating_add(1));
        }
        imrt
    }

    /// `check_refblocks` with `-r all` for a refcount block at `off`, past
    /// the end of the file: the file grows (with zeros) to end just after the
    /// block. False when QEMU cannot resize the file (it then rebuilds the
    /// refcount structure instead).
    fn grow_for_refblock(&mut self, off: u64) -> SimResult<bool> {
        let Some(end) = off.checked_add(self.cs).filter(|&e| e <= i64::MAX as u64) else {
            self.note(format!("ERROR could not resize image: Invalid argument (a refcount block at {off:#x} would end past INT64_MAX, a size QEMU takes as negative): QEMU rebuilds the refcount structure"));
            return Ok(false);
        };
        if end > super::BDRV_MAX_LENGTH {
            self.note(format!("ERROR could not resize image: Input/output error (offset({end}) exceeds maximum({}), the block layer's limit, for a refcount block at {off:#x}): QEMU rebuilds the refcount structure", super::BDRV_MAX_LENGTH));
            return Ok(false);
        }
        if end > super::MAX_FILE_LEN {
            self.note(format!("ERROR could not resize image: File too large (a refcount block at {off:#x} would make the file {end} bytes long): QEMU rebuilds the refcount structure"));
            return Ok(false);
        }
        // QEMU then holds a refcount for every cluster of the grown file in
        // memory (realloc_refcount_array), and walks them all.
        let clusters = end.div_ceil(self.cs);
        let array = clusters
            .saturating_mul(1u64 << self.order)
            .div_ceil(8)
            .div_ceil(self.cs)
            .saturating_mul(self.cs);
        if array > MAX_QEMU_ARRAY_BYTES {
            return Err(SimError::NotModelled(format!(
                "a refcount block at {off:#x}, outside the image, makes QEMU grow the file to {end} bytes and hold a refcount for each of its {clusters} clusters in memory, {array} bytes asked for at once: whether it gets them or fails with Cannot allocate memory depends on the machine (qinspect follows it up to {MAX_QEMU_ARRAY_BYTES} bytes)"
            )));
        }
        // What QEMU's check of the grown file says at once, and qinspect's
        // own count of it would say too.
        if crate::check::Refusal::file_too_large(clusters).is_some() {
            return Err(SimError::NotModelled(format!(
                "a refcount block at {off:#x}, outside the image, makes QEMU grow the file to {end} bytes, {clusters} clusters: more than the {} clusters QEMU's check counts (a check of such a file fails with File too large)",
                crate::check::MAX_CHECK_CLUSTERS
            )));
        }
        self.note(format!(
            "Repairing refcount block at {off:#x}, outside the image: the file grows from {} to {end} bytes (zeros) to hold it",
            self.file_len
        ));
        self.file_len = self.file_len.max(end);
        Ok(true)
    }

    /// `rebuild_refcount_structure` from the checker's reference counts
    /// (see the module docs), because of `why`. The caller then repairs the
    /// leaks it leaves.
    pub(super) fn rebuild_refcounts(&mut self, imrt: &Imrt, why: &str) -> SimResult<()> {
        self.note(format!(
            "{why}: QEMU rebuilds the whole refcount structure (Rebuilding refcount structure)"
        ));
        // qcow2_cache_empty: the new blocks are written directly, not
        // through the refcount cache, which starts again empty.
        self.refcount_cache_emptied();
        let mut rb = Rebuild {
            refs: imrt.clone(),
            len: imrt.nb_clusters,
            reftable: Vec::new(),
            block_bits: self.block_bits(),
            cs: self.cs,
        };
        let end = rb.len();
        self.write_refblocks(&mut rb, 0, end)?;
        let mut grown = true;
        let mut table_cluster = 0u64;
        let mut table_clusters = 0u64;
        while grown {
            let bytes = (rb.reftable.len() as u64).saturating_mul(8);
            table_clusters = bytes.div_ceil(self.cs);
            let mut first_free = 0u64;
            table_cluster = rb.alloc(table_clusters, &mut first_free)?;
            let offset = self.cluster_start(table_cluster);
            self.why("the rebuilt refcount table");
            self.record(
                Target::Allocate {
                    offset,
                    length: self.clusters_bytes(table_clusters),
                    purpose: "the rebuilt refcount table".into(),
                },
                table_cluster,
                table_cluster,
            );
            self.allocated.push((
                offset,
                self.clusters_bytes(table_clusters),
                "the rebuilt refcount table".into(),
            ));
            grown = self.write_refblocks(
                &mut rb,
                table_cluster,
                table_cluster.saturating_add(table_clusters),
            )?;
        }
        let offset = self.cluster_start(table_cluster);
        let mut bytes: Vec<u8> = rb.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        let full = usize::try_from(self.clusters_bytes(table_clusters)).unwrap_or(0);
        bytes.resize(full.max(bytes.len()), 0);
        self.overlap_check(None, offset, bytes.len() as u64)
            .map_err(|e| {
                SimError::Qemu(format!(
                    "ERROR writing reftable: Input/output error ({})",
                    e.text().trim_end_matches(" (EIO)")
                ))
            })?;
        self.write_bytes(offset, &bytes)?;
        let clusters = u32::try_from(table_clusters).map_err(|_| {
            SimError::Qemu("the rebuilt refcount table is too large (EFBIG)".into())
        })?;
        self.why("the header now names the rebuilt refcount table");
        self.set_header(Field::RefcountTableOffset, offset)?;
        self.set_header(Field::RefcountTableClusters, u64::from(clusters))?;
        self.refcount_table_offset = offset;
        self.refcount_table_clusters = clusters;
        Ok(())
    }

    /// QEMU's `rebuild_refcounts_write_refblocks` over clusters
    /// `first..end`: a block for every range with a cluster in use, written
    /// as the in-memory counts of its range. Returns whether the new refcount
    /// table grew.
    fn write_refblocks(&mut self, rb: &mut Rebuild, first: u64, mut end: u64) -> SimResult<bool> {
        let per_block = 1u64 << rb.block_bits;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            // The next cluster with a count (every one between is free).
            match rb.next_used(cluster) {
                Some(c) if c < end => cluster = c,
                _ => break,
            }
            let index = cluster >> rb.block_bits;
            let start = index << rb.block_bits;
            let slot = usize::try_from(index).ok();
            let existing = slot.and_then(|i| rb.reftable.get(i)).copied().unwrap_or(0);
            let block = if existing != 0 {
                HostOffset(existing)
            } else {
                first_free = first_free.max(start);
                let c = rb.alloc(1, &mut first_free)?;
                if c >= end {
                    end = c.saturating_add(1);
                }
                let slot = slot.ok_or_else(|| {
                    SimError::Qemu("the rebuilt refcount table is too large (EFBIG)".into())
                })?;
                if rb.reftable.len() <= slot {
                    let bytes = (index.saturating_add(1))
                        .saturating_mul(8)
                        .next_multiple_of(rb.cs);
                    let entries = usize::try_from(bytes / 8).map_err(|_| {
                        SimError::Qemu("the rebuilt refcount table is too large (EFBIG)".into())
                    })?;
                    rb.reftable.resize(entries, 0);
                    grown = true;
                }
                let off = self.cluster_start(c);
                // Nothing in the new structure can land on metadata QEMU
                // counts; an old refcount block it could not count (one not
                // cluster aligned) can be in the way. (A block written again
                // passed this check the first time.)
                self.overlap_check(None, off, rb.cs).map_err(|e| {
                    SimError::Qemu(format!(
                        "ERROR writing refblock: Input/output error ({})",
                        e.text().trim_end_matches(" (EIO)")
                    ))
                })?;
                if let Some(e) = rb.reftable.get_mut(slot) {
                    *e = off.get();
                }
                self.why(format!("refcount block {index} of the rebuilt structure"));
                self.record(
                    Target::Allocate {
                        offset: off,
                        length: rb.cs,
                        purpose: format!("rebuilt refcount block {index}"),
                    },
                    c,
                    c,
                );
                self.allocated
                    .push((off, rb.cs, format!("rebuilt refcount block {index}")));
                off
            };
            let mut buf = vec![0u8; usize::try_from(rb.cs).unwrap_or(0)];
            let stop = start.saturating_add(per_block);
            let mut at = start;
            while let Some(c) = rb.next_used(at).filter(|&c| c < stop) {
                set_refcount(&mut buf, self.order, c.saturating_sub(start), rb.get(c));
                at = c.saturating_add(1);
            }
            self.write_bytes(block, &buf)?;
            cluster = start.saturating_add(per_block);
        }
        Ok(grown)
    }
}

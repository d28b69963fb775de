//! Guest writes and copy-on-write: finding or making the L2 table for a guest
//! cluster, allocating data clusters, and copying the parts of a cluster a
//! write does not cover (`qcow2_alloc_host_offset`, `handle_copied`,
//! `handle_alloc`, `perform_cow`).

use super::Sim;
use super::SimError;
use super::SimResult;
use super::alloc::Discard;
use super::change::Target;
use super::overlap::Meta;
use crate::tables::ClusterType;
use crate::tables::L1Entry;
use crate::tables::L2Entry;
use crate::types::low_mask;
use crate::types::{GuestOffset, HostOffset};

mod cow;

impl Sim {
    /// Where entry `index` of the L2 table at `l2` is (saturating: `l2` comes from
    /// an L1 entry).
    pub(super) fn l2_entry_offset(&self, l2: HostOffset, index: u64) -> HostOffset {
        l2.saturating_entry(index, self.geo.l2_entry_size())
    }

    /// Entry `index` of the L2 table at `l2`: its word and, with extended
    /// L2, its subcluster bitmap (else 0).
    pub(super) fn l2_entry_at(&mut self, l2: HostOffset, index: u64) -> (u64, u64) {
        let off = self.l2_entry_offset(l2, index);
        let raw = self.read_u64(off);
        let bitmap = if self.geo.extended_l2 {
            self.read_u64(off.saturating_add(8))
        } else {
            0
        };
        (raw, bitmap)
    }

    pub(super) fn set_l2_entry(
        &mut self,
        l2: HostOffset,
        index: u64,
        raw: u64,
        bitmap: u64,
    ) -> SimResult<()> {
        let (old, old_bm) = self.l2_entry_at(l2, index);
        let off = self.l2_entry_offset(l2, index);
        if old != raw || old_bm != bitmap {
            if !self.held_back(l2, index, old, old_bm) {
                self.overlap_check(Some(Meta::ActiveL2), off, self.geo.l2_entry_size())?;
            }
            self.log_l2_write(l2, index, old, old_bm);
        }
        if old != raw {
            self.write_u64(off, raw)?;
            self.record(
                Target::L2Entry {
                    table_offset: l2,
                    index,
                },
                old,
                raw,
            );
        }
        if self.geo.extended_l2 && old_bm != bitmap {
            self.write_u64(off.saturating_add(8), bitmap)?;
            let saved = self.reason.clone();
            self.reason = format!("{saved} (subcluster bitmap)");
            self.record(
                Target::L2Entry {
                    table_offset: l2,
                    index,
                },
                old_bm,
                bitmap,
            );
            self.reason = saved;
        }
        Ok(())
    }

    /// QEMU's `get_cluster_table`: the L2 table for `guest`, allocated or copied
    /// first if the L1 entry lacks COPIED (an entry of 0 included).
    pub(super) fn cluster_table(&mut self, guest: GuestOffset) -> SimResult<HostOffset> {
        let i = self.geo.l1_index(guest);
        if i >= self.l1.len() as u64 {
            let saved = self.reason.clone();
            self.why(format!(
                "guest offset {guest:#x} is beyond the active L1 table ({} entries)",
                self.l1.len()
            ));
            self.grow_l1_table(i.saturating_add(1), false)?;
            self.reason = saved;
        }
        let Some(&e) = self.l1.get(i as usize) else {
            return Err(SimError::Qemu(format!(
                "guest offset {guest:#x} is beyond the L1 table (EIO)"
            )));
        };
        let index = self.geo.l2_index(guest);
        if e.copied() {
            let l2 = e.l2_offset().unwrap_or_default();
            // l2_load: the slice through QEMU's L2 cache.
            self.l2_slice_used(l2, index, false);
            return Ok(l2);
        }
        let old = e.l2_offset().filter(|&o| o != HostOffset(0));
        let saved = self.reason.clone();
        let purpose = if let Some(old) = old {
            format!("a copy of the shared L2 table at {old:#x} (active L1[{i}] lacks COPIED)")
        } else {
            format!(
                "a new L2 table for active L1[{i}] (guest {:#x}..)",
                i.saturating_mul(self.geo.l2_coverage())
            )
        };
        self.why(purpose.clone());
        let new = self.alloc_clusters(self.cs, &purpose)?;
        let content = match old {
            None => vec![0u8; self.cs as usize],
            Some(old) => self.read_bytes(old, self.cs),
        };
        // l2_allocate writes QEMU's refcount cache back, then fills the new
        // table slice by slice in its L2 cache (each new slice held while
        // the old one is read), then writes the L2 cache back. A slice held
        // back for the overlap check stops the first of them that writes
        // it: the refcount cache's, when it waits on the L2 cache (its
        // refcounts and the new table then unwritten), else the L2 cache's.
        let site = "l2_allocate makes a new L2 table";
        let stop = self.held_unwritten(site)?;
        if let Some(stop) = stop
            && self.refcount_flush_writes_l2_first()
        {
            self.l2_written_back();
            let e = self.held_stopped_within(stop, site);
            self.new_table_undone(new);
            return Err(e);
        }
        self.write_bytes(new, &content)?;
        self.refcounts_flushed();
        let slice = self.slice_entries().max(1);
        let mut k = 0u64;
        while k < self.geo.l2_entries() {
            self.l2_slice_get(new, k);
            if let Some(old) = old {
                self.l2_slice_used(old, k, false);
            }
            self.l2_slice_put(new, k, true);
            k = k.saturating_add(slice);
        }
        if let Some(stop) = stop {
            if let Some(why) = self.held_evicted() {
                return Err(SimError::NotModelled(why));
            }
            self.l2_written_back();
            let e = self.held_stopped_within(stop, site);
            self.new_table_undone(new);
            return Err(e);
        }
        self.l2_cache_flushed();
        if let Some(old) = old {
            self.record(
                Target::Copy {
                    from: format!("L2 table at {old:#x}"),
                    to: new,
                    length: self.cs,
                },
                0,
                0,
            );
        }
        self.why(format!(
            "active L1[{i}] now names the {}",
            if old.is_none() {
                "new L2 table"
            } else {
                "private copy"
            }
        ));
        let new_e = L1Entry::l2_table(new, true);
        let l1_off = self.l1_table_offset;
        // qcow2_write_l1_entry: checked as any write, the active L1 aside
        // (an L1 table that is also an active L2 table stops it).
        self.overlap_check(Some(Meta::ActiveL1), l1_off.saturating_entry(i, 8), 8)?;
        if let Some(slot) = self.l1.get_mut(i as usize) {
            *slot = new_e;
        }
        self.write_u64(l1_off.saturating_entry(i, 8), new_e.0)?;
        self.record(
            Target::L1Entry {
                table: "active L1".into(),
                table_offset: l1_off,
                index: i,
                snapshot: None,
            },
            e.0,
            new_e.0,
        );
        if let Some(old) = old {
            self.free_clusters(
                old,
                self.cs,
                &format!("the old L2 table at {old:#x} (one L1 fewer names it)"),
                Discard::Other,
            );
        }
        self.reason = saved;
        self.l2_slice_used(new, index, false);
        Ok(new)
    }

    pub(super) fn needs_new_alloc(&self, raw: u64) -> bool {
        let e = L2Entry { raw, bitmap: 0 };
        match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Unallocated | ClusterType::ZeroPlain | ClusterType::Compressed => true,
            ClusterType::Normal | ClusterType::ZeroAlloc => !e.copied(),
        }
    }

    /// QEMU's `qcow2_alloc_clusters_at`: as many free clusters as there are at
    /// `off`, up to `n`, +1 each.
    pub(super) fn alloc_clusters_at(
        &mut self,
        off: HostOffset,
        n: u64,
        purpose: &str,
    ) -> SimResult<u64> {
        let first = self.cluster_of(off);
        loop {
            let mut i = 0u64;
            while i < n && self.get_refcount(first.saturating_add(i))? == 0 {
                i = i.saturating_add(1);
            }
            if i == 0 {
                return Ok(0);
            }
            let len = self.clusters_bytes(i);
            match self.take_clusters(off, len, first, purpose) {
                Err(SimError::Again) => continue,
                Err(e) => return Err(e),
                Ok(()) => return Ok(i),
            }
        }
    }

    /// Where the disk ends for the block layer: the header's size cut down
    /// to whole sectors (`total_sectors`); a request past it fails.
    pub(super) fn disk_end(&self) -> u64 {
        self.size & !511
    }

    /// A guest write of `length` bytes at `offset`: one write request, whose
    /// L2 entries QEMU sets only after its data is written (see
    /// [`Sim::request_begin`]).
    pub(super) fn write(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
        let started = self.request_begin();
        let r = self.write_request(offset, length);
        // A piece the request left early (an error) keeps its data.
        self.data.map.keep();
        if started {
            self.request_end();
        }
        r
    }

    /// The request of [`Sim::write`] (`qcow2_co_pwritev_part`).
    ///
    /// Guest positions stay inside `offset..offset + length` (checked against the
    /// disk size first), counts of clusters inside one L2 slice, and host offsets
    /// are masked L2 entries (below 2^56): the saturating operations below never
    /// saturate on any image, they only rule out wraparound.
    ///
    /// It is one function because it is one loop with QEMU's restart points
    /// (a new refcount block found mid-allocation sends it back to the lookup
    /// of the same cluster): cutting it would spread the state of one pass
    /// (the slice, the run being placed, what COW reads) over several calls.
    fn write_request(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
        let Some(end) = offset
            .checked_add(length)
            .filter(|e| e.get() <= self.disk_end())
        else {
            return Err(SimError::Qemu(format!(
                "write failed: Input/output error (the request ends past the end of the disk, {} bytes, so the block layer refuses all of it)",
                self.disk_end()
            )));
        };
        self.mark_dirty(offset, length);
        let cs = self.cs;
        let sc_bits = self.geo.subcluster_bits();
        let mut frees: Vec<(u64, String)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            // qcow2_alloc_host_offset: one contiguous host range. Its data
            // is written once the whole range is allocated: an entry that
            // fails the allocation on the way takes back what the piece's
            // earlier clusters were given.
            self.request_piece();
            self.data.map.journal();
            let mut host_next: Option<HostOffset> = None;
            loop {
                if pos >= end {
                    break;
                }
                let l2_index = self.geo.l2_index(pos);
                let slice = self.slice_entries();
                let in_c = self.within(pos);
                let max_n = in_c
                    .saturating_add(end.saturating_sub(pos))
                    .div_ceil(cs)
                    .min(slice.saturating_sub(l2_index.checked_rem(slice).unwrap_or(0)));
                // handle_copied
                let l2 = self.cluster_table(pos)?;
                let (raw, bitmap) = self.l2_entry_at(l2, l2_index);
                if !self.needs_new_alloc(raw) {
                    let host = L2Entry::from_word(raw).host_offset();
                    if !host.is_multiple_of(cs) {
                        return Err(SimError::Qemu(format!(
                            "Data cluster offset {host:#x} unaligned (guest offset: {pos:#x}) (EIO)"
                        )));
                    }
                    if host_next.is_some_and(|h| h != host) {
                        break;
                    }
                    let mut keep = 0u64;
                    let mut expect = host;
                    while keep < max_n {
                        let (r, _) = self.l2_entry_at(l2, l2_index.saturating_add(keep));
                        if self.needs_new_alloc(r) || L2Entry::from_word(r).host_offset() != expect
                        {
                            break;
                        }
                        expect = expect.saturating_add(cs);
                        keep = keep.saturating_add(1);
                    }
                    let bytes = keep
                        .saturating_mul(cs)
                        .saturating_sub(in_c)
                        .min(end.saturating_sub(pos));
                    let write_end = pos.saturating_add(bytes);
                    self.piece_valid(l2, l2_index, keep, pos)?;
                    self.why(format!("in-place write to guest {pos:#x}..{write_end:#x}: the clusters are COPIED (refcount 1)"));
                    self.note(format!(
                        "guest {pos:#x}..{write_end:#x} is written in place at host {:#x} (COPIED: no copy needed)",
                        host.saturating_add(in_c)
                    ));
                    if !self.has_data_file {
                        self.overlap_check(None, host.saturating_add(in_c), bytes)?;
                    }
                    // An l2meta exists only for zero-allocated clusters or, with
                    // extended L2, subclusters that are not yet normal.
                    for k in 0..keep {
                        let index = l2_index.saturating_add(k);
                        {
                            // The written range, relative to cluster k of the run.
                            let k_start = k.saturating_mul(cs);
                            let a = in_c.max(k_start).saturating_sub(k_start);
                            let b = in_c
                                .saturating_add(bytes)
                                .min(k_start.saturating_add(cs))
                                .saturating_sub(k_start);
                            let g0 = self.guest_cluster_start(pos).saturating_add(k_start);
                            self.data_keep_around(
                                l2,
                                index,
                                g0,
                                host.saturating_add(k_start),
                                (a, b),
                            )?;
                        }
                        let (r, bm) = self.l2_entry_at(l2, index);
                        let ty = L2Entry { raw: r, bitmap: bm }
                            .cluster_type(&self.geo, self.has_data_file);
                        let new_bm = if self.geo.extended_l2 {
                            let from = if k == 0 { in_c } else { 0 };
                            // The written range, relative to cluster k of the run.
                            let to = in_c
                                .saturating_add(bytes)
                                .saturating_sub(k.saturating_mul(cs))
                                .min(cs);
                            let (fsc, lsc) = (from >> sc_bits, to.saturating_sub(1) >> sc_bits);
                            let mask = sub_range(fsc, lsc.saturating_add(1));
                            (bm | mask) & !(mask << 32)
                        } else {
                            bm
                        };
                        let new_raw = if ty == ClusterType::ZeroAlloc && !self.geo.extended_l2 {
                            L2Entry::from_word(L2Entry::from_word(r).host_offset().0)
                                .with_copied(true)
                                .raw
                        } else {
                            r
                        };
                        if new_raw != r || new_bm != bm {
                            // Its l2meta is linked as a new cluster's is.
                            self.l2_link();
                            self.why("the written cluster no longer reads as zeros");
                            self.set_l2_entry(l2, index, new_raw, new_bm)?;
                        }
                    }
                    let _ = bitmap;
                    self.data_written(host.saturating_add(in_c), pos, bytes);
                    host_next = Some(host.saturating_add(keep.saturating_mul(cs)));
                    if write_end <= pos {
                        return Err(SimError::Qemu(format!(
                            "no progress at guest {pos:#x}: the L2 entries there are inconsistent"
                        )));
                    }
                    pos = write_end;
                    continue;
                }
                // handle_alloc
                let mut n = 0u64;
                while n < max_n {
                    let (r, _) = self.l2_entry_at(l2, l2_index.saturating_add(n));
                    if !self.needs_new_alloc(r) {
                        break;
                    }
                    n = n.saturating_add(1);
                }
                // The entries are looked at once their clusters are allocated
                // (calculate_l2_meta after do_alloc_cluster_offset); a piece
                // that cannot run on into them ends before they are looked at.
                if host_next.is_none() || self.has_data_file {
                    self.piece_valid(l2, l2_index, n, pos)?;
                }
                let guest_cluster = self.guest_cluster_start(pos);
                let purpose = format!(
                    "guest data at {guest_cluster:#x}..{:#x}",
                    guest_cluster.saturating_add(n.saturating_mul(cs))
                );
                let host = if self.has_data_file {
                    // The data file's clusters sit at the guest's offsets.
                    HostOffset(guest_cluster.get())
                } else {
                    match host_next {
                        None => self.alloc_clusters(n.saturating_mul(cs), &purpose)?,
                        Some(h) => {
                            n = self.alloc_clusters_at(h, n, &purpose)?;
                            if n == 0 {
                                break;
                            }
                            self.piece_valid(l2, l2_index, n, pos)?;
                            h
                        }
                    }
                };
                let bytes = n
                    .saturating_mul(cs)
                    .saturating_sub(in_c)
                    .min(end.saturating_sub(pos));
                self.cow_notes(l2, l2_index, n, pos, bytes, host);
                if !self.has_data_file {
                    // The data, with what copy-on-write fills in, is written
                    // before the L2 entries name it.
                    self.overlap_check(None, host, n.saturating_mul(cs))?;
                }
                // qcow2_alloc_cluster_link_l2, after the data is written.
                self.l2_link();
                let (cow_from, cow_to) = self.cow_range(l2, l2_index, n, in_c, bytes);
                // The data: what copy-on-write reads from this layer as it is
                // now (before the L2 entries change), and the guest's bytes.
                let end_in = in_c.saturating_add(bytes);
                self.data_copied(
                    guest_cluster.saturating_add(cow_from),
                    in_c.saturating_sub(cow_from),
                    host.saturating_add(cow_from),
                )?;
                self.data_copied(
                    guest_cluster.saturating_add(end_in),
                    cow_to.saturating_sub(end_in),
                    host.saturating_add(end_in),
                )?;
                self.data_written(host.saturating_add(in_c), pos, bytes);
                for k in 0..n {
                    let index = l2_index.saturating_add(k);
                    // Cluster k of the run: bytes k * cs.. relative to the first.
                    let k_start = k.saturating_mul(cs);
                    let guest_k = guest_cluster.saturating_add(k_start);
                    let host_k = host.saturating_add(k_start);
                    let (r, bm) = self.l2_entry_at(l2, index);
                    if r != 0 {
                        frees.push((
                            r,
                            format!(
                                "the old cluster of guest {guest_k:#x} (replaced by the copy-on-write)"
                            ),
                        ));
                    }
                    let new_bm = if self.geo.extended_l2 {
                        let from = cow_from.max(k_start);
                        let to = cow_to.min(k_start.saturating_add(cs));
                        let (fsc, lsc) = (
                            from.saturating_sub(k_start) >> sc_bits,
                            to.saturating_sub(k_start).saturating_sub(1) >> sc_bits,
                        );
                        let mask = sub_range(fsc, lsc.saturating_add(1));
                        (bm | mask) & !(mask << 32)
                    } else {
                        bm
                    };
                    self.why(format!(
                        "guest {guest_k:#x} now maps to the new cluster {host_k:#x}"
                    ));
                    let entry = L2Entry::from_word(host_k.get()).with_copied(true);
                    self.set_l2_entry(l2, index, entry.raw, new_bm)?;
                }
                host_next = Some(host.saturating_add(n.saturating_mul(cs)));
                if bytes == 0 {
                    return Err(SimError::Qemu(format!(
                        "no progress at guest {pos:#x}: the L2 entries there are inconsistent"
                    )));
                }
                pos = pos.saturating_add(bytes);
            }
            self.data.map.keep();
        }
        // Old clusters are released last (their tasks finish after all allocations).
        for (entry, why) in frees {
            self.free_any_cluster(entry, &why, Discard::Never);
        }
        Ok(())
    }
}

impl Sim {
    /// [`Sim::write_piece_valid`] within a piece of a write request: when
    /// it fails, the data of the piece so far is taken back (QEMU had not
    /// written it yet).
    fn piece_valid(
        &mut self,
        l2: HostOffset,
        index: u64,
        count: u64,
        pos: GuestOffset,
    ) -> SimResult<()> {
        let r = self.write_piece_valid(l2, index, count, pos);
        if r.is_err() {
            self.data.map.take_back();
        }
        r
    }
}

/// Bits `from..to` of a subcluster allocation bitmap.
pub(super) fn sub_range(from: u64, to: u64) -> u64 {
    let to = to.min(32);
    if from >= to {
        return 0;
    }
    // from < to <= 32.
    low_mask(to.saturating_sub(from) as u32) << from
}

//! One L2 table: `check_refcounts_l2`.

use super::detail::FindingDetail;
use super::report::{Category, FindingKind, L1Id, Role};
use super::visit::{Ctx, Visitor};
use super::walk::Walk;
use crate::io::read_into;
use crate::tables::{
    ClusterType, CompressedDescriptor, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, L2Entry,
};
use crate::types::HostOffset;

impl Walk<'_> {
    /// `check_refcounts_l2` for one L2 table, once, weighted by the L1 entries naming it.
    ///
    /// One function of about 250 lines on purpose: it is the check's hot loop (16
    /// million entries for a 1 TiB image), and the run being built, the contiguity
    /// of the last entry and the counters stay in locals across the match on each
    /// entry's type; the finding-producing arms are cold and short.
    pub(super) fn walk_l2(
        &mut self,
        v: &mut dyn Visitor,
        l2: HostOffset,
        refs: &[(L1Id, u64)],
        buf: &mut [u8],
    ) {
        let w = refs.len() as u64;
        let active = refs.iter().filter(|(id, _)| *id == L1Id::Active).count() as u64;
        let read = read_into(self.img.src.as_ref(), "L2 table", l2, buf).is_ok();
        if let Some(cp) = self.copied.as_mut() {
            cp.table(l2, read.then_some(&*buf));
        }
        if !read {
            let msg = "ERROR: I/O error in check_refcounts_l2".to_string();
            if let Some(f) = self.find(
                FindingKind::CheckError,
                Category::Io,
                FindingDetail::L2TableUnreadable,
                msg,
                w,
            ) {
                f.offset = Some(l2);
            }
            return;
        }
        let geo = self.img.geometry();
        let ext = geo.extended_l2;
        let step = geo.l2_entry_size() as usize;
        let has_df = self.img.header.has_data_file();
        let mut next_contiguous = 0u64;
        let cs = self.cs;
        let cmask = self.cmask;
        // A run of data clusters (first cluster, count, first L2 index) counted at once.
        let mut run: Option<(u64, u64, u64)> = None;
        // Where entry i is, for findings only (not computed per entry).
        let entry_off = |i: u64| l2.saturating_entry(i, step as u64);
        // The raw value of the last entry added to `run` (standard entries only).
        let mut run_raw = 0u64;
        let fast = !ext && !has_df;
        // Entries before this index were taken by the bulk run scan below.
        let mut skip_to = 0usize;
        for (i, chunk) in buf.chunks_exact(step).enumerate() {
            if i < skip_to {
                continue;
            }
            let raw = crate::bytes::be64(chunk, 0);
            // Fast path: the next plain data cluster of a run. Its raw value is the
            // previous entry's plus one cluster, so its flags (COPIED, no zero or
            // compressed bit, no reserved bits) are the same and its offset is the
            // next aligned cluster: everything the full decoding below would find.
            if fast
                && let Some((start, n, idx)) = run
                && raw == run_raw.wrapping_add(cs)
                // Raw mask, not `std_reserved_bits`: this is the per-entry hot path.
                && raw & L2E_STD_RESERVED_MASK == 0
                && idx.saturating_add(n) == i as u64
                && L2Entry::from_word(raw).host_offset().0 < self.file_len
            {
                // The entries after this one that continue the run, in one
                // tight scan. The tests above hold for each next entry equal to
                // the previous one plus a cluster while its offset stays below
                // the end of the file and inside the offset field (bits 9..=55:
                // adding a cluster then leaves every flag and reserved bit as
                // this entry has them): `room` entries at most.
                let off = L2Entry::from_word(raw).host_offset().0;
                let end = self.file_len.min(L2E_OFFSET_MASK | 0x1ff);
                let room = end.saturating_sub(1).saturating_sub(off) >> self.cbits;
                let room = usize::try_from(room).unwrap_or(usize::MAX);
                let mut last = raw;
                let more = buf
                    .get(i.saturating_add(1).saturating_mul(8)..)
                    .unwrap_or(&[])
                    .chunks_exact(8)
                    .take(room)
                    .map(|c| crate::bytes::be64(c, 0))
                    .take_while(|&r| {
                        let ok = r == last.wrapping_add(cs);
                        if ok {
                            last = r;
                        }
                        ok
                    })
                    .count();
                // At most one table's entries: no overflow.
                let taken = (more as u64).saturating_add(1);
                skip_to = i.saturating_add(more).saturating_add(1);
                run = Some((start, n.saturating_add(taken), idx));
                run_raw = last;
                if active > 0 {
                    let r = &mut self.report;
                    r.allocated_clusters = r
                        .allocated_clusters
                        .saturating_add(active.saturating_mul(taken));
                    next_contiguous = L2Entry::from_word(last).host_offset().0.wrapping_add(cs);
                }
                continue;
            }
            let bitmap = if ext { crate::bytes::be64(chunk, 8) } else { 0 };
            if raw == 0 && bitmap == 0 {
                continue;
            }
            let e = L2Entry { raw, bitmap };
            let ct = e.cluster_type(&geo, has_df);
            let i = i as u64;
            if ct != ClusterType::Compressed && e.std_reserved_bits() != 0 {
                let msg = format!("ERROR found l2 entry with reserved bits set: {raw:x}");
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::ReservedBits,
                    FindingDetail::L2ReservedBits,
                    msg,
                    w,
                ) {
                    f.offset = Some(entry_off(i));
                }
            }
            match ct {
                ClusterType::Compressed => {
                    let d = CompressedDescriptor::decode(raw, &geo);
                    if e.copied() {
                        let msg = format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            d.offset.0
                        );
                        if let Some(f) = self.find(
                            FindingKind::Corruption,
                            Category::Copied,
                            FindingDetail::CompressedCopied,
                            msg,
                            w,
                        ) {
                            f.offset = Some(entry_off(i));
                            f.repair = Some("clear bit 63 of the L2 entry".into());
                        }
                    }
                    if has_df {
                        let msg =
                            format!("ERROR compressed cluster {i} with data file, entry={raw:#x}");
                        if let Some(f) = self.find(
                            FindingKind::Corruption,
                            Category::Compressed,
                            FindingDetail::CompressedWithDataFile,
                            msg,
                            w,
                        ) {
                            f.offset = Some(entry_off(i));
                        }
                        continue;
                    }
                    if bitmap != 0 {
                        let msg = format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={raw:#x}"
                        );
                        if let Some(f) = self.find(
                            FindingKind::Corruption,
                            Category::Compressed,
                            FindingDetail::CompressedWithSubclusters,
                            msg,
                            w,
                        ) {
                            f.offset = Some(entry_off(i));
                        }
                        continue;
                    }
                    self.inc(
                        v,
                        d.offset,
                        d.size,
                        w,
                        Ctx::Entry {
                            l2,
                            index: i,
                            role: Role::Compressed,
                        },
                    );
                    let r = &mut self.report;
                    r.allocated_clusters = r.allocated_clusters.saturating_add(active);
                    r.compressed_clusters = r.compressed_clusters.saturating_add(active);
                    r.fragmented_clusters = r.fragmented_clusters.saturating_add(active);
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let off = L2Entry::from_word(raw).host_offset();
                    if (bitmap >> 32) & bitmap != 0 {
                        let msg = format!(
                            "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        );
                        if let Some(f) = self.find(
                            FindingKind::Corruption,
                            Category::Subclusters,
                            FindingDetail::SubclustersContradict,
                            msg,
                            w,
                        ) {
                            f.offset = Some(entry_off(i));
                        }
                    }
                    if off.get() & cmask != 0 {
                        let contains_data = if ext {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            !e.zero_flag()
                        };
                        let detail = if contains_data {
                            FindingDetail::DataClusterUnaligned
                        } else {
                            FindingDetail::UnalignedZeroCluster
                        };
                        let msg = if contains_data {
                            format!(
                                "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            )
                        } else {
                            format!(
                                "ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            )
                        };
                        if let Some(f) =
                            self.find(FindingKind::Corruption, Category::Unaligned, detail, msg, w)
                        {
                            f.offset = Some(entry_off(i));
                            if !contains_data {
                                f.repair = Some("qemu-img check -r all turns the entry into a plain zero cluster".into());
                            }
                        }
                    }
                    if active > 0 {
                        let r = &mut self.report;
                        r.allocated_clusters = r.allocated_clusters.saturating_add(active);
                        if next_contiguous != 0 && off.get() != next_contiguous {
                            r.fragmented_clusters = r.fragmented_clusters.saturating_add(active);
                        }
                        next_contiguous = off.get().wrapping_add(cs);
                    }
                    if !has_df {
                        if off.get() & cmask == 0 && off.get() < self.file_len {
                            // Aligned and inside the file: extend or start a run.
                            let c = off.get() >> self.cbits;
                            match run {
                                // Contiguous on the host and in the table. (A run
                                // ends at a cluster in the file and an index in the
                                // table: these sums cannot overflow.)
                                Some((start, n, idx))
                                    if start.saturating_add(n) == c
                                        && idx.saturating_add(n) == i =>
                                {
                                    run = Some((start, n.saturating_add(1), idx))
                                }
                                _ => {
                                    if let Some((start, n, idx)) = run.take() {
                                        self.flush_run(v, l2, start, n, idx, w);
                                    }
                                    run = Some((c, 1, i));
                                }
                            }
                            run_raw = raw;
                        } else {
                            if let Some((start, n, idx)) = run.take() {
                                self.flush_run(v, l2, start, n, idx, w);
                            }
                            self.inc(
                                v,
                                off,
                                cs,
                                w,
                                Ctx::Entry {
                                    l2,
                                    index: i,
                                    role: Role::Data,
                                },
                            );
                        }
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & 0xffff_ffff != 0 {
                        let msg =
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .to_string();
                        if let Some(f) = self.find(
                            FindingKind::Corruption,
                            Category::Subclusters,
                            FindingDetail::SubclustersUnallocated,
                            msg,
                            w,
                        ) {
                            f.offset = Some(entry_off(i));
                        }
                    }
                }
            }
        }
        if let Some((start, n, idx)) = run.take() {
            self.flush_run(v, l2, start, n, idx, w);
        }
    }
}

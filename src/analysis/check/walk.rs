//! The walk over every structure that references a cluster.

use super::MAX_FINDINGS;
use super::copied::Copied;
use super::detail::FindingDetail;
use super::imrt::Imrt;
use super::report::{Category, CheckReport, Finding, FindingKind, L1Id, Progress, Referrer, Role};
use super::visit::{Counter, Ctx, Visitor};
use crate::header::ExtensionKind;
use crate::image::Qcow2;
use crate::io::read_into;
use crate::tables::{L1Entry, MAX_L1_ENTRIES};
use crate::types::{HostOffset, low_mask};
use std::collections::BTreeMap;

/// Below this many L2 tables the L2 phase stays on one thread.
const SPLIT_MIN_TABLES: usize = 64;

/// The walk over every structure, shared by the check and by `clusters`.
pub(super) struct Walk<'a> {
    pub(super) img: &'a Qcow2,
    pub(super) cs: u64,
    pub(super) cbits: u32,
    /// `cs - 1`: the offset-in-cluster bits.
    pub(super) cmask: u64,
    pub(super) file_len: u64,
    pub(super) report: CheckReport,
    /// L2 table offset -> the L1 entries that name it.
    pub(super) l2_refs: BTreeMap<HostOffset, Vec<(L1Id, u64)>>,
    /// Snapshot L1 tables as read.
    pub(super) snapshot_l1_count: usize,
    pub(super) record: bool,
    /// The COPIED check, handed each active L2 table as it is read.
    pub(super) copied: Option<Box<Copied<'a>>>,
    pub(super) progress: Option<&'a (dyn Fn(Progress) + Sync)>,
    /// Set by the cluster listing (never by `check`, which walks as QEMU's check
    /// does): leave out the active L1 table, neither read nor counted, when the
    /// open did not read it ([`Qcow2::l1_unread`]), and hand the visitor regions
    /// past the end of the file too, so the listing can say what names them.
    pub(super) listing: bool,
}

impl<'a> Walk<'a> {
    pub(super) fn new(img: &'a Qcow2, record: bool) -> Self {
        let cbits = img.geometry().cluster_bits;
        Walk {
            img,
            cs: 1 << cbits,
            cbits,
            cmask: low_mask(cbits),
            file_len: img.file_len(),
            report: CheckReport::default(),
            l2_refs: BTreeMap::new(),
            snapshot_l1_count: 0,
            record,
            copied: None,
            progress: None,
            listing: false,
        }
    }

    pub(super) fn l1_name(&self, id: L1Id) -> String {
        match id {
            L1Id::Active => "active L1".into(),
            L1Id::Snapshot { index } => match self.img.snapshots.snapshots.get(index) {
                Some(s) => format!("snapshot {} '{}' L1", s.id, s.name),
                None => format!("snapshot #{index} L1"),
            },
        }
    }

    pub(super) fn find(
        &mut self,
        kind: FindingKind,
        category: Category,
        detail: FindingDetail,
        message: String,
        count: u64,
    ) -> Option<&mut Finding> {
        if !self.record || count == 0 {
            return None;
        }
        match kind {
            FindingKind::Corruption => {
                self.report.corruptions = self.report.corruptions.saturating_add(count)
            }
            FindingKind::Leak => self.report.leaks = self.report.leaks.saturating_add(count),
            FindingKind::CheckError => {
                self.report.check_errors = self.report.check_errors.saturating_add(count)
            }
            FindingKind::Note => {}
        }
        if self.report.findings.len() >= MAX_FINDINGS {
            self.report.findings_omitted = self.report.findings_omitted.saturating_add(1);
            return None;
        }
        self.report.findings.push(Finding {
            kind,
            category,
            detail,
            message,
            count,
            cluster: None,
            offset: None,
            refcount: None,
            reference: None,
            referrers: Vec::new(),
            repair: None,
        });
        self.report.findings.last_mut()
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`, `w` times: the clusters of `len` bytes
    /// at `off`.
    pub(super) fn inc(&mut self, v: &mut dyn Visitor, off: HostOffset, len: u64, w: u64, ctx: Ctx) {
        if len == 0 || w == 0 {
            return;
        }
        let end = off.get().saturating_add(len);
        if end.saturating_sub(self.file_len) >= self.cs && end > self.file_len {
            let msg = format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            );
            let cbits = self.cbits;
            if let Some(f) = self.find(
                FindingKind::Corruption,
                Category::PastEof,
                FindingDetail::PastEof,
                msg,
                w,
            ) {
                f.offset = Some(off);
                f.cluster = Some(off.get() >> cbits);
            }
            if !self.listing {
                return;
            }
        }
        let first = off.get() >> self.cbits;
        // len > 0, so end >= 1.
        let last = end.saturating_sub(1) >> self.cbits;
        let over = v.visit(first, last, w, ctx);
        if over > 0 && self.record {
            // Repeated overflows of one cluster are one finding with a count.
            if let Some(f) = self.report.findings.last_mut()
                && f.category == Category::Overflow
                && f.cluster == Some(first)
            {
                f.count = f.count.saturating_add(over);
                self.report.corruptions = self.report.corruptions.saturating_add(over);
                return;
            }
        }
        if over > 0 {
            let msg = format!(
                "ERROR: overflow cluster offset={:#x} (refcounts are {} bits wide: at most {})",
                first << self.cbits,
                self.img.header.refcount_bits(),
                self.img.refcount_geometry().max()
            );
            let at = first << self.cbits;
            if let Some(f) = self.find(
                FindingKind::Corruption,
                Category::Overflow,
                FindingDetail::Overflow,
                msg,
                over,
            ) {
                f.cluster = Some(first);
                f.offset = Some(HostOffset(at));
                f.repair = Some("qemu-img amend -o refcount_bits=… (wider refcounts) or qemu-img convert to a clean copy".into());
            }
        }
    }

    pub(super) fn tick(&self, phase: &'static str, done: u64, total: u64) {
        if let Some(p) = self.progress {
            p(Progress { phase, done, total });
        }
    }

    /// Read an L1 table (zeros past EOF, like QEMU's reads).
    /// Only the entries inside the file are read: past its end they are zeros,
    /// which the walk skips anyway, so a huge l1_size on a small file costs nothing.
    pub(super) fn read_l1(&self, off: HostOffset, entries: u64) -> Vec<L1Entry> {
        let in_file = self.file_len.saturating_sub(off.get()).div_ceil(8);
        let mut buf =
            vec![0u8; entries.min(MAX_L1_ENTRIES).min(in_file).saturating_mul(8) as usize];
        let _ = read_into(self.img.src.as_ref(), "L1 table", off, &mut buf);
        buf.chunks_exact(8)
            .map(|c| L1Entry(crate::bytes::be64(c, 0)))
            .collect()
    }

    /// `check_refcounts_l1`, minus the L2 entries (collected for later).
    pub(super) fn walk_l1(
        &mut self,
        v: &mut dyn Visitor,
        id: L1Id,
        off: HostOffset,
        entries: u64,
        l1: &[L1Entry],
    ) {
        if entries == 0 {
            return;
        }
        let l1_bytes = entries.saturating_mul(8);
        self.inc(v, off, l1_bytes, 1, Ctx::L1Table(id));
        for (i, &e) in l1.iter().enumerate() {
            // QEMU skips only the word 0: an entry with reserved bits alone is checked.
            if e == L1Entry::UNALLOCATED {
                continue;
            }
            let i = i as u64;
            if e.reserved_bits() != 0 {
                let name = self.l1_name(id);
                let msg = format!("ERROR found L1 entry with reserved bits set: {:x}", e.0);
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::ReservedBits,
                    FindingDetail::L1ReservedBits,
                    msg,
                    1,
                ) {
                    f.offset = Some(off.saturating_entry(i, 8));
                    f.referrers.push(Referrer {
                        l1: Some(name),
                        l1_index: Some(i),
                        l1_table: Some(id),
                        ..Referrer::plain(Role::L1Table, None)
                    });
                    f.repair = Some("none: qemu-img check -r cannot fix reserved bits".into());
                }
            }
            let l2 = e.l2_offset().unwrap_or_default();
            self.inc(v, l2, self.cs, 1, Ctx::L2Table(id, i));
            if l2.get() & self.cmask != 0 {
                let msg = format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                );
                let name = self.l1_name(id);
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::Unaligned,
                    FindingDetail::L2TableUnaligned,
                    msg,
                    1,
                ) {
                    f.offset = Some(l2);
                    f.referrers.push(Referrer {
                        l1: Some(name),
                        l1_index: Some(i),
                        l1_table: Some(id),
                        ..Referrer::plain(Role::L2Table, None)
                    });
                }
            }
            self.l2_refs.entry(l2).or_default().push((id, i));
        }
    }

    /// Add another (partial) report's counts and findings to this one.
    pub(super) fn absorb(&mut self, other: CheckReport) {
        let r = &mut self.report;
        r.check_errors = r.check_errors.saturating_add(other.check_errors);
        r.corruptions = r.corruptions.saturating_add(other.corruptions);
        r.leaks = r.leaks.saturating_add(other.leaks);
        r.findings_omitted = r.findings_omitted.saturating_add(other.findings_omitted);
        for f in other.findings {
            if r.findings.len() < MAX_FINDINGS {
                r.findings.push(f);
            } else {
                r.findings_omitted = r.findings_omitted.saturating_add(1);
            }
        }
    }

    /// Count a run of data clusters found in one L2 table.
    pub(super) fn flush_run(
        &mut self,
        v: &mut dyn Visitor,
        l2: HostOffset,
        first: u64,
        n: u64,
        index: u64,
        w: u64,
    ) {
        let over = v.visit_run(
            first,
            n,
            w,
            Ctx::Entry {
                l2,
                index,
                role: Role::Data,
            },
        );
        if over > 0 {
            let msg = format!(
                "ERROR: overflow cluster offset={:#x}.. ({} references did not fit in {}-bit refcounts)",
                first << self.cbits,
                over,
                self.img.header.refcount_bits()
            );
            let at = first << self.cbits;
            if let Some(f) = self.find(
                FindingKind::Corruption,
                Category::Overflow,
                FindingDetail::Overflow,
                msg,
                over,
            ) {
                f.cluster = Some(first);
                f.offset = Some(HostOffset(at));
                f.repair = Some("qemu-img amend -o refcount_bits=… (wider refcounts) or qemu-img convert to a clean copy".into());
            }
        }
    }

    /// Everything but the comparison: QEMU's `calculate_refcounts`.
    pub(super) fn calculate(&mut self, v: &mut dyn Visitor) {
        self.head(v);
        self.l2_phase(v);
        self.tail(v);
    }

    /// The header, then every L1 table (their L2 tables are collected for later).
    pub(super) fn head(&mut self, v: &mut dyn Visitor) {
        let img = self.img;
        let h = &img.header;
        let cs = self.cs;
        self.inc(v, HostOffset(0), cs, 1, Ctx::Header);
        if !(self.listing && img.l1_unread().is_some()) {
            let active_l1 = self.read_l1(h.l1_table_offset, u64::from(h.l1_size));
            self.walk_l1(
                v,
                L1Id::Active,
                h.l1_table_offset,
                u64::from(h.l1_size),
                &active_l1,
            );
        }
        if h.has_data_file() && h.nb_snapshots > 0 && !img.snapshots.snapshots.is_empty() {
            let msg = format!("ERROR {} snapshots in image with data file", h.nb_snapshots);
            self.find(
                FindingKind::Corruption,
                Category::SnapshotTable,
                FindingDetail::SnapshotsWithDataFile,
                msg,
                1,
            );
        }
        for (index, sn) in img.snapshots.snapshots.iter().enumerate() {
            if sn.l1_table_offset.get() & self.cmask != 0 {
                let msg = format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                );
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::SnapshotTable,
                    FindingDetail::SnapshotL1Unaligned,
                    msg,
                    1,
                ) {
                    f.offset = Some(sn.entry_offset);
                }
                continue;
            }
            if u64::from(sn.l1_size) > MAX_L1_ENTRIES {
                let msg = format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                );
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::SnapshotTable,
                    FindingDetail::SnapshotL1TooLarge,
                    msg,
                    1,
                ) {
                    f.offset = Some(sn.entry_offset);
                }
                continue;
            }
            let l1 = self.read_l1(sn.l1_table_offset, u64::from(sn.l1_size));
            self.walk_l1(
                v,
                L1Id::Snapshot { index },
                sn.l1_table_offset,
                u64::from(sn.l1_size),
                &l1,
            );
            // Only the count is kept: one L1 table at a time is in memory.
            self.snapshot_l1_count = self.snapshot_l1_count.saturating_add(1);
        }
    }

    /// Every L2 table once, weighted by the L1 entries that name it.
    pub(super) fn l2_phase(&mut self, v: &mut dyn Visitor) {
        let refs = std::mem::take(&mut self.l2_refs);
        let mut buf = vec![0u8; self.cs as usize];
        let total = refs.len() as u64;
        for (n, (l2, who)) in refs.iter().enumerate() {
            if n % 64 == 0 {
                self.tick("L2 tables", n as u64, total);
            }
            self.walk_l2(v, *l2, who, &mut buf);
        }
        self.tick("L2 tables", total, total);
        self.l2_refs = refs;
    }

    /// The L2 phase of the check: the same as [`Walk::l2_phase`], with the L2
    /// tables split in two halves (in offset order) walked on two threads, each
    /// into its own counts, merged after. Findings come out in the serial order.
    /// If the merged counts would overflow a refcount, the second half is walked
    /// again here instead, so overflow findings are exactly the serial walk's.
    pub(super) fn l2_phase_split(&mut self, counter: &mut Counter) {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        if threads < 2 || self.l2_refs.len() < SPLIT_MIN_TABLES {
            self.l2_phase(counter);
            return;
        }
        let refs = std::mem::take(&mut self.l2_refs);
        let list: Vec<(&HostOffset, &Vec<(L1Id, u64)>)> = refs.iter().collect();
        let (mine, theirs) = list.split_at(list.len() / 2);
        let img = self.img;
        let mut side = Walk::new(img, self.record);
        side.copied = self.copied.as_ref().map(|c| Box::new(c.fork()));
        let mut side_counter = Counter {
            imrt: Imrt::new(counter.imrt.nb_clusters),
            max: counter.max,
        };
        let cs = self.cs as usize;
        let total = list.len() as u64;
        let side = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let mut buf = vec![0u8; cs];
                for (l2, who) in theirs {
                    side.walk_l2(&mut side_counter, **l2, who, &mut buf);
                }
                (side, side_counter)
            });
            let mut buf = vec![0u8; cs];
            for (n, (l2, who)) in mine.iter().enumerate() {
                if n % 64 == 0 {
                    // Both halves advance together.
                    self.tick("L2 tables", (n as u64).saturating_mul(2), total);
                }
                self.walk_l2(counter, **l2, who, &mut buf);
            }
            h.join().ok()
        });
        match side {
            Some((side, side_counter)) if counter.imrt.fits(&side_counter.imrt, counter.max) => {
                counter.imrt.merge(side_counter.imrt);
                let r = &mut self.report;
                let s = &side.report;
                r.allocated_clusters = r.allocated_clusters.saturating_add(s.allocated_clusters);
                r.fragmented_clusters = r.fragmented_clusters.saturating_add(s.fragmented_clusters);
                r.compressed_clusters = r.compressed_clusters.saturating_add(s.compressed_clusters);
                if let (Some(mine), Some(theirs)) = (self.copied.as_mut(), side.copied) {
                    mine.absorb(*theirs);
                }
                self.absorb(side.report);
            }
            _ => {
                let mut buf = vec![0u8; cs];
                for (l2, who) in theirs {
                    self.walk_l2(counter, **l2, who, &mut buf);
                }
            }
        }
        self.tick("L2 tables", total, total);
        drop(list);
        self.l2_refs = refs;
    }

    /// The snapshot table, refcount table, LUKS header, bitmaps and refcount blocks.
    pub(super) fn tail(&mut self, v: &mut dyn Visitor) {
        let img = self.img;
        let h = &img.header;
        let cs = self.cs;
        self.inc(
            v,
            h.snapshots_offset,
            img.snapshots.size,
            1,
            Ctx::SnapshotTable,
        );
        let rt_len = u64::from(h.refcount_table_clusters)
            .saturating_mul(cs)
            .min(crate::refcount::MAX_REFTABLE_BYTES);
        self.inc(v, h.refcount_table_offset, rt_len, 1, Ctx::RefcountTable);
        for e in &img.extensions {
            if let ExtensionKind::Crypto { offset, length } = e.kind
                && img.header.crypt_method != 0
            {
                self.inc(v, offset, length, 1, Ctx::Crypto);
            }
        }
        if !self.walk_bitmaps(v) {
            return;
        }
        self.walk_refblocks(v);
    }

    /// `check_refblocks`.
    pub(super) fn walk_refblocks(&mut self, v: &mut dyn Visitor) {
        let Ok(table) = self.img.refcount_table() else {
            return;
        };
        let nb_clusters = self.file_len.div_ceil(self.cs);
        for (i, e) in table.iter().enumerate() {
            let i = i as u64;
            let off = e.block_offset().unwrap_or_default();
            let cluster = off.get() >> self.cbits;
            let rt_entry = self.img.header.refcount_table_offset.saturating_entry(i, 8);
            if e.reserved_bits() != 0 {
                let msg = format!("ERROR refcount table entry {i} has reserved bits set");
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::Refblock,
                    FindingDetail::RefblockReservedBits,
                    msg,
                    1,
                ) {
                    f.offset = Some(rt_entry);
                    f.repair = Some("qemu-img check -r all rebuilds the refcount structure".into());
                }
                continue;
            }
            if off.get() & self.cmask != 0 {
                let msg = format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                );
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::Refblock,
                    FindingDetail::RefblockUnaligned,
                    msg,
                    1,
                ) {
                    f.offset = Some(rt_entry);
                    f.repair = Some("qemu-img check -r all rebuilds the refcount structure".into());
                }
                continue;
            }
            if cluster >= nb_clusters {
                let msg = format!("ERROR refcount block {i} is outside image");
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::Refblock,
                    FindingDetail::RefblockOutside,
                    msg,
                    1,
                ) {
                    f.offset = Some(off);
                    f.cluster = Some(cluster);
                    f.repair = Some("qemu-img check -r all grows the file to include it".into());
                }
                continue;
            }
            if off != HostOffset(0) {
                self.inc(v, off, self.cs, 1, Ctx::RefcountBlock(i));
                let n = v.count(cluster);
                if self.record && n != 1 {
                    let msg = format!("ERROR refcount block {i} refcount={n}");
                    if let Some(f) = self.find(
                        FindingKind::Corruption,
                        Category::Refblock,
                        FindingDetail::RefblockRefcount,
                        msg,
                        1,
                    ) {
                        f.cluster = Some(cluster);
                        f.offset = Some(off);
                        f.reference = Some(n);
                        f.repair =
                            Some("qemu-img check -r all rebuilds the refcount structure".into());
                    }
                }
            }
        }
    }
}

//! Consistency checking, the way `qemu-img check` does it, and more.
//!
//! A qcow2 image stores a refcount for every host cluster. The check recomputes
//! those refcounts from scratch by following every structure that references a
//! cluster, in QEMU's order (`calculate_refcounts` in `block/qcow2-refcount.c`):
//!
//! 1. the header cluster;
//! 2. the active L1 table, each L2 table it names, and each data or compressed
//!    cluster those name (an L2 table shared by several L1 tables counts once per
//!    L1 table that names it);
//! 3. every snapshot's L1 table and what it reaches, the same way;
//! 4. the snapshot table, the refcount table, the LUKS header, the bitmap
//!    directory, bitmap tables and bitmap data;
//! 5. the refcount blocks themselves (each must end up with refcount exactly 1).
//!
//! The result, the in-memory refcount table (IMRT), is compared with the stored
//! refcounts: a stored refcount **lower** than the computed one is a corruption
//! (the cluster could be freed while still in use), a **higher** one is a leak
//! (space wasted, data safe). Finally the COPIED flags of the active tables must
//! say "refcount is exactly 1" truthfully.
//!
//! qinspect counts exactly what QEMU counts, so the totals equal `qemu-img check`'s,
//! but it walks an L2 table shared by many L1 tables once and adds its weight, and
//! it keeps a note of who referenced what so each finding can name its owners.

use crate::bitmap;
use crate::header::{AUTOCLEAR_BITMAPS, ExtensionKind};
use crate::image::{Qcow2, RefcountReader};
use crate::io::read_into;
use crate::refcount::get_refcount;
use crate::types::low_mask;

use crate::tables::{
    ClusterType, CompressedDescriptor, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK, L2Entry, MAX_L1_ENTRIES, OFLAG_COPIED, OFLAG_ZERO,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// How many detailed findings are kept (counts are always exact).
pub const MAX_FINDINGS: usize = 100_000;
/// How many refcounts past the end of the file are looked at.
pub const PAST_EOF_BUDGET: u64 = 1 << 22;
/// How many referrers are listed for one cluster.
pub const MAX_REFERRERS: usize = 64;
/// How many clusters get their referrers listed.
pub const MAX_OWNER_CLUSTERS: usize = 10_000;

/// Which totals a finding adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// Counts in `corruptions`.
    Corruption,
    /// Counts in `leaks`.
    Leak,
    /// Counts in `check-errors`.
    CheckError,
    /// Something qemu-img does not report; counts in no total.
    Note,
}

/// Which table an L1 table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "l1")]
pub enum L1Id {
    /// The active L1 table.
    Active,
    /// The L1 table of snapshot number `index` (0-based table position).
    Snapshot {
        /// Position in the snapshot table.
        index: usize,
    },
}

/// What a reference to a cluster is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Cluster 0: the header and extensions.
    Header,
    /// An L1 table.
    L1Table,
    /// An L2 table.
    L2Table,
    /// A data cluster.
    Data,
    /// A cluster holding (part of) compressed data.
    Compressed,
    /// The snapshot table.
    SnapshotTable,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The LUKS header.
    CryptoHeader,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table.
    BitmapTable,
    /// Bitmap data.
    BitmapData,
    /// A snapshot's saved VM state (RAM and device state from `savevm`): data
    /// clusters a snapshot's L1 table maps past the end of its disk.
    VmState,
}

impl Role {
    /// Whether the role is metadata (everything but data, compressed data and VM
    /// state).
    pub fn is_metadata(&self) -> bool {
        !matches!(self, Role::Data | Role::Compressed | Role::VmState)
    }
}

/// Who points at a cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Referrer {
    /// What the cluster is to this referrer.
    pub role: Role,
    /// The L1 table involved, for L1/L2/data references.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l1: Option<String>,
    /// Index in that L1 table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l1_index: Option<u64>,
    /// The L2 table, for data references.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_table: Option<u64>,
    /// Index in the L2 table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_index: Option<u64>,
    /// The guest offset mapped, for data references.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_offset: Option<u64>,
    /// Anything else (refcount table index, bitmap name, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Referrer {
    fn plain(role: Role, detail: Option<String>) -> Self {
        Referrer {
            role,
            l1: None,
            l1_index: None,
            l2_table: None,
            l2_index: None,
            guest_offset: None,
            detail,
        }
    }

    /// One line: `data via active L1[0] -> L2 0x40000[16] (guest 0x100000)`.
    pub fn describe(&self) -> String {
        let role = serde_json::to_value(self.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut s = role;
        if let (Some(l1), Some(i)) = (&self.l1, self.l1_index) {
            s.push_str(&format!(" via {l1}[{i}]"));
        }
        if let (Some(t), Some(i)) = (self.l2_table, self.l2_index) {
            s.push_str(&format!(" -> L2 {t:#x}[{i}]"));
        }
        if let Some(g) = self.guest_offset {
            s.push_str(&format!(" (guest {g:#x})"));
        }
        if let Some(d) = &self.detail {
            s.push_str(&format!(" ({d})"));
        }
        s
    }
}

/// One thing the check found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Which total it adds to.
    pub kind: FindingKind,
    /// A short category name ("refcount", "copied", "reserved-bits", ...).
    pub category: &'static str,
    /// What is wrong, in the words qemu-img check uses where it has words.
    pub message: String,
    /// How many times QEMU counts it (a shared L2 table repeats its problems once per L1 table).
    pub count: u64,
    /// The host cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<u64>,
    /// The host offset (of the cluster, or of the entry at fault).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The stored refcount.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refcount: Option<u64>,
    /// The computed number of references.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<u64>,
    /// Who references the cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub referrers: Vec<Referrer>,
    /// What `qemu-img check -r` would change, where that is clear.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<String>,
}

/// The check's result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// Internal errors (qemu-img's `check-errors`).
    pub check_errors: u64,
    /// Corruptions.
    pub corruptions: u64,
    /// Leaked clusters.
    pub leaks: u64,
    /// One past the last cluster in use or with a refcount.
    pub image_end_offset: u64,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Allocated guest clusters (active L1).
    pub allocated_clusters: u64,
    /// Fragmented clusters.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// The check stopped early: why (qemu-img says "Check failed" and exits 1).
    pub aborted: Option<String>,
    /// QEMU would not open the image at all: why.
    pub qemu_refuses: Option<String>,
    /// Warnings that are not findings (dirty bit, ...).
    pub warnings: Vec<String>,
    /// Findings, grouped by kind in QEMU's order of discovery.
    pub findings: Vec<Finding>,
    /// Findings not listed because there were more than [`MAX_FINDINGS`].
    pub findings_omitted: u64,
    /// Computed references per cluster, for clusters whose refcount is wrong.
    #[serde(skip)]
    pub imrt: Option<Arc<Imrt>>,
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 1 check failed, 2 corruptions, 3 leaks.
    pub fn exit_code(&self) -> i32 {
        if self.aborted.is_some() || self.check_errors > 0 || self.qemu_refuses.is_some() {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Reference counts of one chunk of clusters, as narrow as the counts allow.
#[derive(Debug)]
enum Counts {
    U8(Box<[u8]>),
    U16(Box<[u16]>),
    U64(Box<[u64]>),
}

impl Counts {
    fn get(&self, i: usize) -> u64 {
        match self {
            Counts::U8(v) => v.get(i).map_or(0, |x| u64::from(*x)),
            Counts::U16(v) => v.get(i).map_or(0, |x| u64::from(*x)),
            Counts::U64(v) => v.get(i).copied().unwrap_or(0),
        }
    }

    /// Store `v`, widening the whole chunk first if it does not fit.
    fn set(&mut self, i: usize, v: u64) {
        if v > u64::from(u16::MAX) && !matches!(self, Counts::U64(_)) {
            let wide: Vec<u64> = (0..CHUNK as usize).map(|j| self.get(j)).collect();
            *self = Counts::U64(wide.into_boxed_slice());
        } else if v > u64::from(u8::MAX) && matches!(self, Counts::U8(_)) {
            let wide: Vec<u16> = (0..CHUNK as usize).map(|j| self.get(j) as u16).collect();
            *self = Counts::U16(wide.into_boxed_slice());
        }
        match self {
            Counts::U8(a) => {
                if let Some(x) = a.get_mut(i) {
                    *x = v as u8;
                }
            }
            Counts::U16(a) => {
                if let Some(x) = a.get_mut(i) {
                    *x = v as u16;
                }
            }
            Counts::U64(a) => {
                if let Some(x) = a.get_mut(i) {
                    *x = v;
                }
            }
        }
    }
}

/// One chunk: counts plus two bits per cluster (referenced as metadata, as data).
#[derive(Debug)]
struct Chunk {
    counts: Counts,
    kinds: Box<[u8]>,
}

/// The in-memory refcount table: computed references per host cluster, in chunks
/// of 64Ki clusters allocated only where something is referenced, one byte per
/// cluster until a count needs more.
#[derive(Debug, Default)]
pub struct Imrt {
    chunks: Vec<Option<Chunk>>,
    /// Number of clusters covered (the file's, plus any reference just past it).
    pub nb_clusters: u64,
}

const CHUNK_BITS: u32 = 16;
const CHUNK: u64 = 1 << CHUNK_BITS;

impl Imrt {
    fn new(nb_clusters: u64) -> Self {
        let slots = ((nb_clusters >> CHUNK_BITS) as usize).saturating_add(2);
        let mut chunks = Vec::new();
        chunks.resize_with(slots, || None);
        Imrt {
            chunks,
            nb_clusters,
        }
    }

    fn chunk(&self, c: u64) -> Option<&Chunk> {
        self.chunks
            .get((c >> CHUNK_BITS) as usize)
            .and_then(Option::as_ref)
    }

    fn chunk_mut(&mut self, c: u64) -> Option<&mut Chunk> {
        let i = (c >> CHUNK_BITS) as usize;
        if i >= self.chunks.len() {
            // Only a reference just past the end of the file gets here.
            self.chunks.resize_with(i.saturating_add(1), || None);
        }
        let slot = self.chunks.get_mut(i)?;
        Some(slot.get_or_insert_with(|| Chunk {
            counts: Counts::U8(vec![0u8; CHUNK as usize].into_boxed_slice()),
            kinds: vec![0u8; (CHUNK / 4) as usize].into_boxed_slice(),
        }))
    }

    /// Computed references of a cluster.
    pub fn get(&self, c: u64) -> u64 {
        self.chunk(c)
            .map_or(0, |ch| ch.counts.get((c & (CHUNK - 1)) as usize))
    }

    /// 1: referenced as metadata; 2: as data; 3: both.
    fn kinds(&self, c: u64) -> u8 {
        let i = (c & (CHUNK - 1)) as usize;
        self.chunk(c)
            .and_then(|ch| ch.kinds.get(i / 4))
            .map_or(0, |b| (b >> kind_shift(i)) & 3)
    }

    /// Add `w` data references to each of `n` clusters from `first`; returns how
    /// many did not fit under `max`.
    fn add_run(&mut self, first: u64, n: u64, w: u64, max: u64) -> u64 {
        let mut over = 0u64;
        let mut c = first;
        let end = first.saturating_add(n);
        while c < end {
            // The start of the next chunk (c < end, so c is not u64::MAX).
            let stop = end.min((c | (CHUNK - 1)).saturating_add(1));
            if stop > self.nb_clusters {
                self.nb_clusters = stop;
            }
            let Some(ch) = self.chunk_mut(c) else {
                return over;
            };
            let lo = (c & (CHUNK - 1)) as usize;
            // stop - c is at most CHUNK - lo: hi stays inside the chunk.
            let hi = lo.saturating_add(stop.saturating_sub(c) as usize);
            for i in lo..hi {
                if let Some(b) = ch.kinds.get_mut(i / 4) {
                    *b |= 2 << kind_shift(i);
                }
            }
            let fast = match &mut ch.counts {
                Counts::U8(a) if w < 255 && max >= 255 => a.get_mut(lo..hi).map(|s| {
                    // Every count is below 255 - w, so adding w cannot saturate.
                    let w8 = w as u8;
                    let limit = u8::MAX.saturating_sub(w8);
                    s.iter().all(|x| *x < limit) && {
                        s.iter_mut().for_each(|x| *x = x.saturating_add(w8));
                        true
                    }
                }),
                _ => None,
            };
            if fast != Some(true) {
                for i in lo..hi {
                    let cur = ch.counts.get(i);
                    let room = max.saturating_sub(cur);
                    let added = w.min(room);
                    over = over.saturating_add(w.saturating_sub(added));
                    if added > 0 {
                        // added <= max - cur: the sum is at most max.
                        ch.counts.set(i, cur.saturating_add(added));
                    }
                }
            }
            c = stop;
        }
        over
    }

    /// Add `w` references of one kind, saturating at `max`; returns how many did not fit.
    fn add(&mut self, c: u64, w: u64, max: u64, metadata: bool) -> u64 {
        if c >= self.nb_clusters {
            self.nb_clusters = c.saturating_add(1);
        }
        let i = (c & (CHUNK - 1)) as usize;
        let Some(ch) = self.chunk_mut(c) else {
            return 0;
        };
        if let Some(b) = ch.kinds.get_mut(i / 4) {
            *b |= (if metadata { 1 } else { 2 }) << kind_shift(i);
        }
        let cur = ch.counts.get(i);
        let room = max.saturating_sub(cur);
        let added = w.min(room);
        if added > 0 {
            // added <= max - cur: the sum is at most max.
            ch.counts.set(i, cur.saturating_add(added));
        }
        w.saturating_sub(added)
    }
}

/// Where the two kind bits of the `i`th cluster of a chunk sit in their byte
/// (four clusters per byte): 0, 2, 4 or 6.
#[inline]
fn kind_shift(i: usize) -> usize {
    (i & 3) << 1
}

/// Progress of a long check, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Phase name.
    pub phase: &'static str,
    /// Units done.
    pub done: u64,
    /// Units in this phase.
    pub total: u64,
}

/// Options.
#[derive(Default)]
pub struct CheckOptions<'a> {
    /// Called now and then with progress.
    pub progress: Option<&'a (dyn Fn(Progress) + Sync)>,
}

/// Where a reference comes from, cheaply.
#[derive(Clone, Copy, Debug)]
enum Ctx {
    Header,
    L1Table(L1Id),
    L2Table(L1Id, u64),
    Entry { l2: u64, index: u64, role: Role },
    SnapshotTable,
    RefcountTable,
    RefcountBlock(u64),
    Crypto,
    BitmapDirectory,
    BitmapTable(usize),
    BitmapData(usize, u64),
}

impl Ctx {
    fn role(&self) -> Role {
        match self {
            Ctx::Header => Role::Header,
            Ctx::L1Table(_) => Role::L1Table,
            Ctx::L2Table(..) => Role::L2Table,
            Ctx::Entry { role, .. } => *role,
            Ctx::SnapshotTable => Role::SnapshotTable,
            Ctx::RefcountTable => Role::RefcountTable,
            Ctx::RefcountBlock(_) => Role::RefcountBlock,
            Ctx::Crypto => Role::CryptoHeader,
            Ctx::BitmapDirectory => Role::BitmapDirectory,
            Ctx::BitmapTable(_) => Role::BitmapTable,
            Ctx::BitmapData(..) => Role::BitmapData,
        }
    }
}

/// Receives every reference the walk finds.
trait Visitor {
    /// `len` bytes at `off`, referenced `w` times, by `ctx`. Returns how many of the
    /// `w` references overflowed (for the counting visitor).
    fn visit(&mut self, first: u64, last: u64, w: u64, ctx: Ctx) -> u64;
    /// `n` data clusters from `first` on, named by consecutive entries of one L2
    /// table starting at the entry in `ctx`, each referenced `w` times.
    fn visit_run(&mut self, first: u64, n: u64, w: u64, ctx: Ctx) -> u64 {
        let mut over = 0u64;
        for k in 0..n {
            let ctx = match ctx {
                Ctx::Entry { l2, index, role } => Ctx::Entry {
                    l2,
                    index: index.saturating_add(k),
                    role,
                },
                other => other,
            };
            let c = first.saturating_add(k);
            over = over.saturating_add(self.visit(c, c, w, ctx));
        }
        over
    }
    /// The refcount so far of a cluster (for the refblock check).
    fn count(&self, _c: u64) -> u64 {
        0
    }
}

/// Counts references into the IMRT.
struct Counter {
    imrt: Imrt,
    max: u64,
}

impl Visitor for Counter {
    fn visit(&mut self, first: u64, last: u64, w: u64, ctx: Ctx) -> u64 {
        // L2 tables are shared by snapshots just like data, so for overlap
        // detection they count with data; other metadata is never shared.
        let role = ctx.role();
        let meta = role.is_metadata() && role != Role::L2Table;
        let mut over = 0u64;
        for c in first..=last {
            over = over.saturating_add(self.imrt.add(c, w, self.max, meta));
        }
        over
    }
    fn visit_run(&mut self, first: u64, n: u64, w: u64, _ctx: Ctx) -> u64 {
        self.imrt.add_run(first, n, w, self.max)
    }
    fn count(&self, c: u64) -> u64 {
        self.imrt.get(c)
    }
}

/// Collects referrers for a set of clusters.
struct Owners<'a> {
    want: &'a dyn Fn(u64) -> bool,
    found: BTreeMap<u64, Vec<(Ctx, u64)>>,
}

impl Visitor for Owners<'_> {
    fn visit(&mut self, first: u64, last: u64, w: u64, ctx: Ctx) -> u64 {
        for c in first..=last {
            if (self.want)(c) {
                let v = self.found.entry(c).or_default();
                if v.len() < 64 {
                    v.push((ctx, w));
                }
            }
        }
        0
    }
}

/// The walk over every structure, shared by the check and by `clusters`.
struct Walk<'a> {
    img: &'a Qcow2,
    cs: u64,
    cbits: u32,
    /// `cs - 1`: the offset-in-cluster bits.
    cmask: u64,
    file_len: u64,
    report: CheckReport,
    /// L2 table offset -> the L1 entries that name it.
    l2_refs: BTreeMap<u64, Vec<(L1Id, u64)>>,
    /// Snapshot L1 tables as read.
    snapshot_l1_count: usize,
    record: bool,
    progress: Option<&'a (dyn Fn(Progress) + Sync)>,
}

impl<'a> Walk<'a> {
    fn new(img: &'a Qcow2, record: bool) -> Self {
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
            progress: None,
        }
    }

    fn l1_name(&self, id: L1Id) -> String {
        match id {
            L1Id::Active => "active L1".into(),
            L1Id::Snapshot { index } => match self.img.snapshots.snapshots.get(index) {
                Some(s) => format!("snapshot {} '{}' L1", s.id, s.name),
                None => format!("snapshot #{index} L1"),
            },
        }
    }

    fn find(
        &mut self,
        kind: FindingKind,
        category: &'static str,
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

    /// QEMU's `qcow2_inc_refcounts_imrt`, `w` times.
    fn inc(&mut self, v: &mut dyn Visitor, off: u64, len: u64, w: u64, ctx: Ctx) {
        if len == 0 || w == 0 {
            return;
        }
        let end = off.saturating_add(len);
        if end.saturating_sub(self.file_len) >= self.cs && end > self.file_len {
            let msg = format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            );
            let cbits = self.cbits;
            if let Some(f) = self.find(FindingKind::Corruption, "past-eof", msg, w) {
                f.offset = Some(off);
                f.cluster = Some(off >> cbits);
            }
            return;
        }
        let first = off >> self.cbits;
        // len > 0, so end >= 1.
        let last = end.saturating_sub(1) >> self.cbits;
        let over = v.visit(first, last, w, ctx);
        if over > 0 && self.record {
            // Repeated overflows of one cluster are one finding with a count.
            if let Some(f) = self.report.findings.last_mut()
                && f.category == "overflow"
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
            if let Some(f) = self.find(FindingKind::Corruption, "overflow", msg, over) {
                f.cluster = Some(first);
                f.offset = Some(at);
                f.repair = Some("qemu-img amend -o refcount_bits=… (wider refcounts) or qemu-img convert to a clean copy".into());
            }
        }
    }

    fn tick(&self, phase: &'static str, done: u64, total: u64) {
        if let Some(p) = self.progress {
            p(Progress { phase, done, total });
        }
    }

    /// Read an L1 table (zeros past EOF, like QEMU's reads).
    /// Only the entries inside the file are read: past its end they are zeros,
    /// which the walk skips anyway, so a huge l1_size on a small file costs nothing.
    fn read_l1(&self, off: u64, entries: u64) -> Vec<u64> {
        let in_file = self.file_len.saturating_sub(off).div_ceil(8);
        let mut buf =
            vec![0u8; entries.min(MAX_L1_ENTRIES).min(in_file).saturating_mul(8) as usize];
        let _ = read_into(self.img.src.as_ref(), "L1 table", off, &mut buf);
        buf.chunks_exact(8)
            .map(|c| crate::bytes::be64(c, 0))
            .collect()
    }

    /// `check_refcounts_l1`, minus the L2 entries (collected for later).
    fn walk_l1(&mut self, v: &mut dyn Visitor, id: L1Id, off: u64, entries: u64, l1: &[u64]) {
        if entries == 0 {
            return;
        }
        let l1_bytes = entries.saturating_mul(8);
        self.inc(v, off, l1_bytes, 1, Ctx::L1Table(id));
        for (i, &e) in l1.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let i = i as u64;
            if e & L1E_RESERVED_MASK != 0 {
                let name = self.l1_name(id);
                let msg = format!("ERROR found L1 entry with reserved bits set: {e:x}");
                if let Some(f) = self.find(FindingKind::Corruption, "reserved-bits", msg, 1) {
                    f.offset = Some(off.saturating_add(i.saturating_mul(8)));
                    f.referrers.push(Referrer {
                        l1: Some(name),
                        l1_index: Some(i),
                        ..Referrer::plain(Role::L1Table, None)
                    });
                    f.repair = Some("none: qemu-img check -r cannot fix reserved bits".into());
                }
            }
            let l2 = e & L1E_OFFSET_MASK;
            self.inc(v, l2, self.cs, 1, Ctx::L2Table(id, i));
            if l2 & self.cmask != 0 {
                let msg = format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                );
                let name = self.l1_name(id);
                if let Some(f) = self.find(FindingKind::Corruption, "unaligned", msg, 1) {
                    f.offset = Some(l2);
                    f.referrers.push(Referrer {
                        l1: Some(name),
                        l1_index: Some(i),
                        ..Referrer::plain(Role::L2Table, None)
                    });
                }
            }
            self.l2_refs.entry(l2).or_default().push((id, i));
        }
    }

    /// Add another (partial) report's counts and findings to this one.
    fn absorb(&mut self, other: CheckReport) {
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
    fn flush_run(&mut self, v: &mut dyn Visitor, l2: u64, first: u64, n: u64, index: u64, w: u64) {
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
            if let Some(f) = self.find(FindingKind::Corruption, "overflow", msg, over) {
                f.cluster = Some(first);
                f.offset = Some(at);
                f.repair = Some("qemu-img amend -o refcount_bits=… (wider refcounts) or qemu-img convert to a clean copy".into());
            }
        }
    }

    /// `check_refcounts_l2` for one L2 table, once, weighted by the L1 entries naming it.
    fn walk_l2(&mut self, v: &mut dyn Visitor, l2: u64, refs: &[(L1Id, u64)], buf: &mut [u8]) {
        let w = refs.len() as u64;
        let active = refs.iter().filter(|(id, _)| *id == L1Id::Active).count() as u64;
        if read_into(self.img.src.as_ref(), "L2 table", l2, buf).is_err() {
            let msg = "ERROR: I/O error in check_refcounts_l2".to_string();
            if let Some(f) = self.find(FindingKind::CheckError, "io", msg, w) {
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
        let entry_off = |i: u64| l2.saturating_add(i.saturating_mul(step as u64));
        // The raw value of the last entry added to `run` (standard entries only).
        let mut run_raw = 0u64;
        let fast = !ext && !has_df;
        for (i, chunk) in buf.chunks_exact(step).enumerate() {
            let raw = crate::bytes::be64(chunk, 0);
            // Fast path: the next plain data cluster of a run. Its raw value is the
            // previous entry's plus one cluster, so its flags (COPIED, no zero or
            // compressed bit, no reserved bits) are the same and its offset is the
            // next aligned cluster: everything the full decoding below would find.
            if fast
                && let Some((start, n, idx)) = run
                && raw == run_raw.wrapping_add(cs)
                && raw & L2E_STD_RESERVED_MASK == 0
                && idx.saturating_add(n) == i as u64
                && (raw & L2E_OFFSET_MASK) < self.file_len
            {
                run = Some((start, n.saturating_add(1), idx));
                run_raw = raw;
                if active > 0 {
                    let r = &mut self.report;
                    r.allocated_clusters = r.allocated_clusters.saturating_add(active);
                    next_contiguous = (raw & L2E_OFFSET_MASK).wrapping_add(cs);
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
            if ct != ClusterType::Compressed && raw & L2E_STD_RESERVED_MASK != 0 {
                let msg = format!("ERROR found l2 entry with reserved bits set: {raw:x}");
                if let Some(f) = self.find(FindingKind::Corruption, "reserved-bits", msg, w) {
                    f.offset = Some(entry_off(i));
                }
            }
            match ct {
                ClusterType::Compressed => {
                    let d = CompressedDescriptor::decode(raw, &geo);
                    if raw & OFLAG_COPIED != 0 {
                        let msg = format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            d.offset.0
                        );
                        if let Some(f) = self.find(FindingKind::Corruption, "copied", msg, w) {
                            f.offset = Some(entry_off(i));
                            f.repair = Some("clear bit 63 of the L2 entry".into());
                        }
                    }
                    if has_df {
                        let msg =
                            format!("ERROR compressed cluster {i} with data file, entry={raw:#x}");
                        if let Some(f) = self.find(FindingKind::Corruption, "compressed", msg, w) {
                            f.offset = Some(entry_off(i));
                        }
                        continue;
                    }
                    if bitmap != 0 {
                        let msg = format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={raw:#x}"
                        );
                        if let Some(f) = self.find(FindingKind::Corruption, "compressed", msg, w) {
                            f.offset = Some(entry_off(i));
                        }
                        continue;
                    }
                    self.inc(
                        v,
                        d.offset.0,
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
                    let off = raw & L2E_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        let msg = format!(
                            "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        );
                        if let Some(f) = self.find(FindingKind::Corruption, "subclusters", msg, w) {
                            f.offset = Some(entry_off(i));
                        }
                    }
                    if off & cmask != 0 {
                        let contains_data = if ext {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            raw & OFLAG_ZERO == 0
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
                        if let Some(f) = self.find(FindingKind::Corruption, "unaligned", msg, w) {
                            f.offset = Some(entry_off(i));
                            if !contains_data {
                                f.repair = Some("qemu-img check -r all turns the entry into a plain zero cluster".into());
                            }
                        }
                    }
                    if active > 0 {
                        let r = &mut self.report;
                        r.allocated_clusters = r.allocated_clusters.saturating_add(active);
                        if next_contiguous != 0 && off != next_contiguous {
                            r.fragmented_clusters = r.fragmented_clusters.saturating_add(active);
                        }
                        next_contiguous = off.wrapping_add(cs);
                    }
                    if !has_df {
                        if off & cmask == 0 && off < self.file_len {
                            // Aligned and inside the file: extend or start a run.
                            let c = off >> self.cbits;
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
                        if let Some(f) = self.find(FindingKind::Corruption, "subclusters", msg, w) {
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

    /// Everything but the comparison: QEMU's `calculate_refcounts`.
    fn calculate(&mut self, v: &mut dyn Visitor) {
        self.head(v);
        self.l2_phase(v);
        self.tail(v);
    }

    /// The header, then every L1 table (their L2 tables are collected for later).
    fn head(&mut self, v: &mut dyn Visitor) {
        let img = self.img;
        let h = &img.header;
        let cs = self.cs;
        self.inc(v, 0, cs, 1, Ctx::Header);
        let active_l1 = self.read_l1(h.l1_table_offset, u64::from(h.l1_size));
        self.walk_l1(
            v,
            L1Id::Active,
            h.l1_table_offset,
            u64::from(h.l1_size),
            &active_l1,
        );
        if h.has_data_file() && h.nb_snapshots > 0 && !img.snapshots.snapshots.is_empty() {
            let msg = format!("ERROR {} snapshots in image with data file", h.nb_snapshots);
            self.find(FindingKind::Corruption, "snapshot-table", msg, 1);
        }
        for (index, sn) in img.snapshots.snapshots.iter().enumerate() {
            if sn.l1_table_offset & self.cmask != 0 {
                let msg = format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                );
                if let Some(f) = self.find(FindingKind::Corruption, "snapshot-table", msg, 1) {
                    f.offset = Some(sn.entry_offset);
                }
                continue;
            }
            if u64::from(sn.l1_size) > MAX_L1_ENTRIES {
                let msg = format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                );
                if let Some(f) = self.find(FindingKind::Corruption, "snapshot-table", msg, 1) {
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
    fn l2_phase(&mut self, v: &mut dyn Visitor) {
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

    /// The snapshot table, refcount table, LUKS header, bitmaps and refcount blocks.
    fn tail(&mut self, v: &mut dyn Visitor) {
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

    /// `qcow2_check_bitmaps_refcounts`; false if the check must stop.
    fn walk_bitmaps(&mut self, v: &mut dyn Visitor) -> bool {
        let img = self.img;
        if img.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return true;
        }
        let Some((count, size, off)) = img.extensions.iter().find_map(|e| match e.kind {
            ExtensionKind::Bitmaps {
                nb_bitmaps,
                directory_size,
                directory_offset,
                ..
            } => Some((nb_bitmaps, directory_size, directory_offset)),
            _ => None,
        }) else {
            return true;
        };
        if count == 0 {
            return true;
        }
        self.inc(v, off, size, 1, Ctx::BitmapDirectory);
        let list = match bitmap::read_directory(img.src.as_ref(), off, size, count) {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("bitmap directory cannot be loaded: {e}");
                self.find(FindingKind::Corruption, "bitmaps", msg, 1);
                self.report.aborted =
                    Some("the bitmap directory cannot be loaded (Invalid argument)".into());
                return false;
            }
        };
        for (bi, b) in list.iter().enumerate() {
            self.inc(
                v,
                b.table_offset,
                u64::from(b.table_size) * 8,
                1,
                Ctx::BitmapTable(bi),
            );
            let table = match bitmap::read_table(img.src.as_ref(), b) {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!("bitmap '{}' table cannot be loaded: {e}", b.name);
                    self.find(FindingKind::Corruption, "bitmaps", msg, 1);
                    self.report.aborted =
                        Some(format!("bitmap '{}' table cannot be loaded", b.name));
                    return false;
                }
            };
            for (j, e) in table.iter().enumerate() {
                let raw = e.0;
                let offset = raw & bitmap::BME_TABLE_ENTRY_OFFSET_MASK;
                let bad = raw & 0xff00_0000_0000_01fe != 0
                    || (offset != 0 && (raw & 1 != 0 || !offset.is_multiple_of(self.cs)));
                if bad {
                    let msg = format!(
                        "ERROR bitmap '{}' table entry {j} is invalid: {raw:#x}",
                        b.name
                    );
                    if let Some(f) = self.find(FindingKind::Corruption, "bitmaps", msg, 1) {
                        f.offset =
                            Some(b.table_offset.saturating_add((j as u64).saturating_mul(8)));
                    }
                    continue;
                }
                if offset != 0 {
                    self.inc(v, offset, self.cs, 1, Ctx::BitmapData(bi, j as u64));
                }
            }
        }
        true
    }

    /// `check_refblocks`.
    fn walk_refblocks(&mut self, v: &mut dyn Visitor) {
        let Ok(table) = self.img.refcount_table() else {
            return;
        };
        let nb_clusters = self.file_len.div_ceil(self.cs);
        for (i, e) in table.iter().enumerate() {
            let i = i as u64;
            let off = e.0 & crate::refcount::REFT_OFFSET_MASK;
            let cluster = off >> self.cbits;
            let rt_entry = self
                .img
                .header
                .refcount_table_offset
                .saturating_add(i.saturating_mul(8));
            if e.reserved_bits() != 0 {
                let msg = format!("ERROR refcount table entry {i} has reserved bits set");
                if let Some(f) = self.find(FindingKind::Corruption, "refblock", msg, 1) {
                    f.offset = Some(rt_entry);
                    f.repair = Some("qemu-img check -r all rebuilds the refcount structure".into());
                }
                continue;
            }
            if off & self.cmask != 0 {
                let msg = format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                );
                if let Some(f) = self.find(FindingKind::Corruption, "refblock", msg, 1) {
                    f.offset = Some(rt_entry);
                    f.repair = Some("qemu-img check -r all rebuilds the refcount structure".into());
                }
                continue;
            }
            if cluster >= nb_clusters {
                let msg = format!("ERROR refcount block {i} is outside image");
                if let Some(f) = self.find(FindingKind::Corruption, "refblock", msg, 1) {
                    f.offset = Some(off);
                    f.cluster = Some(cluster);
                    f.repair = Some("qemu-img check -r all grows the file to include it".into());
                }
                continue;
            }
            if off != 0 {
                self.inc(v, off, self.cs, 1, Ctx::RefcountBlock(i));
                let n = v.count(cluster);
                if self.record && n != 1 {
                    let msg = format!("ERROR refcount block {i} refcount={n}");
                    if let Some(f) = self.find(FindingKind::Corruption, "refblock", msg, 1) {
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

    fn referrers(&self, list: &[(Ctx, u64)]) -> Vec<Referrer> {
        let geo = self.img.geometry();
        let mut out = Vec::new();
        for (ctx, _w) in list {
            match *ctx {
                Ctx::Entry { l2, index, role } => {
                    let all = self.l2_refs.get(&l2).map(Vec::as_slice).unwrap_or(&[]);
                    if all.len() > MAX_REFERRERS {
                        out.push(Referrer::plain(
                            role,
                            Some(format!(
                                "L2 {l2:#x}[{index}], an L2 table named by {} L1 entries (the first {MAX_REFERRERS} follow)",
                                all.len()
                            )),
                        ));
                    }
                    for (id, l1i) in all.iter().take(MAX_REFERRERS) {
                        let role = match id {
                            L1Id::Snapshot { index }
                                if role == Role::Data && self.in_vm_state(*index, *l1i) =>
                            {
                                Role::VmState
                            }
                            _ => role,
                        };
                        out.push(Referrer {
                            role,
                            l1: Some(self.l1_name(*id)),
                            l1_index: Some(*l1i),
                            l2_table: Some(l2),
                            l2_index: Some(index),
                            guest_offset: geo.guest_offset(*l1i, index, 0).map(|g| g.0),
                            detail: None,
                        });
                    }
                }
                Ctx::L2Table(id, i) => out.push(Referrer {
                    l1: Some(self.l1_name(id)),
                    l1_index: Some(i),
                    ..Referrer::plain(Role::L2Table, None)
                }),
                Ctx::L1Table(id) => {
                    out.push(Referrer::plain(Role::L1Table, Some(self.l1_name(id))))
                }
                Ctx::Header => out.push(Referrer::plain(Role::Header, None)),
                Ctx::SnapshotTable => out.push(Referrer::plain(Role::SnapshotTable, None)),
                Ctx::RefcountTable => out.push(Referrer::plain(Role::RefcountTable, None)),
                Ctx::RefcountBlock(i) => out.push(Referrer::plain(
                    Role::RefcountBlock,
                    Some(format!("refcount table entry {i}")),
                )),
                Ctx::Crypto => out.push(Referrer::plain(Role::CryptoHeader, None)),
                Ctx::BitmapDirectory => out.push(Referrer::plain(Role::BitmapDirectory, None)),
                Ctx::BitmapTable(b) => out.push(Referrer::plain(
                    Role::BitmapTable,
                    Some(self.bitmap_name(b)),
                )),
                Ctx::BitmapData(b, j) => out.push(Referrer::plain(
                    Role::BitmapData,
                    Some(format!("{} table entry {j}", self.bitmap_name(b))),
                )),
            }
        }
        out.sort();
        out.dedup();
        if out.len() > MAX_REFERRERS * 2 {
            let more = out.len().saturating_sub(MAX_REFERRERS);
            out.truncate(MAX_REFERRERS);
            let role = out.first().map_or(Role::Header, |f| f.role);
            out.push(Referrer::plain(
                role,
                Some(format!("... and {more} more referrers")),
            ));
        }
        out
    }

    /// Whether L1 index `l1i` of snapshot `index` maps its VM state: QEMU saves
    /// it at the guest offsets just past the disk (`qcow2_vm_state_offset`, the
    /// first L1 entry not needed for the snapshot's disk size).
    fn in_vm_state(&self, index: usize, l1i: u64) -> bool {
        self.img.snapshots.snapshots.get(index).is_some_and(|s| {
            s.vm_state_size > 0
                && l1i
                    >= self
                        .img
                        .geometry()
                        .l1_entries_for(s.effective_disk_size(self.img.header.size))
        })
    }

    fn bitmap_name(&self, b: usize) -> String {
        match &self.img.bitmaps {
            Some(Ok(l)) => l
                .get(b)
                .map(|x| format!("bitmap '{}'", x.name))
                .unwrap_or_default(),
            _ => format!("bitmap #{b}"),
        }
    }
}

/// Run the check.
pub fn check(img: &Qcow2, opts: &CheckOptions) -> CheckReport {
    let mut walk = Walk::new(img, true);
    walk.progress = opts.progress;
    let h = &img.header;
    let cs = walk.cs;
    walk.report.total_clusters = (h.size & !511).div_ceil(cs);
    if h.dirty() {
        walk.report.warnings.push(
            "the dirty bit is set: the image was not closed cleanly (lazy refcounts), so stored refcounts may lag behind; QEMU would repair them when opening it read-write. The computed refcounts below are what they should be.".into(),
        );
    }
    if let Some(why) = &img.check_refusal {
        walk.report.qemu_refuses = Some(why.clone());
    }
    // Step 1: the snapshot table (qcow2_check_read_snapshot_table).
    let nb = u64::from(h.nb_snapshots);
    if nb > crate::snapshot::MAX_SNAPSHOTS {
        let msg = "ERROR snapshot table too large".to_string();
        walk.find(FindingKind::CheckError, "snapshot-table", msg, 1);
        walk.report.aborted = Some(format!(
            "{nb} snapshots is more than QEMU's limit of 65536 (File too large)"
        ));
        return finish(walk, None);
    }
    // The offset must be aligned even when there are no snapshots.
    if h.snapshots_offset & walk.cmask != 0
        || h.snapshots_offset > (i64::MAX as u64).saturating_sub(nb.saturating_mul(40))
    {
        walk.find(
            FindingKind::CheckError,
            "snapshot-table",
            "ERROR snapshot table offset invalid".into(),
            1,
        );
        walk.report.aborted = Some("snapshot table offset invalid (Invalid argument)".into());
        return finish(walk, None);
    }
    if let Some(e) = &img.snapshots.error {
        let msg = format!("ERROR failed to read the snapshot table: {e}");
        walk.find(FindingKind::CheckError, "snapshot-table", msg, 1);
        walk.report.aborted = Some(e.clone());
        return finish(walk, None);
    }
    if h.version >= 3 {
        for (i, s) in img.snapshots.snapshots.iter().enumerate() {
            if s.extra_data_size < 16 {
                let msg = format!("ERROR snapshot table entry {i} is incomplete");
                if let Some(f) = walk.find(FindingKind::Corruption, "snapshot-table", msg, 1) {
                    f.offset = Some(s.entry_offset);
                    f.repair = Some("qemu-img check -r all rewrites the snapshot table with 24 bytes of extra data".into());
                }
            }
        }
    }
    let file_clusters = walk.file_len.div_ceil(cs);
    let mut counter = Counter {
        imrt: Imrt::new(file_clusters),
        max: img.refcount_geometry().max(),
    };
    // The COPIED check reads only stored refcounts and the active tables, so it
    // runs on a second thread while this one recounts every reference.
    let copied_report = std::thread::scope(|sc| {
        let side = sc.spawn(|| {
            let mut w = Walk::new(img, true);
            copied(&mut w);
            w.report
        });
        walk.head(&mut counter);
        walk.l2_phase(&mut counter);
        walk.tail(&mut counter);
        if walk.report.aborted.is_none() {
            compare(&mut walk, &counter);
        }
        side.join().ok()
    });
    if walk.report.aborted.is_some() {
        return finish(walk, Some(counter));
    }
    if let Some(r) = copied_report {
        walk.absorb(r);
    }
    overlaps(&mut walk, &counter);
    finish(walk, Some(counter))
}

/// `compare_refcounts`, plus what lies past the end of the file.
fn compare(walk: &mut Walk, counter: &Counter) {
    let img = walk.img;
    let nb = counter.imrt.nb_clusters;
    let mut stored = RefcountReader::new(img);
    let mut highest = 0u64;
    let mut unreadable: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    let bb = stored.block_bits;
    let order = stored.order();
    let mask = low_mask(bb);
    let mut c = 0u64;
    while c < nb {
        let ti = c >> bb;
        // The start of the next refcount block (c < nb, so c is not u64::MAX).
        let end = (c | mask).saturating_add(1).min(nb);
        walk.tick("refcounts", c, nb);
        let block = match stored.block(ti) {
            Ok(b) => b,
            Err(off) => {
                unreadable.insert(ti, (off, c, end.saturating_sub(c)));
                c = end;
                continue;
            }
        };
        // No refcount block and nothing counted here: every cluster is 0 = 0.
        // (Skipping keeps the pass proportional to what is used, not to the file
        // length.)
        if block.is_none()
            && ((c >> CHUNK_BITS)..=(end.saturating_sub(1) >> CHUNK_BITS))
                .all(|x| counter.imrt.chunk(x << CHUNK_BITS).is_none())
        {
            c = end;
            continue;
        }
        // Fast path for the common case (16-bit refcounts, counts below 256):
        // skip the stretch of clusters whose stored refcount equals the count.
        let mut from = c;
        if let (Some(b), 4, Some(Counts::U8(counts))) =
            (block, order, counter.imrt.chunk(c).map(|ch| &ch.counts))
        {
            let lo = (c & (CHUNK - 1)) as usize;
            let n = end.saturating_sub(c) as usize;
            let stored = b
                .get((c & mask).saturating_mul(2) as usize..)
                .unwrap_or(&[]);
            if let Some(mine) = counts.get(lo..lo.saturating_add(n)) {
                for (cc, (pair, &m)) in (c..end).zip(stored.chunks_exact(2).zip(mine)) {
                    let r = u16::from_be_bytes(pair.try_into().unwrap_or([0, 0]));
                    if r != u16::from(m) {
                        break;
                    }
                    if r != 0 {
                        highest = cc;
                    }
                    // cc < end: no overflow.
                    from = cc.saturating_add(1);
                }
            }
        }
        for c in from..end {
            let computed = counter.imrt.get(c);
            let r = block.map_or(0, |b| get_refcount(b, order, c & mask));
            if r == 0 && computed == 0 {
                continue;
            }
            if r > 0 || computed > 0 {
                highest = c;
            }
            if r != computed {
                let (kind, word) = if r < computed {
                    (FindingKind::Corruption, "ERROR")
                } else {
                    (FindingKind::Leak, "Leaked")
                };
                let msg = format!("{word} cluster {c} refcount={r} reference={computed}");
                let cs = walk.cs;
                if let Some(f) = walk.find(kind, "refcount", msg, 1) {
                    f.cluster = Some(c);
                    f.offset = Some(c.saturating_mul(cs));
                    f.refcount = Some(r);
                    f.reference = Some(computed);
                    f.repair = Some(if r == 0 {
                        "qemu-img check -r all rebuilds the refcount structure (a used cluster has refcount 0)".to_string()
                    } else if r < computed {
                        format!("qemu-img check -r all sets the refcount to {computed}")
                    } else {
                        format!(
                            "qemu-img check -r leaks sets the refcount to {computed}{}",
                            if computed == 0 {
                                " (frees the cluster)"
                            } else {
                                ""
                            }
                        )
                    });
                }
            }
        }
        c = end;
    }
    walk.tick("refcounts", nb, nb);
    for (ti, (off, first, n)) in unreadable {
        let msg = format!(
            "Can't get refcount for cluster {first} (and {} more): refcount block {ti} at {off:#x} is not cluster aligned (Input/output error)",
            n.saturating_sub(1)
        );
        if let Some(f) = walk.find(FindingKind::CheckError, "refblock", msg, n) {
            f.cluster = Some(first);
            f.offset = Some(off);
        }
    }
    walk.report.image_end_offset = highest.saturating_add(1).saturating_mul(walk.cs);
    // Beyond qemu-img: refcounts for clusters past the end of the file.
    let table = stored.table.clone();
    let per = 1u64 << stored.block_bits;
    let mut past: Vec<(u64, u64)> = Vec::new();
    let mut past_total = 0u64;
    // Only real blocks (aligned, inside the file) are read, and at most
    // PAST_EOF_BUDGET refcounts in all, so a table of garbage entries stays cheap.
    let mut budget = PAST_EOF_BUDGET;
    let mut cut_short = false;
    for (ti, e) in table.iter().enumerate() {
        let first = (ti as u64).saturating_mul(per);
        let last = first.saturating_add(per);
        let readable = e
            .block_offset()
            .is_some_and(|o| walk.img.geometry().is_cluster_aligned(o.0) && o.0 < walk.file_len);
        if last <= nb || !readable {
            continue;
        }
        let span = last.saturating_sub(first.max(nb));
        if span > budget {
            cut_short = true;
            break;
        }
        budget = budget.saturating_sub(span);
        for c in first.max(nb)..last {
            if let Ok(r) = stored.get(c)
                && r != 0
            {
                past_total = past_total.saturating_add(1);
                if past.len() < 1000 {
                    past.push((c, r));
                }
            }
        }
    }
    if cut_short {
        walk.find(
            FindingKind::Note,
            "refcount-past-eof",
            format!("refcounts past the end of the file were looked at for the first {PAST_EOF_BUDGET} clusters only"),
            1,
        );
    }
    for (c, r) in &past {
        let msg = format!(
            "cluster {c} (offset {:#x}) is past the end of the file but has refcount {r}; qemu-img check does not look there",
            c.saturating_mul(walk.cs)
        );
        let at = c.saturating_mul(walk.cs);
        if let Some(f) = walk.find(FindingKind::Note, "refcount-past-eof", msg, 1) {
            f.cluster = Some(*c);
            f.offset = Some(at);
            f.refcount = Some(*r);
            f.reference = Some(0);
        }
    }
    if past_total > past.len() as u64 {
        let msg = format!(
            "{} more clusters past the end of the file have a refcount",
            past_total.saturating_sub(past.len() as u64)
        );
        walk.find(FindingKind::Note, "refcount-past-eof", msg, 1);
    }
}

/// `check_oflag_copied` over the active L1 table.
fn copied(walk: &mut Walk) {
    let img = walk.img;
    let geo = img.geometry();
    let has_df = img.header.has_data_file();
    let mut stored = RefcountReader::new(img);
    let mut buf = vec![0u8; walk.cs as usize];
    // Each active L2 table is read once; its entries are checked once per L1 entry naming it.
    let mut weights: BTreeMap<u64, (u64, Vec<u64>)> = BTreeMap::new();
    for (i, e) in img.l1.iter().enumerate() {
        let l2 = e.0 & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let Ok(r) = stored.get(l2 >> walk.cbits) else {
            continue;
        };
        if (r == 1) != e.copied() {
            let msg = format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={r}",
                e.0
            );
            let cbits = walk.cbits;
            if let Some(f) = walk.find(FindingKind::Corruption, "copied", msg, 1) {
                f.cluster = Some(l2 >> cbits);
                f.offset = Some(
                    img.header
                        .l1_table_offset
                        .saturating_add((i as u64).saturating_mul(8)),
                );
                f.refcount = Some(r);
                f.repair = Some(format!(
                    "{} bit 63 of active L1[{i}]",
                    if r == 1 { "set" } else { "clear" }
                ));
            }
        }
        let w = weights.entry(l2).or_default();
        w.0 = w.0.saturating_add(1);
        w.1.push(i as u64);
    }
    for (l2, (w, l1s)) in weights {
        if read_into(img.src.as_ref(), "L2 table", l2, &mut buf).is_err() {
            walk.find(
                FindingKind::CheckError,
                "io",
                "ERROR: Could not read L2 table".into(),
                1,
            );
            return;
        }
        let step = geo.l2_entry_size() as usize;
        let entries = buf.len().checked_div(step).unwrap_or(0);
        let raw_at = |j: usize| crate::bytes::be64(&buf, j.saturating_mul(step));
        let mut j = 0usize;
        while j < entries {
            let raw = raw_at(j);
            let e = L2Entry { raw, bitmap: 0 };
            let ct = e.cluster_type(&geo, has_df);
            if !matches!(ct, ClusterType::Normal | ClusterType::ZeroAlloc) {
                j = j.saturating_add(1);
                continue;
            }
            let c = (raw & L2E_OFFSET_MASK) >> walk.cbits;
            // The entries after this one that continue it (same flags, next host
            // cluster) are judged with it, one refcount block span at a time.
            let mut k = 1usize;
            if !has_df {
                while j.saturating_add(k) < entries
                    && raw_at(j.saturating_add(k))
                        == raw.wrapping_add((k as u64).wrapping_mul(walk.cs))
                    && (raw_at(j.saturating_add(k)) & L2E_OFFSET_MASK) > (raw & L2E_OFFSET_MASK)
                {
                    k = k.saturating_add(1);
                }
            }
            let mut bad: Vec<(usize, u64)> = Vec::new();
            if has_df {
                if !e.copied() {
                    bad.push((j, 1));
                }
            } else {
                stored.each_copied_mismatch(c, k as u64, e.copied(), &mut |x, r| {
                    bad.push((j.saturating_add(x as usize), r));
                });
            }
            j = j.saturating_add(k);
            for (j, r) in bad {
                let raw = raw_at(j);
                let msg = format!("ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={r}");
                let cbits = walk.cbits;
                let name = walk.l1_name(L1Id::Active);
                if let Some(f) = walk.find(FindingKind::Corruption, "copied", msg, w) {
                    f.cluster = Some((raw & L2E_OFFSET_MASK) >> cbits);
                    f.offset = Some(l2.saturating_add((j as u64).saturating_mul(step as u64)));
                    f.refcount = Some(r);
                    f.repair = Some(format!(
                        "{} bit 63 of the L2 entry",
                        if r == 1 { "set" } else { "clear" }
                    ));
                    for l1i in &l1s {
                        f.referrers.push(Referrer {
                            l1: Some(name.clone()),
                            l1_index: Some(*l1i),
                            l2_table: Some(l2),
                            l2_index: Some(j as u64),
                            guest_offset: geo.guest_offset(*l1i, j as u64, 0).map(|g| g.0),
                            ..Referrer::plain(Role::Data, None)
                        });
                    }
                }
            }
        }
    }
}

/// Beyond qemu-img: metadata used as data, and data clusters mapped at two guest offsets.
fn overlaps(walk: &mut Walk, counter: &Counter) {
    let nb_l1 = (walk.snapshot_l1_count as u64).saturating_add(1);
    let mut suspects: BTreeSet<u64> = BTreeSet::new();
    let nb = counter.imrt.nb_clusters;
    for (ci, chunk) in counter.imrt.chunks.iter().enumerate() {
        let Some(chunk) = chunk else {
            continue;
        };
        let first = (ci as u64) << CHUNK_BITS;
        for (i, kb) in chunk.kinds.iter().enumerate() {
            if *kb == 0 {
                continue;
            }
            for j in 0..4 {
                // Byte i holds clusters 4i..4i+4 of the chunk; first is a multiple
                // of CHUNK and the index is below CHUNK, so `|` adds them exactly.
                let idx = (i << 2) | j;
                let c = first | idx as u64;
                if c >= nb {
                    break;
                }
                let k = (kb >> kind_shift(j)) & 3;
                if k == 0 {
                    continue;
                }
                let n = chunk.counts.get(idx);
                let both = k == 3;
                let meta_shared = k == 1 && n > 1;
                let data_over = k == 2 && n > nb_l1;
                if (both || meta_shared || data_over) && suspects.len() < MAX_OWNER_CLUSTERS {
                    suspects.insert(c);
                }
            }
        }
    }
    // Also clusters whose refcount is wrong, to name their owners.
    for f in &walk.report.findings {
        if let (Some(c), Some(_)) = (f.cluster, f.reference)
            && suspects.len() < MAX_OWNER_CLUSTERS
        {
            suspects.insert(c);
        }
    }
    if suspects.is_empty() {
        return;
    }
    let want = |c: u64| suspects.contains(&c);
    let mut owners = Owners {
        want: &want,
        found: BTreeMap::new(),
    };
    let mut again = Walk::new(walk.img, false);
    again.calculate(&mut owners);
    walk.l2_refs = std::mem::take(&mut again.l2_refs);
    // Ordered, so the notes come out in cluster order on every run.
    let mut named: BTreeMap<u64, Vec<Referrer>> = BTreeMap::new();
    for (c, list) in &owners.found {
        named.insert(*c, walk.referrers(list));
    }
    for f in walk.report.findings.iter_mut() {
        if let Some(c) = f.cluster
            && f.referrers.is_empty()
            && let Some(r) = named.get(&c)
        {
            f.referrers = r.clone();
        }
    }
    let cs = walk.cs;
    for (c, refs) in named {
        let kinds = counter.imrt.kinds(c);
        let guests: BTreeSet<u64> = refs
            .iter()
            .filter(|r| matches!(r.role, Role::Data | Role::Compressed))
            .filter_map(|r| r.guest_offset)
            .collect();
        let metas: Vec<&Referrer> = refs.iter().filter(|r| r.role.is_metadata()).collect();
        let has_data = refs
            .iter()
            .any(|r| matches!(r.role, Role::Data | Role::Compressed));
        let _ = kinds;
        let what = if has_data && !metas.is_empty() {
            Some("metadata and guest data share")
        } else if metas.len() > 1 && metas.iter().any(|m| m.role != Role::L2Table) {
            Some("two metadata structures share")
        } else if guests.len() > 1 && refs.iter().all(|r| r.role == Role::Data) {
            Some("two different guest offsets map to")
        } else {
            None
        };
        if let Some(what) = what {
            let msg = format!(
                "{what} host cluster {c} (offset {:#x}): {}",
                c.saturating_mul(cs),
                refs.iter()
                    .map(Referrer::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if let Some(f) = walk.find(FindingKind::Note, "cross-link", msg, 1) {
                f.cluster = Some(c);
                f.offset = Some(c.saturating_mul(cs));
                f.reference = Some(counter.imrt.get(c));
                f.referrers = refs;
                f.repair = Some("no automatic repair: a write to one owner changes what the other reads; copy the data out first".into());
            }
        }
    }
}

fn finish(mut walk: Walk, counter: Option<Counter>) -> CheckReport {
    if let Some(c) = counter {
        walk.report.imrt = Some(Arc::new(c.imrt));
    }
    walk.report
}

/// Every role and referrer of each host cluster in `first..=last`, with stored and
/// computed refcounts (what `qinspect clusters` prints).
#[derive(Clone, Debug, Serialize)]
pub struct ClusterInfo {
    /// Host cluster index.
    pub cluster: u64,
    /// Host offset.
    pub offset: u64,
    /// Roles, deduplicated ("free" when none).
    pub roles: Vec<Role>,
    /// Stored refcount (`None` if unreadable).
    pub refcount: Option<u64>,
    /// Computed references.
    pub reference: u64,
    /// Who points here.
    pub referrers: Vec<Referrer>,
}

/// Describe host clusters `first..=last` (bounded by the caller).
pub fn clusters(img: &Qcow2, first: u64, last: u64) -> Vec<ClusterInfo> {
    let want = |c: u64| c >= first && c <= last;
    let mut owners = Owners {
        want: &want,
        found: BTreeMap::new(),
    };
    let mut walk = Walk::new(img, false);
    walk.calculate(&mut owners);
    let mut stored = RefcountReader::new(img);
    let cs = walk.cs;
    (first..=last)
        .map(|c| {
            let list = owners.found.get(&c).cloned().unwrap_or_default();
            let reference = list
                .iter()
                .map(|(ctx, w)| match ctx {
                    Ctx::Entry { l2, .. } => {
                        walk.l2_refs.get(l2).map(|v| v.len() as u64).unwrap_or(*w)
                    }
                    _ => *w,
                })
                .fold(0u64, u64::saturating_add);
            let referrers = walk.referrers(&list);
            let mut roles: Vec<Role> = referrers.iter().map(|r| r.role).collect();
            roles.sort();
            roles.dedup();
            ClusterInfo {
                cluster: c,
                offset: c.saturating_mul(cs),
                roles,
                refcount: stored.get(c).ok(),
                reference,
                referrers,
            }
        })
        .collect()
}

/// Bit `1 << role as u16` for each role of each host cluster in `first..=last`
/// (0 for a free cluster): a light version of [`clusters`] for whole-file views.
pub fn role_map(img: &Qcow2, first: u64, last: u64) -> Vec<u16> {
    struct Roles {
        first: u64,
        bits: Vec<u16>,
    }
    impl Visitor for Roles {
        fn visit(&mut self, first: u64, last: u64, _w: u64, ctx: Ctx) -> u64 {
            let bit = 1u16 << (ctx.role() as u16);
            for c in first..=last {
                if let Some(b) = c
                    .checked_sub(self.first)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| self.bits.get_mut(i))
                {
                    *b |= bit;
                }
            }
            0
        }
        fn visit_run(&mut self, first: u64, n: u64, w: u64, ctx: Ctx) -> u64 {
            if let Some(rest) = n.checked_sub(1) {
                self.visit(first, first.saturating_add(rest), w, ctx);
            }
            0
        }
    }
    let len = last.saturating_sub(first).saturating_add(1).min(1 << 26) as usize;
    let mut v = Roles {
        first,
        bits: vec![0u16; len],
    };
    let mut walk = Walk::new(img, false);
    walk.calculate(&mut v);
    v.bits
}

/// Every role, in bit order of [`role_map`].
pub const ROLES: [Role; 13] = [
    Role::Header,
    Role::L1Table,
    Role::L2Table,
    Role::Data,
    Role::Compressed,
    Role::SnapshotTable,
    Role::RefcountTable,
    Role::RefcountBlock,
    Role::CryptoHeader,
    Role::BitmapDirectory,
    Role::BitmapTable,
    Role::BitmapData,
    Role::VmState,
];

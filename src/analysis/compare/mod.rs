//! Comparing two states of an image guest cluster by guest cluster: the active
//! state, any internal snapshot, or another opening of the image (the simulator's
//! in-memory result).
//!
//! For each guest cluster, each side's L2 entry says where the cluster's data is
//! ([`Mapping`]); two sides differ when they map it differently, which is exactly
//! when `qemu-img map --output=json` of the two states disagrees about that cluster
//! (present, zero, data, offset), except for compressed clusters, whose host
//! offset `qemu-img map` does not report. Where both sides name different host
//! clusters, the bytes can be compared as well, to tell a copy from a change.
//!
//! ```no_run
//! # fn main() -> qinspect::Result<()> {
//! use qinspect::compare::{Options, Side, compare};
//! use qinspect::image::{Qcow2, Strictness};
//! use qinspect::io::{FileSource, SharedSource};
//! let src: SharedSource = std::sync::Arc::new(FileSource::open("disk.qcow2".as_ref())?);
//! let img = Qcow2::open(src, Strictness::Lenient)?;
//! let a = Side::active(&img);
//! let b = Side::snapshot(&img, "before-upgrade")?;
//! let c = compare(&a, &b, &Options::default())?;
//! println!("{} of {} guest clusters differ", c.differing, c.clusters);
//! # Ok(()) }
//! ```

use crate::error::{Error, Result};
use crate::image::{Qcow2, View};
use crate::tables::{ClusterType, CompressedDescriptor, L2Entry};
use crate::types::{GuestOffset, HostOffset};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

mod closest;
pub use closest::{Distance, closest};

/// One side of a comparison: an image and one of its L1 tables, with a name.
#[derive(Clone)]
pub struct Side<'a> {
    /// How it is named to people ("the active state", "snapshot 1 'base'").
    pub name: String,
    /// The image the L1 table belongs to.
    pub img: &'a Qcow2,
    /// The L1 table.
    pub view: View,
}

impl<'a> Side<'a> {
    /// The active L1 table of `img`.
    pub fn active(img: &'a Qcow2) -> Side<'a> {
        Side {
            name: "the active state".into(),
            img,
            view: img.active_view(),
        }
    }

    /// The snapshot of `img` with this ID or name.
    pub fn snapshot(img: &'a Qcow2, id_or_name: &str) -> Result<Side<'a>> {
        let view = img.snapshot_view(id_or_name)?;
        let name = match &view.snapshot {
            Some(s) => format!("snapshot {} '{}'", s.id, s.name),
            None => format!("snapshot {id_or_name}"),
        };
        Ok(Side { name, img, view })
    }

    /// `active` or a snapshot's ID or name.
    pub fn parse(img: &'a Qcow2, which: &str) -> Result<Side<'a>> {
        if which == "active" {
            Ok(Side::active(img))
        } else {
            Side::snapshot(img, which)
        }
    }
}

/// Where one side keeps one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mapping {
    /// Not allocated in this image: the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros (a host cluster kept allocated, or none).
    Zero {
        /// The host cluster kept for it.
        host: Option<HostOffset>,
    },
    /// Data in a host cluster.
    Data {
        /// Its host offset (in the data file when the image has one).
        host: HostOffset,
    },
    /// Compressed data.
    Compressed {
        /// Where the compressed bytes start.
        host: HostOffset,
    },
    /// Extended L2: the subclusters of the cluster are of several kinds.
    Subclusters {
        /// The L2 entry.
        raw: u64,
        /// Its subcluster bitmap.
        bitmap: u64,
    },
    /// Past the end of this side's disk.
    PastEnd,
}

impl Mapping {
    /// How L2 entry `e` of `img` maps its guest cluster.
    pub fn of(e: &L2Entry, img: &Qcow2) -> Mapping {
        let geo = img.geometry();
        let has_df = img.header.has_data_file();
        if geo.extended_l2 && !e.compressed() {
            let t = e.subcluster_type(&geo, has_df, 0);
            let uniform = (1..32).all(|s| e.subcluster_type(&geo, has_df, s) == t);
            if !uniform {
                return Mapping::Subclusters {
                    raw: e.raw,
                    bitmap: e.bitmap,
                };
            }
            if t.is_zero() {
                return Mapping::Zero {
                    host: t.has_host_cluster().then_some(e.host_offset()),
                };
            }
            if t.is_unallocated() {
                return Mapping::Unallocated;
            }
        }
        match e.cluster_type(&geo, has_df) {
            ClusterType::Unallocated => Mapping::Unallocated,
            ClusterType::ZeroPlain => Mapping::Zero { host: None },
            ClusterType::ZeroAlloc => Mapping::Zero {
                host: Some(e.host_offset()),
            },
            ClusterType::Normal => Mapping::Data {
                host: e.host_offset(),
            },
            ClusterType::Compressed => Mapping::Compressed {
                host: CompressedDescriptor::decode(e.raw, &geo).offset,
            },
        }
    }

    /// In words, for one side: "unallocated", "data at 0x920000 in this file".
    pub fn words(&self, backing: bool, data_file: bool) -> String {
        let words = self.words_unplaced(backing);
        if !matches!(self, Mapping::Data { .. }) {
            return words;
        }
        let file = if data_file {
            "in the data file"
        } else {
            "in this file"
        };
        format!("{words} {file}")
    }

    /// [`Mapping::words`] without the file a data cluster is in ("data at
    /// 0x920000"), for a row whose other side names the same file.
    pub fn words_unplaced(&self, backing: bool) -> String {
        match self {
            Mapping::Unallocated if backing => "unallocated (the backing file)".into(),
            Mapping::Unallocated => "unallocated (zeros)".into(),
            Mapping::Zero { host: None } => "zero".into(),
            Mapping::Zero { host: Some(h) } => format!("zero (cluster kept at {h:#x})"),
            Mapping::Data { host } => format!("data at {host:#x}"),
            Mapping::Compressed { host } => format!("compressed data at {host:#x}"),
            Mapping::Subclusters { raw, bitmap } => {
                format!("mixed subclusters (entry {raw:#x}, bitmap {bitmap:#x})")
            }
            Mapping::PastEnd => "past the end of the disk".into(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Mapping::Unallocated => "unallocated",
            Mapping::Zero { .. } => "zero",
            Mapping::Data { .. } => "data",
            Mapping::Compressed { .. } => "compressed",
            Mapping::Subclusters { .. } => "subclusters",
            Mapping::PastEnd => "past the end",
        }
    }
}

/// How the two sides compare at one guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Both map it the same way, to no host cluster (both unallocated, both zero).
    Same,
    /// Both use the same host cluster, and its bytes are the same.
    Shared,
    /// Both use the same host cluster of different openings (the simulated image
    /// rewrote it): the bytes differ.
    Rewritten,
    /// Different host clusters holding the same bytes.
    CopiedSame,
    /// Different host clusters with different bytes (or bytes not compared).
    DifferentClusters,
    /// Different kinds (unallocated vs data, zero vs data, ...).
    DifferentKinds,
}

impl Verdict {
    /// Whether the two sides map the cluster differently.
    pub fn differs(self) -> bool {
        !matches!(self, Verdict::Same | Verdict::Shared)
    }
}

/// One guest cluster the sides do not map the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Its first guest byte.
    pub guest: GuestOffset,
    /// Side A.
    pub a: Mapping,
    /// Side B.
    pub b: Mapping,
    /// The verdict.
    pub verdict: Verdict,
    /// In words.
    pub words: String,
}

/// How to compare: whether to read cluster contents, how many rows to keep,
/// and where to report progress (and cancel).
pub struct Options<'a> {
    /// Compare the bytes of different host clusters (and of the same host cluster
    /// in two different openings).
    pub contents: bool,
    /// Rows kept at most (every cluster is counted regardless).
    pub max_rows: usize,
    /// Called now and then with (guest clusters done, total); returning false
    /// stops the comparison with [`Error::Unsupported`] "cancelled".
    pub progress: Option<&'a (dyn Fn(u64, u64) -> bool + Sync)>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            contents: true,
            max_rows: 100_000,
            progress: None,
        }
    }
}

/// The result.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Comparison {
    /// Side A's name.
    pub a: String,
    /// Side B's name.
    pub b: String,
    /// Cluster size (the unit compared).
    pub cluster_size: u64,
    /// Guest clusters compared (the larger of the two disks).
    pub clusters: u64,
    /// Clusters mapped differently.
    pub differing: u64,
    /// Clusters counted per verdict.
    pub counts: BTreeMap<String, u64>,
    /// Differing clusters counted per pair of kinds ("unallocated vs data").
    pub kinds: BTreeMap<String, u64>,
    /// The differing clusters, in guest order (at most [`Options::max_rows`]).
    pub rows: Vec<Row>,
    /// Differing clusters not listed.
    pub omitted: u64,
    /// Side A's disk size.
    #[serde(skip)]
    a_size: u64,
}

fn cancelled() -> Error {
    Error::Unsupported {
        what: "comparison".into(),
        reason: "cancelled".into(),
    }
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Same => "same mapping, no host cluster",
        Verdict::Shared => "shared host cluster: same data",
        Verdict::Rewritten => "same host cluster, rewritten",
        Verdict::CopiedSame => "different host clusters: same data",
        Verdict::DifferentClusters => "different host clusters",
        Verdict::DifferentKinds => "different kinds",
    }
}

/// The L2 table behind an L1 entry, as a slice to index safely.
fn table(side: &Side, i: usize) -> Result<Option<std::sync::Arc<Vec<L2Entry>>>> {
    match side.view.l1.get(i).and_then(|e| e.l2_offset()) {
        None => Ok(None),
        Some(o) => side.img.l2_table(o).map(Some),
    }
}

fn read_cluster(img: &Qcow2, host: HostOffset, buf: &mut [u8]) -> Option<()> {
    img.src.read_at(buf, host.get()).ok().map(|_| ())
}

/// Compare side `a` with side `b`, guest cluster by guest cluster. Both images
/// must have the same cluster size.
pub fn compare(a: &Side, b: &Side, opts: &Options) -> Result<Comparison> {
    let geo = a.img.geometry();
    let cs = geo.cluster_size();
    if b.img.geometry().cluster_size() != cs {
        return Err(Error::Unsupported {
            what: "comparison".into(),
            reason: "the two sides have different cluster sizes".into(),
        });
    }
    let per = geo.l2_entries();
    let coverage = geo.l2_coverage();
    let size = a.view.size.max(b.view.size);
    let clusters = size.div_ceil(cs);
    let same_image = std::ptr::eq(a.img, b.img);
    let data_file = a.img.header.has_data_file() || b.img.header.has_data_file();
    // Encrypted clusters hold ciphertext that depends on the host offset: their
    // bytes cannot tell a copy from a change.
    let encrypted = a.img.header.crypt_method != 0 || b.img.header.crypt_method != 0;
    let contents = opts.contents && !data_file && !encrypted;
    let backing = a.img.backing_name.is_some();
    let mut out = Comparison {
        a: a.name.clone(),
        b: b.name.clone(),
        cluster_size: cs,
        clusters,
        a_size: a.view.size,
        ..Default::default()
    };
    let (mut ba, mut bb) = if contents {
        (
            vec![0u8; usize::try_from(cs).unwrap_or(0)],
            vec![0u8; usize::try_from(cs).unwrap_or(0)],
        )
    } else {
        (Vec::new(), Vec::new())
    };
    // Guest ranges past both L1 tables have no L2 table on either side: they are
    // counted in bulk, so a huge disk size in the header costs nothing.
    let l1_len = size.div_ceil(coverage);
    let walked = l1_len.min(a.view.l1.len().max(b.view.l1.len()) as u64);
    let in_both = a.view.size.min(b.view.size).div_ceil(cs);
    // What a pair of L2 tables (or none) adds over a whole L1 entry's range, kept
    // to reuse when the same pair comes back (many L1 entries naming one table).
    let mut seen: HashMap<(Option<HostOffset>, Option<HostOffset>), Delta> = HashMap::new();
    for i in 0..walked {
        if let Some(p) = opts.progress {
            let done = i.saturating_mul(per).min(clusters);
            if !p(done, clusters) {
                return Err(cancelled());
            }
        }
        let iu = usize::try_from(i).map_err(|_| cancelled())?;
        let ea = a.view.l1.get(iu).and_then(|e| e.l2_offset());
        let eb = b.view.l1.get(iu).and_then(|e| e.l2_offset());
        let first = i.saturating_mul(per);
        let n = per.min(clusters.saturating_sub(first));
        if ea.is_none() && eb.is_none() {
            untabled(&mut out, opts, first, n, in_both, backing, data_file);
            continue;
        }
        let whole = n == per && first.saturating_add(n) <= in_both;
        if whole
            && let Some(d) = seen.get(&(ea, eb))
            && (d.differing == 0 || out.rows.len() >= opts.max_rows)
        {
            d.add_to(&mut out);
            continue;
        }
        let before = whole.then(|| Delta::of(&out));
        let ta = table(a, iu)?;
        let tb = if same_image && ea == eb {
            ta.clone()
        } else {
            table(b, iu)?
        };
        for j in 0..n {
            let g = GuestOffset(first.saturating_add(j).saturating_mul(cs));
            let ma = mapping(a, ta.as_deref(), j, g);
            let mb = mapping(b, tb.as_deref(), j, g);
            let v = match (host_of(&ma), host_of(&mb)) {
                _ if ma.kind() != mb.kind() => Verdict::DifferentKinds,
                (None, None) if ma == mb => Verdict::Same,
                (None, None) => Verdict::DifferentClusters,
                (Some(x), Some(y)) => {
                    let compared = contents
                        && matches!(ma, Mapping::Data { .. })
                        && (x != y || !same_image)
                        && read_cluster(a.img, x, &mut ba).is_some()
                        && read_cluster(b.img, y, &mut bb).is_some();
                    match (x == y && ma == mb, compared && ba == bb) {
                        (true, _) if same_image => Verdict::Shared,
                        (true, true) => Verdict::Shared,
                        (true, false) if compared => Verdict::Rewritten,
                        (true, false) => Verdict::Shared,
                        (false, true) => Verdict::CopiedSame,
                        (false, false) => Verdict::DifferentClusters,
                    }
                }
                // A zero cluster that keeps a host cluster and one that does not.
                _ => Verdict::DifferentClusters,
            };
            tally(&mut out, opts, g, ma, mb, v, backing, data_file);
        }
        if let Some(b0) = before {
            seen.insert((ea, eb), Delta::of(&out).minus(&b0));
        }
    }
    let rest = walked.saturating_mul(per).min(clusters);
    untabled(
        &mut out,
        opts,
        rest,
        clusters.saturating_sub(rest),
        in_both,
        backing,
        data_file,
    );
    if let Some(p) = opts.progress {
        p(clusters, clusters);
    }
    Ok(out)
}

/// Counts a range adds to a comparison.
#[derive(Clone, Debug, Default)]
struct Delta {
    counts: BTreeMap<String, u64>,
    kinds: BTreeMap<String, u64>,
    differing: u64,
    omitted: u64,
    rows: usize,
}

impl Delta {
    fn of(c: &Comparison) -> Delta {
        Delta {
            counts: c.counts.clone(),
            kinds: c.kinds.clone(),
            differing: c.differing,
            omitted: c.omitted,
            rows: c.rows.len(),
        }
    }

    fn minus(mut self, b: &Delta) -> Delta {
        for (k, v) in &mut self.counts {
            *v = v.saturating_sub(b.counts.get(k).copied().unwrap_or(0));
        }
        for (k, v) in &mut self.kinds {
            *v = v.saturating_sub(b.kinds.get(k).copied().unwrap_or(0));
        }
        self.differing = self.differing.saturating_sub(b.differing);
        // Reused only once rows are full (or there are none): every differing
        // cluster it adds then goes unlisted.
        self.omitted = self.differing;
        self.rows = 0;
        self
    }

    fn add_to(&self, c: &mut Comparison) {
        for (k, v) in &self.counts {
            let e = c.counts.entry(k.clone()).or_insert(0);
            *e = e.saturating_add(*v);
        }
        for (k, v) in &self.kinds {
            let e = c.kinds.entry(k.clone()).or_insert(0);
            *e = e.saturating_add(*v);
        }
        c.differing = c.differing.saturating_add(self.differing);
        c.omitted = c.omitted.saturating_add(self.omitted);
    }
}

/// Guest clusters `first..first+n` where neither side has an L2 table: both
/// unallocated below `in_both`, one side past its end above it. Rows are made
/// only while there is room for them; the rest is counted.
fn untabled(
    out: &mut Comparison,
    opts: &Options,
    first: u64,
    n: u64,
    in_both: u64,
    backing: bool,
    data_file: bool,
) {
    let end = first.saturating_add(n);
    let same = end.min(in_both).saturating_sub(first);
    if same > 0 {
        let c = out
            .counts
            .entry(verdict_name(Verdict::Same).to_string())
            .or_insert(0);
        *c = c.saturating_add(same);
    }
    let mut k = first.max(in_both);
    while k < end && out.rows.len() < opts.max_rows {
        let g = GuestOffset(k.saturating_mul(out.cluster_size));
        let (ma, mb) = past_end_pair(out, g);
        tally(
            out,
            opts,
            g,
            ma,
            mb,
            Verdict::DifferentKinds,
            backing,
            data_file,
        );
        k = k.saturating_add(1);
    }
    let left = end.saturating_sub(k);
    if left > 0 {
        let (ma, mb) = past_end_pair(out, GuestOffset(k.saturating_mul(out.cluster_size)));
        let c = out
            .counts
            .entry(verdict_name(Verdict::DifferentKinds).to_string())
            .or_insert(0);
        *c = c.saturating_add(left);
        let e = out
            .kinds
            .entry(format!("{} vs {}", ma.kind(), mb.kind()))
            .or_insert(0);
        *e = e.saturating_add(left);
        out.differing = out.differing.saturating_add(left);
        out.omitted = out.omitted.saturating_add(left);
    }
}

/// Which side is past its end at guest offset `g` (the other is unallocated).
fn past_end_pair(out: &Comparison, g: GuestOffset) -> (Mapping, Mapping) {
    if out.a_size <= g.get() {
        (Mapping::PastEnd, Mapping::Unallocated)
    } else {
        (Mapping::Unallocated, Mapping::PastEnd)
    }
}

fn host_of(m: &Mapping) -> Option<HostOffset> {
    match m {
        Mapping::Data { host } | Mapping::Compressed { host } => Some(*host),
        Mapping::Zero { host } => *host,
        // Mixed subclusters are the same only where the entries are (`ma == mb`).
        Mapping::Subclusters { raw, .. } => Some(L2Entry::from_word(*raw).host_offset()),
        _ => None,
    }
}

fn mapping(side: &Side, t: Option<&Vec<L2Entry>>, j: u64, guest: GuestOffset) -> Mapping {
    if guest.get() >= side.view.size {
        return Mapping::PastEnd;
    }
    let e = usize::try_from(j).ok().and_then(|j| t?.get(j));
    match e {
        None => Mapping::Unallocated,
        Some(e) => Mapping::of(e, side.img),
    }
}

#[allow(clippy::too_many_arguments)]
fn tally(
    out: &mut Comparison,
    opts: &Options,
    guest: GuestOffset,
    a: Mapping,
    b: Mapping,
    v: Verdict,
    backing: bool,
    data_file: bool,
) {
    let c = out.counts.entry(verdict_name(v).to_string()).or_insert(0);
    *c = c.saturating_add(1);
    if !v.differs() {
        return;
    }
    out.differing = out.differing.saturating_add(1);
    let k = out
        .kinds
        .entry(format!("{} vs {}", a.kind(), b.kind()))
        .or_insert(0);
    *k = k.saturating_add(1);
    if out.rows.len() >= opts.max_rows {
        out.omitted = out.omitted.saturating_add(1);
        return;
    }
    let wa = a.words(backing, data_file);
    let wb = b.words(backing, data_file);
    let words = match v {
        Verdict::CopiedSame => format!("{wa} vs {wb}: different host clusters, same data"),
        Verdict::DifferentClusters => format!("{wa} vs {wb}: different host clusters"),
        Verdict::Rewritten => format!("{wa} in both: same host cluster, different data"),
        _ => format!("{wa} vs {wb}"),
    };
    out.rows.push(Row {
        guest,
        a,
        b,
        verdict: v,
        words,
    });
}

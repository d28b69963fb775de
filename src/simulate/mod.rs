//! Simulating what QEMU would write: refcount updates, snapshots, copy-on-write.
//!
//! A [`Sim`] keeps an in-memory copy of every metadata cluster an operation reads
//! or changes, on top of the read-only image, and replays QEMU's algorithms on it
//! (`block/qcow2-refcount.c`, `qcow2-snapshot.c`, `qcow2-cluster.c`):
//!
//! * **the refcount walk** (`qcow2_update_snapshot_refcount`): for every L2 table an
//!   L1 table names and every cluster those name, add the addend (+1 when a
//!   snapshot starts sharing them, -1 when one stops), then set COPIED on exactly
//!   the entries whose cluster now has refcount 1. Addend 0 changes no refcount and
//!   only recomputes the COPIED flags.
//! * **snapshot create / delete / apply**, built on the walk.
//! * **guest writes** with copy-on-write of shared L2 tables and data clusters, and
//!   **discards**.
//!
//! New clusters are found the way a freshly opened QEMU finds them: first fit from
//! the lowest cluster with refcount 0. Every change is recorded as a [`Change`]
//! (merged into runs where consecutive changes are alike), and the result is an
//! image ([`Sim::image`]) that the checker, map and read can look at. Nothing is
//! ever written to the real file.

mod bitmaps;
mod overlay;
mod repair;
mod zeroes;

use crate::error::{Error, Result};
use crate::header::Header;
use crate::image::{Qcow2, Strictness};
use crate::io::{SharedSource, Source};
use crate::refcount::{get_refcount, set_refcount};
use crate::tables::{
    ClusterType, CompressedDescriptor, L1E_OFFSET_MASK, L2E_OFFSET_MASK, L2Entry, OFLAG_COPIED,
    OFLAG_ZERO, SubclusterType,
};
use crate::types::{Geometry, GuestOffset, low_mask};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest file the simulator lets an image grow to (ext4's limit, 16 TiB).
pub const MAX_FILE_LEN: u64 = 1 << 44;

/// What changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// The refcount of host clusters `cluster..cluster+count`.
    Refcount {
        /// First cluster.
        cluster: u64,
    },
    /// Entries of an L1 table.
    L1Entry {
        /// Which table ("active L1" or "snapshot 1 'name' L1").
        table: String,
        /// Its offset.
        table_offset: u64,
        /// First index.
        index: u64,
    },
    /// Entries of an L2 table.
    L2Entry {
        /// The table's offset.
        table_offset: u64,
        /// First index.
        index: u64,
    },
    /// A header field.
    Header {
        /// Field name.
        field: &'static str,
    },
    /// Clusters allocated (refcount 0 -> 1) for a purpose.
    Allocate {
        /// First byte.
        offset: u64,
        /// Bytes.
        length: u64,
        /// What for.
        purpose: String,
    },
    /// Clusters released (a -1 that may free them).
    Free {
        /// First byte.
        offset: u64,
        /// Bytes.
        length: u64,
        /// What they were.
        purpose: String,
    },
    /// Bytes copied (an L1 table into a snapshot, or guest data for copy-on-write).
    Copy {
        /// From (host offset, or guest offset for data read through the chain).
        from: String,
        /// To host offset.
        to: u64,
        /// Bytes.
        length: u64,
    },
    /// The snapshot table was rewritten.
    SnapshotTable {
        /// New offset.
        offset: u64,
        /// New size in bytes.
        size: u64,
        /// Number of entries.
        entries: u64,
    },
    /// Something to know that is not a change.
    Note,
}

/// One change (or a run of alike changes) an operation makes.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// Where.
    #[serde(flatten)]
    pub target: Target,
    /// How many consecutive clusters or entries this covers.
    pub count: u64,
    /// Value before.
    pub before: u64,
    /// Value after.
    pub after: u64,
    /// Why, in plain words.
    pub reason: String,
}

impl Change {
    /// One line for people.
    pub fn describe(&self) -> String {
        let range = |first: u64| {
            if self.count > 1 {
                format!(
                    "{first}..{}",
                    first.saturating_add(self.count.saturating_sub(1))
                )
            } else {
                first.to_string()
            }
        };
        match &self.target {
            Target::Refcount { cluster } => format!(
                "refcount of cluster{} {}: {} -> {} ({})",
                if self.count > 1 { "s" } else { "" },
                range(*cluster),
                self.before,
                self.after,
                self.reason
            ),
            Target::L1Entry { table, index, .. } => format!(
                "{table}[{}]: {:#x} -> {:#x} ({})",
                range(*index),
                self.before,
                self.after,
                self.reason
            ),
            Target::L2Entry {
                table_offset,
                index,
            } => format!(
                "L2 {table_offset:#x}[{}]: {:#x} -> {:#x}{} ({})",
                range(*index),
                self.before,
                self.after,
                if self.count > 1 { " and alike" } else { "" },
                self.reason
            ),
            Target::Header { field } => format!(
                "header {field}: {:#x} -> {:#x} ({})",
                self.before, self.after, self.reason
            ),
            Target::Allocate {
                offset,
                length,
                purpose,
            } => format!(
                "allocate {length} bytes at {offset:#x} (cluster {}) for {purpose}",
                self.before
            ),
            Target::Free {
                offset,
                length,
                purpose,
            } => format!("release {length} bytes at {offset:#x}: {purpose}"),
            Target::Copy { from, to, length } => {
                format!(
                    "copy {length} bytes from {from} to {to:#x} ({})",
                    self.reason
                )
            }
            Target::SnapshotTable {
                offset,
                size,
                entries,
            } => {
                format!("write the snapshot table ({entries} entries, {size} bytes) at {offset:#x}")
            }
            Target::Note => self.reason.clone(),
        }
    }

    fn extends(&self, next: &Change) -> bool {
        if self.reason != next.reason {
            return false;
        }
        // Refcounts merge when they change the same way; table entries when the
        // same bits flip (e.g. COPIED cleared on a run of entries).
        let same = match self.target {
            Target::L1Entry { .. } | Target::L2Entry { .. } => {
                self.before ^ self.after == next.before ^ next.after
            }
            _ => self.before == next.before && self.after == next.after,
        };
        if !same {
            return false;
        }
        match (&self.target, &next.target) {
            (Target::Refcount { cluster: a }, Target::Refcount { cluster: b }) => {
                a.checked_add(self.count) == Some(*b)
            }
            (
                Target::L2Entry {
                    table_offset: t1,
                    index: a,
                },
                Target::L2Entry {
                    table_offset: t2,
                    index: b,
                },
            ) => t1 == t2 && a.checked_add(self.count) == Some(*b),
            (
                Target::L1Entry {
                    table_offset: t1,
                    index: a,
                    ..
                },
                Target::L1Entry {
                    table_offset: t2,
                    index: b,
                    ..
                },
            ) => t1 == t2 && a.checked_add(self.count) == Some(*b),
            _ => false,
        }
    }
}

/// A fast hash for cluster numbers (they are already well spread).
#[derive(Default, Clone, Copy)]
pub struct ClusterHasher(u64);

impl std::hash::Hasher for ClusterHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ClusterMap = HashMap<u64, Box<[u8]>, std::hash::BuildHasherDefault<ClusterHasher>>;

/// An operation to simulate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// `qemu-img snapshot -c NAME`.
    SnapshotCreate {
        /// Name.
        name: String,
    },
    /// `qemu-img snapshot -d NAME` (names only, as qemu-img matches them).
    SnapshotDelete {
        /// Name.
        id_or_name: String,
    },
    /// QMP `snapshot-delete-internal-sync` with only an `id`.
    SnapshotDeleteId {
        /// Snapshot ID.
        id: String,
    },
    /// `qemu-img snapshot -a ID_OR_NAME`.
    SnapshotApply {
        /// ID or name.
        id_or_name: String,
    },
    /// A guest write.
    Write {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        length: u64,
    },
    /// A guest write-zeroes (`qemu-io -c 'write -z [-u]'`).
    WriteZeroes {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        length: u64,
        /// `-u`: clusters may be released.
        unmap: bool,
    },
    /// A guest discard.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Bytes.
        length: u64,
    },
    /// `qemu-img resize [--shrink] IMG SIZE`.
    Resize {
        /// New disk size in bytes.
        size: u64,
        /// `--shrink` given.
        shrink: bool,
    },
    /// A throw-away overlay over the image (`qemu-nbd -s`) or over one of its
    /// snapshots (`qemu-nbd -s -l SNAPSHOT`); the operations after it act on
    /// the overlay.
    Overlay {
        /// The snapshot shown (ID or name), or the active image.
        snapshot: Option<String>,
    },
    /// Where a guest read at an offset comes from, through the simulated chain.
    Trace {
        /// Guest offset.
        offset: u64,
    },
    /// `qemu-img check -r leaks` or `-r all`.
    Repair {
        /// `-r all` (else `-r leaks`).
        all: bool,
    },
    /// The bare refcount walk over an L1 table.
    RefcountUpdate {
        /// `active` or a snapshot ID or name.
        l1: String,
        /// -1, 0 or +1.
        addend: i32,
    },
}

impl Op {
    /// Parse `snapshot-create:NAME`, `write:1M:4k`, `refcount-update:active:-1`, ...
    pub fn parse(
        s: &str,
        parse_num: &dyn Fn(&str) -> std::result::Result<u64, String>,
    ) -> std::result::Result<Op, String> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        let need = |what: &str| {
            if rest.is_empty() {
                Err(format!("'{s}': {kind} needs {what}"))
            } else {
                Ok(rest.to_string())
            }
        };
        let range = || -> std::result::Result<(u64, u64), String> {
            let (o, l) = rest
                .split_once(':')
                .ok_or_else(|| format!("'{s}': {kind} takes OFFSET:LENGTH, e.g. {kind}:1M:64k"))?;
            Ok((parse_num(o)?, parse_num(l)?))
        };
        match kind {
            "snapshot-create" => Ok(Op::SnapshotCreate {
                name: need("a NAME")?,
            }),
            "snapshot-delete" => Ok(Op::SnapshotDelete {
                id_or_name: need("an ID or NAME")?,
            }),
            "snapshot-delete-id" => Ok(Op::SnapshotDeleteId { id: need("an ID")? }),
            "snapshot-apply" => Ok(Op::SnapshotApply {
                id_or_name: need("an ID or NAME")?,
            }),
            "write" => {
                let (offset, length) = range()?;
                Ok(Op::Write { offset, length })
            }
            "write-zeroes" => {
                let (r, unmap) = match rest.strip_suffix(":unmap") {
                    Some(r) => (r, true),
                    None => (rest, false),
                };
                let (o, l) = r.split_once(':').ok_or_else(|| {
                    format!(
                        "'{s}': write-zeroes takes OFFSET:LENGTH[:unmap], e.g. write-zeroes:1M:64k"
                    )
                })?;
                Ok(Op::WriteZeroes {
                    offset: parse_num(o)?,
                    length: parse_num(l)?,
                    unmap,
                })
            }
            "discard" => {
                let (offset, length) = range()?;
                Ok(Op::Discard { offset, length })
            }
            "resize" => {
                let (n, shrink) = match rest.split_once(':') {
                    Some((n, "shrink")) => (n, true),
                    Some(_) => {
                        return Err(format!(
                            "'{s}': resize takes SIZE or SIZE:shrink, e.g. resize:2G"
                        ));
                    }
                    None => (rest, false),
                };
                if n.is_empty() {
                    return Err(format!("'{s}': resize needs a SIZE"));
                }
                Ok(Op::Resize {
                    size: parse_num(n)?,
                    shrink,
                })
            }
            "overlay" => Ok(Op::Overlay {
                snapshot: (!rest.is_empty()).then(|| rest.to_string()),
            }),
            "trace" => Ok(Op::Trace {
                offset: parse_num(&need("an OFFSET")?)?,
            }),
            "repair" => match rest {
                "leaks" => Ok(Op::Repair { all: false }),
                "all" => Ok(Op::Repair { all: true }),
                _ => Err(format!(
                    "'{s}': repair takes leaks or all, e.g. repair:leaks"
                )),
            },
            "refcount-update" => {
                let (l1, a) = rest.rsplit_once(':').ok_or_else(|| {
                    format!("'{s}': refcount-update takes L1:ADDEND, e.g. refcount-update:active:0")
                })?;
                let addend: i32 = a
                    .parse()
                    .map_err(|_| format!("'{s}': ADDEND must be -1, 0 or +1"))?;
                if !(-1..=1).contains(&addend) {
                    return Err(format!(
                        "'{s}': ADDEND must be -1, 0 or +1 (QEMU asserts it)"
                    ));
                }
                Ok(Op::RefcountUpdate {
                    l1: l1.to_string(),
                    addend,
                })
            }
            _ => Err(format!(
                "'{s}': unknown operation (snapshot-create, snapshot-delete, snapshot-delete-id, snapshot-apply, write, write-zeroes, discard, resize, repair, overlay, trace, refcount-update)"
            )),
        }
    }

    /// How QEMU would be asked to do it.
    pub fn describe(&self) -> String {
        match self {
            Op::SnapshotCreate { name } => {
                format!("snapshot-create '{name}' (qemu-img snapshot -c {name})")
            }
            Op::SnapshotDelete { id_or_name } => {
                format!("snapshot-delete '{id_or_name}' (qemu-img snapshot -d {id_or_name})")
            }
            Op::SnapshotDeleteId { id } => {
                format!(
                    "snapshot-delete-id '{id}' (QMP snapshot-delete-internal-sync with id '{id}')"
                )
            }
            Op::SnapshotApply { id_or_name } => {
                format!("snapshot-apply '{id_or_name}' (qemu-img snapshot -a {id_or_name})")
            }
            Op::Write { offset, length } => format!(
                "write {length} bytes at guest {offset:#x} (qemu-io -c 'write {offset} {length}')"
            ),
            Op::WriteZeroes {
                offset,
                length,
                unmap,
            } => format!(
                "write zeroes over {length} bytes at guest {offset:#x} (qemu-io -c 'write -z{} {offset} {length}')",
                if *unmap { " -u" } else { "" }
            ),
            Op::Discard { offset, length } => format!(
                "discard {length} bytes at guest {offset:#x} (qemu-io -c 'discard {offset} {length}')"
            ),
            Op::Resize { size, shrink } => format!(
                "resize the disk to {size} bytes (qemu-img resize{} IMG {size})",
                if *shrink { " --shrink" } else { "" }
            ),
            Op::Overlay { snapshot } => match snapshot {
                Some(sn) => {
                    format!("a throw-away overlay over snapshot '{sn}' (qemu-nbd -s -l {sn} IMG)")
                }
                None => "a throw-away overlay over the image (qemu-nbd -s IMG)".to_string(),
            },
            Op::Trace { offset } => format!(
                "where a guest read at {offset:#x} comes from (qinspect trace, through the simulated chain)"
            ),
            Op::Repair { all } => {
                let m = if *all { "all" } else { "leaks" };
                format!("repair {m} (qemu-img check -r {m} IMG)")
            }
            Op::RefcountUpdate { l1, addend } => {
                format!("refcount walk over the {l1} L1 table with addend {addend:+}")
            }
        }
    }
}

/// A snapshot as the simulator keeps it (QEMU's `QCowSnapshot`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimSnapshot {
    /// ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// L1 table.
    pub l1_table_offset: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// VM state size.
    pub vm_state_size: u64,
    /// Date.
    pub date_sec: u32,
    /// Date, nanoseconds.
    pub date_nsec: u32,
    /// VM clock.
    pub vm_clock_nsec: u64,
    /// Disk size.
    pub disk_size: u64,
    /// icount (-1 as all ones when absent).
    pub icount: u64,
    /// Extra data size as stored.
    pub extra_data_size: u32,
    /// Unknown extra data.
    pub unknown_extra: Vec<u8>,
}

/// The record of one simulated operation.
#[derive(Clone, Debug, Serialize)]
pub struct OpRecord {
    /// The operation.
    pub op: Op,
    /// What QEMU would be asked.
    pub description: String,
    /// Changes in order.
    pub steps: Vec<Change>,
    /// Set if QEMU would refuse or fail: its reason. Changes made before the
    /// failure stay, as in QEMU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The in-memory state.
pub struct Sim {
    base: SharedSource,
    path: PathBuf,
    geo: Geometry,
    cs: u64,
    order: u32,
    max_refcount: u64,
    version: u32,
    has_data_file: bool,
    /// Clusters read or written, by cluster index.
    clusters: ClusterMap,
    /// Host file length (grows when clusters past the end are allocated).
    file_len: u64,
    l1: Vec<u64>,
    l1_table_offset: u64,
    size: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    snapshots: Vec<SimSnapshot>,
    snapshots_offset: u64,
    snapshots_size: u64,
    free_cluster_index: u64,
    steps: Vec<Change>,
    reason: String,
    /// Every operation so far.
    pub records: Vec<OpRecord>,
    /// Allocations: (offset, length, purpose).
    pub allocated: Vec<(u64, u64, String)>,
    /// Releases that brought clusters to refcount 0: (cluster, purpose).
    pub freed: Vec<(u64, String)>,
    backing: Option<crate::chain::Chain>,
    backing_named: bool,
    /// Persistent bitmaps, stored again at the end of every operation.
    bitmaps: Option<bitmaps::Bitmaps>,
    /// QEMU's message when the corrupt bit keeps it from opening read-write.
    open_refused: Option<String>,
    /// What QEMU would do on open that is not modelled: every operation says so.
    not_modelled: Option<String>,
    /// The file was cut here: bytes from here on read as zeros, not as the
    /// original file's.
    zero_from: u64,
    /// For a throw-away overlay: the image under it, and the snapshot shown.
    overlay_of: Option<(PathBuf, Option<String>)>,
}

/// Failure inside a simulated operation (QEMU's errno, and why).
#[derive(Debug)]
enum Fail {
    /// QEMU fails the operation with this message.
    Msg(String),
    /// QEMU's `-EAGAIN` from `alloc_refcount_block`: a new refcount block was
    /// hooked up, possibly where the caller meant to put its clusters, so the
    /// caller undoes its refcount changes and searches again.
    Again,
    /// QEMU would go on here in a way qinspect does not follow.
    NotModelled(String),
}

impl Fail {
    fn text(self) -> String {
        match self {
            Fail::Msg(m) => m,
            Fail::NotModelled(m) => format!("not simulated: {m}"),
            Fail::Again => "a new refcount block was allocated in the middle of an update that cannot be restarted (Resource temporarily unavailable)".into(),
        }
    }
}

type SimResult<T> = std::result::Result<T, Fail>;

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Msg(e.to_string())
    }
}

impl Sim {
    /// Start a simulation on `img` (opened from `path`, for backing-file reads).
    pub fn new(img: &Qcow2, path: &Path) -> Result<Sim> {
        let h: &Header = &img.header;
        // QEMU would not open the image, so it would not change it either.
        if let Some(p) = img.problems.first() {
            return Err(Error::unsupported(
                "simulation",
                format!("QEMU refuses to open this image: {p}"),
            ));
        }
        // An encrypted image opens read-write only with its key, which the
        // simulator is not given: qemu-img fails the same way without one.
        if h.crypt_method != 0 && img.data_key().is_none() {
            return Err(Error::unsupported(
                "simulation",
                "QEMU opens this encrypted image only with its key (qemu-img: Parameter 'encrypt.key-secret' is required for cipher)",
            ));
        }
        if img.snapshots.error.is_some() {
            return Err(Error::unsupported(
                "simulation",
                "the snapshot table cannot be read, so QEMU would not open the image",
            ));
        }
        let geo = img.geometry();
        let snapshots = img
            .snapshots
            .snapshots
            .iter()
            .map(|s| SimSnapshot {
                id: s.id.clone(),
                name: s.name.clone(),
                l1_table_offset: s.l1_table_offset,
                l1_size: s.l1_size,
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec,
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                disk_size: s.effective_disk_size(h.size & !511),
                icount: s.icount.unwrap_or(u64::MAX),
                extra_data_size: s.extra_data_size,
                unknown_extra: s.unknown_extra.clone(),
            })
            .collect();
        let backing = match &img.backing_name {
            Some(_) => {
                let chain = crate::chain::Chain::open(path, &Default::default()).ok();
                chain.map(|mut c| {
                    c.layers.remove(0);
                    c
                })
            }
            None => None,
        };
        let (bitmaps, not_modelled) = match bitmaps::load(img) {
            Ok(b) => (b, None),
            Err(why) => (None, Some(why)),
        };
        let open_refused = Some(format!(
            "Could not open '{}': qcow2: Image is corrupt; cannot be opened read/write",
            path.display()
        ));
        Ok(Sim {
            bitmaps,
            open_refused,
            not_modelled,
            zero_from: u64::MAX,
            overlay_of: None,
            base: img.src.clone(),
            path: path.to_path_buf(),
            geo,
            cs: geo.cluster_size(),
            order: h.refcount_order.min(6),
            max_refcount: img.refcount_geometry().max(),
            version: h.version,
            has_data_file: h.has_data_file(),
            clusters: ClusterMap::default(),
            file_len: img.file_len(),
            l1: img.l1.iter().map(|e| e.0).collect(),
            l1_table_offset: h.l1_table_offset,
            size: h.size,
            refcount_table_offset: h.refcount_table_offset,
            refcount_table_clusters: h.refcount_table_clusters,
            snapshots,
            snapshots_offset: h.snapshots_offset,
            snapshots_size: img.snapshots.size,
            free_cluster_index: 0,
            backing_named: img.backing_name.is_some(),
            steps: Vec::new(),
            reason: String::new(),
            records: Vec::new(),
            allocated: Vec::new(),
            freed: Vec::new(),
            backing,
        })
    }

    // ---- bytes -------------------------------------------------------------

    /// The cluster holding byte `off` (`off / cs`).
    fn cluster_of(&self, off: u64) -> u64 {
        off >> self.geo.cluster_bits
    }

    /// Where byte `off` sits in its cluster (`off % cs`).
    fn within(&self, off: u64) -> u64 {
        off & low_mask(self.geo.cluster_bits)
    }

    /// First byte of cluster `c` (saturating: an index read from disk cannot wrap).
    fn cluster_start(&self, c: u64) -> u64 {
        c.saturating_mul(self.cs)
    }

    /// `n` clusters in bytes (saturating).
    fn clusters_bytes(&self, n: u64) -> u64 {
        n.saturating_mul(self.cs)
    }

    fn cluster(&mut self, c: u64) -> &mut [u8] {
        let at = self.cluster_start(c);
        let (base, cs, zero_from) = (&self.base, self.cs, self.zero_from);
        self.clusters.entry(c).or_insert_with(|| {
            let mut buf = vec![0u8; cs as usize].into_boxed_slice();
            if at < zero_from {
                let _ = base.read_at(&mut buf, at);
                // A cluster the cut went through keeps only its head.
                let keep = zero_from.saturating_sub(at).min(cs) as usize;
                if let Some(tail) = buf.get_mut(keep..) {
                    tail.fill(0);
                }
            }
            buf
        })
    }

    fn read_bytes(&mut self, off: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = off;
        let end = off.saturating_add(len);
        while pos < end {
            let c = self.cluster_of(pos);
            let within = self.within(pos) as usize;
            // 1..=cs - within bytes, so pos moves on and stays <= end.
            let n =
                (end.saturating_sub(pos) as usize).min((self.cs as usize).saturating_sub(within));
            let cl = self.cluster(c);
            out.extend_from_slice(crate::bytes::slice(cl, within, n));
            pos = pos.saturating_add(n as u64);
        }
        out
    }

    /// Write `data` at `off`. Like QEMU (`bdrv_check_request`), a write that would
    /// end past `i64::MAX` fails (EIO) instead of landing anywhere: offsets
    /// computed from hostile header or table fields saturate to `u64::MAX`, and
    /// must not wrap around to real metadata or grow the file without bound.
    fn write_bytes(&mut self, off: u64, data: &[u8]) -> SimResult<()> {
        if off
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(Fail::Msg(format!(
                "a write of {} bytes at {off:#x} ends past the largest offset QEMU can write (EIO)",
                data.len()
            )));
        }
        // A file system would refuse to grow the file that far (ext4 stops at
        // 16 TiB); QEMU then fails the write.
        let end = off.saturating_add(data.len() as u64);
        if end > MAX_FILE_LEN && end > self.file_len {
            return Err(Fail::Msg(format!(
                "a write at {off:#x} would grow the image file to {end} bytes, past what file systems allow (EFBIG)"
            )));
        }
        let mut pos = off;
        let mut rest = data;
        while !rest.is_empty() {
            let c = self.cluster_of(pos);
            let within = self.within(pos) as usize;
            let n = rest.len().min((self.cs as usize).saturating_sub(within));
            let (head, tail) = rest.split_at(n);
            if let Some(dst) = self.cluster(c).get_mut(within..within.saturating_add(n)) {
                dst.copy_from_slice(head);
            }
            rest = tail;
            pos = pos.saturating_add(n as u64);
        }
        self.file_len = self.file_len.max(pos);
        Ok(())
    }

    fn read_u64(&mut self, off: u64) -> u64 {
        let within = self.within(off) as usize;
        let c = self.cluster_of(off);
        crate::bytes::be64(self.cluster(c), within)
    }

    fn write_u64(&mut self, off: u64, v: u64) -> SimResult<()> {
        self.write_bytes(off, &v.to_be_bytes())
    }

    // ---- recording ---------------------------------------------------------

    fn record(&mut self, target: Target, before: u64, after: u64) {
        let c = Change {
            target,
            count: 1,
            before,
            after,
            reason: self.reason.clone(),
        };
        // Merge with the previous change, or with the one before it when the two
        // alternate (a refcount, then the L2 entry whose COPIED flag follows it).
        let n = self.steps.len();
        for back in 1..=2usize.min(n) {
            if let Some(prev) = n.checked_sub(back).and_then(|i| self.steps.get_mut(i))
                && prev.extends(&c)
            {
                prev.count = prev.count.saturating_add(1);
                return;
            }
        }
        self.steps.push(c);
    }

    fn note(&mut self, text: String) {
        self.steps.push(Change {
            target: Target::Note,
            count: 1,
            before: 0,
            after: 0,
            reason: text,
        });
    }

    fn why(&mut self, r: impl Into<String>) {
        self.reason = r.into();
    }

    // ---- refcounts ---------------------------------------------------------

    fn reftable_len(&self) -> u64 {
        self.clusters_bytes(u64::from(self.refcount_table_clusters)) / 8
    }

    fn block_bits(&self) -> u32 {
        self.geo
            .cluster_bits
            .saturating_add(3)
            .saturating_sub(self.order)
    }

    /// Where refcount table entry `ti` is (saturating: the table offset comes
    /// from the header).
    fn reftable_entry_offset(&self, ti: u64) -> u64 {
        self.refcount_table_offset
            .saturating_add(ti.saturating_mul(8))
    }

    /// QEMU's `qcow2_get_refcount`.
    fn get_refcount(&mut self, c: u64) -> SimResult<u64> {
        let ti = c >> self.block_bits();
        if ti >= self.reftable_len() {
            return Ok(0);
        }
        let e = self.read_u64(self.reftable_entry_offset(ti));
        let block = e & crate::refcount::REFT_OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        if !block.is_multiple_of(self.cs) {
            return Err(Fail::Msg(format!(
                "Refblock offset {block:#x} unaligned (reftable index: {ti:#x}) (EIO)"
            )));
        }
        let idx = c & low_mask(self.block_bits());
        let order = self.order;
        let bc = self.cluster_of(block);
        Ok(get_refcount(self.cluster(bc), order, idx))
    }

    /// QEMU's `update_refcount`: add or subtract `addend` on every cluster the byte
    /// range touches; on failure, undo this call's earlier clusters.
    fn update_refcount(
        &mut self,
        offset: u64,
        length: u64,
        addend: u64,
        decrease: bool,
    ) -> SimResult<()> {
        if length == 0 {
            return Ok(());
        }
        let first = self.cluster_of(offset);
        let last = self.cluster_of(offset.saturating_add(length.saturating_sub(1)));
        for c in first..=last {
            if let Err(e) = self.update_one(c, addend, decrease) {
                if matches!(e, Fail::Again) {
                    // The search restarts from the first cluster of this update.
                    self.free_cluster_index = self.free_cluster_index.min(first);
                }
                // "Try do undo any updates if an error is returned"
                for u in first..c {
                    let _ = self.update_one(u, addend, !decrease);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn update_one(&mut self, c: u64, addend: u64, decrease: bool) -> SimResult<()> {
        let ti = c >> self.block_bits();
        let block = match self.refcount_block_for(ti, c) {
            Ok(b) => b,
            Err(Fail::Again) => {
                self.free_cluster_index = self.free_cluster_index.min(c);
                return Err(Fail::Again);
            }
            Err(e) => return Err(e),
        };
        let idx = c & low_mask(self.block_bits());
        let order = self.order;
        let bc = self.cluster_of(block);
        let cur = get_refcount(self.cluster(bc), order, idx);
        let new = if decrease {
            cur.checked_sub(addend)
        } else {
            cur.checked_add(addend).filter(|&n| n <= self.max_refcount)
        };
        let Some(new) = new else {
            return Err(Fail::Msg(format!(
                "refcount of cluster {c} would {} ({cur} {} {addend}, {}-bit refcounts) (EINVAL)",
                if decrease { "go below 0" } else { "overflow" },
                if decrease { "-" } else { "+" },
                1u32 << order
            )));
        };
        if new == 0 && c < self.free_cluster_index {
            self.free_cluster_index = c;
        }
        set_refcount(self.cluster(bc), order, idx, new);
        self.record(Target::Refcount { cluster: c }, cur, new);
        if new == 0 {
            let r = self.reason.clone();
            self.freed.push((c, r));
        }
        Ok(())
    }

    /// The refcount block for table index `ti` (QEMU's `alloc_refcount_block`,
    /// for the case where the table has room).
    fn refcount_block_for(&mut self, ti: u64, for_cluster: u64) -> SimResult<u64> {
        if ti >= self.reftable_len() {
            return self.new_refcount_block(ti, for_cluster);
        }
        let e = self.read_u64(self.reftable_entry_offset(ti));
        let block = e & crate::refcount::REFT_OFFSET_MASK;
        if block != 0 {
            if !block.is_multiple_of(self.cs) {
                return Err(Fail::Msg(format!(
                    "Refblock offset {block:#x} unaligned (EIO)"
                )));
            }
            return Ok(block);
        }
        self.new_refcount_block(ti, for_cluster)
    }

    /// A missing refcount block: QEMU allocates one. If the new block would itself
    /// be described by the block being created, it describes itself.
    fn new_refcount_block(&mut self, ti: u64, for_cluster: u64) -> SimResult<u64> {
        // Either way the caller restarts: this returns `Fail::Again` once the
        // block is hooked up.
        let saved = self.reason.clone();
        // alloc_clusters_noref: the lowest free cluster (refcounts as they stand).
        let new_c = self.find_free(1)?;
        let bb = self.block_bits();
        let new_off = self.cluster_start(new_c);
        // The clusters block ti describes: ti << bb ..= last (the same bits, all ones below bb).
        let last = (ti << bb) | low_mask(bb);
        if new_c >> bb == ti {
            // Self-describing: the block counts itself.
            self.why(format!(
                "new refcount block for clusters {}..{last} (describes itself)",
                ti << bb,
            ));
            let zero = vec![0u8; self.cs as usize];
            self.write_bytes(new_off, &zero)?;
            let idx = new_c & low_mask(bb);
            let order = self.order;
            set_refcount(self.cluster(new_c), order, idx, 1);
            self.record(Target::Refcount { cluster: new_c }, 0, 1);
        } else {
            self.why(format!(
                "new refcount block for clusters {}..{last}",
                ti << bb,
            ));
            let other_ti = new_c >> bb;
            // Its own refcount lives in another block, which must exist.
            let _ = self.refcount_block_for(other_ti, new_c)?;
            self.update_one(new_c, 1, false)?;
            let zero = vec![0u8; self.cs as usize];
            self.write_bytes(new_off, &zero)?;
        }
        self.allocated
            .push((new_off, self.cs, "refcount block".into()));
        self.record(
            Target::Allocate {
                offset: new_off,
                length: self.cs,
                purpose: format!(
                    "refcount block (refcount table entry {ti}, needed for cluster {for_cluster})"
                ),
            },
            new_c,
            new_c,
        );
        if ti >= self.reftable_len() {
            // No room in the table for the block: a new, larger table with
            // self-describing blocks after everything counted so far.
            let rbs = 1u64 << bb;
            let blocks_used = for_cluster
                .saturating_add(1)
                .max(new_c.saturating_add(1))
                .div_ceil(rbs);
            let meta = self.clusters_bytes(blocks_used.saturating_mul(rbs));
            self.refcount_area(meta, ti, new_off)?;
            self.reason = saved;
            return Err(Fail::Again);
        }
        let entry_off = self.reftable_entry_offset(ti);
        let before = self.read_u64(entry_off);
        self.write_u64(entry_off, new_off)?;
        self.reason = format!("refcount table entry {ti} now points at the new block");
        self.record(
            Target::Header {
                field: "refcount table entry",
            },
            before,
            new_off,
        );
        self.note(
            "the new refcount block may sit where the clusters being counted were meant to go: QEMU undoes this update and searches again (EAGAIN)"
            .to_string(),
        );
        self.reason = saved;
        Err(Fail::Again)
    }

    /// QEMU's `qcow2_refcount_metadata_size`: how many refcount blocks it
    /// takes to count `clusters` clusters plus the blocks and the table
    /// themselves (with half the table again to spare when `generous`).
    fn refcount_blocks_needed(&self, mut clusters: u64, mut generous: bool) -> u64 {
        let per_table_cluster = self.cs / 8;
        let per_block = 1u64 << self.block_bits();
        let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
        loop {
            let last = n;
            blocks = clusters
                .saturating_add(table)
                .saturating_add(blocks)
                .div_ceil(per_block);
            table = blocks.div_ceil(per_table_cluster);
            n = clusters.saturating_add(blocks).saturating_add(table);
            if n == last && generous {
                clusters = clusters.saturating_add(table.div_ceil(2));
                n = 0;
                generous = false;
            }
            if n == last {
                return blocks;
            }
        }
    }

    /// QEMU's `qcow2_refcount_area` as `alloc_refcount_block` calls it: from
    /// `start` on, the refcount blocks still missing, then a new refcount table
    /// (half as large again as needed), all counted by themselves; the header
    /// switches to it and the old table is freed.
    fn refcount_area(&mut self, start: u64, new_ti: u64, new_block: u64) -> SimResult<()> {
        let cs = self.cs;
        let bb = self.block_bits();
        let rbs = 1u64 << bb;
        let total = self.refcount_blocks_needed(self.cluster_of(start), true);
        let per_cluster = cs / 8;
        let table_size = total
            .saturating_add(total.div_ceil(2))
            .div_ceil(per_cluster)
            .saturating_mul(per_cluster);
        if table_size.saturating_mul(8) > crate::refcount::MAX_REFTABLE_BYTES {
            return Err(Fail::Msg(
                "the refcount table would grow past 8 MiB (EFBIG)".into(),
            ));
        }
        let table_clusters = table_size.checked_div(per_cluster).unwrap_or(0);
        let old_len = self.reftable_len();
        let mut table: Vec<u64> = (0..table_size.min(old_len))
            .map(|i| self.read_u64(self.reftable_entry_offset(i)))
            .collect();
        table.resize(table_size as usize, 0);
        if let Some(slot) = table.get_mut(new_ti as usize) {
            *slot = new_block;
        }
        let area_ti = self.cluster_of(start) >> bb;
        let missing = (area_ti..total)
            .filter(|&i| table.get(i as usize).is_some_and(|&e| e == 0))
            .count() as u64;
        let table_offset = start.saturating_add(self.clusters_bytes(missing));
        let end = table_offset.saturating_add(self.clusters_bytes(table_clusters));
        self.why(format!(
            "the refcount table is full: {missing} new refcount block(s) at {start:#x} and a table of {table_clusters} cluster(s) at {table_offset:#x}, counting themselves"
        ));
        let mut block_offset = start;
        let order = self.order;
        for i in area_ti..total {
            let existing = table.get(i as usize).copied().unwrap_or(0);
            let block = if existing != 0 {
                existing & crate::refcount::REFT_OFFSET_MASK
            } else {
                let b = block_offset;
                self.write_bytes(b, &vec![0u8; cs as usize])?;
                if let Some(slot) = table.get_mut(i as usize) {
                    *slot = b;
                }
                self.allocated.push((b, cs, "refcount block".into()));
                self.record(
                    Target::Allocate {
                        offset: b,
                        length: cs,
                        purpose: format!("refcount block (new refcount table entry {i})"),
                    },
                    self.cluster_of(b),
                    self.cluster_of(b),
                );
                block_offset = block_offset.saturating_add(cs);
                b
            };
            let first = self.clusters_bytes(i.saturating_mul(rbs));
            if first < end {
                let j0 = if first < start {
                    self.cluster_of(start.saturating_sub(first))
                } else {
                    0
                };
                let j1 = self.cluster_of(end.saturating_sub(first)).min(rbs);
                let bc = self.cluster_of(block);
                for j in j0..j1 {
                    let cur = get_refcount(self.cluster(bc), order, j);
                    set_refcount(self.cluster(bc), order, j, 1);
                    self.record(
                        Target::Refcount {
                            cluster: i.saturating_mul(rbs).saturating_add(j),
                        },
                        cur,
                        1,
                    );
                }
            }
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_bytes(table_offset, &bytes)?;
        self.allocated.push((
            table_offset,
            self.clusters_bytes(table_clusters),
            "the new refcount table".into(),
        ));
        self.record(
            Target::Allocate {
                offset: table_offset,
                length: self.clusters_bytes(table_clusters),
                purpose: format!("the new refcount table ({table_size} entries)"),
            },
            self.cluster_of(table_offset),
            self.cluster_of(table_offset),
        );
        let (old_off, old_clusters) = (self.refcount_table_offset, self.refcount_table_clusters);
        self.why("the header points at the new refcount table");
        self.set_header_u64(48, "refcount_table_offset", table_offset)?;
        self.set_header_u32(56, "refcount_table_clusters", table_clusters as u32)?;
        self.refcount_table_offset = table_offset;
        self.refcount_table_clusters = table_clusters as u32;
        self.file_len = self.file_len.max(end);
        self.free_clusters(
            old_off,
            self.clusters_bytes(u64::from(old_clusters)),
            "the old refcount table",
        );
        Ok(())
    }

    /// QEMU's `alloc_clusters_noref`: `n` contiguous clusters with refcount 0,
    /// first fit from the free-cluster hint.
    fn find_free(&mut self, n: u64) -> SimResult<u64> {
        let mut found = 0u64;
        let limit = self.free_cluster_index.saturating_add(1 << 40);
        while found < n {
            let c = self.free_cluster_index;
            if c > limit {
                return Err(Fail::Msg("no free clusters found (EFBIG)".into()));
            }
            // c <= limit, and found <= n: neither can overflow.
            self.free_cluster_index = c.saturating_add(1);
            if self.get_refcount(c)? != 0 {
                found = 0;
            } else {
                found = found.saturating_add(1);
            }
        }
        // The last n clusters looked at were free.
        Ok(self.free_cluster_index.saturating_sub(n))
    }

    /// +1 on each cluster of a range just found free, and record the allocation.
    fn take_clusters(&mut self, off: u64, len: u64, first: u64, purpose: &str) -> SimResult<()> {
        let saved = self.reason.clone();
        self.why(format!("allocated for {purpose}"));
        if let Err(e) = self.update_refcount(off, len, 1, false) {
            self.reason = saved;
            return Err(e);
        }
        self.record(
            Target::Allocate {
                offset: off,
                length: len,
                purpose: purpose.to_string(),
            },
            first,
            first,
        );
        self.allocated.push((off, len, purpose.to_string()));
        self.reason = saved;
        Ok(())
    }

    /// QEMU's `qcow2_alloc_clusters`: find, then +1 on each.
    fn alloc_clusters(&mut self, size: u64, purpose: &str) -> SimResult<u64> {
        let n = size.div_ceil(self.cs);
        if n == 0 {
            // alloc_clusters_noref(0) looks at nothing and returns the hint as it
            // stands; update_refcount of 0 bytes counts nothing.
            return Ok(self.cluster_start(self.free_cluster_index));
        }
        loop {
            match self.alloc_clusters_once(n, purpose) {
                Err(Fail::Again) => continue,
                r => return r,
            }
        }
    }

    /// One round of `qcow2_alloc_clusters`' loop.
    fn alloc_clusters_once(&mut self, n: u64, purpose: &str) -> SimResult<u64> {
        let first = self.find_free(n)?;
        // A range that does not fit in 64 bits is refused rather than wrapped.
        let range = first
            .checked_mul(self.cs)
            .zip(n.checked_mul(self.cs))
            .and_then(|(off, len)| Some((off, len, off.checked_add(len)?)));
        let Some((off, len, end)) = range else {
            return Err(Fail::Msg(format!(
                "{n} clusters from cluster {first} do not fit in the file (EFBIG)"
            )));
        };
        self.take_clusters(off, len, first, purpose)?;
        if end > self.file_len {
            self.file_len = end;
        }
        Ok(off)
    }

    /// QEMU's `qcow2_free_clusters`: -1 on each cluster the range touches.
    fn free_clusters(&mut self, off: u64, size: u64, purpose: &str) {
        let saved = self.reason.clone();
        self.why(format!("released: {purpose}"));
        self.record(
            Target::Free {
                offset: off,
                length: size,
                purpose: purpose.to_string(),
            },
            0,
            0,
        );
        if let Err(e) = self.update_refcount(off, size, 1, true) {
            let e = e.text();
            self.note(format!(
                "QEMU: qcow2_free_clusters failed: {e}; the clusters are leaked"
            ));
        }
        self.reason = saved;
    }

    /// QEMU's `qcow2_free_any_cluster`.
    fn free_any_cluster(&mut self, entry: u64, purpose: &str) {
        let e = L2Entry {
            raw: entry,
            bitmap: 0,
        };
        match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Compressed => {
                let d = CompressedDescriptor::decode(entry, &self.geo);
                self.free_clusters(d.offset.0, d.size, purpose);
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let off = entry & L2E_OFFSET_MASK;
                if !off.is_multiple_of(self.cs) {
                    self.note(format!("Cannot free unaligned cluster {off:#x}"));
                } else if !self.has_data_file {
                    self.free_clusters(off, self.cs, purpose);
                }
            }
            _ => {}
        }
    }

    // ---- the refcount walk ---------------------------------------------------

    fn l1_label(&self, offset: u64) -> String {
        if offset == self.l1_table_offset {
            return "active L1".into();
        }
        match self.snapshots.iter().find(|s| s.l1_table_offset == offset) {
            Some(s) => format!("snapshot {} '{}' L1", s.id, s.name),
            None => format!("L1 at {offset:#x}"),
        }
    }

    /// QEMU's `qcow2_update_snapshot_refcount`. `active` selects the in-memory
    /// active table (QEMU uses it when the offset is the active L1's).
    fn update_snapshot_refcount(
        &mut self,
        l1_offset: u64,
        l1_size: u64,
        addend: i32,
    ) -> SimResult<()> {
        let label = self.l1_label(l1_offset);
        let active = l1_offset == self.l1_table_offset;
        let mut table: Vec<u64> = if active {
            self.l1.clone()
        } else {
            let raw = self.read_bytes(l1_offset, l1_size.saturating_mul(8));
            raw.chunks_exact(8)
                .map(|c| crate::bytes::be64(c, 0))
                .collect()
        };
        let step = self.geo.l2_entry_size();
        let entries = self.geo.l2_entries();
        let mut l1_modified = false;
        let mut result = Ok(());
        'outer: for i in 0..table.len() {
            let Some(&old_l1) = table.get(i) else { break };
            if old_l1 == 0 {
                continue;
            }
            let l2 = old_l1 & L1E_OFFSET_MASK;
            if !l2.is_multiple_of(self.cs) {
                result = Err(Fail::Msg(format!(
                    "L2 table offset {l2:#x} unaligned (L1 index: {i:#x}) (EIO)"
                )));
                break;
            }
            let sign = if addend > 0 { "+1" } else { "-1" };
            let data_reason = format!("{sign}: data cluster named by {label}[{i}] -> L2 {l2:#x}");
            let compressed_reason =
                format!("{sign}: compressed data named by {label}[{i}] -> L2 {l2:#x}");
            let mut copied_reason: (u64, String) = (u64::MAX, String::new());
            for j in 0..entries {
                let eoff = l2.saturating_add(j.saturating_mul(step));
                let old = self.read_u64(eoff);
                let entry = old & !OFLAG_COPIED;
                let off = entry & L2E_OFFSET_MASK;
                let e = L2Entry {
                    raw: entry,
                    bitmap: 0,
                };
                let refcount = match e.cluster_type(&self.geo, self.has_data_file) {
                    ClusterType::Compressed => {
                        if addend != 0 {
                            let d = CompressedDescriptor::decode(entry, &self.geo);
                            self.reason.clone_from(&compressed_reason);
                            if let Err(e) = self.update_refcount(d.offset.0, d.size, 1, addend < 0)
                            {
                                result = Err(e);
                                break 'outer;
                            }
                        }
                        2
                    }
                    ClusterType::Normal | ClusterType::ZeroAlloc => {
                        if !off.is_multiple_of(self.cs) {
                            result = Err(Fail::Msg(format!(
                                "Cluster allocation offset {off:#x} unaligned (L2 offset: {l2:#x}, L2 index: {j:#x}) (EIO)"
                            )));
                            break 'outer;
                        }
                        if addend != 0 {
                            self.reason.clone_from(&data_reason);
                            if let Err(e) = self.update_one(self.cluster_of(off), 1, addend < 0) {
                                result = Err(e);
                                break 'outer;
                            }
                        }
                        match self.get_refcount(self.cluster_of(off)) {
                            Ok(r) => r,
                            Err(e) => {
                                result = Err(e);
                                break 'outer;
                            }
                        }
                    }
                    _ => 0,
                };
                let new = if refcount == 1 {
                    entry | OFLAG_COPIED
                } else {
                    entry
                };
                if new != old {
                    if copied_reason.0 != refcount {
                        copied_reason = (
                            refcount,
                            if new & OFLAG_COPIED != 0 {
                                "COPIED set: refcount is now exactly 1".to_string()
                            } else if refcount == 0 {
                                "COPIED cleared: refcount is now 0 (freed)".to_string()
                            } else {
                                format!("COPIED cleared: refcount is now {refcount} (shared)")
                            },
                        );
                    }
                    self.reason.clone_from(&copied_reason.1);
                    if let Err(e) = self.write_u64(eoff, new) {
                        result = Err(e);
                        break 'outer;
                    }
                    self.record(
                        Target::L2Entry {
                            table_offset: l2,
                            index: j,
                        },
                        old,
                        new,
                    );
                }
            }
            if addend != 0 {
                self.why(format!(
                    "{}: the L2 table named by {label}[{i}]",
                    if addend > 0 { "+1" } else { "-1" }
                ));
                if let Err(e) = self.update_one(self.cluster_of(l2), 1, addend < 0) {
                    result = Err(e);
                    break;
                }
            }
            let r = match self.get_refcount(self.cluster_of(l2)) {
                Ok(r) => r,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let new_l1 = if r == 1 { l2 | OFLAG_COPIED } else { l2 };
            if new_l1 != old_l1 {
                if let Some(slot) = table.get_mut(i) {
                    *slot = new_l1;
                }
                l1_modified = true;
                self.why(if r == 1 {
                    "COPIED set: the L2 table's refcount is exactly 1".to_string()
                } else if r == 0 {
                    "COPIED cleared: the L2 table's refcount is now 0 (freed)".to_string()
                } else {
                    format!("COPIED cleared: the L2 table's refcount is {r} (shared)")
                });
                self.record(
                    Target::L1Entry {
                        table: label.clone(),
                        table_offset: l1_offset,
                        index: i as u64,
                    },
                    old_l1,
                    new_l1,
                );
            }
        }
        if active {
            // QEMU modified its in-memory table in place.
            self.l1.clone_from(&table);
        }
        if result.is_ok() && addend >= 0 && l1_modified {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            result = self.write_bytes(l1_offset, &bytes);
        } else if l1_modified && addend < 0 {
            self.note(format!(
                "the {label} is not written back: with addend -1 it is about to be deleted"
            ));
        }
        result
    }

    // ---- snapshot table --------------------------------------------------------

    /// QEMU's `qcow2_write_snapshots`: a new table, then the header, then free the old.
    fn write_snapshots(&mut self) -> SimResult<()> {
        let mut size = 0u64;
        for s in &self.snapshots {
            // Saturating: a sum past 64 MiB is refused just below anyway.
            size = crate::bytes::align8(size)
                .saturating_add(40)
                .saturating_add(u64::from(s.extra_data_size.max(24)))
                .saturating_add(s.id.len() as u64)
                .saturating_add(s.name.len() as u64);
        }
        if size > crate::snapshot::MAX_TABLE_BYTES {
            return Err(Fail::Msg(
                "the snapshot table would exceed 64 MiB (EFBIG)".into(),
            ));
        }
        let off = if size > 0 {
            self.alloc_clusters(size, "the new snapshot table")?
        } else {
            // qcow2_alloc_clusters(0) counts nothing and returns the free-cluster
            // hint as it stands.
            self.cluster_start(self.free_cluster_index)
        };
        let mut buf = Vec::with_capacity(size as usize);
        for s in &self.snapshots {
            while buf.len() % 8 != 0 {
                buf.push(0);
            }
            buf.extend_from_slice(&s.l1_table_offset.to_be_bytes());
            buf.extend_from_slice(&s.l1_size.to_be_bytes());
            buf.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
            buf.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
            buf.extend_from_slice(&s.date_sec.to_be_bytes());
            buf.extend_from_slice(&s.date_nsec.to_be_bytes());
            buf.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
            let small = if s.vm_state_size <= 0xffff_ffff {
                s.vm_state_size as u32
            } else {
                0
            };
            buf.extend_from_slice(&small.to_be_bytes());
            buf.extend_from_slice(&s.extra_data_size.max(24).to_be_bytes());
            buf.extend_from_slice(&s.vm_state_size.to_be_bytes());
            buf.extend_from_slice(&s.disk_size.to_be_bytes());
            buf.extend_from_slice(&s.icount.to_be_bytes());
            if s.extra_data_size > 24 {
                buf.extend_from_slice(&s.unknown_extra);
            }
            buf.extend_from_slice(s.id.as_bytes());
            buf.extend_from_slice(s.name.as_bytes());
        }
        if !buf.is_empty() {
            self.write_bytes(off, &buf)?;
        }
        self.record(
            Target::SnapshotTable {
                offset: off,
                size,
                entries: self.snapshots.len() as u64,
            },
            0,
            0,
        );
        let (old_off, old_size) = (self.snapshots_offset, self.snapshots_size);
        self.why("the header points at the new snapshot table");
        self.set_header_u32(60, "nb_snapshots", self.snapshots.len() as u32)?;
        self.set_header_u64(64, "snapshots_offset", off)?;
        self.snapshots_offset = off;
        self.snapshots_size = size;
        if old_size > 0 {
            self.free_clusters(old_off, old_size, "the old snapshot table");
        }
        Ok(())
    }

    fn set_header_u64(&mut self, at: u64, field: &'static str, v: u64) -> SimResult<()> {
        let before = self.read_u64(at);
        if before != v {
            self.write_u64(at, v)?;
            self.record(Target::Header { field }, before, v);
        }
        Ok(())
    }

    fn set_header_u32(&mut self, at: u64, field: &'static str, v: u32) -> SimResult<()> {
        let b = self.read_bytes(at, 4);
        let before = u64::from(crate::bytes::be32(&b, 0));
        if before != u64::from(v) {
            self.write_bytes(at, &v.to_be_bytes())?;
            self.record(Target::Header { field }, before, u64::from(v));
        }
        Ok(())
    }

    fn find_snapshot(&self, id_or_name: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
    }

    fn check_snapshot_l1(&self, sn: &SimSnapshot) -> SimResult<()> {
        if u64::from(sn.l1_size) > crate::tables::MAX_L1_ENTRIES {
            return Err(Fail::Msg("Snapshot L1 table too large (EFBIG)".into()));
        }
        if !sn.l1_table_offset.is_multiple_of(self.cs) {
            return Err(Fail::Msg(
                "Snapshot L1 table offset invalid (EINVAL)".into(),
            ));
        }
        Ok(())
    }

    // ---- operations --------------------------------------------------------------

    fn snapshot_create(&mut self, name: &str) -> SimResult<()> {
        if self.snapshots.len() as u64 >= crate::snapshot::MAX_SNAPSHOTS {
            return Err(Fail::Msg(
                "the image already has 65536 snapshots (EFBIG)".into(),
            ));
        }
        if self.has_data_file {
            return Err(Fail::Msg(
                "snapshots are not supported with an external data file (ENOTSUP)".into(),
            ));
        }
        let id_max = self
            .snapshots
            .iter()
            .map(|s| s.id.trim().parse::<u64>().unwrap_or(0))
            .max()
            .unwrap_or(0);
        let l1_size = self.l1.len() as u64;
        self.why("snapshot-create");
        let l1_bytes = l1_size.saturating_mul(8);
        let l1_off =
            self.alloc_clusters(l1_bytes, &format!("the L1 table of snapshot '{name}'"))?;
        let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_bytes(l1_off, &bytes)?;
        self.why("the active L1 table is copied as it is, COPIED flags included");
        self.record(
            Target::Copy {
                from: format!("active L1 at {:#x}", self.l1_table_offset),
                to: l1_off,
                length: l1_bytes,
            },
            0,
            0,
        );
        self.note("every L2 table and data cluster the active L1 reaches becomes shared with the new snapshot: +1 each".into());
        self.update_snapshot_refcount(self.l1_table_offset, l1_size, 1)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.snapshots.push(SimSnapshot {
            // QEMU's find_new_snapshot_id: id_max + 1 in an unsigned long, which wraps.
            id: id_max.wrapping_add(1).to_string(),
            name: name.to_string(),
            l1_table_offset: l1_off,
            l1_size: l1_size as u32,
            vm_state_size: 0,
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_micros().saturating_mul(1000),
            vm_clock_nsec: 0,
            disk_size: self.size & !511,
            icount: 0,
            extra_data_size: 24,
            unknown_extra: Vec::new(),
        });
        self.why("snapshot-create: the snapshot table gets the new entry");
        if let Err(e) = self.write_snapshots() {
            self.snapshots.pop();
            return Err(e);
        }
        Ok(())
    }

    fn snapshot_delete(&mut self, id_or_name: &str, by_id: bool) -> SimResult<()> {
        if self.has_data_file {
            return Err(Fail::Msg(
                "snapshots are not supported with an external data file (ENOTSUP)".into(),
            ));
        }
        // qemu-img snapshot -d looks the snapshot up by name only
        // (bdrv_snapshot_find), the first match; HMP's delvm and QMP's
        // snapshot-delete-internal-sync also take an ID (`snapshot-delete-id`).
        let i = if by_id {
            self.snapshots.iter().position(|s| s.id == id_or_name)
        } else {
            self.snapshots.iter().position(|s| s.name == id_or_name)
        };
        let Some(i) = i else {
            let hint = match self.snapshots.iter().find(|s| !by_id && s.id == id_or_name) {
                Some(s) => format!(
                    " ('{id_or_name}' is the ID of snapshot '{}': qemu-img snapshot -d matches names only; snapshot-delete-id:{id_or_name} models QMP's snapshot-delete-internal-sync by ID)",
                    s.name
                ),
                None => String::new(),
            };
            return Err(Fail::Msg(if by_id {
                format!("Snapshot with id '{id_or_name}' does not exist")
            } else {
                format!("Could not delete snapshot '{id_or_name}': snapshot not found{hint}")
            }));
        };
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| Fail::Msg("no snapshot".into()))?;
        self.check_snapshot_l1(&sn)?;
        let label = format!("snapshot {} '{}' L1", sn.id, sn.name);
        self.snapshots.remove(i);
        self.why("snapshot-delete: the snapshot table without the entry");
        self.write_snapshots()?;
        self.note(format!(
            "everything the {label} reaches loses one reference: -1 each"
        ));
        // The label of the walk: the snapshot is no longer in the list.
        self.snapshots.push(sn.clone());
        let r = self.update_snapshot_refcount(sn.l1_table_offset, u64::from(sn.l1_size), -1);
        self.snapshots.pop();
        r?;
        self.free_clusters(
            sn.l1_table_offset,
            u64::from(sn.l1_size) * 8,
            &format!("the {label} table"),
        );
        self.note(
            "addend 0 over the active L1: no refcount changes, COPIED flags recomputed".into(),
        );
        self.update_snapshot_refcount(self.l1_table_offset, self.l1.len() as u64, 0)
    }

    fn snapshot_apply(&mut self, id_or_name: &str) -> SimResult<()> {
        if self.has_bitmaps() {
            // bdrv_snapshot_goto refuses before looking the snapshot up.
            return Err(Fail::Msg(format!(
                "Could not apply snapshot '{id_or_name}': Device has active dirty bitmaps"
            )));
        }
        if self.has_data_file {
            return Err(Fail::Msg(
                "snapshots are not supported with an external data file (ENOTSUP)".into(),
            ));
        }
        let Some(i) = self.find_snapshot(id_or_name) else {
            return Err(Fail::Msg(format!(
                "Could not apply snapshot '{id_or_name}': Failed to load snapshot: No such file or directory"
            )));
        };
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| Fail::Msg("no snapshot".into()))?;
        self.check_snapshot_l1(&sn)?;
        if sn.disk_size != self.size & !511 {
            self.note(format!(
                "the snapshot's disk is {} bytes, the current one {}: QEMU resizes the disk first",
                sn.disk_size, self.size
            ));
            self.truncate(sn.disk_size)?;
        }
        if u64::from(sn.l1_size) > self.l1.len() as u64 {
            self.why("the snapshot's L1 table is larger than the active one");
            self.grow_l1_table(u64::from(sn.l1_size), true)?;
        }
        let cur_len = self.l1.len() as u64;
        let cur_bytes = cur_len.saturating_mul(8);
        let mut buffer = self.read_bytes(sn.l1_table_offset, u64::from(sn.l1_size) * 8);
        buffer.resize(cur_bytes as usize, 0);
        self.note(format!(
            "everything snapshot {} '{}' reaches gains a reference: +1 each",
            sn.id, sn.name
        ));
        self.update_snapshot_refcount(sn.l1_table_offset, u64::from(sn.l1_size), 1)?;
        let active_off = self.l1_table_offset;
        self.why(
            "snapshot-apply: the snapshot's L1 (as read before the walk) replaces the active L1",
        );
        let old: Vec<u8> = self.read_bytes(active_off, cur_bytes);
        self.write_bytes(active_off, &buffer)?;
        for k in 0..cur_len {
            let at = k.saturating_mul(8) as usize;
            let b = crate::bytes::be64(&old, at);
            let a = crate::bytes::be64(&buffer, at);
            if a != b {
                self.record(
                    Target::L1Entry {
                        table: "active L1".into(),
                        table_offset: active_off,
                        index: k,
                    },
                    b,
                    a,
                );
            }
        }
        self.note("everything the old active L1 reached loses one reference: -1 each".into());
        let r = self.update_snapshot_refcount(active_off, cur_len, -1);
        self.l1 = buffer
            .chunks_exact(8)
            .map(|c| crate::bytes::be64(c, 0))
            .collect();
        r?;
        self.note("addend 0 over the new active L1: COPIED flags recomputed".into());
        self.update_snapshot_refcount(active_off, cur_len, 0)
    }

    /// QEMU's `qcow2_grow_l1_table`: a new, larger active L1 in new clusters,
    /// the header repointed, the old table freed.
    fn grow_l1_table(&mut self, min_size: u64, exact: bool) -> SimResult<()> {
        let old_len = self.l1.len() as u64;
        if min_size <= old_len {
            return Ok(());
        }
        let new_len = if exact {
            min_size
        } else {
            // Grown by half again until it fits, to grow less often.
            let mut n = old_len.max(1);
            while min_size > n {
                n = n.saturating_mul(3).div_ceil(2);
            }
            n
        };
        if new_len > crate::tables::MAX_L1_ENTRIES {
            return Err(Fail::Msg(format!(
                "an L1 table of {new_len} entries is larger than QEMU allows (EFBIG)"
            )));
        }
        let bytes = new_len.saturating_mul(8);
        let off = self.alloc_clusters(
            bytes,
            &format!("the active L1 table grown to {new_len} entries"),
        )?;
        let mut table = self.l1.clone();
        table.resize(new_len as usize, 0);
        let buf: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_bytes(off, &buf)?;
        self.record(
            Target::Copy {
                from: format!("active L1 at {:#x}", self.l1_table_offset),
                to: off,
                length: old_len.saturating_mul(8),
            },
            0,
            0,
        );
        let saved = self.reason.clone();
        self.why("the header points at the grown L1 table");
        self.set_header_u32(36, "l1_size", new_len as u32)?;
        self.set_header_u64(40, "l1_table_offset", off)?;
        let old_off = self.l1_table_offset;
        self.l1 = table;
        self.l1_table_offset = off;
        self.reason = saved;
        self.free_clusters(
            old_off,
            old_len.saturating_mul(8),
            "the old active L1 table",
        );
        Ok(())
    }

    /// `qemu-img resize [--shrink]`.
    fn resize(&mut self, size: u64, shrink: bool) -> SimResult<()> {
        if size == 0 {
            return Err(Fail::Msg("New image size must be positive".into()));
        }
        if size < self.size && !shrink {
            return Err(Fail::Msg(
                "Use the --shrink option to perform a shrink operation.".into(),
            ));
        }
        self.truncate(size)
    }

    /// QEMU's `qcow2_co_truncate` (no preallocation).
    fn truncate(&mut self, size: u64) -> SimResult<()> {
        if !size.is_multiple_of(512) {
            return Err(Fail::Msg(
                "The new size must be a multiple of 512 (EINVAL)".into(),
            ));
        }
        if self.version < 3 && !self.snapshots.is_empty() {
            return Err(Fail::Msg(
                "Can't resize a v2 image which has snapshots (ENOTSUP)".into(),
            ));
        }
        if self.has_data_file {
            return Err(Fail::NotModelled(
                "resizing an image with an external data file".into(),
            ));
        }
        let old = self.size;
        let cs = self.cs;
        let l1_needed = size.div_ceil(self.geo.l2_coverage());
        if size > old && self.backing.is_some() {
            // bdrv_co_truncate zero-fills the new area when the backing file
            // would show through it.
            let backing_len = self
                .backing
                .as_ref()
                .and_then(|c| c.layers.first())
                .map_or(0, |l| l.size());
            if backing_len > old {
                return Err(Fail::NotModelled(
                    "growing over a longer backing file (QEMU zero-fills the new area)".into(),
                ));
            }
        }
        if size < old {
            self.why("shrinking: the clusters past the new end are discarded");
            let from = size.div_ceil(cs).saturating_mul(cs);
            if from < old {
                self.discard_clusters(from, old, true)?;
            }
            self.shrink_l1_table(l1_needed)?;
            self.shrink_reftable()?;
            // The file is cut after its last cluster in use.
            let mut last = self.file_len.div_ceil(cs);
            while last > 0 && self.get_refcount(last.saturating_sub(1))? == 0 {
                last = last.saturating_sub(1);
            }
            let end = self.clusters_bytes(last);
            if end < self.file_len {
                self.note(format!(
                    "the image file is cut to {end} bytes, after its last cluster in use"
                ));
                self.file_len = end;
                self.zero_from = self.zero_from.min(end);
                let first_gone = last;
                self.clusters.retain(|&c, _| c < first_gone);
            }
        } else {
            self.grow_l1_table(l1_needed, true)?;
        }
        self.why("the new disk size");
        self.set_header_u64(24, "size", size)?;
        self.size = size;
        Ok(())
    }

    /// QEMU's `qcow2_shrink_l1_table`: the entries past `keep` are zeroed and
    /// their L2 tables freed (the table keeps its size).
    fn shrink_l1_table(&mut self, keep: u64) -> SimResult<()> {
        let len = self.l1.len() as u64;
        if keep >= len {
            return Ok(());
        }
        let off = self.l1_table_offset;
        let zeros = vec![0u8; len.saturating_sub(keep).saturating_mul(8) as usize];
        self.write_bytes(off.saturating_add(keep.saturating_mul(8)), &zeros)?;
        for i in (keep..len).rev() {
            let e = self.l1.get(i as usize).copied().unwrap_or(0);
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.why("shrinking: the L1 entry is past the new end");
            self.record(
                Target::L1Entry {
                    table: "active L1".into(),
                    table_offset: off,
                    index: i,
                },
                e,
                0,
            );
            self.free_clusters(
                l2,
                self.cs,
                &format!("the L2 table of active L1[{i}], past the new end"),
            );
            if let Some(slot) = self.l1.get_mut(i as usize) {
                *slot = 0;
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_shrink_reftable`: refcount blocks that count nothing (but
    /// perhaps themselves) are dropped from the table.
    fn shrink_reftable(&mut self) -> SimResult<()> {
        let bb = self.block_bits();
        let order = self.order;
        let mut dropped = Vec::new();
        for ti in 0..self.reftable_len() {
            let at = self.reftable_entry_offset(ti);
            let block = self.read_u64(at) & crate::refcount::REFT_OFFSET_MASK;
            if block == 0 {
                continue;
            }
            let bc = self.cluster_of(block);
            let own = (bc >> bb == ti).then(|| bc & low_mask(bb));
            let data = self.cluster(bc).to_vec();
            let mut scratch = data;
            if let Some(idx) = own {
                set_refcount(&mut scratch, order, idx, 0);
            }
            if scratch.iter().all(|&b| b == 0) {
                dropped.push((ti, block));
            }
        }
        for &(ti, block) in &dropped {
            self.why(format!(
                "shrinking: refcount block {ti} counts nothing and leaves the table"
            ));
            let at = self.reftable_entry_offset(ti);
            self.write_u64(at, 0)?;
            self.record(
                Target::Header {
                    field: "refcount table entry",
                },
                block,
                0,
            );
        }
        for (ti, block) in dropped {
            let bc = self.cluster_of(block);
            if bc >> bb != ti {
                // Counted by another block: its entry goes from 1 to 0.
                let oti = bc >> bb;
                let ob = self.read_u64(self.reftable_entry_offset(oti))
                    & crate::refcount::REFT_OFFSET_MASK;
                if ob != 0 {
                    let idx = bc & low_mask(bb);
                    let obc = self.cluster_of(ob);
                    let cur = get_refcount(self.cluster(obc), order, idx);
                    set_refcount(self.cluster(obc), order, idx, 0);
                    self.record(Target::Refcount { cluster: bc }, cur, 0);
                }
            }
            if bc < self.free_cluster_index {
                self.free_cluster_index = bc;
            }
            self.freed
                .push((bc, format!("refcount block {ti}, no longer needed")));
        }
        Ok(())
    }

    fn refcount_walk(&mut self, l1: &str, addend: i32) -> SimResult<()> {
        if l1 == "active" {
            return self.update_snapshot_refcount(
                self.l1_table_offset,
                self.l1.len() as u64,
                addend,
            );
        }
        let Some(i) = self.find_snapshot(l1) else {
            return Err(Fail::Msg(format!(
                "no snapshot '{l1}' (use 'active' or a snapshot ID or name)"
            )));
        };
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| Fail::Msg("no snapshot".into()))?;
        self.check_snapshot_l1(&sn)?;
        self.update_snapshot_refcount(sn.l1_table_offset, u64::from(sn.l1_size), addend)
    }

    /// Simulate one operation and record it.
    pub fn apply(&mut self, op: &Op) {
        self.steps.clear();
        self.reason.clear();
        // Each operation is a fresh open of the image (a separate qemu-img or
        // qemu-io command), so QEMU's free-cluster hint starts at 0 again.
        self.free_cluster_index = 0;
        if let Op::Trace { offset } = op {
            // A look, not a QEMU command: nothing is opened read-write.
            let r = self.trace(*offset);
            self.records.push(OpRecord {
                op: op.clone(),
                description: op.describe(),
                steps: std::mem::take(&mut self.steps),
                error: r.err().map(Fail::text),
            });
            return;
        }
        let features = self.read_u64(72);
        let checking = matches!(op, Op::Repair { .. });
        let r = if features & crate::header::INCOMPAT_CORRUPT != 0 && !checking {
            // qemu-img and qemu-io stop at the open: nothing is written.
            Err(Fail::Msg(self.open_refused.clone().unwrap_or_default()))
        } else if let Some(why) = &self.not_modelled {
            Err(Fail::Msg(format!("not simulated: {why}")))
        } else {
            // A dirty image (lazy refcounts) is repaired first on a read-write
            // open that is not itself a check.
            let r = if features & crate::header::INCOMPAT_DIRTY != 0 && !checking {
                self.note("the image is dirty (lazy refcounts): QEMU repairs its refcounts on open, as qemu-img check -r all would".into());
                self.repair(true)
            } else {
                Ok(())
            };
            let r = r.and_then(|()| self.run_op(op));
            // The close: persistent bitmaps are stored again even when the
            // operation failed.
            let closed = self.store_bitmaps();
            r.and(closed)
        };
        let error = r.err().map(|f| qemu_words(op, f.text()));
        self.records.push(OpRecord {
            op: op.clone(),
            description: op.describe(),
            steps: std::mem::take(&mut self.steps),
            error,
        });
    }

    fn run_op(&mut self, op: &Op) -> SimResult<()> {
        match op {
            Op::SnapshotCreate { name } => self.snapshot_create(name),
            Op::SnapshotDelete { id_or_name } => self.snapshot_delete(id_or_name, false),
            Op::SnapshotDeleteId { id } => self.snapshot_delete(id, true),
            Op::SnapshotApply { id_or_name } => self.snapshot_apply(id_or_name),
            Op::Write { offset, length } => self.write(*offset, *length),
            Op::Discard { offset, length } => self.discard(*offset, *length),
            Op::WriteZeroes {
                offset,
                length,
                unmap,
            } => self.write_zeroes(*offset, *length, *unmap),
            Op::Resize { size, shrink } => self.resize(*size, *shrink),
            Op::Repair { all } => self.repair(*all),
            Op::Trace { offset } => self.trace(*offset),
            Op::Overlay { .. } => Err(Fail::Msg(
                "an overlay starts a new layer: simulate_layers handles it".into(),
            )),
            Op::RefcountUpdate { l1, addend } => self.refcount_walk(l1, *addend),
        }
    }

    // ---- results -------------------------------------------------------------------

    /// The simulated image as a read-only source: the original bytes with every
    /// changed cluster laid over them.
    pub fn source(&self) -> SharedSource {
        Arc::new(OverlaySource {
            base: self.base.clone(),
            cs: self.cs,
            cluster_bits: self.geo.cluster_bits,
            clusters: self.clusters.clone(),
            len: self.file_len,
            zero_from: self.zero_from,
            name: self.path.clone(),
        })
    }

    /// The simulated image, opened.
    pub fn image(&self) -> Result<Qcow2> {
        Qcow2::open(self.source(), Strictness::Lenient)
    }

    /// Every cluster with a non-zero refcount, in order, after all operations.
    pub fn refcounts(&mut self) -> Vec<(u64, u64)> {
        let n = self.file_len.div_ceil(self.cs);
        let mut out = Vec::new();
        for c in 0..n
            .max(self.reftable_len() << self.block_bits())
            .min(n.max(1).saturating_add(1 << 20))
        {
            if let Ok(r) = self.get_refcount(c)
                && r != 0
            {
                out.push((c, r));
            }
        }
        out
    }

    /// Host file length after the operations.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// Version of the image.
    pub fn version(&self) -> u32 {
        self.version
    }

    // ---- guest writes and discards -------------------------------------------------

    /// Entries per L2 cache slice: a whole table, unless QEMU's default 32 MiB L2
    /// cache cannot cover the disk; then 4 KiB slices.
    fn slice_entries(&self) -> u64 {
        let per_table = self.geo.l2_entries();
        // read_cache_sizes: one entry (8 or 16 bytes) per guest cluster, rounded
        // up to whole clusters, against the 32 MiB default.
        let needed = self
            .size
            .div_ceil(self.cs)
            .saturating_mul(self.geo.l2_entry_size())
            .div_ceil(self.cs)
            .saturating_mul(self.cs);
        if needed > 32 << 20 {
            self.cs
                .min(4096)
                .checked_div(self.geo.l2_entry_size())
                .unwrap_or(per_table)
                .min(per_table)
        } else {
            per_table
        }
    }

    /// Where entry `index` of the L2 table at `l2` is (saturating: `l2` comes from
    /// an L1 entry).
    fn l2_entry_offset(&self, l2: u64, index: u64) -> u64 {
        l2.saturating_add(index.saturating_mul(self.geo.l2_entry_size()))
    }

    fn l2_entry_at(&mut self, l2: u64, index: u64) -> (u64, u64) {
        let off = self.l2_entry_offset(l2, index);
        let raw = self.read_u64(off);
        let bitmap = if self.geo.extended_l2 {
            self.read_u64(off.saturating_add(8))
        } else {
            0
        };
        (raw, bitmap)
    }

    fn set_l2_entry(&mut self, l2: u64, index: u64, raw: u64, bitmap: u64) -> SimResult<()> {
        let (old, old_bm) = self.l2_entry_at(l2, index);
        let off = self.l2_entry_offset(l2, index);
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
    fn cluster_table(&mut self, guest: u64) -> SimResult<u64> {
        let i = self.geo.l1_index(GuestOffset(guest));
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
            return Err(Fail::Msg(format!(
                "guest offset {guest:#x} is beyond the L1 table (EIO)"
            )));
        };
        if e & OFLAG_COPIED != 0 {
            return Ok(e & L1E_OFFSET_MASK);
        }
        let old = e & L1E_OFFSET_MASK;
        let saved = self.reason.clone();
        let purpose = if old == 0 {
            format!(
                "a new L2 table for active L1[{i}] (guest {:#x}..)",
                i.saturating_mul(self.geo.l2_coverage())
            )
        } else {
            format!("a copy of the shared L2 table at {old:#x} (active L1[{i}] lacks COPIED)")
        };
        self.why(purpose.clone());
        let new = self.alloc_clusters(self.cs, &purpose)?;
        let content = if old == 0 {
            vec![0u8; self.cs as usize]
        } else {
            self.read_bytes(old, self.cs)
        };
        self.write_bytes(new, &content)?;
        if old != 0 {
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
            if old == 0 {
                "new L2 table"
            } else {
                "private copy"
            }
        ));
        let new_e = new | OFLAG_COPIED;
        if let Some(slot) = self.l1.get_mut(i as usize) {
            *slot = new_e;
        }
        let l1_off = self.l1_table_offset;
        self.write_u64(l1_off.saturating_add(i.saturating_mul(8)), new_e)?;
        self.record(
            Target::L1Entry {
                table: "active L1".into(),
                table_offset: l1_off,
                index: i,
            },
            e,
            new_e,
        );
        if old != 0 {
            self.free_clusters(
                old,
                self.cs,
                &format!("the old L2 table at {old:#x} (one L1 fewer names it)"),
            );
        }
        self.reason = saved;
        Ok(new)
    }

    fn needs_new_alloc(&self, raw: u64) -> bool {
        let e = L2Entry { raw, bitmap: 0 };
        match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Unallocated | ClusterType::ZeroPlain | ClusterType::Compressed => true,
            ClusterType::Normal | ClusterType::ZeroAlloc => raw & OFLAG_COPIED == 0,
        }
    }

    /// QEMU's `qcow2_alloc_clusters_at`: as many free clusters as there are at
    /// `off`, up to `n`, +1 each.
    fn alloc_clusters_at(&mut self, off: u64, n: u64, purpose: &str) -> SimResult<u64> {
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
                Err(Fail::Again) => continue,
                Err(e) => return Err(e),
                Ok(()) => {
                    self.file_len = self.file_len.max(off.saturating_add(len));
                    return Ok(i);
                }
            }
        }
    }

    /// A guest write of `length` bytes at `offset` (`qcow2_co_pwritev_part`).
    ///
    /// Guest positions stay inside `offset..offset + length` (checked against the
    /// disk size first), counts of clusters inside one L2 slice, and host offsets
    /// are masked L2 entries (below 2^56): the saturating operations below never
    /// saturate on any image, they only rule out wraparound.
    fn write(&mut self, offset: u64, length: u64) -> SimResult<()> {
        let Some(end) = offset.checked_add(length).filter(|&e| e <= self.size) else {
            return Err(Fail::Msg(format!(
                "write failed: Input/output error (the request ends past the end of the disk, {} bytes, so the block layer refuses all of it)",
                self.size
            )));
        };
        self.mark_dirty(offset, length);
        let cs = self.cs;
        let sc_bits = self.geo.subcluster_bits();
        let mut frees: Vec<(u64, String)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            // qcow2_alloc_host_offset: one contiguous host range.
            let mut host_next: Option<u64> = None;
            loop {
                if pos >= end {
                    break;
                }
                let l2_index = self.geo.l2_index(GuestOffset(pos));
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
                    let host = raw & L2E_OFFSET_MASK;
                    if !host.is_multiple_of(cs) {
                        return Err(Fail::Msg(format!(
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
                        if self.needs_new_alloc(r) || r & L2E_OFFSET_MASK != expect {
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
                    self.why(format!("in-place write to guest {pos:#x}..{write_end:#x}: the clusters are COPIED (refcount 1)"));
                    self.note(format!(
                        "guest {pos:#x}..{write_end:#x} is written in place at host {:#x} (COPIED: no copy needed)",
                        host.saturating_add(in_c)
                    ));
                    // An l2meta exists only for zero-allocated clusters or, with
                    // extended L2, subclusters that are not yet normal.
                    for k in 0..keep {
                        let index = l2_index.saturating_add(k);
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
                            (r & L2E_OFFSET_MASK) | OFLAG_COPIED
                        } else {
                            r
                        };
                        if new_raw != r || new_bm != bm {
                            self.why("the written cluster no longer reads as zeros");
                            self.set_l2_entry(l2, index, new_raw, new_bm)?;
                        }
                    }
                    let _ = bitmap;
                    host_next = Some(host.saturating_add(keep.saturating_mul(cs)));
                    if write_end <= pos {
                        return Err(Fail::Msg(format!(
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
                let guest_cluster = pos.saturating_sub(in_c);
                let purpose = format!(
                    "guest data at {guest_cluster:#x}..{:#x}",
                    guest_cluster.saturating_add(n.saturating_mul(cs))
                );
                let host = if self.has_data_file {
                    guest_cluster
                } else {
                    match host_next {
                        None => self.alloc_clusters(n.saturating_mul(cs), &purpose)?,
                        Some(h) => {
                            n = self.alloc_clusters_at(h, n, &purpose)?;
                            if n == 0 {
                                break;
                            }
                            h
                        }
                    }
                };
                let bytes = n
                    .saturating_mul(cs)
                    .saturating_sub(in_c)
                    .min(end.saturating_sub(pos));
                self.cow_notes(l2, l2_index, n, pos, bytes, host);
                // qcow2_alloc_cluster_link_l2, after the data is written.
                let (cow_from, cow_to) = self.cow_range(l2, l2_index, n, in_c, bytes);
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
                    self.set_l2_entry(l2, index, host_k | OFLAG_COPIED, new_bm)?;
                }
                host_next = Some(host.saturating_add(n.saturating_mul(cs)));
                if bytes == 0 {
                    return Err(Fail::Msg(format!(
                        "no progress at guest {pos:#x}: the L2 entries there are inconsistent"
                    )));
                }
                pos = pos.saturating_add(bytes);
            }
        }
        // Old clusters are released last (their tasks finish after all allocations).
        for (entry, why) in frees {
            self.free_any_cluster(entry, &why);
        }
        Ok(())
    }

    /// The copy-on-write region `[from, to)` relative to the first cluster
    /// (`calculate_l2_meta` with keep_old = false).
    fn cow_range(&mut self, l2: u64, l2_index: u64, n: u64, in_c: u64, bytes: u64) -> (u64, u64) {
        let cs = self.cs;
        let sc_bits = self.geo.subcluster_bits();
        let scs = self.geo.subcluster_size();
        let (r, bm) = self.l2_entry_at(l2, l2_index);
        let first = L2Entry { raw: r, bitmap: bm }.subcluster_type(
            &self.geo,
            self.has_data_file,
            (in_c >> sc_bits) as u32,
        );
        let from = match first {
            SubclusterType::Compressed => 0,
            SubclusterType::Normal
            | SubclusterType::ZeroAlloc
            | SubclusterType::UnallocatedAlloc => {
                if self.geo.extended_l2 {
                    let alloc = (bm & 0xffff_ffff) as u32;
                    u64::from((in_c >> sc_bits) as u32).min(u64::from(alloc.trailing_zeros()))
                        << sc_bits
                } else {
                    0
                }
            }
            _ => (in_c >> sc_bits) << sc_bits,
        };
        // bytes >= 1 and n >= 1 (write() never asks for less).
        let end_in = in_c.saturating_add(bytes);
        let last_i = l2_index.saturating_add(n.saturating_sub(1));
        let (r, bm) = self.l2_entry_at(l2, last_i);
        let sc_last = (self.within(end_in.saturating_sub(1)) >> sc_bits) as u32;
        let last =
            L2Entry { raw: r, bitmap: bm }.subcluster_type(&self.geo, self.has_data_file, sc_last);
        let full = end_in.div_ceil(cs).saturating_mul(cs);
        let to = match last {
            SubclusterType::Compressed => full,
            SubclusterType::Normal
            | SubclusterType::ZeroAlloc
            | SubclusterType::UnallocatedAlloc => {
                if self.geo.extended_l2 {
                    let alloc = (bm & 0xffff_ffff) as u32;
                    // sc_last < 32, so skip <= 31 - sc_last: full stays above end_in.
                    let skip = u64::from(31u32.saturating_sub(sc_last).min(alloc.leading_zeros()));
                    full.saturating_sub(skip << sc_bits)
                } else {
                    full
                }
            }
            _ => end_in.div_ceil(scs).saturating_mul(scs),
        };
        (from, to)
    }

    /// Say what the copy-on-write reads to fill the rest of the new clusters.
    fn cow_notes(&mut self, l2: u64, l2_index: u64, n: u64, pos: u64, bytes: u64, host: u64) {
        let in_c = self.within(pos);
        let (from, to) = self.cow_range(l2, l2_index, n, in_c, bytes);
        let guest0 = pos.saturating_sub(in_c);
        let (r, _) = self.l2_entry_at(l2, l2_index);
        let source = |me: &Self, raw: u64| -> String {
            match (L2Entry { raw, bitmap: 0 }).cluster_type(&me.geo, me.has_data_file) {
                ClusterType::Normal => format!("the old cluster at {:#x}", raw & L2E_OFFSET_MASK),
                ClusterType::Compressed => "the decompressed old cluster".to_string(),
                ClusterType::ZeroAlloc | ClusterType::ZeroPlain => {
                    "zeros (zero cluster)".to_string()
                }
                ClusterType::Unallocated => {
                    if me.backing.is_some() {
                        "the backing file".to_string()
                    } else {
                        "zeros (unallocated, no backing file)".to_string()
                    }
                }
            }
        };
        if from < in_c {
            let src = source(self, r);
            self.why(format!("copy-on-write head, read from {src}"));
            self.record(
                Target::Copy {
                    from: format!("guest {:#x}", guest0.saturating_add(from)),
                    to: host.saturating_add(from),
                    length: in_c.saturating_sub(from),
                },
                0,
                0,
            );
        }
        let end_in = in_c.saturating_add(bytes);
        if to > end_in {
            let last_i = l2_index.saturating_add(n.saturating_sub(1));
            let (r_last, _) = self.l2_entry_at(l2, last_i);
            let src = source(self, r_last);
            self.why(format!("copy-on-write tail, read from {src}"));
            self.record(
                Target::Copy {
                    from: format!("guest {:#x}", guest0.saturating_add(end_in)),
                    to: host.saturating_add(end_in),
                    length: to.saturating_sub(end_in),
                },
                0,
                0,
            );
        }
        self.why("the guest's new data");
        self.record(
            Target::Copy {
                from: "the guest".into(),
                to: host.saturating_add(in_c),
                length: bytes,
            },
            0,
            0,
        );
    }

    /// A guest discard (`qcow2_co_pdiscard` after the block layer's alignment).
    fn discard(&mut self, offset: u64, length: u64) -> SimResult<()> {
        let cs = self.cs;
        let Some(end) = offset.checked_add(length).filter(|&e| e <= self.size) else {
            return Err(Fail::Msg(format!(
                "discard failed: Input/output error (the request ends past the end of the disk, {} bytes, so the block layer refuses all of it)",
                self.size
            )));
        };
        self.mark_dirty(offset, length);
        let has_backing = self.backing.is_some() || self.backing_named;
        if self.version < 3 && has_backing {
            self.note(
                "compat=0.10 image with a backing file: QEMU cannot discard (ENOTSUP, ignored)"
                    .into(),
            );
            return Ok(());
        }
        // The block layer splits off unaligned head and tail; qcow2 ignores them,
        // except a tail that ends exactly at an unaligned end of the disk.
        let start = offset.div_ceil(cs).saturating_mul(cs);
        let mut stop = end & !low_mask(self.geo.cluster_bits);
        if end == self.size && !end.is_multiple_of(cs) && offset <= stop {
            stop = end.div_ceil(cs).saturating_mul(cs);
        }
        if !offset.is_multiple_of(cs) {
            self.note(format!(
                "the unaligned head {offset:#x}..{:#x} is ignored (not a whole cluster)",
                start.min(end)
            ));
        }
        if !end.is_multiple_of(cs) && stop < end {
            self.note(format!(
                "the unaligned tail {:#x}..{end:#x} is ignored (not a whole cluster)",
                stop.max(start)
            ));
        }
        self.discard_clusters(start, stop, false)
    }

    /// QEMU's `qcow2_cluster_discard` over whole clusters `start..stop` (`stop`
    /// may be the unaligned end of the disk). A full discard (shrinking) leaves
    /// the entries 0, so they fall through to the backing file.
    fn discard_clusters(&mut self, mut start: u64, stop: u64, full: bool) -> SimResult<()> {
        let cs = self.cs;
        let has_backing = self.backing.is_some() || self.backing_named;
        let slice = self.slice_entries();
        while start < stop {
            let l2_index = self.geo.l2_index(GuestOffset(start));
            let n = self
                .cluster_of(stop.saturating_sub(start))
                .min(slice.saturating_sub(l2_index.checked_rem(slice).unwrap_or(0)))
                .max(1);
            self.why("discard");
            let l2 = self.cluster_table(start)?;
            for k in 0..n {
                let index = l2_index.saturating_add(k);
                let (raw, bm) = self.l2_entry_at(l2, index);
                let ty = L2Entry { raw, bitmap: bm }.cluster_type(&self.geo, self.has_data_file);
                let allocated = matches!(
                    ty,
                    ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed
                );
                if !(full || has_backing || allocated) {
                    continue;
                }
                let (new, new_bm) = if full {
                    (0, 0)
                } else if self.geo.extended_l2 {
                    (0, 0xffff_ffffu64 << 32)
                } else if self.version >= 3 {
                    (OFLAG_ZERO, 0)
                } else {
                    (0, 0)
                };
                if new == raw && new_bm == bm {
                    continue;
                }
                let g = start.saturating_add(k.saturating_mul(cs));
                self.why(format!(
                    "guest {g:#x} discarded: {}",
                    if full {
                        "the disk no longer reaches it"
                    } else if self.version >= 3 {
                        "now reads as zeros"
                    } else {
                        "now unallocated"
                    }
                ));
                self.set_l2_entry(l2, index, new, new_bm)?;
                self.free_any_cluster(raw, &format!("the discarded cluster of guest {g:#x}"));
            }
            start = start.saturating_add(n.saturating_mul(cs));
        }
        Ok(())
    }
}

/// Bits `from..to` of a subcluster allocation bitmap.
fn sub_range(from: u64, to: u64) -> u64 {
    let to = to.min(32);
    if from >= to {
        return 0;
    }
    // from < to <= 32.
    low_mask(to.saturating_sub(from) as u32) << from
}

/// The image after simulation: changed clusters over the original file.
#[derive(Debug)]
pub struct OverlaySource {
    base: SharedSource,
    cs: u64,
    cluster_bits: u32,
    clusters: ClusterMap,
    len: u64,
    zero_from: u64,
    name: PathBuf,
}

impl Source for OverlaySource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.saturating_add(done as u64);
            let c = pos >> self.cluster_bits;
            let within = (pos & low_mask(self.cluster_bits)) as usize;
            // done < buf.len() and within < cs: n >= 1 and done + n <= buf.len().
            let n = buf
                .len()
                .saturating_sub(done)
                .min((self.cs as usize).saturating_sub(within));
            let Some(dst) = buf.get_mut(done..done.saturating_add(n)) else {
                break;
            };
            match self.clusters.get(&c) {
                Some(cl) => dst.copy_from_slice(crate::bytes::slice(cl, within, n)),
                None => {
                    self.base.read_at(dst, pos)?;
                }
            }
            if pos >= self.len || (pos >= self.zero_from && !self.clusters.contains_key(&c)) {
                dst.fill(0);
            }
            done = done.saturating_add(n);
        }
        Ok(buf.len().min(self.len.saturating_sub(offset) as usize))
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn name(&self) -> &Path {
        &self.name
    }
}

/// Simulate `ops` in order on the image at `path`.
pub fn simulate(img: &Qcow2, path: &Path, ops: &[Op]) -> Result<Sim> {
    let mut sim = Sim::new(img, path)?;
    for op in ops {
        sim.apply(op);
        if sim.records.last().is_some_and(|r| r.error.is_some()) {
            break;
        }
    }
    Ok(sim)
}

/// Simulate `ops` in order, starting a new throw-away overlay at each
/// `overlay` op: the first layer is the image itself, then one per overlay,
/// each over the image (or the snapshot it names), each getting the
/// operations that follow it. Stops at the first failing operation.
pub fn simulate_layers(img: &Qcow2, path: &Path, ops: &[Op]) -> Result<Vec<Sim>> {
    let mut layers = vec![Sim::new(img, path)?];
    for op in ops {
        if let Op::Overlay { snapshot } = op {
            layers.push(Sim::overlay(img, path, snapshot.as_deref())?);
            continue;
        }
        let Some(sim) = layers.last_mut() else { break };
        sim.apply(op);
        if sim.records.last().is_some_and(|r| r.error.is_some()) {
            break;
        }
    }
    Ok(layers)
}

/// Group allocations by purpose, for summaries.
pub fn summarize(list: &[(u64, u64, String)]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for (_, len, what) in list {
        let total: &mut u64 = m.entry(what.clone()).or_default();
        *total = total.saturating_add(*len);
    }
    m
}

/// An error as QEMU's tool would print it: its prefix for the operation and the
/// errno's text, then what qinspect knows of why.
fn qemu_words(op: &Op, detail: String) -> String {
    const ALREADY: [&str; 5] = [
        "Could not ",
        "write failed: ",
        "discard failed: ",
        "not simulated: ",
        "Snapshot with id ",
    ];
    if ALREADY.iter().any(|p| detail.starts_with(p)) {
        return detail;
    }
    let prefix = match op {
        Op::SnapshotCreate { name } => format!("Could not create snapshot '{name}': "),
        Op::SnapshotDelete { id_or_name } => format!("Could not delete snapshot '{id_or_name}': "),
        Op::SnapshotDeleteId { id } => format!("Could not delete snapshot '{id}': "),
        // bdrv_snapshot_goto words the driver's errno this way.
        Op::SnapshotApply { id_or_name } => {
            format!("Could not apply snapshot '{id_or_name}': Failed to load snapshot: ")
        }
        Op::Write { .. } | Op::WriteZeroes { .. } => "write failed: ".into(),
        Op::Discard { .. } => "discard failed: ".into(),
        Op::Resize { .. } | Op::Repair { .. } | Op::Overlay { .. } | Op::Trace { .. } => {
            String::new()
        }
        Op::RefcountUpdate { .. } => String::new(),
    };
    const ERRNO: [(&str, &str); 8] = [
        ("EINVAL", "Invalid argument"),
        ("EIO", "Input/output error"),
        ("EFBIG", "File too large"),
        ("ENOTSUP", "Operation not supported"),
        ("ENOENT", "No such file or directory"),
        ("ENOSPC", "No space left on device"),
        ("EAGAIN", "Resource temporarily unavailable"),
        ("ENOMEM", "Cannot allocate memory"),
    ];
    let text = ERRNO
        .iter()
        .find(|(e, _)| detail.contains(&format!("({e})")) || detail.contains(&format!(", {e})")))
        .map(|(_, t)| *t);
    match text {
        Some(t) => format!("{prefix}{t} ({detail})"),
        None => format!("{prefix}{detail}"),
    }
}

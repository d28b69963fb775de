//! Simulating what QEMU would write: refcount updates, snapshots, copy-on-write.
//!
//! A [`Sim`] keeps every cluster an operation changes (as its compressed
//! difference from the file once it leaves a small cache of recently used
//! clusters), reads the rest from the read-only image as it needs them, and
//! replays QEMU's algorithms on that
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

mod alloc;
mod backing;
mod bitmaps;
mod bytes;
mod change;
mod command;
mod compressed;
mod copied;
mod cor;
mod data;
mod discard;
mod error;
mod guest;
mod invalid;
mod ops;
mod overlap;
mod overlay;
mod rebuild;
mod refcount;
mod repair;
mod resize;
mod snapshot;
mod snaptable;
mod store;
#[cfg(test)]
mod tests;
mod triage;
mod update_header;
mod walk;
mod zeroes;

pub use bytes::{ClusterHasher, OverlaySource};
pub use change::{Change, Target};
pub use data::{DEFAULT_PATTERN, DataMap, Opened, Piece, Sealed};
pub use error::SimError;
use error::SimResult;
pub use ops::Op;

use crate::error::{Error, Result};
use crate::header::Header;
use crate::image::{Qcow2, Strictness};
use crate::io::SharedSource;
use crate::refcount::get_refcount;
use crate::tables::L1Entry;
use crate::types::low_mask as types_low_mask;
use crate::types::{Geometry, GuestOffset, HostOffset};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest file the simulator lets an image grow to (ext4's limit with
/// 4 KiB blocks: 16 TiB less one block).
pub const MAX_FILE_LEN: u64 = (1 << 44) - 4096;

// The block layer's limit on any request: a read or write of the image file
// that would end past it fails (EIO) before it reaches the file.
use crate::types::BDRV_MAX_LENGTH;

/// A snapshot as the simulator keeps it (QEMU's `QCowSnapshot`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimSnapshot {
    /// ID string.
    pub id: String,
    /// The snapshot's name.
    pub name: String,
    /// L1 table.
    pub l1_table_offset: HostOffset,
    /// L1 entries.
    pub l1_size: u32,
    /// VM state size.
    pub vm_state_size: u64,
    /// When it was taken: seconds since the Unix epoch.
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
    /// The failure behind `error`, to match on.
    #[serde(skip)]
    pub cause: Option<SimError>,
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
    /// Clusters read or written: a bounded cache, and every changed one.
    clusters: store::Store,
    /// Host file length: it grows as writes land past its end (an allocation
    /// alone does not grow it).
    file_len: u64,
    l1: Vec<L1Entry>,
    l1_table_offset: HostOffset,
    size: u64,
    refcount_table_offset: HostOffset,
    refcount_table_clusters: u32,
    snapshots: Vec<SimSnapshot>,
    snapshots_offset: HostOffset,
    snapshots_size: u64,
    free_cluster_index: u64,
    /// Whether this operation's command opens the image with unmap
    /// ([`Sim::opens_with_unmap`]): a guest's discard then passes down.
    unmap: bool,
    /// A refcount walk is under way: discards wait for its end.
    cache_discards: bool,
    /// The clusters whose discards are queued for the file (`s->discards`).
    discards: Vec<u64>,
    steps: Vec<Change>,
    reason: String,
    /// Every operation so far.
    pub records: Vec<OpRecord>,
    /// Allocations: (where in the file, length in bytes, purpose).
    pub allocated: Vec<(HostOffset, u64, String)>,
    /// Releases that brought clusters to refcount 0: (cluster, purpose).
    pub freed: Vec<(u64, String)>,
    backing: Option<crate::chain::Chain>,
    backing_named: bool,
    /// Why the backing chain did not open, when the image names one.
    backing_failure: Option<Box<crate::chain::ChainFailure>>,
    /// Persistent bitmaps, stored again at the end of every operation.
    bitmaps: Option<bitmaps::Bitmaps>,
    /// Why QEMU refuses to open the image at all (its bitmap directory), in
    /// the block layer's words; each command says it in its own
    /// ([`backing::open_words`]).
    open_fails: Option<String>,
    /// QEMU's refusal to open the image for anything but a check (a snapshot
    /// table it cannot read: qemu-img check reads it only in the check).
    check_only: Option<String>,
    /// What QEMU would do on open that is not modelled: every operation says so.
    not_modelled: Option<String>,
    /// The order the next compressed write places its clusters in.
    compressed_order: Option<Vec<GuestOffset>>,
    /// The file was cut here: bytes from here on read as zeros, not as the
    /// original file's.
    zero_from: u64,
    /// For a throw-away overlay: the image under it, and the snapshot shown.
    overlay_of: Option<(PathBuf, Option<String>)>,
    /// Bumped on every write into the refcount table, so that the overlap
    /// check's memo knows when the refcount blocks may have moved.
    reftable_writes: u64,
    /// A version 2 image's feature bits, which its header has no field for,
    /// or a corrupt bit whose header rewrite did not fit its cluster: QEMU
    /// keeps them in memory for the one command (a corrupt bit it sets stops
    /// that command's further writes, and the next open forgets it).
    unstored_features: u64,
    /// The overlap check's memo: the metadata layout it was made for, and the
    /// clusters an L2-entry write was found not to overlap under that layout.
    overlap_memo: (
        overlap::Layout,
        std::collections::HashSet<u64, std::hash::BuildHasherDefault<ClusterHasher>>,
    ),
    /// What the data clusters written hold, described.
    data: data::Data,
    /// The metadata structure the overlap check last kept a write off in
    /// this operation (the write failed, the image marked corrupt).
    overlap_stop: Option<overlap::Meta>,
    /// The active L2 table whose read in the next check's COPIED check
    /// fails ([`Sim::fail_copied_read`]).
    copied_read_fails: Option<HostOffset>,
    /// Set by a check pass that grew the file for refcount blocks past its
    /// end, for the pass after it: what that pass counted, the file's
    /// clusters before it grew, and the blocks' clusters (QEMU goes on with
    /// those counts: `counts_before_growth` in `rebuild.rs`).
    counted_before_growth: Option<(Arc<crate::check::Imrt>, u64, Vec<u64>)>,
    /// What of this operation's metadata changes QEMU's caches would still
    /// hold (lost when it meets an invalid L2 entry).
    unflushed: invalid::Unflushed,
    /// A guest write's L2 entries held back from the file ([`Sim::held_back`]).
    held_l2: Option<Vec<(HostOffset, u64, u64, u64)>>,
}

impl Sim {
    /// Start a simulation on `img` (opened from `path`, for backing-file reads).
    pub fn new(img: &Qcow2, path: &Path) -> Result<Sim> {
        let h: &Header = &img.header;
        // QEMU would not open the image, so it would not change it either;
        // only a snapshot table it cannot read leaves qemu-img check's open
        // (BDRV_O_CHECK), which reads that table later, to go on. A bitmap
        // directory or entry QEMU refuses fails each operation instead, at its
        // open, as each qemu-img or qemu-io command does (`open_fails`).
        let refusing: Vec<&Error> = img
            .problems
            .iter()
            .filter(|e| !e.corrupt_kind().is_some_and(|k| k.is_bitmap_directory()))
            .collect();
        let snapshot_table_only = img.check_refusal.is_none()
            && refusing
                .iter()
                .all(|p| p.corrupt_kind() == Some(crate::error::CorruptKind::SnapshotTable));
        let check_only = refusing
            .first()
            .filter(|_| snapshot_table_only)
            .map(|p| p.to_string());
        if let Some(p) = refusing.first().filter(|_| !snapshot_table_only) {
            return Err(Error::unsupported(
                "simulation",
                format!("QEMU refuses to open this image: {p}"),
            ));
        }
        // An encrypted image opens read-write only with its key: without
        // one, qemu-img fails the same way.
        if h.crypt_method != 0 && img.data_key().is_none() {
            return Err(Error::unsupported(
                "simulation",
                "QEMU opens this encrypted image only with its key (qemu-img: Parameter 'encrypt.key-secret' is required for cipher)",
            ));
        }
        if img.snapshots.error.is_some() && !snapshot_table_only {
            return Err(Error::unsupported(
                "simulation",
                "the snapshot table cannot be read, so QEMU would not open the image",
            ));
        }
        let geo = img.geometry();
        let snapshots = SimSnapshot::from_image(img);
        let (backing, backing_failure) = match &img.backing_name {
            Some(_) => match crate::chain::Chain::open_detailed(path, &Default::default()) {
                Ok(mut c) => {
                    c.layers.remove(0);
                    backing::refuse_encrypted(&c)?;
                    (Some(c), None)
                }
                Err(f) => (None, Some(f)),
            },
            None => (None, None),
        };
        let open_fails = bitmaps::open_fails(img);
        let (bitmaps, not_modelled) = match bitmaps::load(img) {
            Ok(b) => (b, None),
            Err(why) => (None, Some(why)),
        };
        Ok(Sim {
            bitmaps,
            open_fails,
            check_only,
            not_modelled,
            compressed_order: None,
            zero_from: u64::MAX,
            overlay_of: None,
            reftable_writes: 0,
            unstored_features: 0,
            overlap_memo: Default::default(),
            overlap_stop: None,
            copied_read_fails: None,
            counted_before_growth: None,
            unflushed: Default::default(),
            held_l2: None,
            data: data::Data::with_key(img.data_key().cloned()),
            base: img.src.clone(),
            path: path.to_path_buf(),
            geo,
            cs: geo.cluster_size(),
            order: h.refcount_order.min(6),
            max_refcount: img.refcount_geometry().max(),
            version: h.version,
            has_data_file: h.has_data_file(),
            clusters: store::Store::new(geo.cluster_size()),
            file_len: img.file_len(),
            l1: img.l1.to_vec(),
            l1_table_offset: h.l1_table_offset,
            size: h.size,
            refcount_table_offset: h.refcount_table_offset,
            refcount_table_clusters: h.refcount_table_clusters,
            snapshots,
            snapshots_offset: h.snapshots_offset,
            snapshots_size: img.snapshots.size,
            free_cluster_index: 0,
            unmap: false,
            cache_discards: false,
            discards: Vec::new(),
            backing_named: img.backing_name.is_some(),
            backing_failure,
            steps: Vec::new(),
            reason: String::new(),
            records: Vec::new(),
            allocated: Vec::new(),
            freed: Vec::new(),
            backing,
        })
    }

    // ---- results -------------------------------------------------------------------

    /// The simulated image as a read-only source: the original bytes with every
    /// changed cluster laid over them.
    pub fn source(&self) -> SharedSource {
        let (packed, clusters) = self.clusters.snapshot();
        Arc::new(OverlaySource {
            packed: store::PackedReader::new(packed),
            base: self.base.clone(),
            cs: self.cs,
            cluster_bits: self.geo.cluster_bits,
            clusters,
            len: self.file_len,
            zero_from: self.zero_from,
            name: self.path.clone(),
            data: self.data.map.clone(),
            below: self.data.below(),
        })
    }

    /// Pack every changed cluster and let go of the cache of recent ones,
    /// so that an overlay made next ([`Sim::source`]) copies none of them:
    /// for a long look at the result, such as a check.
    pub fn settle(&mut self) {
        self.clusters.settle(&self.base, self.zero_from);
    }

    /// The simulated image, opened.
    pub fn image(&self) -> Result<Qcow2> {
        let img = Qcow2::open(self.source(), Strictness::Lenient)?;
        // An encrypted image's guest data reads with the key it was given.
        if let Some(k) = &self.data.key {
            img.set_data_key(k.clone());
        }
        Ok(img)
    }

    /// Every cluster with a non-zero refcount, in order, after all operations.
    pub fn refcounts(&mut self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let _ = self.try_for_each_refcount(|c, r| {
            out.push((c, r));
            Ok::<(), std::convert::Infallible>(())
        });
        out
    }

    /// [`Sim::refcounts`] one cluster at a time, in order, without building
    /// the list (an image of a few TiB has tens of millions of clusters):
    /// `f` gets each cluster with a non-zero refcount and its refcount, and
    /// its first error stops the walk. Each refcount block is looked up once.
    pub fn try_for_each_refcount<E>(
        &mut self,
        mut f: impl FnMut(u64, u64) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let n = self.file_len.div_ceil(self.cs);
        let end = n
            .max(self.reftable_len() << self.block_bits())
            .min(n.max(1).saturating_add(1 << 20));
        let bb = self.block_bits();
        let order = self.order;
        let mut c = 0u64;
        while c < end {
            let ti = c >> bb;
            // The first cluster of the next block: this block covers c..next.
            let next = ti
                .saturating_add(1)
                .checked_shl(bb)
                .unwrap_or(u64::MAX)
                .min(end);
            let block = self.refcount_block_of(ti).ok().flatten();
            if let Some(bc) = block {
                let data = self.cluster_ro(bc);
                let first = c & types_low_mask(bb);
                for (k, cl) in (c..next).enumerate() {
                    let r = get_refcount(data, order, first.saturating_add(k as u64));
                    if r != 0 {
                        f(cl, r)?;
                    }
                }
            }
            c = next;
        }
        Ok(())
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

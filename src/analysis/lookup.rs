//! Resolving guest reads: which layer, which host bytes, or zeros.
//!
//! For one qcow2 layer, a guest offset goes through the L1 table to an L2 table and
//! then to an L2 entry (and, with extended L2, a subcluster), exactly as QEMU's
//! `qcow2_get_host_offset` does; [`layer_run`] returns the result for a run of
//! guest bytes that all resolve the same way. [`read`] stitches runs together down
//! the backing chain, and [`trace`] records every step for one offset, with an
//! explanation a learner can follow.

use crate::chain::{Chain, Layer, LayerKind};
use crate::compress;
use crate::error::{Error, Result};
use crate::image::{Qcow2, View};
use crate::io::{Source, read_into};
use crate::tables::{CompressedDescriptor, L1Entry, L1Mapping, L2Entry, L2Mapping, SubclusterType};
use crate::types::{Geometry, GuestOffset, HostOffset};
use serde::Serialize;

/// How a run of guest bytes resolves in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Status {
    /// Not in this layer: the next layer down answers (zeros if there is none).
    Unallocated {
        /// A host cluster kept for this range (extended L2 "unallocated (alloc)").
        host: Option<HostOffset>,
    },
    /// Reads as zeros here; lower layers are not consulted.
    Zero {
        /// The host cluster kept allocated, if any.
        host: Option<HostOffset>,
    },
    /// Data at a host offset (in the image file, or in the external data file).
    Data {
        /// Host offset of the first byte of the run.
        host: HostOffset,
        /// The bytes are in the external data file.
        in_data_file: bool,
    },
    /// A compressed cluster.
    Compressed {
        /// Where the compressed bytes are.
        descriptor: CompressedDescriptor,
        /// Offset of the run's first byte inside the decompressed cluster.
        in_cluster: u64,
    },
}

/// A run of guest bytes with one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Run {
    /// First guest byte.
    pub guest: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// How it resolves.
    pub status: Status,
    /// The subcluster type QEMU sees.
    pub subcluster: SubclusterType,
}

fn eio(guest: u64, layer: &str, reason: String) -> Error {
    Error::GuestIo {
        guest,
        layer: layer.to_string(),
        reason,
    }
}

/// Resolve up to `max_len` guest bytes from `guest` in one qcow2 layer, the way
/// `qcow2_get_host_offset` does: the run never crosses an L2 table, and it covers
/// consecutive (sub)clusters of the same type (and, for data, contiguous host
/// offsets). Returns QEMU's EIO conditions as [`Error::GuestIo`].
pub fn layer_run(img: &Qcow2, view: &View, guest: u64, max_len: u64, name: &str) -> Result<Run> {
    let geo = img.geometry();
    let cs = geo.cluster_size();
    let g = GuestOffset(guest);
    let in_cluster = geo.in_cluster(g);
    let l2_index = geo.l2_index(g);
    // Bytes from the start of this cluster to the end of its L2 table. (QEMU stops
    // at the end of a 4 KiB L2 cache slice; that never changes a read's bytes, a
    // map's merged extents, or which entries can fail a request.)
    // l2_index < l2_entries, so this is at most the L2 coverage (2^39).
    let to_l2_end = geo.l2_entries().saturating_sub(l2_index).saturating_mul(cs);
    let needed = max_len.saturating_add(in_cluster).min(to_l2_end);
    let unallocated = |len: u64| Run {
        guest,
        len: len.saturating_sub(in_cluster).max(1),
        status: Status::Unallocated { host: None },
        subcluster: SubclusterType::UnallocatedPlain,
    };
    let l1_index = geo.l1_index(g);
    let Some(l1e) = usize::try_from(l1_index).ok().and_then(|i| view.l1.get(i)) else {
        return Ok(unallocated(needed));
    };
    let L1Mapping::L2Table { offset: l2_off, .. } = l1e.mapping() else {
        return Ok(unallocated(needed));
    };
    if !geo.is_cluster_aligned(l2_off.0) {
        return Err(eio(
            guest,
            name,
            format!("L2 table offset {l2_off} unaligned (L1 index {l1_index:#x})"),
        ));
    }
    let l2 = img.l2_table(l2_off)?;
    let has_df = img.header.has_data_file();
    let sc_index = geo.subcluster_index(g);
    let entry = l2
        .get(l2_index as usize)
        .copied()
        .unwrap_or(L2Entry { raw: 0, bitmap: 0 });
    let mapping = entry.mapping(&geo, has_df);
    let first_type = mapping.subcluster_type(sc_index);
    if img.header.version < 3 && first_type.is_zero() {
        return Err(eio(
            guest,
            name,
            format!(
                "Zero cluster entry found in pre-v3 image (L2 offset: {l2_off}, L2 index: {l2_index:#x})"
            ),
        ));
    }
    let mut host = None;
    match first_type {
        SubclusterType::Compressed if has_df => {
            return Err(eio(
                guest,
                name,
                format!(
                    "Compressed cluster entry found in image with external data file (L2 offset: {l2_off}, L2 index: {l2_index:#x})"
                ),
            ));
        }
        SubclusterType::ZeroAlloc | SubclusterType::Normal | SubclusterType::UnallocatedAlloc => {
            // These three types come from a data or preallocated zero entry.
            let hc = mapping.host_offset().unwrap_or_default();
            if !geo.is_cluster_aligned(hc.0) {
                return Err(eio(
                    guest,
                    name,
                    format!(
                        "Cluster allocation offset {hc} unaligned (L2 offset: {l2_off}, L2 index: {l2_index:#x})"
                    ),
                ));
            }
            let h = hc.0.saturating_add(in_cluster);
            if has_df && h != guest {
                return Err(eio(
                    guest,
                    name,
                    format!(
                        "External data file host cluster offset {hc} does not match guest cluster offset {:#x}",
                        guest.saturating_sub(in_cluster)
                    ),
                ));
            }
            host = Some(HostOffset(h));
        }
        _ => {}
    }
    // count_contiguous_subclusters
    let nb_clusters = geo.clusters_for(needed);
    if !geo.extended_l2 && first_type != SubclusterType::Compressed {
        // Standard L2 entries: one type per cluster; a tight loop over the table.
        let start = l2_index as usize;
        let end = start.saturating_add(nb_clusters as usize).min(l2.len());
        let n = standard_run_len(l2.get(start..end).unwrap_or(&[]), &geo, has_df, first_type);
        let len = (n as u64)
            .saturating_mul(cs)
            .min(needed)
            .saturating_sub(in_cluster)
            .max(1);
        return Ok(Run {
            guest,
            len,
            status: run_status(first_type, host, has_df, &mapping, in_cluster),
            subcluster: first_type,
        });
    }
    let mut count: u64 = 0;
    let mut expected_off = entry.host_offset().0;
    let check_offset = first_type.has_host_cluster();
    for i in 0..nb_clusters {
        let first_sc = if i == 0 { sc_index } else { 0 };
        let e = l2
            .get(l2_index.saturating_add(i) as usize)
            .copied()
            .unwrap_or(L2Entry { raw: 0, bitmap: 0 });
        let Some((t, n)) = e.subcluster_run(&geo, has_df, first_sc) else {
            return Err(eio(
                guest,
                name,
                format!(
                    "Invalid cluster entry found (L2 offset: {l2_off}, L2 index: {:#x})",
                    l2_index.saturating_add(i)
                ),
            ));
        };
        if i == 0 {
            if t == SubclusterType::Compressed {
                count = u64::from(n);
                break;
            }
        } else if t != first_type {
            break;
        } else if check_offset {
            expected_off = expected_off.wrapping_add(cs);
            if expected_off != e.host_offset().0 {
                break;
            }
        }
        // At most 32 subclusters per entry, over at most one L2 table.
        count = count.saturating_add(u64::from(n));
        let per = if geo.extended_l2 { 32 } else { 1 };
        if first_sc.saturating_add(n) < per {
            break;
        }
    }
    let avail = count.saturating_add(u64::from(sc_index)) << geo.subcluster_bits();
    let len = avail.min(needed).saturating_sub(in_cluster).max(1);
    Ok(Run {
        guest,
        len,
        status: run_status(first_type, host, has_df, &mapping, in_cluster),
        subcluster: first_type,
    })
}

/// How many entries from the first of `entries` (standard L2, so one type per
/// cluster) form one run: the same subcluster type as `first_type` and, for types
/// with a host cluster, consecutive host clusters. The first entry always counts.
fn standard_run_len(
    entries: &[L2Entry],
    geo: &Geometry,
    has_df: bool,
    first_type: SubclusterType,
) -> usize {
    let cs = geo.cluster_size();
    let mut expected = entries.first().map_or(0, |e| e.host_offset().0);
    // n is the index of the first entry that breaks the run (an index into the
    // table, so no counter can overflow).
    for (i, e) in entries.iter().enumerate().skip(1) {
        if e.subcluster_type(geo, has_df, 0) != first_type {
            return i;
        }
        if first_type.has_host_cluster() {
            expected = expected.wrapping_add(cs);
            if e.host_offset().0 != expected {
                return i;
            }
        }
    }
    entries.len()
}

fn run_status(
    t: SubclusterType,
    host: Option<HostOffset>,
    has_df: bool,
    mapping: &L2Mapping,
    in_cluster: u64,
) -> Status {
    match t {
        SubclusterType::Normal => Status::Data {
            host: host.unwrap_or_default(),
            in_data_file: has_df,
        },
        SubclusterType::Compressed => match *mapping {
            L2Mapping::Compressed { descriptor, .. } => Status::Compressed {
                descriptor,
                in_cluster,
            },
            // A compressed subcluster comes only from a compressed mapping.
            _ => Status::Unallocated { host },
        },
        SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc => Status::Zero { host },
        _ => Status::Unallocated { host },
    }
}

/// Decompress the compressed cluster described by `d` in `img`.
pub fn read_compressed(
    img: &Qcow2,
    d: &CompressedDescriptor,
    guest: u64,
    name: &str,
) -> Result<Vec<u8>> {
    let cs = img.geometry().cluster_size();
    // The descriptor can claim at most 2^(cluster_bits-8) sectors, i.e. 2 clusters.
    let mut buf = vec![0u8; d.size.min(cs.saturating_mul(2)) as usize];
    read_into(img.src.as_ref(), "compressed cluster", d.offset.0, &mut buf)?;
    compress::decompress(img.header.compression_type(), &buf, cs as usize).map_err(|e| {
        eio(
            guest,
            name,
            format!("compressed cluster at {} ({} bytes): {e}", d.offset, d.size),
        )
    })
}

/// A cache of the last decompressed cluster, so sequential reads inflate each
/// compressed cluster once.
#[derive(Default)]
pub struct ReadCache {
    last: Option<(usize, u64, Vec<u8>)>,
    /// Scratch space for decrypted sectors.
    decrypted: Vec<u8>,
}

/// A piece of guest data, as the chain resolves it.
pub enum Segment<'a> {
    /// `len` bytes stored at `host` in `src` (bytes past the end of `src` read as zeros).
    Data {
        /// The file holding them.
        src: &'a dyn Source,
        /// The host offset of the first byte in `src`.
        host: u64,
        /// How many.
        len: u64,
    },
    /// `len` bytes of zeros.
    Zero {
        /// How many.
        len: u64,
    },
    /// Bytes produced in memory (a slice of a decompressed cluster).
    Bytes(&'a [u8]),
}

impl Segment<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Data { len, .. } | Segment::Zero { len } => *len,
            Segment::Bytes(b) => b.len() as u64,
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolve guest bytes `guest..guest+len` into segments, in order, calling `f`
/// for each: data in some file, zeros, or decompressed bytes. Bytes past the end of
/// the guest disk, and past the end of shorter backing layers, are zeros.
pub fn for_each_segment(
    chain: &Chain,
    guest: u64,
    len: u64,
    cache: &mut ReadCache,
    f: &mut dyn FnMut(Segment) -> Result<()>,
) -> Result<()> {
    segments(chain, 0, guest, len, cache, f)
}

/// Read guest bytes of the chain at `guest` into `buf`, as QEMU would.
pub fn read(chain: &Chain, guest: u64, buf: &mut [u8], cache: &mut ReadCache) -> Result<()> {
    let mut pos = 0usize;
    for_each_segment(chain, guest, buf.len() as u64, cache, &mut |seg| {
        let n = seg.len() as usize;
        let Some(dst) = buf.get_mut(pos..pos.saturating_add(n)) else {
            return Ok(());
        };
        match seg {
            Segment::Data { src, host, .. } => {
                read_into(src, "guest data", host, dst)?;
            }
            Segment::Zero { .. } => dst.fill(0),
            Segment::Bytes(b) => dst.copy_from_slice(b),
        }
        pos = pos.saturating_add(n);
        Ok(())
    })
}

fn segments(
    chain: &Chain,
    depth: usize,
    guest: u64,
    len: u64,
    cache: &mut ReadCache,
    f: &mut dyn FnMut(Segment) -> Result<()>,
) -> Result<()> {
    let Some(layer) = chain.layers.get(depth) else {
        return if len > 0 {
            f(Segment::Zero { len })
        } else {
            Ok(())
        };
    };
    let in_range = len.min(layer.size().saturating_sub(guest));
    let name = layer.path.display().to_string();
    match &layer.kind {
        LayerKind::Raw => {
            if in_range > 0 {
                f(Segment::Data {
                    src: layer.src.as_ref(),
                    host: guest,
                    len: in_range,
                })?;
            }
        }
        LayerKind::Qcow2 {
            image,
            view,
            data_file,
        } => {
            let mut pos = 0u64;
            while pos < in_range {
                // pos < in_range <= layer size - guest: no overflow.
                let g = guest.saturating_add(pos);
                let want = in_range.saturating_sub(pos);
                let run = layer_run(image, view, g, want, &name)?;
                let n = run.len.min(want);
                match run.status {
                    Status::Data { host, in_data_file } => {
                        let src = match (in_data_file, data_file) {
                            (true, Some(df)) => df.as_ref(),
                            _ => layer.src.as_ref(),
                        };
                        if image.header.crypt_method != 0 {
                            crate::crypto::decrypted_segments(
                                image,
                                src,
                                host.0,
                                g,
                                n,
                                &mut cache.decrypted,
                                f,
                            )?;
                        } else {
                            f(Segment::Data {
                                src,
                                host: host.0,
                                len: n,
                            })?;
                        }
                    }
                    Status::Zero { .. } => f(Segment::Zero { len: n })?,
                    Status::Unallocated { .. } => {
                        segments(chain, depth.saturating_add(1), g, n, cache, f)?
                    }
                    Status::Compressed {
                        descriptor,
                        in_cluster,
                    } => {
                        let hit = matches!(&cache.last, Some((d, off, _)) if *d == depth && *off == descriptor.offset.0);
                        if !hit {
                            let data = read_compressed(image, &descriptor, g, &name)?;
                            cache.last = Some((depth, descriptor.offset.0, data));
                        }
                        if let Some((_, _, data)) = &cache.last {
                            let s = crate::bytes::slice(data, in_cluster as usize, n as usize);
                            f(Segment::Bytes(s))?;
                        }
                    }
                }
                pos = pos.saturating_add(n);
            }
        }
    }
    if len > in_range {
        f(Segment::Zero {
            len: len.saturating_sub(in_range),
        })?;
    }
    Ok(())
}

/// One step of a traced lookup.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Which layer (0 = top).
    pub depth: usize,
    /// The layer's file.
    pub layer: String,
    /// What kind of step.
    #[serde(flatten)]
    pub kind: StepKind,
    /// A sentence explaining the step.
    pub explanation: String,
}

/// The kinds of steps in a lookup.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum StepKind {
    /// The layer is entered; the guest offset is split into indexes.
    Split {
        /// Format of the layer.
        format: String,
        /// Virtual size of the layer.
        layer_size: u64,
        /// Cluster size (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        cluster_size: Option<u64>,
        /// L1 index (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        l1_index: Option<u64>,
        /// L2 index (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        l2_index: Option<u64>,
        /// Offset in the cluster (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        in_cluster: Option<u64>,
        /// Subcluster index (extended L2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        subcluster: Option<u32>,
    },
    /// The offset is past the end of this layer.
    PastEnd {
        /// Layer size.
        layer_size: u64,
    },
    /// The L1 index is past the end of the L1 table.
    BeyondL1 {
        /// L1 index.
        l1_index: u64,
        /// L1 size.
        l1_size: u64,
    },
    /// An L1 entry was read.
    L1Entry {
        /// Which L1 table (active or snapshot).
        table: String,
        /// The entry's index in that table (guest offset / (cluster size × L2 entries)).
        index: u64,
        /// Where the entry is in the file.
        entry_offset: u64,
        /// Raw value (hex).
        raw: String,
        /// L2 offset (hex) or null.
        l2_offset: Option<String>,
        /// Bit 63: the L2 table's refcount is exactly 1, so it may be written in place.
        copied: bool,
        /// Reserved bits set (hex) or null.
        reserved: Option<String>,
    },
    /// An L2 entry was read.
    L2Entry {
        /// Where the L2 table is.
        table_offset: String,
        /// The entry's index in that L2 table.
        index: u64,
        /// Where the entry is in the file.
        entry_offset: u64,
        /// Raw value (hex).
        raw: String,
        /// Subcluster bitmap (hex; extended L2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        bitmap: Option<String>,
        /// QEMU's cluster type.
        cluster_type: String,
        /// The state of the subcluster holding the offset.
        subcluster_type: String,
        /// Host offset bits (hex) if meaningful.
        #[serde(skip_serializing_if = "Option::is_none")]
        host_offset: Option<String>,
        /// Bit 63: the data cluster's refcount is exactly 1 (never set on compressed entries).
        copied: bool,
        /// Compressed descriptor.
        #[serde(skip_serializing_if = "Option::is_none")]
        compressed: Option<CompressedDescriptor>,
        /// Reserved bits set (hex) or null.
        reserved: Option<String>,
    },
    /// The lookup ends with data.
    Data {
        /// The file holding the byte.
        file: String,
        /// Host offset of the byte.
        host_offset: String,
        /// Whether the host offset is past the end of that file (reads zeros).
        past_eof: bool,
    },
    /// The lookup ends with a compressed cluster.
    Compressed {
        /// The file.
        file: String,
        /// The compressed cluster's host offset and sector count, decoded from the entry.
        descriptor: CompressedDescriptor,
        /// Offset inside the decompressed cluster.
        in_cluster: u64,
    },
    /// The lookup ends with zeros.
    Zero {
        /// Why the read gives zeros here (a zero entry, past the end of a backing file, ...).
        reason: String,
        /// The byte's place in the layer's file where it has one (a raw file's
        /// hole, a zero cluster that keeps its host cluster), as `qemu-img map`
        /// reports it.
        #[serde(skip_serializing_if = "Option::is_none")]
        host_offset: Option<String>,
    },
    /// Not here: go down one layer.
    FallThrough {
        /// Next layer's file, if any.
        next: Option<String>,
    },
    /// The data is decrypted: which sector number becomes the IV, which key.
    Decrypt(crate::crypto::DecryptStep),
    /// QEMU would fail the read.
    Error {
        /// QEMU's complaint.
        message: String,
    },
}

/// The full trace of one guest offset.
#[derive(Clone, Debug, Serialize)]
pub struct Trace {
    /// The guest offset traced.
    pub guest_offset: u64,
    /// Which L1 table the top layer uses.
    pub view: String,
    /// Steps in order.
    pub steps: Vec<Step>,
    /// One-sentence outcome.
    pub outcome: String,
    /// The answer `qemu-img map` gives for this byte (depth, present, zero, data,
    /// compressed, offset), from the same decision the map is made of; absent past
    /// the end of the disk or where the read fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<crate::map::MapEntry>,
    /// Why QEMU fails the read (EIO), if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Trace the lookup of one guest offset through the chain, step by step.
pub fn trace(chain: &Chain, guest: u64) -> Trace {
    let mut steps = Vec::new();
    let view = match &chain.top().kind {
        LayerKind::Qcow2 { view, .. } => view.label(),
        LayerKind::Raw => "raw".into(),
    };
    let mut outcome = String::new();
    for (depth, layer) in chain.layers.iter().enumerate() {
        let name = layer.path.display().to_string();
        let next = chain
            .layers
            .get(depth.saturating_add(1))
            .map(|l| l.path.display().to_string());
        let push = |steps: &mut Vec<Step>, kind: StepKind, explanation: String| {
            steps.push(Step {
                depth,
                layer: name.clone(),
                kind,
                explanation,
            })
        };
        let size = layer.size();
        if guest >= size {
            let why = if depth == 0 {
                format!(
                    "Guest offset {guest:#x} is past the end of the disk ({size} bytes); there is nothing to read."
                )
            } else {
                format!(
                    "{name} is only {size} bytes long, so offset {guest:#x} is past its end: QEMU reads zeros there."
                )
            };
            push(
                &mut steps,
                StepKind::PastEnd { layer_size: size },
                why.clone(),
            );
            outcome = if depth == 0 {
                "past the end of the disk".into()
            } else {
                format!("zeros: past the end of backing layer {name} ({size} bytes)")
            };
            break;
        }
        match &layer.kind {
            LayerKind::Raw => {
                push(
                    &mut steps,
                    StepKind::Split {
                        format: "raw".into(),
                        layer_size: size,
                        cluster_size: None,
                        l1_index: None,
                        l2_index: None,
                        in_cluster: None,
                        subcluster: None,
                    },
                    format!(
                        "{name} is a raw image: guest offset {guest:#x} is byte {guest:#x} of the file."
                    ),
                );
                let flen = layer.src.len();
                let (zero, _) = crate::map::file_extent(layer.src.as_ref(), guest);
                if guest >= flen {
                    let reason = format!(
                        "byte {guest:#x} is past the end of {name} ({flen} bytes), inside QEMU's rounding of a raw file's size up to 512 bytes"
                    );
                    push(
                        &mut steps,
                        StepKind::Zero {
                            reason: reason.clone(),
                            host_offset: Some(format!("{guest:#x}")),
                        },
                        format!("The {reason}: it reads as zero."),
                    );
                    outcome = format!("zeros: {reason}");
                } else if zero {
                    let reason = format!("byte {guest:#x} is in a hole of {name}");
                    push(
                        &mut steps,
                        StepKind::Zero {
                            reason: reason.clone(),
                            host_offset: Some(format!("{guest:#x}")),
                        },
                        format!(
                            "The file system stores nothing there: {reason}, so it reads as zero (qemu-img map reports it as zero, not data)."
                        ),
                    );
                    outcome = format!("zeros: hole in {name} at {guest:#x} (raw layer {depth})");
                } else {
                    push(
                        &mut steps,
                        StepKind::Data {
                            file: name.clone(),
                            host_offset: format!("{guest:#x}"),
                            past_eof: false,
                        },
                        format!("The byte is read from {name} at offset {guest:#x}."),
                    );
                    outcome = format!("data in {name} at {guest:#x} (raw layer {depth})");
                }
                break;
            }
            LayerKind::Qcow2 {
                image,
                view,
                data_file,
            } => {
                match trace_qcow2(
                    image,
                    view,
                    data_file.as_deref(),
                    guest,
                    depth,
                    &name,
                    next.as_deref(),
                    &mut steps,
                ) {
                    Some(o) => {
                        outcome = o;
                        break;
                    }
                    None => {
                        if next.is_none() {
                            outcome = format!(
                                "zeros: unallocated in every layer (the last one, {name}, has no backing file)"
                            );
                        }
                    }
                }
            }
        }
    }
    let (answer, error) = if guest < chain.size() {
        match crate::map::decide(chain, guest) {
            Ok(e) => (Some(e), None),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        (None, None)
    };
    Trace {
        guest_offset: guest,
        view,
        steps,
        outcome,
        answer,
        error,
    }
}

/// Trace within one qcow2 layer; `Some(outcome)` if the lookup ends here.
#[allow(clippy::too_many_arguments)]
fn trace_qcow2(
    img: &Qcow2,
    view: &View,
    data_file: Option<&dyn crate::io::Source>,
    guest: u64,
    depth: usize,
    name: &str,
    next: Option<&str>,
    steps: &mut Vec<Step>,
) -> Option<String> {
    let geo = img.geometry();
    let g = GuestOffset(guest);
    let (l1i, l2i, inc) = (geo.l1_index(g), geo.l2_index(g), geo.in_cluster(g));
    let sc = geo.subcluster_index(g);
    let mut t = LayerSteps {
        depth,
        name,
        next,
        steps,
    };
    t.push(StepKind::Split {
            format: "qcow2".into(),
            layer_size: view.size,
            cluster_size: Some(geo.cluster_size()),
            l1_index: Some(l1i),
            l2_index: Some(l2i),
            in_cluster: Some(inc),
            subcluster: geo.extended_l2.then_some(sc),
        },
        format!(
            "With {}-byte clusters and {} entries per L2 table, guest offset {guest:#x} is L1 index {l1i}, L2 index {l2i}, byte {inc:#x} of the cluster{}.",
            geo.cluster_size(),
            geo.l2_entries(),
            if geo.extended_l2 {
                format!(", subcluster {sc}")
            } else {
                String::new()
            }
        ),
    );
    let Some(l1e) = usize::try_from(l1i)
        .ok()
        .and_then(|i| view.l1.get(i))
        .copied()
    else {
        t.push(StepKind::BeyondL1 {
                l1_index: l1i,
                l1_size: view.l1.len() as u64,
            },
            format!(
                "The {} has only {} entries, so index {l1i} is beyond it: nothing is allocated here.",
                view.label(),
                view.l1.len()
            ),
        );
        return t.fall("This range is unallocated in this layer.");
    };
    let l1m = l1e.mapping();
    let l1_entry_off = view.l1_offset.saturating_add(l1i.saturating_mul(8));
    t.push(
        StepKind::L1Entry {
            table: view.label(),
            index: l1i,
            entry_offset: l1_entry_off,
            raw: format!("{:#018x}", l1e.0),
            l2_offset: l1m.l2_offset().map(|o| o.to_string()),
            copied: l1e.copied(),
            reserved: (l1e.reserved_bits() != 0).then(|| format!("{:#x}", l1e.reserved_bits())),
        },
        format!(
            "{} entry {l1i} (at file offset {l1_entry_off:#x}) is {:#018x}: {}.",
            view.label(),
            l1e.0,
            L1Entry::describe(&l1e, &geo)
        ),
    );
    let L1Mapping::L2Table { offset: l2_off, .. } = l1m else {
        return t.fall("The L1 entry is 0, so no L2 table covers this range.");
    };
    if !geo.is_cluster_aligned(l2_off.0)
        && let Err(Error::GuestIo { reason, .. }) = layer_run(img, view, guest, 1, name)
    {
        t.push(
            StepKind::Error {
                message: reason.clone(),
            },
            format!("{} QEMU fails the read with EIO.", eio_why(&reason)),
        );
        return Some(format!("I/O error in {name}: {reason}"));
    }
    let l2 = match img.l2_table(l2_off) {
        Ok(t) => t,
        Err(e) => {
            t.push(
                StepKind::Error {
                    message: e.to_string(),
                },
                format!("The L2 table could not be read: {e}."),
            );
            return Some(format!("error: {e}"));
        }
    };
    let e = l2
        .get(l2i as usize)
        .copied()
        .unwrap_or(L2Entry { raw: 0, bitmap: 0 });
    let has_df = img.header.has_data_file();
    let m = e.mapping(&geo, has_df);
    let (ct, st) = (m.cluster_type(), m.subcluster_type(sc));
    let entry_off = l2_off
        .0
        .saturating_add(l2i.saturating_mul(geo.l2_entry_size()));
    let past = l2_off.0 >= img.file_len();
    t.push(StepKind::L2Entry {
            table_offset: l2_off.to_string(),
            index: l2i,
            entry_offset: entry_off,
            raw: format!("{:#018x}", e.raw),
            bitmap: geo.extended_l2.then(|| format!("{:#018x}", e.bitmap)),
            cluster_type: format!("{ct:?}").to_lowercase(),
            subcluster_type: st.name().into(),
            // Offset 0 is a host cluster too where an external data file holds the
            // data (guest offset = host offset).
            host_offset: m.host_offset().map(|h| h.to_string()),
            copied: e.copied(),
            compressed: match m {
                L2Mapping::Compressed { descriptor, .. } => Some(descriptor),
                _ => None,
            },
            reserved: (e.reserved_bits(&geo) != 0).then(|| format!("{:#x}", e.reserved_bits(&geo))),
        },
        format!(
            "L2 table at {l2_off}{}, entry {l2i} (at file offset {entry_off:#x}) is {:#018x}{}: {}.",
            if past {
                " (past the end of the file, so it reads as zeros)"
            } else {
                ""
            },
            e.raw,
            if geo.extended_l2 {
                format!(" with bitmap {:#018x}", e.bitmap)
            } else {
                String::new()
            },
            e.describe(&geo, has_df)
        ),
    );
    // The decision is layer_run's, the same one map and read use; the steps above
    // only show what it looked at.
    let run = match layer_run(img, view, guest, 1, name) {
        Ok(r) => r,
        Err(Error::GuestIo { reason, .. }) => {
            t.push(
                StepKind::Error {
                    message: reason.clone(),
                },
                format!("{} QEMU fails the read with EIO.", eio_why(&reason)),
            );
            return Some(format!("I/O error in {name}: {reason}"));
        }
        Err(e) => {
            t.push(
                StepKind::Error {
                    message: e.to_string(),
                },
                format!("The read fails: {e}."),
            );
            return Some(format!("error: {e}"));
        }
    };
    let at = Place {
        img,
        data_file,
        guest,
        sc,
        inc,
        host_cluster: m.host_offset().unwrap_or_default(),
    };
    conclude(&mut t, &at, run.status)
}

/// Where a traced read ends up in one qcow2 layer, for [`conclude`].
struct Place<'a> {
    img: &'a Qcow2,
    data_file: Option<&'a dyn Source>,
    guest: u64,
    /// The subcluster index and the offset in the cluster of `guest`.
    sc: u32,
    inc: u64,
    /// The L2 entry's host cluster (for data).
    host_cluster: HostOffset,
}

/// The last step of a layer's trace: what [`layer_run`] decided (`status`),
/// explained; `Some(outcome)` if the lookup ends in this layer.
fn conclude(t: &mut LayerSteps<'_>, at: &Place<'_>, status: Status) -> Option<String> {
    let Place {
        img,
        data_file,
        guest,
        sc,
        inc,
        host_cluster: hc,
    } = *at;
    let geo = img.geometry();
    let name = t.name;
    match status {
        Status::Unallocated { .. } => {
            let why = if geo.extended_l2 {
                format!("Subcluster {sc} is neither allocated nor zero in this layer.")
            } else {
                "The L2 entry has no host offset and no zero flag: this cluster is unallocated in this layer.".to_string()
            };
            t.fall(&why)
        }
        Status::Zero { host } => {
            let reason = if geo.extended_l2 {
                format!("subcluster {sc}'s zero bit is set")
            } else {
                "the L2 entry's zero flag (bit 0) is set".into()
            };
            let encrypted = img.header.crypt_method != 0;
            t.push(StepKind::Zero {
                    reason: reason.clone(),
                    host_offset: host.filter(|_| !encrypted).map(|h| format!("{:#x}", h.0)),
                },
                format!(
                    "Because {reason}, the read returns zeros here without looking at any backing file."
                ),
            );
            Some(format!("zeros: {reason} in {name}"))
        }
        Status::Compressed { descriptor: d, .. } => {
            t.push(StepKind::Compressed {
                    file: name.to_string(),
                    descriptor: d,
                    in_cluster: inc,
                },
                format!(
                    "QEMU reads {} bytes at {} in {name}, inflates them ({}) to a whole {}-byte cluster, and takes byte {inc:#x} of it.",
                    d.size,
                    d.offset,
                    img.header.compression_type().qemu_name(),
                    geo.cluster_size()
                ),
            );
            Some(format!(
                "compressed data in {name}: {} bytes at {}, byte {inc:#x} of the inflated cluster",
                d.size, d.offset
            ))
        }
        Status::Data { host, in_data_file } => {
            let host = host.0;
            let (file, flen) = match (in_data_file, data_file) {
                (true, Some(df)) => (df.name().display().to_string(), df.len()),
                _ => (name.to_string(), img.file_len()),
            };
            let past_eof = host >= flen;
            t.push(StepKind::Data {
                    file: file.clone(),
                    host_offset: format!("{host:#x}"),
                    past_eof,
                },
                format!(
                    "The byte is data at host offset {hc} + {inc:#x} = {host:#x} in {file}{}.",
                    if past_eof {
                        format!(
                            ", which is past the end of that file ({flen} bytes), so it reads as zero"
                        )
                    } else {
                        String::new()
                    }
                ),
            );
            if let Some((d, why)) = crate::crypto::decrypt_step(img, host, guest) {
                t.push(StepKind::Decrypt(d), why);
            }
            Some(format!(
                "data in {file} at host offset {host:#x}{}",
                if past_eof {
                    " (past end of file: zeros)"
                } else {
                    ""
                }
            ))
        }
    }
}

/// The steps of one layer's trace, with what every step of that layer shares.
struct LayerSteps<'s> {
    depth: usize,
    name: &'s str,
    /// The backing file's name, where reads fall through to.
    next: Option<&'s str>,
    steps: &'s mut Vec<Step>,
}

impl LayerSteps<'_> {
    fn push(&mut self, kind: StepKind, explanation: String) {
        self.steps.push(Step {
            depth: self.depth,
            layer: self.name.to_string(),
            kind,
            explanation,
        });
    }

    /// The read falls through to the backing file; `Some(outcome)` if there is none.
    fn fall(&mut self, why: &str) -> Option<String> {
        let explanation = match self.next {
            Some(n) => format!(
                "{why} The read falls through to the backing file {n} at the same guest offset."
            ),
            None => format!("{why} There is no backing file, so the read returns zeros."),
        };
        let next = self.next.map(str::to_string);
        self.push(StepKind::FallThrough { next }, explanation);
        self.next.is_none().then(|| {
            format!(
                "zeros: unallocated in {}, which has no backing file",
                self.name
            )
        })
    }
}

/// A learner's sentence for one of QEMU's EIO reasons.
fn eio_why(reason: &str) -> &'static str {
    const WHY: [(&str, &str); 6] = [
        (
            "Zero cluster entry found in pre-v3",
            "Version 2 images have no zero clusters; QEMU treats the zero flag as corruption.",
        ),
        (
            "Invalid cluster entry",
            "The subcluster bitmap marks a subcluster both allocated and zero (or an unallocated cluster has allocation bits).",
        ),
        (
            "Compressed cluster entry found in image with external data file",
            "Images with an external data file cannot have compressed clusters.",
        ),
        (
            "Cluster allocation offset",
            "A data cluster must start on a cluster boundary.",
        ),
        (
            "External data file host cluster offset",
            "In an external data file, guest offset and host offset must be equal.",
        ),
        (
            "L2 table offset",
            "QEMU refuses to use an L2 table that is not cluster-aligned.",
        ),
    ];
    WHY.iter()
        .find(|(p, _)| reason.starts_with(p))
        .map_or("QEMU rejects this entry.", |(_, w)| w)
}

/// Convenience: the host offset QEMU would read for a guest offset in one layer.
pub fn host_offset_of(layer: &Layer, guest: u64) -> Result<Option<HostOffset>> {
    match &layer.kind {
        LayerKind::Raw => Ok((guest < layer.size()).then_some(HostOffset(guest))),
        LayerKind::Qcow2 { image, view, .. } => {
            let run = layer_run(image, view, guest, 1, &layer.path.display().to_string())?;
            Ok(match run.status {
                Status::Data { host, .. } => Some(host),
                _ => None,
            })
        }
    }
}

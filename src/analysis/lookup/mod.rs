//! Resolving guest reads: which layer, which host bytes, or zeros.
//!
//! For one qcow2 layer, a guest offset goes through the L1 table to an L2 table and
//! then to an L2 entry (and, with extended L2, a subcluster), exactly as QEMU's
//! `qcow2_get_host_offset` does; [`layer_run`] returns the result for a run of
//! guest bytes that all resolve the same way. [`read`] stitches runs together down
//! the backing chain, and [`trace`] records every step for one offset, with an
//! explanation a learner can follow.
//!
//! The parts: this file resolves one layer ([`layer_run`]); `read` stitches layers
//! into guest bytes ([`read`], [`for_each_segment`]); `trace` explains one offset
//! ([`trace`]).

mod read;
mod slots;
mod steps;
#[cfg(test)]
mod tests;
mod trace;

pub use read::{ReadCache, Segment, for_each_segment, read, read_compressed};
pub use slots::L2Walker;
pub use steps::{Step, StepKind, Trace};
pub use trace::trace;

use crate::chain::{Layer, LayerKind};
use crate::error::{Error, Result};
use crate::image::{Qcow2, View};

use crate::tables::{CompressedDescriptor, L1Mapping, L2Mapping, SubclusterType};
use crate::types::{GuestOffset, HostOffset};
use serde::Serialize;
use slots::L2Slots;

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
    pub guest: GuestOffset,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// How it resolves.
    pub status: Status,
    /// The subcluster type QEMU sees.
    pub subcluster: SubclusterType,
}

fn eio(guest: GuestOffset, layer: &str, reason: String) -> Error {
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
///
/// It follows `qcow2_get_host_offset` and `count_contiguous_subclusters` in QEMU's
/// order, one check after the other, which is why it is one long function; the
/// standard-L2 run count is `RunKey::run_len` (in `slots`).
pub fn layer_run(
    img: &Qcow2,
    view: &View,
    guest: GuestOffset,
    max_len: u64,
    name: &str,
) -> Result<Run> {
    run_in(img, view, guest, max_len, name, |off| img.l2_table(off))
}

/// [`layer_run`], reading the L2 table through `walker` (one reused buffer of the
/// table's bytes) instead of the image's cache of decoded tables: the same runs
/// and errors, for a walk in guest order such as `map`. A walker holds one table,
/// so a walk over several images keeps one walker per image.
pub fn layer_run_with(
    img: &Qcow2,
    view: &View,
    guest: GuestOffset,
    max_len: u64,
    name: &str,
    walker: &mut L2Walker,
) -> Result<Run> {
    run_in(img, view, guest, max_len, name, move |off| {
        walker.load(img, off)
    })
}

/// [`layer_run`] with the L2 table from `table`.
fn run_in<T: L2Slots>(
    img: &Qcow2,
    view: &View,
    guest: GuestOffset,
    max_len: u64,
    name: &str,
    table: impl FnOnce(HostOffset) -> Result<T>,
) -> Result<Run> {
    let geo = img.geometry();
    let cs = geo.cluster_size();
    let in_cluster = geo.in_cluster(guest);
    let l2_index = geo.l2_index(guest);
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
    let l1_index = geo.l1_index(guest);
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
    let l2 = table(l2_off)?;
    let has_df = img.header.has_data_file();
    let sc_index = geo.subcluster_index(guest);
    let entry = l2.entry(l2_index);
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
    let host = first_host(img, &mapping, first_type, guest, name, l2_off, l2_index)?;
    // count_contiguous_subclusters
    let nb_clusters = geo.clusters_for(needed);
    if !geo.extended_l2 && first_type != SubclusterType::Compressed {
        // Standard L2 entries: one type per cluster; a tight loop over the table.
        let end = l2_index.saturating_add(nb_clusters).min(l2.count());
        let n = l2.standard_run(l2_index, end, &geo, has_df, first_type);
        let len = n
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
        let e = l2.entry(l2_index.saturating_add(i));
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

/// The host offset of the first byte of a run whose first subcluster is of
/// type `first_type`, as QEMU's lookup checks it: refused (EIO) for a compressed
/// cluster with an external data file, an unaligned cluster, or a data-file
/// cluster whose offset is not the guest's; none for types with no host cluster.
fn first_host(
    img: &Qcow2,
    mapping: &L2Mapping,
    first_type: SubclusterType,
    guest: GuestOffset,
    name: &str,
    l2_off: HostOffset,
    l2_index: u64,
) -> Result<Option<HostOffset>> {
    let geo = img.geometry();
    let has_df = img.header.has_data_file();
    let in_cluster = geo.in_cluster(guest);
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
            let h = hc.saturating_add(in_cluster);
            // An external data file maps guest offsets to the same host offsets.
            if has_df && h.get() != guest.get() {
                return Err(eio(
                    guest,
                    name,
                    format!(
                        "External data file host cluster offset {hc} does not match guest cluster offset {:#x}",
                        geo.align_down(guest.get())
                    ),
                ));
            }
            return Ok(Some(h));
        }
        _ => {}
    }
    Ok(None)
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

/// Convenience: the host offset QEMU would read for a guest offset in one layer.
pub fn host_offset_of(layer: &Layer, guest: GuestOffset) -> Result<Option<HostOffset>> {
    match &layer.kind {
        // A raw layer's guest offsets are its file's offsets.
        LayerKind::Raw => Ok((guest.get() < layer.size()).then_some(HostOffset(guest.get()))),
        LayerKind::Qcow2 { image, view, .. } => {
            let run = layer_run(image, view, guest, 1, &layer.path.display().to_string())?;
            Ok(match run.status {
                Status::Data { host, .. } => Some(host),
                _ => None,
            })
        }
    }
}

//! One guest offset's lookup, step by step, with an explanation of each step.

use super::steps::{Step, StepKind, Trace};
use super::{Status, layer_run};
use crate::chain::{Chain, Layer, LayerKind};
use crate::error::Error;
use crate::image::{Qcow2, View};
use crate::io::Source;
use crate::tables::{L1Entry, L1Mapping, L2Entry, L2Mapping};
use crate::types::{GuestOffset, HostOffset};

/// Trace the lookup of one guest offset through the chain, step by step.
pub fn trace(chain: &Chain, guest: GuestOffset) -> Trace {
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
        if guest.get() >= size {
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
                outcome = trace_raw(layer, guest, depth, &mut steps);
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
    let (answer, error) = if guest.get() < chain.size() {
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

/// The step a raw layer gives: it is read where the guest offset says, as a hole
/// or data of its file, or as the zeros past its end. Returns the trace's outcome.
fn trace_raw(layer: &Layer, guest: GuestOffset, depth: usize, steps: &mut Vec<Step>) -> String {
    let name = layer.path.display().to_string();
    let size = layer.size();
    let push = |steps: &mut Vec<Step>, kind: StepKind, explanation: String| {
        steps.push(Step {
            depth,
            layer: name.clone(),
            kind,
            explanation,
        })
    };
    let outcome;
    push(
        steps,
        StepKind::Split {
            format: "raw".into(),
            layer_size: size,
            cluster_size: None,
            l1_index: None,
            l2_index: None,
            in_cluster: None,
            subcluster: None,
        },
        format!("{name} is a raw image: guest offset {guest:#x} is byte {guest:#x} of the file."),
    );
    let flen = layer.src.len();
    // A raw layer's guest offsets are its file's offsets.
    let (zero, _) = crate::map::file_extent(layer.src.as_ref(), HostOffset(guest.get()));
    if guest.get() >= flen {
        let reason = format!(
            "byte {guest:#x} is past the end of {name} ({flen} bytes), inside QEMU's rounding of a raw file's size up to 512 bytes"
        );
        push(
            steps,
            StepKind::Zero {
                reason: reason.clone(),
                host_offset: Some(HostOffset(guest.get())),
            },
            format!("The {reason}: it reads as zero."),
        );
        outcome = format!("zeros: {reason}");
    } else if zero {
        let reason = format!("byte {guest:#x} is in a hole of {name}");
        push(
            steps,
            StepKind::Zero {
                reason: reason.clone(),
                host_offset: Some(HostOffset(guest.get())),
            },
            format!(
                "The file system stores nothing there: {reason}, so it reads as zero (qemu-img map reports it as zero, not data)."
            ),
        );
        outcome = format!("zeros: hole in {name} at {guest:#x} (raw layer {depth})");
    } else {
        push(
            steps,
            StepKind::Data {
                file: name.clone(),
                host_offset: HostOffset(guest.get()),
                past_eof: false,
            },
            format!("The byte is read from {name} at offset {guest:#x}."),
        );
        outcome = format!("data in {name} at {guest:#x} (raw layer {depth})");
    }
    outcome
}

/// Trace within one qcow2 layer; `Some(outcome)` if the lookup ends here.
#[allow(clippy::too_many_arguments)]
fn trace_qcow2(
    img: &Qcow2,
    view: &View,
    data_file: Option<&dyn crate::io::Source>,
    guest: GuestOffset,
    depth: usize,
    name: &str,
    next: Option<&str>,
    steps: &mut Vec<Step>,
) -> Option<String> {
    let geo = img.geometry();
    let (l1i, l2i, inc) = (
        geo.l1_index(guest),
        geo.l2_index(guest),
        geo.in_cluster(guest),
    );
    let sc = geo.subcluster_index(guest);
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
    let l1_entry_off = view.l1_offset.saturating_entry(l1i, 8);
    t.push(
        StepKind::L1Entry {
            table: view.label(),
            index: l1i,
            entry_offset: l1_entry_off,
            raw: format!("{:#018x}", l1e.0),
            l2_offset: l1m.l2_offset(),
            copied: l1e.copied(),
            reserved: (l1e.reserved_bits() != 0).then(|| format!("{:#x}", l1e.reserved_bits())),
        },
        format!(
            "{} entry {l1i} (at file offset {l1_entry_off:#x}) is {:#018x}: {}.",
            view.label(),
            l1e.0,
            L1Entry::describe(&l1e, &geo, view.snapshot.is_none())
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
    let m = l2_entry_step(&mut t, img, view, l2_off, guest, e);
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

/// The step that shows the L2 entry `e` of `guest` in the table at `l2_off`
/// (one of `view`'s) and what it means for the subcluster of `guest`, in the
/// words of the image around it; returns the entry decoded.
fn l2_entry_step(
    t: &mut LayerSteps<'_>,
    img: &Qcow2,
    view: &View,
    l2_off: HostOffset,
    guest: GuestOffset,
    e: L2Entry,
) -> L2Mapping {
    let geo = img.geometry();
    let (l2i, sc) = (geo.l2_index(guest), geo.subcluster_index(guest));
    let has_df = img.header.has_data_file();
    let m = e.mapping(&geo, has_df);
    let (ct, st) = (m.cluster_type(), m.subcluster_type(sc));
    let entry_off = l2_off.saturating_entry(l2i, geo.l2_entry_size());
    let past = l2_off.0 >= img.file_len();
    t.push(StepKind::L2Entry {
            table_offset: l2_off,
            index: l2i,
            entry_offset: entry_off,
            raw: format!("{:#018x}", e.raw),
            bitmap: geo.extended_l2.then(|| format!("{:#018x}", e.bitmap)),
            cluster_type: format!("{ct:?}").to_lowercase(),
            subcluster_type: st.name().into(),
            // Offset 0 is a host cluster too where an external data file holds the
            // data (guest offset = host offset).
            host_offset: m.host_offset(),
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
            e.describe_in(&m, &geo, guest, &img.surroundings(view.size))
        ),
    );
    m
}

/// Where a traced read ends up in one qcow2 layer, for [`conclude`].
struct Place<'a> {
    img: &'a Qcow2,
    data_file: Option<&'a dyn Source>,
    guest: GuestOffset,
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
                    host_offset: host.filter(|_| !encrypted),
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
            let (file, flen) = match (in_data_file, data_file) {
                (true, Some(df)) => (df.name().display().to_string(), df.len()),
                _ => (name.to_string(), img.file_len()),
            };
            let past_eof = host.get() >= flen;
            t.push(StepKind::Data {
                    file: file.clone(),
                    host_offset: host,
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

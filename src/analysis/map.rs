//! The guest address space as extents, exactly as `qemu-img map --output=json`
//! reports them.
//!
//! For each guest byte QEMU works out, layer by layer from the top:
//!
//! * **depth** — how many layers down the answer came from;
//! * **present** — the layer itself has data or zeros there (not just "nothing
//!   below either");
//! * **zero** / **data** / **compressed** — what a read returns;
//! * **offset** — where the bytes are in that layer's file, when there is such a
//!   place (never for compressed or encrypted clusters).
//!
//! A qcow2 layer answers "not here" for unallocated clusters, and the question goes
//! to its backing file; with no backing file, or past the end of a shorter one, the
//! answer is "zeros, not present" at that layer's depth. A raw layer always answers:
//! data where the file system stores data, zeros in holes. Maximal runs with the same
//! answer (and contiguous offsets) become one extent.
//!
//! One detail matters for preallocated images: if a qcow2 file has about as many
//! clusters in use as it has allocated on disk, QEMU assumes metadata
//! preallocation and asks the file system about each data cluster, so data clusters
//! that sit in holes of the host file show as `zero: true, data: true`.

use crate::chain::{Chain, Layer, LayerKind};
use crate::error::Result;
use crate::image::{Qcow2, RefcountReader};
use crate::io::{Extent, Source};
use crate::lookup::{L2Walker, Status, layer_run_with};
use crate::types::{GuestOffset, HostOffset};
use serde::Serialize;

/// One extent of `qemu-img map --output=json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which layer answered (0 = top).
    pub depth: usize,
    /// That layer itself has data or zeros here.
    pub present: bool,
    /// Reads return zeros.
    pub zero: bool,
    /// Reads return stored data.
    pub data: bool,
    /// The data is compressed.
    pub compressed: bool,
    /// Where the bytes are in the answering layer's file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapEntry {
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.length != 0
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }

    /// The JSON line exactly as qemu-img prints it.
    pub fn qemu_json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start,
            self.length,
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

/// A whole map in qemu-img's JSON text (byte for byte).
pub fn qemu_json(entries: &[MapEntry]) -> String {
    let body: Vec<String> = entries.iter().map(MapEntry::qemu_json).collect();
    format!("[{}]\n", body.join(",\n"))
}

/// A layer's length as QEMU's block layer sees it.
pub fn qemu_length(layer: &Layer) -> u64 {
    layer.size()
}

/// QEMU's `qcow2_detect_metadata_preallocation`: does the file have at least as
/// many clusters in use (refcount > 0) as it has clusters stored on disk, give or
/// take 10%?
pub fn metadata_preallocated(img: &Qcow2) -> bool {
    let geo = img.geometry();
    let cs = geo.cluster_size();
    let file_length = img.file_len().div_ceil(512).saturating_mul(512);
    let real_clusters = img.src.allocated_size() >> geo.cluster_bits;
    let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters.saturating_add(2));
    let end_cluster = file_length.div_ceil(cs);
    let mut reader = RefcountReader::new(img);
    let mut count = 0u64;
    for c in 0..end_cluster {
        if count >= threshold {
            break;
        }
        match reader.get(c) {
            Ok(r) => count = count.saturating_add(u64::from(r > 0)),
            Err(_) => return false,
        }
    }
    count >= threshold
}

/// The answer of one layer for a run of bytes.
struct Answer {
    len: u64,
    data: bool,
    zero: bool,
    compressed: bool,
    allocated: bool,
    offset: Option<u64>,
}

/// Map the chain's guest space like `qemu-img map --output=json`.
pub fn map(chain: &Chain) -> Result<Vec<MapEntry>> {
    map_range(chain, 0, u64::MAX)
}

/// Map `start..start+len` (clamped to the disk), like `qemu-img map -s -l`.
pub fn map_range(chain: &Chain, start: u64, max_len: u64) -> Result<Vec<MapEntry>> {
    let prealloc: Vec<bool> = chain
        .layers
        .iter()
        .map(|l| l.qcow2().is_some_and(metadata_preallocated))
        .collect();
    let length = qemu_length(chain.top()).min(start.saturating_add(max_len));
    let mut walk = Walk::new(chain);
    let mut out: Vec<MapEntry> = Vec::new();
    let mut cur = MapEntry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
    };
    while cur.start.saturating_add(cur.length) < length {
        // The loop condition keeps off below length: neither can overflow.
        let off = cur.start.saturating_add(cur.length);
        let next = status(chain, &prealloc, &mut walk, off, length.saturating_sub(off))?;
        if cur.mergeable(&next) {
            cur.length = cur.length.saturating_add(next.length);
            continue;
        }
        if cur.length > 0 {
            out.push(cur);
        }
        cur = next;
    }
    out.push(cur);
    Ok(out)
}

/// How QEMU answers for the byte at `guest`: the [`MapEntry`] (one byte long)
/// `qemu-img map` would put it in. This is the one decision that `map` merges
/// into extents and that [`crate::lookup::trace`] explains step by step.
pub fn decide(chain: &Chain, guest: u64) -> Result<MapEntry> {
    let prealloc: Vec<bool> = chain
        .layers
        .iter()
        .map(|l| l.qcow2().is_some_and(metadata_preallocated))
        .collect();
    status(chain, &prealloc, &mut Walk::new(chain), guest, 1)
}

/// Per layer: its name in errors, and its L2 tables read in guest order.
struct Walk {
    names: Vec<String>,
    walkers: Vec<L2Walker>,
}

impl Walk {
    fn new(chain: &Chain) -> Walk {
        Walk {
            names: chain
                .layers
                .iter()
                .map(|l| l.path.display().to_string())
                .collect(),
            walkers: chain.layers.iter().map(|_| L2Walker::new()).collect(),
        }
    }
}

/// QEMU's `get_block_status` in qemu-img: ask each layer in turn.
fn status(
    chain: &Chain,
    prealloc: &[bool],
    walk: &mut Walk,
    off: u64,
    bytes: u64,
) -> Result<MapEntry> {
    let mut bytes = bytes;
    for (depth, layer) in chain.layers.iter().enumerate() {
        let a = layer_answer(chain, prealloc, walk, depth, layer, off, bytes)?;
        bytes = a.len;
        if a.data || a.zero {
            return Ok(MapEntry {
                start: off,
                length: a.len,
                depth,
                present: a.allocated,
                zero: a.zero,
                data: a.data,
                compressed: a.compressed,
                offset: a.offset,
            });
        }
    }
    // Unreachable for real chains: the last layer always answers data or zero.
    Ok(MapEntry {
        start: off,
        length: bytes.max(1),
        depth: chain.layers.len().saturating_sub(1),
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
    })
}

/// Where `host` stands in `file`, as file-posix's block status (after io.c) says.
/// Returns (zero, length) with `None` length meaning "to the end of the request".
/// Zero means a hole, or past the end of the file (QEMU rounds a raw file's size
/// up to 512 bytes; the rounded-up bytes read as zeros).
pub fn file_extent(file: &dyn Source, host: u64) -> (bool, Option<u64>) {
    let rounded = file.len().div_ceil(512).saturating_mul(512);
    if host >= file.len() {
        // Past EOF (or in the last partial sector): reads as zeros, to the end.
        return (true, None);
    }
    match file.extent_at(host) {
        Extent::Data(n) if host.saturating_add(n) >= rounded => (false, Some(n)),
        Extent::Data(n) => (false, Some(n.max(1))),
        Extent::Hole(n) if host.saturating_add(n) >= file.len() => (true, None),
        Extent::Hole(n) => (true, Some(n.max(1))),
    }
}

fn layer_answer(
    chain: &Chain,
    prealloc: &[bool],
    walk: &mut Walk,
    depth: usize,
    layer: &Layer,
    off: u64,
    bytes: u64,
) -> Result<Answer> {
    let total = qemu_length(layer);
    let bytes = bytes.min(total.saturating_sub(off));
    match &layer.kind {
        LayerKind::Raw => {
            let (zero, n) = file_extent(layer.src.as_ref(), off);
            let len = n.map_or(bytes, |n| n.min(bytes)).max(1);
            Ok(Answer {
                len,
                data: !zero,
                zero,
                compressed: false,
                allocated: true,
                offset: Some(off),
            })
        }
        LayerKind::Qcow2 {
            image,
            view,
            data_file,
        } => {
            let name = walk.names.get(depth).map_or("", String::as_str);
            let run = match walk.walkers.get_mut(depth) {
                Some(w) => layer_run_with(image, view, GuestOffset(off), bytes, name, w)?,
                None => layer_run_with(
                    image,
                    view,
                    GuestOffset(off),
                    bytes,
                    name,
                    &mut L2Walker::new(),
                )?,
            };
            let len = run.len.min(bytes).max(1);
            let encrypted = image.header.crypt_method != 0;
            let with_offset = |h: Option<HostOffset>| {
                if encrypted { None } else { h.map(|h| h.0) }
            };
            let mut a = match run.status {
                Status::Data { host, .. } => Answer {
                    len,
                    data: true,
                    zero: false,
                    compressed: false,
                    allocated: true,
                    offset: with_offset(Some(host)),
                },
                Status::Zero { host } => Answer {
                    len,
                    data: false,
                    zero: true,
                    compressed: false,
                    allocated: true,
                    offset: with_offset(host),
                },
                Status::Compressed { .. } => Answer {
                    len,
                    data: true,
                    zero: false,
                    compressed: true,
                    allocated: true,
                    offset: None,
                },
                Status::Unallocated { host } => {
                    let below = chain.layers.get(depth.saturating_add(1));
                    let zero = match below {
                        None => true,
                        Some(b) => off >= qemu_length(b),
                    };
                    Answer {
                        len,
                        data: false,
                        zero,
                        compressed: false,
                        allocated: false,
                        offset: with_offset(host),
                    }
                }
            };
            // Metadata preallocation: ask the file system about data clusters.
            if prealloc.get(depth).copied().unwrap_or(false)
                && a.data
                && !a.zero
                && let Some(host) = a.offset
            {
                let file: &dyn Source = match data_file {
                    Some(df) => df.as_ref(),
                    None => layer.src.as_ref(),
                };
                let (zero, n) = file_extent(file, host);
                if let Some(n) = n {
                    a.len = a.len.min(n);
                }
                a.zero = zero;
            }
            Ok(a)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_needs_contiguous_offsets() {
        let a = MapEntry {
            start: 0,
            length: 10,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(100),
        };
        let mut b = MapEntry {
            start: 10,
            offset: Some(110),
            ..a
        };
        assert!(a.mergeable(&b));
        b.offset = Some(111);
        assert!(!a.mergeable(&b));
        b.offset = None;
        assert!(!a.mergeable(&b));
        assert_eq!(
            a.qemu_json(),
            r#"{ "start": 0, "length": 10, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 100}"#
        );
        assert_eq!(qemu_json(&[a, b]).lines().count(), 2);
    }
}

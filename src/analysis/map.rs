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
use crate::image::Qcow2;
use crate::image::View;
use crate::io::{Extent, Source};
use crate::lookup::{L2Walker, Run, Status, layer_run, layer_run_with};
use crate::types::{GuestOffset, HostOffset};
use serde::Serialize;

/// One extent of `qemu-img map --output=json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// First guest byte.
    pub start: GuestOffset,
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
    pub offset: Option<HostOffset>,
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
            self.start.get(),
            self.length,
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {}", o.get()));
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

/// The answer of one layer for a run of bytes.
struct Answer {
    len: u64,
    data: bool,
    zero: bool,
    compressed: bool,
    allocated: bool,
    offset: Option<HostOffset>,
}

/// Map the chain's guest space like `qemu-img map --output=json`.
pub fn map(chain: &Chain) -> Result<Vec<MapEntry>> {
    map_range(chain, GuestOffset(0), u64::MAX)
}

/// Map `start..start+len` (clamped to the disk), like `qemu-img map -s -l`.
pub fn map_range(chain: &Chain, start: GuestOffset, max_len: u64) -> Result<Vec<MapEntry>> {
    let length = qemu_length(chain.top()).min(start.get().saturating_add(max_len));
    let walkers = chain.layers.iter().map(|_| L2Walker::new()).collect();
    let mut walk = Walk::new(chain, Tables::Walkers(walkers));
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
    while cur.start.get().saturating_add(cur.length) < length {
        // The loop condition keeps off below length: neither can overflow.
        let off = cur.start.saturating_add(cur.length);
        let next = status(chain, &mut walk, off, length.saturating_sub(off.get()))?;
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
///
/// It reads each L2 table it needs through the image's cache of decoded tables
/// (the tables a trace of the same offset has just read), and works out whether a
/// layer looks metadata-preallocated only when that layer answers with data.
pub fn decide(chain: &Chain, guest: GuestOffset) -> Result<MapEntry> {
    status(chain, &mut Walk::new(chain, Tables::Cached), guest, 1)
}

/// How a [`Walk`] reads L2 tables.
enum Tables {
    /// Through one [`L2Walker`] per layer, reused from one table to the next: for
    /// `map`, which visits the tables in guest order.
    Walkers(Vec<L2Walker>),
    /// Through the image's cache of decoded tables ([`layer_run`]): for one offset.
    Cached,
}

/// Per layer: its name in errors and how its L2 tables are read.
struct Walk {
    names: Vec<String>,
    tables: Tables,
}

impl Walk {
    fn new(chain: &Chain, tables: Tables) -> Walk {
        Walk {
            names: chain
                .layers
                .iter()
                .map(|l| l.path.display().to_string())
                .collect(),
            tables,
        }
    }

    /// Resolve `bytes` from `off` in the qcow2 layer at `depth`.
    fn run(
        &mut self,
        depth: usize,
        image: &Qcow2,
        view: &View,
        off: GuestOffset,
        bytes: u64,
    ) -> Result<Run> {
        let name = self.names.get(depth).map_or("", String::as_str);
        match &mut self.tables {
            Tables::Cached => layer_run(image, view, off, bytes, name),
            Tables::Walkers(walkers) => match walkers.get_mut(depth) {
                Some(w) => layer_run_with(image, view, off, bytes, name, w),
                None => layer_run(image, view, off, bytes, name),
            },
        }
    }
}

/// QEMU's `get_block_status` in qemu-img: ask each layer in turn.
fn status(chain: &Chain, walk: &mut Walk, off: GuestOffset, bytes: u64) -> Result<MapEntry> {
    let mut bytes = bytes;
    for (depth, layer) in chain.layers.iter().enumerate() {
        let a = layer_answer(chain, walk, depth, layer, off, bytes)?;
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
/// (A raw layer's guest offsets are its file's offsets.)
/// Returns (zero, length) with `None` length meaning "to the end of the request".
/// Zero means a hole, or past the end of the file (QEMU rounds a raw file's size
/// up to 512 bytes; the rounded-up bytes read as zeros).
pub fn file_extent(file: &dyn Source, host: HostOffset) -> (bool, Option<u64>) {
    let host = host.get();
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

/// With metadata preallocation QEMU asks the file system about a qcow2
/// layer's data clusters too (`BDRV_BLOCK_RECURSE`): where the data at `host`
/// stands in the file that holds it (the layer's external data file, or its
/// image file), as [`file_extent`] says. `None` where QEMU does not ask: a
/// raw layer, no metadata preallocation, or an encrypted image (whose data
/// offsets its block status does not give).
pub(crate) fn preallocated_data_extent(
    layer: &Layer,
    host: HostOffset,
) -> Option<(bool, Option<u64>)> {
    let LayerKind::Qcow2 {
        image, data_file, ..
    } = &layer.kind
    else {
        return None;
    };
    if image.header.crypt_method != 0 || !image.metadata_preallocated() {
        return None;
    }
    let file: &dyn Source = match data_file {
        Some(df) => df.as_ref(),
        None => layer.src.as_ref(),
    };
    Some(file_extent(file, host))
}

fn layer_answer(
    chain: &Chain,
    walk: &mut Walk,
    depth: usize,
    layer: &Layer,
    off: GuestOffset,
    bytes: u64,
) -> Result<Answer> {
    let total = qemu_length(layer);
    let bytes = bytes.min(total.saturating_sub(off.get()));
    match &layer.kind {
        LayerKind::Raw => {
            // A raw layer's guest offsets are its file's offsets.
            let host = HostOffset(off.get());
            let (zero, n) = file_extent(layer.src.as_ref(), host);
            let len = n.map_or(bytes, |n| n.min(bytes)).max(1);
            Ok(Answer {
                len,
                data: !zero,
                zero,
                compressed: false,
                allocated: true,
                offset: Some(host),
            })
        }
        LayerKind::Qcow2 { image, view, .. } => {
            let run = walk.run(depth, image, view, off, bytes)?;
            let len = run.len.min(bytes).max(1);
            let encrypted = image.header.crypt_method != 0;
            let with_offset = |h: Option<HostOffset>| {
                if encrypted { None } else { h }
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
                        Some(b) => off.get() >= qemu_length(b),
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
            if a.data
                && !a.zero
                && let Some(host) = a.offset
                && let Some((zero, n)) = preallocated_data_extent(layer, host)
            {
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
    use crate::chain::OpenOptions;
    use crate::io::MemSource;
    use crate::tables::OFLAG_COPIED;
    use crate::testing::ImageBuilder;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    /// A built image that notes the offset of every read.
    #[derive(Debug)]
    struct Noting {
        inner: MemSource,
        reads: Mutex<Vec<u64>>,
    }

    impl Source for Noting {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.reads.lock().unwrap().push(offset);
            self.inner.read_at(buf, offset)
        }
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn name(&self) -> &std::path::Path {
            self.inner.name()
        }
    }

    #[test]
    fn decide_reads_no_l2_table_the_trace_has_read() {
        let mut b = ImageBuilder::new(16, 4 << 20);
        let data = b.cluster(&[0x11; 512]);
        let b = b.l2(1, data.get() | OFLAG_COPIED, 0);
        let src = Arc::new(Noting {
            inner: MemSource::new("built.qcow2", b.bytes()),
            reads: Mutex::new(Vec::new()),
        });
        let chain = Chain::from_source(
            src.clone(),
            Path::new("built.qcow2"),
            &OpenOptions::default(),
        )
        .unwrap();
        let l2 = chain.top().qcow2().unwrap().l1[0].l2_offset().unwrap();
        let l2_reads = || {
            let reads = src.reads.lock().unwrap();
            reads.iter().filter(|&&o| o == l2.get()).count()
        };
        assert_eq!(l2_reads(), 0, "opening reads no L2 table");
        let guest = GuestOffset((64 << 10) + 5);
        let want = MapEntry {
            start: guest,
            length: 1,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(data.saturating_add(5)),
        };
        // The trace reads the table once, and its answer is decide's.
        let t = crate::lookup::trace(&chain, guest);
        assert_eq!(t.answer, Some(want));
        assert_eq!(l2_reads(), 1);
        assert_eq!(decide(&chain, guest).unwrap(), want);
        assert_eq!(l2_reads(), 1, "decide reads the table again");
    }

    #[test]
    fn merge_needs_contiguous_offsets() {
        let a = MapEntry {
            start: GuestOffset(0),
            length: 10,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(HostOffset(100)),
        };
        let mut b = MapEntry {
            start: GuestOffset(10),
            offset: Some(HostOffset(110)),
            ..a
        };
        assert!(a.mergeable(&b));
        b.offset = Some(HostOffset(111));
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

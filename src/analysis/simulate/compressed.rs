//! Compressed guest writes (`qemu-io -c 'write -c OFFSET LENGTH'`, qemu-io's
//! default pattern 0xcd): `qcow2_co_pwritev_compressed_part` and
//! `qcow2_alloc_compressed_cluster_offset`.
//!
//! The request starts on a cluster boundary and covers whole clusters (or ends
//! at the end of the disk, the last cluster padded with zeros). Each cluster is
//! compressed with the image's type (raw deflate, QEMU's default "zlib", or one
//! zstd frame: `crate::compress::compress`) into at most one cluster less one
//! byte; one that does not fit is written as an ordinary write. A
//! compressed cluster is never written over an allocated one: QEMU fails the
//! request with EIO, after the other clusters of a request of at most
//! [`MAX_WORKERS`] clusters are placed all the same (each is a task of its
//! own, all started before any ends). Its bytes are placed by `qcow2_alloc_bytes`: right after
//! the previous compressed cluster of the same command when they fit in its
//! host cluster (or in the next one, when that is the next free cluster), else
//! at the start of a new cluster found first fit. Each host cluster the bytes
//! touch gets +1, and the L2 entry names the bytes by offset and sector count.
//!
//! QEMU compresses the clusters of one request in worker threads and places
//! each as its thread finishes, in an order that varies from run to run; the
//! simulator places them in guest order, one of the orders QEMU can take
//! (and its only one for a one-cluster request), and says so, unless it was
//! given the order of one real run ([`Sim::place_compressed_in`]).

use super::alloc::Discard;
use super::change::Target;
use super::{Sim, SimError, SimResult};
use crate::compress::compress;
use crate::header::CompressionType;
use crate::tables::{CompressedDescriptor, L2Entry};
use crate::types::{GuestOffset, HostOffset};

/// `QCOW2_MAX_WORKERS`: the tasks of one request that run at once. A
/// request of more starts one of the rest as each ends, and none once one
/// has failed.
const MAX_WORKERS: usize = 8;

impl Sim {
    /// `write -c`, then the flush of QEMU's caches at qemu-io's exit
    /// ([`Sim::held_flush`]: a compressed write is not followed by one).
    pub(super) fn write_compressed(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
        self.held_flush(true, |s| s.compressed_request(offset, length))
    }

    /// The `write -c` request itself.
    fn compressed_request(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
        let Some(end) = offset
            .checked_add(length)
            .filter(|e| e.get() <= self.disk_end())
        else {
            return Err(SimError::Qemu(format!(
                "write failed: Input/output error (the request ends past the end of the disk, {} bytes, so the block layer refuses all of it)",
                self.disk_end()
            )));
        };
        // The block layer marks the bitmaps when the request ends, whatever
        // the driver answered.
        self.mark_dirty(offset, length);
        if self.has_data_file {
            return Err(SimError::Qemu(
                "write failed: Operation not supported (compressed writes are not supported with an external data file) (ENOTSUP)".into(),
            ));
        }
        let cs = self.cs;
        if self.within(offset) != 0 || (self.within(length) != 0 && end.get() != self.disk_end()) {
            return Err(SimError::Qemu(format!(
                "write failed: Invalid argument (a compressed write covers whole clusters of {cs} bytes, or ends at the end of the disk) (EINVAL)"
            )));
        }
        let kind = self.compression_type();
        if kind == CompressionType::Zstd {
            self.note(format!(
                "zstd frame sizes computed with the system's libzstd {} (qemu-img gets the same sizes when it is linked with the same libzstd)",
                crate::compress::zstd_library_version()
            ));
        }
        let room = usize::try_from(cs.saturating_sub(1)).unwrap_or(0);
        let clusters = end.saturating_sub(offset).div_ceil(cs.max(1));
        let given = self.placement_order(offset, clusters);
        let started_at_once = clusters <= MAX_WORKERS as u64;
        // s->free_byte_offset: 0 on every fresh open.
        let mut free_byte = HostOffset(0);
        let mut failed = None;
        // Every cluster of the request holds the same pattern: one stream for
        // the whole clusters, one for a last cluster the disk's end cuts,
        // each compressed once.
        let mut streams: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
        let in_guest_order = (0..clusters).map(|i| offset.saturating_add(i.saturating_mul(cs)));
        let order: Box<dyn Iterator<Item = GuestOffset>> = match given {
            Some(v) => Box::new(v.into_iter()),
            None => Box::new(in_guest_order),
        };
        for pos in order {
            let bytes = cs.min(end.saturating_sub(pos));
            let i = match streams.iter().position(|(b, _)| *b == bytes) {
                Some(i) => i,
                None => {
                    let mut data = vec![self.data.pattern(); usize::try_from(cs).unwrap_or(0)];
                    // The last cluster of a disk that ends inside it is zero-padded.
                    let pad = usize::try_from(bytes).unwrap_or(0);
                    if let Some(tail) = data.get_mut(pad..) {
                        tail.fill(0);
                    }
                    let c = compress(kind, &data, room).map_err(|e| {
                        SimError::Qemu(format!("write failed: Input/output error ({e}) (EIO)"))
                    })?;
                    streams.push((bytes, c));
                    streams.len().saturating_sub(1)
                }
            };
            let compressed = streams.get(i).and_then(|(_, c)| c.as_deref());
            match compressed {
                None => {
                    self.note(format!(
                        "guest {pos:#x}: the cluster does not compress to less than a cluster, so it is written as it is"
                    ));
                    self.write(pos, bytes)?;
                }
                Some(stream) => {
                    if !self.place_compressed(pos, stream, &mut free_byte)? {
                        let e = SimError::Qemu(format!(
                            "write failed: Input/output error (guest {pos:#x} is already allocated, and a compressed cluster never overwrites one) (EIO)"
                        ));
                        if !started_at_once {
                            return Err(SimError::NotModelled(format!(
                                "a compressed write of more than {MAX_WORKERS} clusters over an allocated one (guest {pos:#x}): which of its clusters QEMU starts after the failure depends on the order its threads finish"
                            )));
                        }
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The next compressed write places the clusters of its request in
    /// `order` (their guest offsets, each once), as one real run of QEMU
    /// placed them, instead of in guest order: QEMU's compression threads
    /// finish in an order that varies between runs, and a comparison with
    /// one run follows the order it took. An `order` that is not of the
    /// request's clusters is not followed.
    pub fn place_compressed_in(&mut self, order: Vec<GuestOffset>) {
        self.compressed_order = Some(order);
    }

    /// The order the `clusters` clusters of a compressed write from `offset`
    /// are placed in: the one given ([`Sim::place_compressed_in`]) when it is
    /// of these clusters, else `None`, guest order, said to be one of QEMU's.
    fn placement_order(&mut self, offset: GuestOffset, clusters: u64) -> Option<Vec<GuestOffset>> {
        let cs = self.cs;
        let nth = |i: u64| offset.saturating_add(i.saturating_mul(cs));
        if let Some(given) = self.compressed_order.take() {
            let mut sorted = given.clone();
            sorted.sort_unstable();
            if sorted.len() as u64 == clusters && (0u64..).zip(&sorted).all(|(i, g)| *g == nth(i)) {
                if given != sorted {
                    self.note(
                        "the clusters of the request are taken in the order given, that of one run of QEMU".into(),
                    );
                }
                return Some(given);
            }
        }
        if clusters > 1 {
            self.note(format!(
                "QEMU compresses the {clusters} clusters of this request in parallel and takes each as its compression ends, in an order that varies between runs: here they are taken in guest order, one of the orders QEMU can take"
            ));
        }
        None
    }

    /// `qcow2_alloc_compressed_cluster_offset` for the cluster at `guest`:
    /// `false` when the cluster is already allocated (QEMU's EIO).
    fn place_compressed(
        &mut self,
        guest: GuestOffset,
        stream: &[u8],
        free_byte: &mut HostOffset,
    ) -> SimResult<bool> {
        let l2 = self.cluster_table(guest)?;
        let index = self.geo.l2_index(guest);
        let (raw, _) = self.l2_entry_at(l2, index);
        if L2Entry::from_word(raw).host_offset().0 != 0 {
            return Ok(false);
        }
        let size = stream.len() as u64;
        let at = self.alloc_bytes(size, free_byte, guest)?;
        let first = at.get() >> 9;
        let last = at.get().saturating_add(size).saturating_sub(1) >> 9;
        let entry = CompressedDescriptor::encode(
            at.get(),
            last.saturating_sub(first).saturating_add(1),
            &self.geo,
        );
        self.overlap_check(None, at, size)?;
        self.write_bytes(at, stream)?;
        self.why(format!(
            "guest {guest:#x} is now {size} compressed bytes at host {at:#x}"
        ));
        self.set_l2_entry(l2, index, entry, 0)?;
        Ok(true)
    }

    /// `qcow2_alloc_bytes`: `size` bytes for compressed data.
    fn alloc_bytes(
        &mut self,
        size: u64,
        free_byte: &mut HostOffset,
        guest: GuestOffset,
    ) -> SimResult<HostOffset> {
        let cs = self.cs;
        let none = HostOffset(0);
        let mut offset = *free_byte;
        if offset != none && self.get_refcount(self.cluster_of(offset))? == self.max_refcount {
            offset = none;
        }
        let mut free_in_cluster = cs.saturating_sub(self.within(offset));
        loop {
            if offset == none || free_in_cluster < size {
                let c = self.find_free(1)?;
                let new = self.cluster_start(c);
                if new == none {
                    return Err(SimError::Qemu(
                        "write failed: Input/output error (Preventing invalid allocation of compressed cluster at offset 0) (EIO)".into(),
                    ));
                }
                if offset == none || offset.get().next_multiple_of(cs) != new.get() {
                    offset = new;
                    free_in_cluster = cs;
                } else {
                    free_in_cluster = free_in_cluster.saturating_add(cs);
                }
            }
            let saved = self.reason.clone();
            self.why(format!("compressed data of guest {guest:#x}"));
            let r = self.update_refcount(offset, size, 1, false, Discard::Never);
            self.reason = saved;
            match r {
                Ok(()) => break,
                Err(SimError::Again) => {
                    offset = none;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        self.record(
            Target::Allocate {
                offset,
                length: size,
                purpose: format!("compressed data of guest {guest:#x}"),
            },
            self.cluster_of(offset),
            self.cluster_of(offset),
        );
        self.allocated
            .push((offset, size, format!("compressed data of guest {guest:#x}")));
        let next = offset.saturating_add(size);
        *free_byte = if self.within(next) == 0 { none } else { next };
        Ok(offset)
    }
}

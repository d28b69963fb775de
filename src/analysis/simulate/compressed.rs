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
//! request with EIO. Its bytes are placed by `qcow2_alloc_bytes`: right after
//! the previous compressed cluster of the same command when they fit in its
//! host cluster (or in the next one, when that is the next free cluster), else
//! at the start of a new cluster found first fit. Each host cluster the bytes
//! touch gets +1, and the L2 entry names the bytes by offset and sector count.
//!
//! QEMU compresses the clusters of one request in worker threads and places
//! each as its thread finishes; the simulator places them in guest order,
//! which is QEMU's order for a one-cluster request.

use super::alloc::Discard;
use super::change::Target;
use super::{Sim, SimError, SimResult};
use crate::compress::compress;
use crate::header::CompressionType;
use crate::tables::{CompressedDescriptor, L2Entry};
use crate::types::{GuestOffset, HostOffset};

impl Sim {
    /// `write -c`.
    pub(super) fn write_compressed(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
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
        let mut data = vec![self.data.pattern(); usize::try_from(cs).unwrap_or(0)];
        // s->free_byte_offset: 0 on every fresh open.
        let mut free_byte = HostOffset(0);
        let mut pos = offset;
        while pos < end {
            let bytes = cs.min(end.saturating_sub(pos));
            // The last cluster of a disk that ends inside it is zero-padded.
            let pad = usize::try_from(bytes).unwrap_or(0);
            if let Some(tail) = data.get_mut(pad..) {
                tail.fill(0);
            }
            let compressed = compress(kind, &data, room).map_err(|e| {
                SimError::Qemu(format!("write failed: Input/output error ({e}) (EIO)"))
            })?;
            match compressed {
                None => {
                    self.note(format!(
                        "guest {pos:#x}: the cluster does not compress to less than a cluster, so it is written as it is"
                    ));
                    self.write(pos, bytes)?;
                }
                Some(stream) => self.place_compressed(pos, &stream, &mut free_byte)?,
            }
            pos = pos.saturating_add(bytes);
        }
        Ok(())
    }

    /// `qcow2_alloc_compressed_cluster_offset` for the cluster at `guest`.
    fn place_compressed(
        &mut self,
        guest: GuestOffset,
        stream: &[u8],
        free_byte: &mut HostOffset,
    ) -> SimResult<()> {
        let l2 = self.cluster_table(guest)?;
        let index = self.geo.l2_index(guest);
        let (raw, _) = self.l2_entry_at(l2, index);
        if L2Entry::from_word(raw).host_offset().0 != 0 {
            return Err(SimError::Qemu(format!(
                "write failed: Input/output error (guest {guest:#x} is already allocated, and a compressed cluster never overwrites one) (EIO)"
            )));
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
        Ok(())
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

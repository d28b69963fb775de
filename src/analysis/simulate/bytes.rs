//! Host bytes: the clusters the simulation has read or changed, laid over the
//! read-only image, and the image they make.

use super::Sim;
use super::SimError;
use super::SimResult;
use super::change::Target;
use super::{BDRV_MAX_LENGTH, MAX_FILE_LEN};
use crate::header::Field;
use crate::io::SharedSource;
use crate::io::Source;
use crate::types::{GuestOffset, HostOffset, low_mask};
use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;

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

pub(super) type ClusterMap = HashMap<u64, Box<[u8]>, std::hash::BuildHasherDefault<ClusterHasher>>;

impl Sim {
    // ---- bytes -------------------------------------------------------------

    /// The cluster holding byte `off` (`off / cs`), host or guest.
    pub(super) fn cluster_of(&self, off: impl Into<u64>) -> u64 {
        off.into() >> self.geo.cluster_bits
    }

    /// Where byte `off` sits in its cluster (`off % cs`), host or guest.
    pub(super) fn within(&self, off: impl Into<u64>) -> u64 {
        off.into() & low_mask(self.geo.cluster_bits)
    }

    /// The first byte of the guest cluster holding `guest`.
    pub(super) fn guest_cluster_start(&self, guest: GuestOffset) -> GuestOffset {
        GuestOffset(self.geo.align_down(guest.get()))
    }

    /// First byte of host cluster `c` (saturating: an index read from disk
    /// cannot wrap).
    pub(super) fn cluster_start(&self, c: u64) -> HostOffset {
        HostOffset(c.saturating_mul(self.cs))
    }

    /// `n` clusters in bytes (saturating).
    pub(super) fn clusters_bytes(&self, n: u64) -> u64 {
        n.saturating_mul(self.cs)
    }

    /// Cluster `c`, to change: it is kept (packed when it leaves the cache)
    /// until the simulation ends.
    pub(super) fn cluster(&mut self, c: u64) -> &mut [u8] {
        self.clusters.get(c, &self.base, self.zero_from, true)
    }

    /// Cluster `c` to read, not to change: once it leaves the cache it is
    /// read from the file again.
    pub(super) fn cluster_ro(&mut self, c: u64) -> &[u8] {
        self.clusters.get(c, &self.base, self.zero_from, false)
    }

    /// `len` bytes of the simulated file from `off`.
    pub(super) fn read_bytes(&mut self, off: HostOffset, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        let off = off.get();
        let mut pos = off;
        let end = off.saturating_add(len);
        while pos < end {
            let c = self.cluster_of(pos);
            let within = self.within(pos) as usize;
            // 1..=cs - within bytes, so pos moves on and stays <= end.
            let n =
                (end.saturating_sub(pos) as usize).min((self.cs as usize).saturating_sub(within));
            let cl = self.cluster_ro(c);
            out.extend_from_slice(crate::bytes::slice(cl, within, n));
            pos = pos.saturating_add(n as u64);
        }
        out
    }

    /// Write `data` at `off`, a write QEMU can make ([`Sim::write_end`]).
    pub(super) fn write_bytes(&mut self, off: HostOffset, data: &[u8]) -> SimResult<()> {
        let end = self.write_end(off, data.len() as u64)?;
        self.written(off, end);
        let mut pos = off.get();
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
        Ok(())
    }

    /// What a write of `off..end` does besides its bytes: the overlap
    /// check's memo learns of a write into the refcount table, data there
    /// is replaced, and the file grows to `end`.
    pub(super) fn written(&mut self, off: HostOffset, end: HostOffset) {
        let table_end = self
            .refcount_table_offset
            .saturating_add(self.clusters_bytes(u64::from(self.refcount_table_clusters)));
        if off < table_end && self.refcount_table_offset < end {
            self.reftable_writes = self.reftable_writes.wrapping_add(1);
        }
        // Metadata (or compressed data) replaces whatever data was there.
        self.data.map.remove(off.get(), end.saturating_sub(off));
        self.file_len = self.file_len.max(end.get());
    }

    /// Where a write of `len` bytes at `off` would end, or QEMU's error for
    /// it. Like QEMU (`bdrv_check_request`), a write that would end past
    /// `BDRV_MAX_LENGTH` (2^63 less 1 GiB) fails (EIO) instead of landing
    /// anywhere: offsets computed from hostile header or table fields
    /// saturate to `u64::MAX`, and must not wrap around to real metadata or
    /// grow the file without bound.
    pub(super) fn write_end(&self, off: HostOffset, len: u64) -> SimResult<HostOffset> {
        let Some(end) = off.checked_add(len).filter(|e| e.get() <= BDRV_MAX_LENGTH) else {
            return Err(SimError::Qemu(format!(
                "a write of {len} bytes at {off:#x} ends past the largest offset QEMU can write (EIO)"
            )));
        };
        // A file system would refuse to grow the file that far (ext4 stops at
        // 16 TiB); QEMU then fails the write.
        if end.get() > MAX_FILE_LEN && end.get() > self.file_len {
            return Err(SimError::Qemu(format!(
                "a write at {off:#x} would grow the image file to {} bytes, past what file systems allow (EFBIG)",
                end.get()
            )));
        }
        Ok(end)
    }

    /// The 8-byte big-endian word at `off`.
    pub(super) fn read_u64(&mut self, off: HostOffset) -> u64 {
        let within = self.within(off) as usize;
        let c = self.cluster_of(off);
        crate::bytes::be64(self.cluster_ro(c), within)
    }

    /// Write the 8-byte big-endian word `v` at `off`.
    pub(super) fn write_u64(&mut self, off: HostOffset, v: u64) -> SimResult<()> {
        self.write_bytes(off, &v.to_be_bytes())
    }

    /// Header field `f` as the simulated image holds it now.
    pub(super) fn header_field(&mut self, f: Field) -> u64 {
        // A version 2 header ends at 72 bytes: what follows is its header
        // extensions, and QEMU takes a field of version 3 as its default
        // (no feature bits, 16-bit refcounts, a 72-byte header).
        if self.version < f.since_version() {
            return match f {
                Field::RefcountOrder => 4,
                Field::HeaderLength => 72,
                Field::IncompatibleFeatures => self.unstored_features,
                _ => 0,
            };
        }
        // The header up to the field's end: Field::read finds it there. A
        // feature bit QEMU could not store (its header rewrite did not fit,
        // [`Sim::mark_corrupt`]) is in its memory all the same.
        let head = self.read_bytes(HostOffset(0), f.end());
        let memory = match f {
            Field::IncompatibleFeatures => self.unstored_features,
            _ => 0,
        };
        f.read(&head) | memory
    }

    /// Set header field `f` to `v` (its low `f.size()` bytes, as QEMU stores
    /// the field), and record the change if it is one.
    pub(super) fn set_header(&mut self, f: Field, v: impl Into<u64>) -> SimResult<()> {
        let v = v.into() & low_mask(u32::try_from(f.size().saturating_mul(8)).unwrap_or(64));
        // QEMU writes no field a version 2 header does not have (a feature
        // bit it sets, such as corrupt, lives only in its memory).
        if self.version < f.since_version() {
            if f == Field::IncompatibleFeatures {
                self.unstored_features = v;
            }
            return Ok(());
        }
        // The header up to the field's end, changed through the layout.
        let mut head = self.read_bytes(HostOffset(0), f.end());
        let before = f.read(&head);
        if before != v {
            f.write(&mut head, v);
            let field = usize::try_from(f.offset()).unwrap_or(usize::MAX);
            self.write_bytes(
                HostOffset(f.offset()),
                head.get(field..).unwrap_or_default(),
            )?;
            self.record(Target::Header { field: f }, before, v);
        }
        Ok(())
    }

    /// Set the field of a header extension at `at` (8 bytes) to `v`, and
    /// record the change if it is one.
    pub(super) fn set_extension_u64(
        &mut self,
        at: HostOffset,
        field: &'static str,
        v: u64,
    ) -> SimResult<()> {
        let before = self.read_u64(at);
        if before != v {
            self.write_u64(at, v)?;
            self.record(Target::ExtensionField { field, at }, before, v);
        }
        Ok(())
    }
}

/// The image after simulation: changed clusters over the original file.
#[derive(Debug)]
pub struct OverlaySource {
    pub(super) base: SharedSource,
    pub(super) cs: u64,
    pub(super) cluster_bits: u32,
    /// Changed clusters that were in the simulation's cache, as they read.
    pub(super) clusters: ClusterMap,
    /// Every other changed cluster, packed.
    pub(super) packed: super::store::PackedReader,
    pub(super) len: u64,
    pub(super) zero_from: u64,
    pub(super) name: PathBuf,
    /// The data clusters written, described.
    pub(super) data: super::DataMap,
    /// The view below, for data copied from it.
    pub(super) below: Option<std::sync::Arc<crate::chain::Chain>>,
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
            let changed = if let Some(cl) = self.clusters.get(&c) {
                dst.copy_from_slice(crate::bytes::slice(cl, within, n));
                true
            } else if let Some(cl) = self.packed.cluster(c, self.cs, &self.base)? {
                dst.copy_from_slice(crate::bytes::slice(&cl, within, n));
                true
            } else {
                self.base.read_at(dst, pos)?;
                false
            };
            if pos >= self.len || (pos >= self.zero_from && !changed) {
                dst.fill(0);
            }
            // Data written after a cut counts (what was there before is gone).
            if pos < self.len {
                for (s, l, piece) in self.data.within(pos, n as u64) {
                    let from = s.saturating_sub(pos) as usize;
                    if let Some(d) = dst.get_mut(from..from.saturating_add(l as usize)) {
                        piece.fill(d, self.below.as_deref())?;
                    }
                }
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

    /// The file the unchanged bytes come from: writing to it would change
    /// what this source reads.
    fn identity(&self) -> Option<crate::io::FileId> {
        self.base.identity()
    }
}

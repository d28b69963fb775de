//! Guest write-zeroes (`qemu-io -c 'write -z [-u] OFFSET LENGTH'`): the block
//! layer's split into an unaligned head, whole clusters and an unaligned tail
//! (`bdrv_co_do_pwrite_zeroes`), qcow2's zero clusters for what it can
//! (`qcow2_co_pwrite_zeroes`, `qcow2_subcluster_zeroize`, `zero_in_l2_slice`),
//! and a plain write of zeros where it cannot.

use super::{Sim, SimError, SimResult};
use crate::tables::{ClusterType, L2Entry, OFLAG_ZERO};
use crate::types::GuestOffset;

impl Sim {
    /// `write -z` (`unmap`: with `-u`, clusters may be released).
    pub(super) fn write_zeroes(&mut self, offset: u64, length: u64, unmap: bool) -> SimResult<()> {
        let Some(end) = offset.checked_add(length).filter(|&e| e <= self.size) else {
            return Err(SimError::Qemu(format!(
                "write failed: Input/output error (the request ends past the end of the disk, {} bytes, so the block layer refuses all of it)",
                self.size
            )));
        };
        if self.geo.extended_l2 || self.has_data_file {
            return Err(SimError::NotModelled(
                "write-zeroes with extended L2 entries or an external data file".into(),
            ));
        }
        self.mark_dirty(offset, length);
        let cs = self.cs;
        // bdrv_co_do_pwrite_zeroes: the head up to the first cluster boundary,
        // then the rest, less an unaligned tail when more than a cluster is left.
        let mut pos = offset;
        let mut head = self.within(offset);
        while pos < end {
            let rest = end.saturating_sub(pos);
            let tail = self.within(end);
            let n = if head != 0 {
                let n = rest.min(cs.saturating_sub(head));
                head = 0;
                n
            } else if tail != 0 && rest > cs {
                rest.saturating_sub(tail)
            } else {
                rest
            };
            self.pwrite_zeroes(pos, n, unmap)?;
            pos = pos.saturating_add(n);
        }
        Ok(())
    }

    /// `qcow2_co_pwrite_zeroes` for one piece; a plain write of zeros when
    /// qcow2 says ENOTSUP (the block layer's bounce-buffer fallback).
    fn pwrite_zeroes(&mut self, off: u64, n: u64, unmap: bool) -> SimResult<()> {
        let cs = self.cs;
        let end = off.saturating_add(n);
        let head = self.within(off);
        let mut tail = end.div_ceil(cs).saturating_mul(cs).saturating_sub(end);
        if end == self.size & !511 {
            tail = 0;
        }
        let (mut start, mut stop) = (off, end);
        if head != 0 || tail != 0 {
            // Only when the rest of the cluster already reads as zeros does
            // qcow2 make the whole cluster a zero cluster.
            let c0 = off.saturating_sub(head);
            let rest_end = c0.saturating_add(cs).min(self.size);
            match self.reads_as_zero(c0, (c0, off), (end, rest_end))? {
                Some(true) => {
                    start = c0;
                    stop = c0.saturating_add(cs).min(self.size);
                }
                Some(false) => {
                    self.note(format!(
                        "guest {off:#x}..{end:#x} is not a whole cluster and the rest of it is not zeros: QEMU writes zeros there (ENOTSUP fallback)"
                    ));
                    return self.write(off, n);
                }
                None => {
                    return Err(SimError::NotModelled(
                        "a partial-cluster write-zeroes over a backing file (QEMU asks the backing chain whether the rest reads as zeros)".into(),
                    ));
                }
            }
        }
        if self.version < 3 {
            let has_backing = self.backing.is_some() || self.backing_named;
            if has_backing {
                self.note(format!(
                    "compat=0.10 with a backing file has no zero clusters: QEMU writes zeros at guest {start:#x}..{stop:#x}"
                ));
                return self.write(off, n);
            }
            // Without a backing file, version 2 discards instead.
            return self.discard_clusters(start, stop, false);
        }
        self.zero_clusters(start, stop, unmap)
    }

    /// Whether the parts `head` and `tail` of the guest cluster at `c0` (the
    /// rest of it, around a partial write-zeroes) read as zeros: `None` when
    /// that depends on a backing file qinspect does not look into.
    fn reads_as_zero(
        &mut self,
        c0: u64,
        head: (u64, u64),
        tail: (u64, u64),
    ) -> SimResult<Option<bool>> {
        let i = self.geo.l1_index(GuestOffset(c0));
        let e = self.l1.get(i as usize).copied().unwrap_or(0);
        let l2 = crate::tables::L1Entry(e).l2_offset().map_or(0, |o| o.0);
        let has_backing = self.backing.is_some() || self.backing_named;
        // Unallocated here: the backing file answers (for an overlay, the
        // image under it).
        let below = |me: &Self| -> Option<bool> {
            if !has_backing {
                return Some(true);
            }
            let h = me.base_reads_zero(head.0, head.1)?;
            let t = me.base_reads_zero(tail.0, tail.1)?;
            Some(h && t)
        };
        if l2 == 0 {
            return Ok(below(self));
        }
        let (raw, bm) = self.l2_entry_at(l2, self.geo.l2_index(GuestOffset(c0)));
        Ok(
            match (L2Entry { raw, bitmap: bm }).cluster_type(&self.geo, self.has_data_file) {
                ClusterType::ZeroPlain | ClusterType::ZeroAlloc => Some(true),
                ClusterType::Unallocated => below(self),
                ClusterType::Normal | ClusterType::Compressed => Some(false),
            },
        )
    }

    /// `zero_in_l2_slice` over whole clusters `start..stop`.
    fn zero_clusters(&mut self, mut start: u64, stop: u64, unmap: bool) -> SimResult<()> {
        let cs = self.cs;
        let slice = self.slice_entries();
        while start < stop {
            let l2_index = self.geo.l2_index(GuestOffset(start));
            let n = stop
                .saturating_sub(start)
                .div_ceil(cs)
                .min(slice.saturating_sub(l2_index.checked_rem(slice).unwrap_or(0)))
                .max(1);
            self.why("write-zeroes");
            let l2 = self.cluster_table(start)?;
            for k in 0..n {
                let index = l2_index.saturating_add(k);
                let (raw, bm) = self.l2_entry_at(l2, index);
                let ty = L2Entry { raw, bitmap: bm }.cluster_type(&self.geo, self.has_data_file);
                let allocated = matches!(
                    ty,
                    ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed
                );
                let release = ty == ClusterType::Compressed || (unmap && allocated);
                let new = if release { 0 } else { raw } | OFLAG_ZERO;
                if new == raw {
                    continue;
                }
                let g = start.saturating_add(k.saturating_mul(cs));
                self.why(format!(
                    "guest {g:#x} is now a zero cluster{}",
                    if release {
                        ", its cluster released"
                    } else if allocated {
                        ", keeping its cluster"
                    } else {
                        ""
                    }
                ));
                self.set_l2_entry(l2, index, new, bm)?;
                if release {
                    self.free_any_cluster(raw, &format!("the zeroed cluster of guest {g:#x}"));
                }
            }
            start = start.saturating_add(n.saturating_mul(cs));
        }
        Ok(())
    }
}

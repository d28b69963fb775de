//! Guest discards (`qcow2_co_pdiscard`, `discard_in_l2_slice`).

use super::Sim;
use super::SimError;
use super::SimResult;
use super::alloc::Discard;
use crate::tables::ClusterType;
use crate::tables::L2Entry;
use crate::types::{GuestOffset, HostOffset};

impl Sim {
    /// A guest discard, then the flush of QEMU's caches at qemu-io's exit
    /// ([`Sim::held_flush`]: a discard request is not followed by one).
    /// QEMU's refcount cache, empty at the open, is followed through its
    /// releases ([`Sim::release_watch_start`]).
    pub(super) fn discard(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
        self.release_watch_from_open();
        self.held_flush(true, |s| s.discard_request(offset, length))
    }

    /// A guest discard request (`qcow2_co_pdiscard` after the block layer's
    /// alignment).
    fn discard_request(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
        let cs = self.cs;
        let Some(end) = offset
            .checked_add(length)
            .filter(|e| e.get() <= self.disk_end())
        else {
            return Err(SimError::Qemu(format!(
                "discard failed: Input/output error (the request ends past the end of the disk, {} bytes, so the block layer refuses all of it)",
                self.disk_end()
            )));
        };
        self.mark_dirty(offset, length);
        let has_backing = self.backing.is_some() || self.backing_named;
        if self.version < 3 && has_backing {
            self.note(
                "compat=0.10 image with a backing file: QEMU cannot discard (ENOTSUP, ignored)"
                    .into(),
            );
            return Ok(());
        }
        // The block layer splits off unaligned head and tail; qcow2 ignores them,
        // except a tail that ends exactly at an unaligned end of the disk.
        let start = GuestOffset(offset.get().div_ceil(cs).saturating_mul(cs));
        let mut stop = GuestOffset(self.geo.align_down(end.get()));
        if end.get() == self.disk_end() && !end.is_multiple_of(cs) && offset <= stop {
            stop = GuestOffset(end.get().div_ceil(cs).saturating_mul(cs));
        }
        if !offset.is_multiple_of(cs) {
            self.note(format!(
                "the unaligned head {offset:#x}..{:#x} is ignored (not a whole cluster)",
                start.min(end)
            ));
        }
        if !end.is_multiple_of(cs) && stop < end {
            self.note(format!(
                "the unaligned tail {:#x}..{end:#x} is ignored (not a whole cluster)",
                stop.max(start)
            ));
        }
        self.discard_clusters(start, stop, false)
    }

    /// QEMU's `qcow2_cluster_discard` over whole clusters `start..stop` (`stop`
    /// may be the unaligned end of the disk). A full discard (shrinking) leaves
    /// the entries 0, so they fall through to the backing file.
    pub(super) fn discard_clusters(
        &mut self,
        mut start: GuestOffset,
        stop: GuestOffset,
        full: bool,
    ) -> SimResult<()> {
        let cs = self.cs;
        let has_backing = self.backing.is_some() || self.backing_named;
        let slice = self.slice_entries();
        while start < stop {
            let l2_index = self.geo.l2_index(start);
            let n = self
                .cluster_of(stop.saturating_sub(start))
                .min(slice.saturating_sub(l2_index.checked_rem(slice).unwrap_or(0)))
                .max(1);
            self.why("discard");
            let l2 = self.cluster_table(start)?;
            for k in 0..n {
                let index = l2_index.saturating_add(k);
                let (raw, bm) = self.l2_entry_at(l2, index);
                let ty = L2Entry { raw, bitmap: bm }.cluster_type(&self.geo, self.has_data_file);
                let allocated = matches!(
                    ty,
                    ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed
                );
                if !(full || has_backing || allocated) {
                    continue;
                }
                let new_entry = if !full && (self.geo.extended_l2 || self.version >= 3) {
                    L2Entry::zeroed(&self.geo)
                } else {
                    L2Entry::from_word(0)
                };
                let (new, new_bm) = (new_entry.raw, new_entry.bitmap);
                if new == raw && new_bm == bm {
                    continue;
                }
                let g = start.saturating_add(k.saturating_mul(cs));
                self.why(format!(
                    "guest {g:#x} discarded: {}",
                    if full {
                        "the disk no longer reaches it"
                    } else if self.version >= 3 {
                        "now reads as zeros"
                    } else {
                        "now unallocated"
                    }
                ));
                self.set_l2_entry(l2, index, new, new_bm)?;
                // A shrink's discard always passes down to the file; a
                // guest's when the image is opened with unmap.
                self.free_any_cluster(
                    raw,
                    &format!("the discarded cluster of guest {g:#x}"),
                    if full {
                        Discard::Always
                    } else {
                        Discard::Request
                    },
                );
                self.freed_own_table(l2, index, raw)?;
            }
            start = start.saturating_add(n.saturating_mul(cs));
        }
        Ok(())
    }

    /// After entry `index` of the L2 table at `l2`, once `raw`, released its
    /// cluster within `discard_in_l2_slice` or `zero_in_l2_slice`: when that
    /// cluster is the table itself, its refcount now 0, and the slice in use
    /// is the one at the table's start, `update_refcount` drops the cached
    /// table while the loop still holds it, and `qcow2_cache_discard`'s
    /// assertion that it is not in use aborts QEMU 10.0.2 (qemu-io dies
    /// with SIGABRT, nothing more written). Not simulated.
    pub(super) fn freed_own_table(
        &mut self,
        l2: HostOffset,
        index: u64,
        raw: u64,
    ) -> SimResult<()> {
        let e = L2Entry { raw, bitmap: 0 };
        if self.has_data_file
            || !matches!(
                e.cluster_type(&self.geo, false),
                ClusterType::Normal | ClusterType::ZeroAlloc
            )
        {
            return Ok(());
        }
        let c = self.cluster_of(L2Entry::from_word(raw).host_offset());
        let first = self.slice_entries().max(1);
        if c != self.cluster_of(l2) || index >= first || self.get_refcount(c)? != 0 {
            return Ok(());
        }
        Err(SimError::NotModelled(format!(
            "an operation that releases the cluster of the L2 table at {l2:#x} from within that table (its entry {index} names it), which frees the table while QEMU's L2 cache holds it in use: QEMU 10.0.2 aborts there (qcow2_cache_discard: Assertion `c->entries[i].ref == 0' failed)"
        )))
    }
}

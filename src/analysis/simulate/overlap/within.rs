//! QEMU's whole L2 cache written back within an operation while it holds a
//! changed slice the overlap check stops ([`Sim::held_back`]): where
//! `l2_allocate` makes a new L2 table (the refcount cache written back
//! first, then the L2 cache with the new table's slices in it) and where
//! `alloc_refcount_block` makes a new refcount block (the L2 cache written
//! back first). The check stops that slice there and marks the image
//! corrupt; the other changed slices are written. The allocation fails, and
//! with it the operation: the new table's L1 entry, or the new block, is
//! never written, nor is anything QEMU's caches still hold.

use super::super::alloc::Discard;
use super::super::{Sim, SimError, SimResult};
use super::Meta;
use crate::types::HostOffset;

impl Sim {
    /// The first slice held back whose changes QEMU's L2 cache has not
    /// written back yet, with what the overlap check stops it for and where
    /// the slice starts. `site` names the write-back in words, for the
    /// refusal when what the cache holds is not followed.
    pub(in crate::analysis::simulate) fn held_unwritten(
        &mut self,
        site: &str,
    ) -> SimResult<Option<(Meta, HostOffset)>> {
        let Some(held) = self.held_l2.clone() else {
            return Ok(None);
        };
        for (l2, index, ..) in held {
            let Some(unwritten) = self.l2_slice_unwritten(l2, index) else {
                return Err(SimError::NotModelled(format!(
                    "an operation that changed an L2 slice of the table at {l2:#x} whose write-back the overlap check stops, then writes QEMU's L2 cache back where {site} (what that cache holds is not followed in this operation)"
                )));
            };
            if !unwritten {
                continue;
            }
            let (at, len) = self.slice_of(l2, index);
            if let Some(m) = self.overlap_of(Some(Meta::ActiveL2), at, len) {
                return Ok(Some((m, at)));
            }
        }
        Ok(None)
    }

    /// `alloc_refcount_block` writes QEMU's L2 cache back before it makes a
    /// new refcount block (the refcount cache first, when the L2 cache
    /// waits on it): a slice held back stops it there.
    pub(in crate::analysis::simulate) fn held_stops_new_refblock(&mut self) -> SimResult<()> {
        let site = "alloc_refcount_block makes a new refcount block";
        let Some(stop) = self.held_unwritten(site)? else {
            return Ok(());
        };
        self.l2_flushed_for_refblock();
        Err(self.held_stopped_within(stop, site))
    }

    /// `l2_allocate` fails after its write-back was stopped and frees the
    /// new table's cluster at `new` (in QEMU's refcount cache, never
    /// written), a release of the kind always passed down to the file: in a
    /// write request the cluster is discarded at once and reads as zeros
    /// from then on; in a write-zeroes itself (`qcow2_subcluster_zeroize`,
    /// which keeps its discards for its end and drops them when it fails)
    /// the cluster keeps what was written to it.
    pub(in crate::analysis::simulate) fn new_table_undone(&mut self, new: HostOffset) {
        if self.in_write_request() {
            let c = self.cluster_of(new);
            self.queue_discard(c, Discard::Always);
            self.process_discards(true);
        }
    }

    /// The overlap check has stopped the slice `stop` names in a write-back
    /// of QEMU's L2 cache at `site`: the entries held back stay as the file
    /// has them, what the caches still hold is lost, the image is marked
    /// corrupt and the operation fails (EIO): the error it fails with.
    pub(in crate::analysis::simulate) fn held_stopped_within(
        &mut self,
        stop: (Meta, HostOffset),
        site: &str,
    ) -> SimError {
        let held = self.held_l2.clone().unwrap_or_default();
        if let Err(e) = self.held_restored(&held) {
            return e;
        }
        if let Some(e) = self
            .caches_lost(|| format!("an operation stopped by QEMU's overlap check where {site},"))
        {
            return e;
        }
        self.overlap_stopped(stop.0, stop.1)
    }
}

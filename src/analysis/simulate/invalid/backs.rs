//! The write-backs of QEMU's L2 cache within one operation, for the overlap
//! check that meets a held L2 slice at one of them ([`Sim::held_flush`]):
//! every write-back writes each changed slice, and checks it. One kind is
//! followed: a write's link (`qcow2_alloc_cluster_link_l2`) after a release
//! makes the L2 cache depend on the refcount cache, and the refcount cache,
//! which since the release depends on the L2 cache, first has the L2 cache
//! written (`qcow2_cache_set_dependency`). QEMU ignores that write-back's
//! failure: the link goes on in its caches, which are never written again.

use super::super::{Sim, SimResult};
use crate::types::HostOffset;

impl Sim {
    /// The first write-back of the whole of QEMU's L2 cache that carried a
    /// change of any of the entries `held` (table, index): its step, and
    /// whether a write's link made it. `None` when no write-back carried one.
    pub(in crate::analysis::simulate) fn first_write_back_of(
        &self,
        held: &[(HostOffset, u64)],
    ) -> Option<(usize, bool)> {
        let keys: Vec<u64> = held.iter().map(|&(t, i)| self.slice_key(t, i)).collect();
        self.unflushed
            .l2_backs
            .iter()
            .find(|(_, _, carried)| carried.iter().any(|k| keys.contains(k)))
            .map(|&(at, link, _)| (at, link))
    }

    /// Undo the L2 entries changed in QEMU's L2 cache from step `at` on:
    /// the write-back at `at` was the last QEMU made.
    pub(in crate::analysis::simulate) fn l2_changes_lost_from(
        &mut self,
        at: usize,
    ) -> SimResult<()> {
        let saved = self.reason.clone();
        self.undo_l2_from(
            at,
            |_| "lost: the change sat in QEMU's L2 cache after its last write-back, never written once the image is marked corrupt",
            false,
        )?;
        self.reason = saved;
        Ok(())
    }
}

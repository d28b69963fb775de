//! Lazy refcounts (`lazy_refcounts=on`) in an operation QEMU's overlap check
//! stops at a cache write-back: the link of a write's L2 entries marks the
//! image dirty, after which QEMU's L2 cache no longer waits on its refcount
//! cache, and a flush that stops at the L2 cache never writes the refcounts.

use super::super::{Sim, SimError, SimResult};
use crate::header::Field;

impl Sim {
    /// `qcow2_alloc_cluster_link_l2` is about to set a write's L2 entries
    /// (any write: a guest write, copy-on-read's, a write-zeroes' or a
    /// compressed write's fallback to one). On an image with lazy refcounts
    /// QEMU first marks the image dirty (`qcow2_mark_dirty`: the dirty bit
    /// written to the header, once per open). From then on its refcounts
    /// need not be accurate (`qcow2_need_accurate_refcounts`): the L2 cache
    /// no longer waits on the refcount cache, and the flush after a request
    /// (`qcow2_write_caches`) writes the L2 cache only. QEMU clears the bit
    /// at the close (`qcow2_mark_clean`), so it stays only when the image
    /// is marked corrupt before that ([`Sim::mark_corrupt`]) or when the
    /// close's header rewrite does not fit its cluster
    /// ([`Sim::mark_clean_on_close`]): the simulation writes the bit in
    /// those two cases only.
    pub(in crate::analysis::simulate) fn l2_link(&mut self) {
        if self.header_field(Field::CompatibleFeatures) & 1 != 0 {
            self.unflushed.dirtied = true;
        }
    }

    /// Whether this operation marked an image with lazy refcounts dirty.
    pub(in crate::analysis::simulate) fn lazy_dirtied(&self) -> bool {
        self.unflushed.dirtied
    }

    /// The flush (after the request, or at qemu-io's exit) of an operation
    /// that marked an image with lazy refcounts dirty ([`Sim::l2_link`]) is
    /// stopped at the L2 cache by the overlap check: `qcow2_write_caches`
    /// returns before it gets to the refcount cache (which it would skip on
    /// a dirty image anyway), and QEMU, the image now unusable, never
    /// writes that cache.
    /// What it holds of the operation's refcount changes is lost, as at
    /// [`Sim::caches_lost`] (the L2 entries are the flush's to sort).
    pub(in crate::analysis::simulate) fn lazy_refcounts_lost(&mut self) -> SimResult<()> {
        let (_, rc_mark) = self.cache_marks();
        let log = &self.unflushed;
        let unknown = if !log.on {
            Some("in an operation whose use of QEMU's refcount cache is not followed")
        } else {
            log.rc.unknown()
        };
        if let Some(why) = unknown {
            return Err(SimError::NotModelled(format!(
                "an operation whose flush the overlap check stops, on an image with lazy refcounts it marked dirty, {why}"
            )));
        }
        self.drop_refcounts_cached(rc_mark)
    }
}

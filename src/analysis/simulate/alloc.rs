//! Allocation: finding free clusters first fit, taking them, and releasing
//! them (`alloc_clusters_noref`, `qcow2_alloc_clusters`, `qcow2_free_clusters`),
//! and which releases QEMU passes down to the image file ([`Discard`]).

use super::Sim;
use super::SimError;
use super::SimResult;
use super::change::Target;
use crate::refcount::get_refcount;
use crate::tables::ClusterType;
use crate::tables::CompressedDescriptor;
use crate::tables::L2Entry;
use crate::types::{HostOffset, low_mask};

/// Why QEMU releases clusters (its `enum qcow2_discard_type`), which decides
/// whether a cluster whose refcount the release brings to 0 is also
/// discarded in the image file: punched, so that its bytes read as zeros
/// afterwards (the file keeps its length). QEMU's `discard_passthrough`
/// table says which kinds pass; the file under a qcow2 image is always
/// opened with `discard=unmap`, so a kind that passes is punched.
///
/// `update_refcount` queues the discard of each cluster that reaches 0 and
/// issues the queue as it returns, or drops it when it fails; a refcount
/// walk (`qcow2_update_snapshot_refcount`) keeps the queue until the whole
/// walk is done, and drops it when the walk fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Discard {
    /// `QCOW2_DISCARD_NEVER`, never passed down: allocations, the undo of a
    /// failed update, and the old clusters a copy-on-write replaced (the
    /// next write reuses them anyway).
    Never,
    /// `QCOW2_DISCARD_ALWAYS`, always passed down: what a shrink cuts off
    /// (its clusters and L2 tables), a leak `qemu-img check -r` frees, and
    /// a bitmap's old data clusters.
    Always,
    /// `QCOW2_DISCARD_REQUEST`, a guest's discard or unmapping
    /// write-zeroes: passed down when the image is opened with unmap
    /// (`BDRV_O_UNMAP`, `pass-discard-request`'s default): qemu-io opens it
    /// so, qemu-img does not (see [`Sim::opens_with_unmap`]).
    Request,
    /// `QCOW2_DISCARD_SNAPSHOT`, passed down (`pass-discard-snapshot`
    /// defaults to on): what a snapshot create, delete or apply frees: the
    /// clusters and L2 tables its refcount walk brings to 0, the old
    /// snapshot table, a deleted snapshot's L1 table.
    Snapshot,
    /// `QCOW2_DISCARD_OTHER`, not passed down (`pass-discard-other`
    /// defaults to off): tables replaced by a copy: an L2 table's
    /// copy-on-write, a grown L1 table, a grown refcount table, the old
    /// bitmap directory and bitmap tables.
    Other,
}

impl Sim {
    /// QEMU's `alloc_clusters_noref`: `n` contiguous clusters with refcount 0,
    /// first fit from the free-cluster hint.
    pub(super) fn find_free(&mut self, n: u64) -> SimResult<u64> {
        let mut found = 0u64;
        let limit = self.free_cluster_index.saturating_add(1 << 40);
        let bb = self.block_bits();
        let order = self.order;
        let mut c = self.free_cluster_index;
        while found < n {
            if c > limit {
                self.free_cluster_index = c;
                return Err(SimError::Qemu("no free clusters found (EFBIG)".into()));
            }
            // Every cluster up to the end of c's refcount block is looked up
            // in the one block (what `get_refcount` would read for each).
            let ti = c >> bb;
            let block = match self.refcount_block_of(ti) {
                Ok(b) => b,
                Err(e) => {
                    self.free_cluster_index = c.saturating_add(1);
                    return Err(e);
                }
            };
            if let Some(bc) = block {
                self.refcount_block_used(bc, false);
            }
            let data = match block {
                Some(bc) => Some(self.clusters.get(bc, &self.base, self.zero_from, false)),
                None => None,
            };
            while found < n && c >> bb == ti {
                if c > limit {
                    self.free_cluster_index = c;
                    return Err(SimError::Qemu("no free clusters found (EFBIG)".into()));
                }
                let r = match &data {
                    Some(d) => get_refcount(d, order, c & low_mask(bb)),
                    None => 0,
                };
                // c <= limit, and found <= n: neither can overflow.
                c = c.saturating_add(1);
                if r != 0 {
                    found = 0;
                } else {
                    found = found.saturating_add(1);
                }
            }
        }
        self.free_cluster_index = c;
        // The last n clusters looked at were free.
        Ok(self.free_cluster_index.saturating_sub(n))
    }

    /// +1 on each cluster of a range just found free, and record the allocation.
    pub(super) fn take_clusters(
        &mut self,
        off: HostOffset,
        len: u64,
        first: u64,
        purpose: &str,
    ) -> SimResult<()> {
        let saved = self.reason.clone();
        self.why(format!("allocated for {purpose}"));
        if let Err(e) = self.update_refcount(off, len, 1, false, Discard::Never) {
            self.reason = saved;
            return Err(e);
        }
        self.record(
            Target::Allocate {
                offset: off,
                length: len,
                purpose: purpose.to_string(),
            },
            first,
            first,
        );
        self.allocated.push((off, len, purpose.to_string()));
        self.reason = saved;
        Ok(())
    }

    /// QEMU's `qcow2_alloc_clusters`: find, then +1 on each.
    pub(super) fn alloc_clusters(&mut self, size: u64, purpose: &str) -> SimResult<HostOffset> {
        let n = size.div_ceil(self.cs);
        if n == 0 {
            // alloc_clusters_noref(0) looks at nothing and returns the hint as it
            // stands; update_refcount of 0 bytes counts nothing.
            return Ok(self.cluster_start(self.free_cluster_index));
        }
        loop {
            match self.alloc_clusters_once(n, purpose) {
                Err(SimError::Again) => continue,
                r => return r,
            }
        }
    }

    /// One round of `qcow2_alloc_clusters`' loop.
    pub(super) fn alloc_clusters_once(&mut self, n: u64, purpose: &str) -> SimResult<HostOffset> {
        let first = self.find_free(n)?;
        // A range that does not fit in 64 bits is refused rather than wrapped.
        let range = first
            .checked_mul(self.cs)
            .zip(n.checked_mul(self.cs))
            .filter(|(off, len)| off.checked_add(*len).is_some());
        let Some((off, len)) = range else {
            return Err(SimError::Qemu(format!(
                "{n} clusters from cluster {first} do not fit in the file (EFBIG)"
            )));
        };
        // The file does not grow here: QEMU's allocation only counts the
        // clusters, and the file reaches them when a write lands there
        // (`Sim::written`), as far as that write goes (a snapshot's L1 table
        // of 20 entries puts 160 bytes into its cluster).
        let off = HostOffset(off);
        self.take_clusters(off, len, first, purpose)?;
        Ok(off)
    }

    /// QEMU's `qcow2_free_clusters`: -1 on each cluster the range touches,
    /// released as `kind` says.
    pub(super) fn free_clusters(
        &mut self,
        off: HostOffset,
        size: u64,
        purpose: &str,
        kind: Discard,
    ) {
        let saved = self.reason.clone();
        self.why(format!("released: {purpose}"));
        self.record(
            Target::Free {
                offset: off,
                length: size,
                purpose: purpose.to_string(),
            },
            0,
            0,
        );
        let looks = self.release_watch_failures();
        if let Err(e) = self.update_refcount(off, size, 1, true, kind) {
            let e = e.text();
            let first = self.cluster_of(off);
            let end = off
                .get()
                .saturating_add(size)
                .div_ceil(self.cs)
                .max(first.saturating_add(1));
            if self.release_watch_failures() > looks {
                // The look at the refcount failed before it changed: what
                // the L2 change that dropped the cluster does is only known
                // once QEMU's caches are settled.
                self.release_watch_unfreed(first, end.saturating_sub(first));
                self.note(format!(
                    "QEMU: qcow2_free_clusters failed: {e}; the refcount is not lowered"
                ));
            } else {
                let now = self.refcounts_named(first, end);
                self.note(format!(
                    "QEMU: qcow2_free_clusters failed: {e}; the range's refcounts are now: {now}"
                ));
            }
        }
        self.reason = saved;
    }

    /// Whether QEMU passes a release of `kind` down to the file, in the
    /// command this operation runs in (`discard_passthrough`).
    pub(super) fn passes(&self, kind: Discard) -> bool {
        match kind {
            Discard::Always | Discard::Snapshot => true,
            Discard::Request => self.unmap,
            Discard::Never | Discard::Other => false,
        }
    }

    /// Whether the command that runs `op` opens the image with unmap
    /// (`BDRV_O_UNMAP`), so that a guest's discard passes down to the
    /// file: qemu-io does (its guest writes, discards and reads), qemu-img
    /// (snapshot, resize, check) does not, and neither does a VM's drive
    /// by default (QMP's snapshot delete), nor a walk by itself.
    pub(super) fn opens_with_unmap(op: &super::Op) -> bool {
        use super::Op;
        matches!(
            op,
            Op::Write { .. }
                | Op::WriteCompressed { .. }
                | Op::WriteZeroes { .. }
                | Op::Read { .. }
                | Op::Discard { .. }
        )
    }

    /// Cluster `c`'s refcount has just dropped to 0 in a release of
    /// `kind`: its discard is queued when QEMU passes that kind down
    /// (`update_refcount_discard`).
    pub(super) fn queue_discard(&mut self, c: u64, kind: Discard) {
        if self.passes(kind) {
            self.discards.push(c);
        }
    }

    /// QEMU's `qcow2_process_discards`: when the update (or the walk) that
    /// queued them succeeded, every queued discard is punched in the file, in
    /// the order queued; when it failed, they are dropped.
    pub(super) fn process_discards(&mut self, ok: bool) {
        let queued = std::mem::take(&mut self.discards);
        if !ok {
            return;
        }
        for c in queued {
            if let Err(e) = self.punch_cluster(c) {
                self.note(format!(
                    "the discard of cluster {c} was not simulated: {}",
                    e.text()
                ));
            }
        }
    }

    /// A discard QEMU passes down to the image file for cluster `c`: its
    /// bytes within the file become a hole and read as zeros; the file keeps
    /// its length.
    fn punch_cluster(&mut self, c: u64) -> SimResult<()> {
        let start = self.cluster_start(c);
        let end = start.get().saturating_add(self.cs).min(self.file_len);
        let len = end.saturating_sub(start.get());
        if len == 0 {
            return Ok(());
        }
        if len == self.cs {
            // A whole cluster: held as zeros without reading it.
            self.written(start, HostOffset(end));
            self.clusters.zero(c);
            return Ok(());
        }
        self.write_bytes(start, &vec![0u8; usize::try_from(len).unwrap_or(0)])
    }

    /// QEMU's `qcow2_free_any_cluster`: the host clusters an L2 entry
    /// names, released as `kind` says.
    pub(super) fn free_any_cluster(&mut self, entry: u64, purpose: &str, kind: Discard) {
        let e = L2Entry {
            raw: entry,
            bitmap: 0,
        };
        match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Compressed => {
                let d = CompressedDescriptor::decode(entry, &self.geo);
                self.free_clusters(d.offset, d.size, purpose, kind);
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let off = L2Entry::from_word(entry).host_offset();
                if !off.is_multiple_of(self.cs) {
                    self.note(format!("Cannot free unaligned cluster {off:#x}"));
                } else if !self.has_data_file {
                    self.free_clusters(off, self.cs, purpose, kind);
                }
            }
            _ => {}
        }
    }
}

//! Allocation: finding free clusters first fit, taking them, and releasing
//! them (`alloc_clusters_noref`, `qcow2_alloc_clusters`, `qcow2_free_clusters`).

use super::Sim;
use super::SimError;
use super::SimResult;
use super::change::Target;
use crate::refcount::get_refcount;
use crate::tables::ClusterType;
use crate::tables::CompressedDescriptor;
use crate::tables::L2Entry;
use crate::types::{HostOffset, low_mask};

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
        if let Err(e) = self.update_refcount(off, len, 1, false) {
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
            .and_then(|(off, len)| Some((HostOffset(off), len, off.checked_add(len)?)));
        let Some((off, len, end)) = range else {
            return Err(SimError::Qemu(format!(
                "{n} clusters from cluster {first} do not fit in the file (EFBIG)"
            )));
        };
        self.take_clusters(off, len, first, purpose)?;
        if end > self.file_len {
            self.file_len = end;
        }
        Ok(off)
    }

    /// QEMU's `qcow2_free_clusters`: -1 on each cluster the range touches.
    pub(super) fn free_clusters(&mut self, off: HostOffset, size: u64, purpose: &str) {
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
        if let Err(e) = self.update_refcount(off, size, 1, true) {
            let e = e.text();
            self.note(format!(
                "QEMU: qcow2_free_clusters failed: {e}; the clusters are leaked"
            ));
        }
        self.reason = saved;
    }

    /// QEMU's `qcow2_free_any_cluster`.
    /// [`free_any_cluster`](Self::free_any_cluster) for a release whose
    /// discard QEMU passes down to the file (a qemu-io guest discard or an
    /// unmapping write-zeroes, `QCOW2_DISCARD_REQUEST` with `BDRV_O_UNMAP`;
    /// a shrink, `QCOW2_DISCARD_ALWAYS`): each host cluster whose refcount
    /// drops to 0 is punched, and reads as zeros afterwards (what shows when
    /// a corrupt image had put metadata in it too). The file keeps its length.
    pub(super) fn free_any_cluster_discarding(&mut self, entry: u64, purpose: &str) {
        let e = L2Entry {
            raw: entry,
            bitmap: 0,
        };
        let (first, last) = match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Compressed => {
                let d = CompressedDescriptor::decode(entry, &self.geo);
                let end = d
                    .offset
                    .get()
                    .saturating_add(d.size.max(1))
                    .saturating_sub(1);
                (self.cluster_of(d.offset), self.cluster_of(end))
            }
            ClusterType::Normal | ClusterType::ZeroAlloc if !self.has_data_file => {
                let c = self.cluster_of(L2Entry::from_word(entry).host_offset());
                (c, c)
            }
            _ => return self.free_any_cluster(entry, purpose),
        };
        let before: Vec<u64> = (first..=last)
            .map(|c| self.get_refcount(c).unwrap_or(0))
            .collect();
        self.free_any_cluster(entry, purpose);
        for (c, was) in (first..=last).zip(before) {
            if was == 0 || self.get_refcount(c).unwrap_or(1) != 0 {
                continue;
            }
            if let Err(e) = self.punch_cluster(
                c,
                &format!("the freed cluster {c} is discarded in the file: it reads as zeros"),
            ) {
                self.note(format!(
                    "the discard of cluster {c} was not simulated: {}",
                    e.text()
                ));
            }
        }
    }

    /// A discard QEMU passes down to the image file for cluster `c`: its
    /// bytes within the file become a hole and read as zeros; the file keeps
    /// its length. `why` is the reason recorded for it.
    pub(super) fn punch_cluster(&mut self, c: u64, why: &str) -> SimResult<()> {
        let start = self.cluster_start(c);
        let end = start.get().saturating_add(self.cs).min(self.file_len);
        let len = end.saturating_sub(start.get());
        if len == 0 {
            return Ok(());
        }
        let saved = self.reason.clone();
        self.why(why);
        let r = self.write_bytes(start, &vec![0u8; usize::try_from(len).unwrap_or(0)]);
        self.reason = saved;
        r
    }

    pub(super) fn free_any_cluster(&mut self, entry: u64, purpose: &str) {
        let e = L2Entry {
            raw: entry,
            bitmap: 0,
        };
        match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Compressed => {
                let d = CompressedDescriptor::decode(entry, &self.geo);
                self.free_clusters(d.offset, d.size, purpose);
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let off = L2Entry::from_word(entry).host_offset();
                if !off.is_multiple_of(self.cs) {
                    self.note(format!("Cannot free unaligned cluster {off:#x}"));
                } else if !self.has_data_file {
                    self.free_clusters(off, self.cs, purpose);
                }
            }
            _ => {}
        }
    }
}

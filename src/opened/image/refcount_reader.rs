//! A refcount reader for passes over many clusters.

use super::Qcow2;
use crate::io::read_into;
use crate::refcount::{self, RefTableEntry};
use crate::types::low_mask;
use std::sync::Arc;

/// Reads stored refcounts cluster after cluster, keeping the current refcount
/// block, for passes over many clusters.
pub struct RefcountReader<'a> {
    img: &'a Qcow2,
    /// The refcount table.
    pub table: Arc<Vec<RefTableEntry>>,
    /// log2 of refcounts per block.
    pub block_bits: u32,
    /// `entries per block - 1`: a cluster's index in its block.
    block_mask: u64,
    order: u32,
    cur: Option<(u64, Vec<u8>)>,
    cur_ti: Option<u64>,
}

impl<'a> RefcountReader<'a> {
    /// A reader over `img`'s refcounts (an unreadable table reads as empty).
    pub fn new(img: &'a Qcow2) -> Self {
        let rg = img.refcount_geometry();
        RefcountReader {
            img,
            table: img.refcount_table().unwrap_or_default(),
            block_bits: rg.block_bits(),
            block_mask: low_mask(rg.block_bits()),
            order: rg.order,
            cur: None,
            cur_ti: None,
        }
    }

    /// The raw bytes of refcount block `ti` (`None` where the table has no block),
    /// or `Err(block offset)` if the block is not cluster-aligned.
    pub fn block(&mut self, ti: u64) -> std::result::Result<Option<&[u8]>, u64> {
        let Some(e) = usize::try_from(ti).ok().and_then(|i| self.table.get(i)) else {
            return Ok(None);
        };
        let Some(off) = e.block_offset() else {
            return Ok(None);
        };
        let geo = self.img.geometry();
        if !geo.is_cluster_aligned(off.0) {
            return Err(off.0);
        }
        if self.cur.as_ref().map(|(o, _)| *o) != Some(off.0) {
            let mut buf = vec![0u8; geo.cluster_size() as usize];
            let _ = read_into(self.img.src.as_ref(), "refcount block", off, &mut buf);
            self.cur = Some((off.0, buf));
        }
        self.cur_ti = Some(ti);
        Ok(self.cur.as_ref().map(|(_, b)| b.as_slice()))
    }

    /// log2 of the refcount width.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// Call `f(k, refcount)` for each cluster `c + k` (`k < n`) whose refcount
    /// being 1 disagrees with `one` (what a COPIED flag claims). Clusters whose
    /// refcount block is misaligned are skipped, as [`RefcountReader::get`]'s
    /// callers skip them. For 16-bit refcounts a block's span that is all ones is
    /// recognised with one comparison.
    pub fn each_copied_mismatch(&mut self, c: u64, n: u64, one: bool, f: &mut dyn FnMut(u64, u64)) {
        // Evaluated at compile time, where an index out of bounds cannot compile.
        #[allow(clippy::indexing_slicing)]
        const ONES: [u8; 512] = {
            let mut a = [0u8; 512];
            let mut i = 1;
            while i < 512 {
                a[i] = 1;
                i += 2;
            }
            a
        };
        let mut k = 0u64;
        while k < n {
            let cl = c.saturating_add(k);
            let ti = cl >> self.block_bits;
            let first = cl & self.block_mask;
            // first <= block_mask and k < n: neither subtraction wraps.
            let in_block = self
                .block_mask
                .saturating_sub(first)
                .saturating_add(1)
                .min(n.saturating_sub(k));
            let order = self.order;
            match self.block(ti) {
                Err(_) => {}
                Ok(None) => {
                    if one {
                        for j in 0..in_block {
                            f(k.saturating_add(j), 0);
                        }
                    }
                }
                Ok(Some(b)) => {
                    let mut j = 0u64;
                    while j < in_block {
                        let idx = first.saturating_add(j);
                        // 256 refcounts of 16 bits at once, when all are 1 (or,
                        // for entries without COPIED, none is: shared clusters).
                        if order == 4 && j.saturating_add(256) <= in_block {
                            let at = usize::try_from(idx).unwrap_or(usize::MAX).saturating_mul(2);
                            let span = b.get(at..at.saturating_add(512));
                            let agree = if one {
                                span == Some(&ONES[..])
                            } else {
                                span.is_some_and(|s| {
                                    s.as_chunks::<2>()
                                        .0
                                        .iter()
                                        .fold(true, |ok, &[hi, lo]| ok & ((hi | (lo ^ 1)) != 0))
                                })
                            };
                            if agree {
                                j = j.saturating_add(256);
                                continue;
                            }
                        }
                        let r = refcount::get_refcount(b, order, idx);
                        if (r == 1) != one {
                            f(k.saturating_add(j), r);
                        }
                        j = j.saturating_add(1);
                    }
                }
            }
            k = k.saturating_add(in_block.max(1));
        }
    }

    /// The stored refcount of cluster `c`, or `Err((table index, block offset))`
    /// if its refcount block is not cluster-aligned (QEMU: EIO).
    #[inline]
    pub fn get(&mut self, c: u64) -> std::result::Result<u64, (u64, u64)> {
        let ti = c >> self.block_bits;
        // Fast path: the same block as last time.
        if self.cur_ti == Some(ti)
            && let Some((_, b)) = &self.cur
        {
            let idx = c & self.block_mask;
            return Ok(refcount::get_refcount(b, self.order, idx));
        }
        let Some(e) = usize::try_from(ti).ok().and_then(|i| self.table.get(i)) else {
            return Ok(0);
        };
        let Some(off) = e.block_offset() else {
            return Ok(0);
        };
        let geo = self.img.geometry();
        if !geo.is_cluster_aligned(off.0) {
            return Err((ti, off.0));
        }
        if self.cur.as_ref().map(|(o, _)| *o) != Some(off.0) {
            let mut buf = vec![0u8; geo.cluster_size() as usize];
            let _ = read_into(self.img.src.as_ref(), "refcount block", off, &mut buf);
            self.cur = Some((off.0, buf));
        }
        self.cur_ti = Some(ti);
        let idx = c & self.block_mask;
        Ok(self
            .cur
            .as_ref()
            .map(|(_, b)| refcount::get_refcount(b, self.order, idx))
            .unwrap_or(0))
    }
}

impl Qcow2 {
    /// QEMU's `qcow2_detect_metadata_preallocation`: does the file have at least
    /// as many clusters in use (refcount > 0) as it has clusters stored on disk,
    /// give or take 10%? Then QEMU asks the file system about each data cluster
    /// too. Worked out once per opened image, the first time it is asked.
    pub fn metadata_preallocated(&self) -> bool {
        *self
            .metadata_preallocated
            .get_or_init(|| detect_metadata_preallocation(self))
    }
}

/// The count behind [`Qcow2::metadata_preallocated`].
fn detect_metadata_preallocation(img: &Qcow2) -> bool {
    let geo = img.geometry();
    let cs = geo.cluster_size();
    let file_length = img.file_len().div_ceil(512).saturating_mul(512);
    let real_clusters = img.src.allocated_size() >> geo.cluster_bits;
    let threshold = (real_clusters.saturating_mul(10) / 9).max(real_clusters.saturating_add(2));
    let end_cluster = file_length.div_ceil(cs);
    let mut reader = RefcountReader::new(img);
    let mut count = 0u64;
    for c in 0..end_cluster {
        if count >= threshold {
            break;
        }
        match reader.get(c) {
            Ok(r) => count = count.saturating_add(u64::from(r > 0)),
            Err(_) => return false,
        }
    }
    count >= threshold
}

//! Growing and shrinking: the active L1 table, the disk (`qemu-img resize`)
//! and the refcount table after a shrink.

use super::Sim;
use super::SimError;
use super::SimResult;
use super::alloc::Discard;
use super::change::Target;
use crate::header::Field;
use crate::refcount::get_refcount;
use crate::refcount::set_refcount;
use crate::tables::L1Entry;
use crate::types::low_mask;
use crate::types::{GuestOffset, HostOffset};

impl Sim {
    /// QEMU's `qcow2_grow_l1_table`: a new, larger active L1 in new clusters,
    /// the header repointed, the old table freed.
    pub(super) fn grow_l1_table(&mut self, min_size: u64, exact: bool) -> SimResult<()> {
        let old_len = self.l1.len() as u64;
        if min_size <= old_len {
            return Ok(());
        }
        let new_len = if exact {
            min_size
        } else {
            // Grown by half again until it fits, to grow less often.
            let mut n = old_len.max(1);
            while min_size > n {
                n = n.saturating_mul(3).div_ceil(2);
            }
            n
        };
        if new_len > crate::tables::MAX_L1_ENTRIES {
            return Err(SimError::Qemu(format!(
                "an L1 table of {new_len} entries is larger than QEMU allows (EFBIG)"
            )));
        }
        let bytes = new_len.saturating_mul(8);
        let off = self.alloc_clusters(
            bytes,
            &format!("the active L1 table grown to {new_len} entries"),
        )?;
        self.refcounts_flushed();
        let mut table = self.l1.clone();
        table.resize(new_len as usize, L1Entry::UNALLOCATED);
        let buf: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_bytes(off, &buf)?;
        self.record(
            Target::Copy {
                from: format!("active L1 at {:#x}", self.l1_table_offset),
                to: off,
                length: old_len.saturating_mul(8),
            },
            0,
            0,
        );
        let saved = self.reason.clone();
        self.why("the header points at the grown L1 table");
        self.set_header(Field::L1Size, new_len)?;
        self.set_header(Field::L1TableOffset, off)?;
        let old_off = self.l1_table_offset;
        self.l1 = table;
        self.l1_table_offset = off;
        self.reason = saved;
        self.free_clusters(
            old_off,
            old_len.saturating_mul(8),
            "the old active L1 table",
            Discard::Other,
        );
        Ok(())
    }

    /// `qemu-img resize [--shrink]`.
    pub(super) fn resize(&mut self, size: u64, shrink: bool) -> SimResult<()> {
        if size == 0 {
            return Err(SimError::Qemu("New image size must be positive".into()));
        }
        if size < self.size && !shrink {
            return Err(SimError::Qemu(
                "Use the --shrink option to perform a shrink operation.".into(),
            ));
        }
        self.truncate(size)
    }

    /// QEMU's `qcow2_co_truncate` (no preallocation).
    pub(super) fn truncate(&mut self, size: u64) -> SimResult<()> {
        if !size.is_multiple_of(512) {
            return Err(SimError::Qemu(
                "The new size must be a multiple of 512 (EINVAL)".into(),
            ));
        }
        if self.version < 3 && !self.snapshots.is_empty() {
            return Err(SimError::Qemu(
                "Can't resize a v2 image which has snapshots (ENOTSUP)".into(),
            ));
        }
        if let Some(name) = self.inconsistent_bitmap() {
            return Err(SimError::Qemu(format!(
                "Bitmap '{name}' is inconsistent and cannot be used (ENOTSUP)"
            )));
        }
        let old = self.size;
        let cs = self.cs;
        let l1_needed = size.div_ceil(self.geo.l2_coverage());
        // bdrv_co_truncate: when a backing file longer than the old disk would
        // show through the new area, qcow2 is asked to zero-fill it.
        let zero_fill = size > old && self.backing_longer_than(old)?;
        let mut held = Vec::new();
        if size < old {
            self.why("shrinking: the clusters past the new end are discarded");
            let from = size.div_ceil(cs).saturating_mul(cs);
            if from < old {
                // Its L2 entries wait in QEMU's L2 cache, checked when the
                // end of the truncate writes it back ([`Sim::shrink_flush`]).
                self.held_l2 = Some(Vec::new());
                let r = self.discard_clusters(GuestOffset(from), GuestOffset(old), true);
                held = self.held_l2.take().unwrap_or_default();
                r?;
            }
            self.shrink_l1_table(l1_needed)?;
            self.shrink_reftable()?;
            // The file is cut after its last cluster in use.
            let mut last = self.file_len.div_ceil(cs);
            while last > 0 && self.get_refcount(last.saturating_sub(1))? == 0 {
                last = last.saturating_sub(1);
            }
            let end = self.clusters_bytes(last);
            if end < self.file_len {
                self.note(format!(
                    "the image file is cut to {end} bytes, after its last cluster in use"
                ));
                self.file_len = end;
                self.zero_from = self.zero_from.min(end);
                let first_gone = last;
                self.clusters.forget_from(first_gone);
                self.data.map.cut(end);
            }
        } else {
            self.grow_l1_table(l1_needed, true)?;
            if zero_fill {
                self.zero_fill_growth(old, size)?;
            }
            if self.has_data_file
                && self.header_field(Field::AutoclearFeatures)
                    & crate::header::AUTOCLEAR_DATA_FILE_RAW
                    != 0
            {
                self.preallocate_raw(old, size)?;
            }
        }
        if self.has_data_file {
            // qcow2_co_truncate resizes the external data file to the new
            // disk size as well (qinspect only predicts it).
            let raw = if self.header_field(Field::AutoclearFeatures)
                & crate::header::AUTOCLEAR_DATA_FILE_RAW
                != 0
            {
                ": with data_file_raw the guest reads it as it is, so a shrink drops what lay past the end and a grown area reads as zeros"
            } else {
                ""
            };
            self.note(format!(
                "QEMU resizes the external data file to {size} bytes too{raw}"
            ));
        }
        self.why("the new disk size");
        self.set_header(Field::Size, size)?;
        self.size = size;
        if held.is_empty() {
            return Ok(());
        }
        self.shrink_flush(held, size, old)
    }

    /// With `data_file_raw`, `qcow2_co_truncate` preallocates the metadata of
    /// the new area (as `qemu-img create` does for the whole disk): every
    /// cluster from `old` to `new` gets an L2 entry naming the same offset of
    /// the data file, with the L2 tables that takes, as a write of the area
    /// would place them (and no dirty bitmap sees it).
    fn preallocate_raw(&mut self, old: u64, new: u64) -> SimResult<()> {
        if new <= old {
            return Ok(());
        }
        self.note(format!(
            "with data_file_raw QEMU maps the new area guest {old:#x}..{new:#x} to the same offsets of the data file (metadata preallocation)"
        ));
        self.why("growing a data_file_raw image: the new area is mapped 1:1 to the data file");
        let first = self.steps.len();
        let r = self.hidden_write(new, |sim| {
            sim.write(GuestOffset(old), new.saturating_sub(old))
        });
        // No data is written: only the L2 entries (and tables) change.
        let mut kept = Vec::new();
        for (i, mut c) in std::mem::take(&mut self.steps).into_iter().enumerate() {
            if i >= first {
                if matches!(c.target, Target::Copy { .. }) {
                    continue;
                }
                if let Target::L2Entry { .. } = c.target {
                    let host = crate::tables::L2Entry::from_word(c.after).host_offset().0;
                    c.reason = format!(
                        "metadata preallocation: the cluster maps to offset {host:#x} of the raw data file"
                    );
                }
            }
            kept.push(c);
        }
        self.steps = kept;
        r
    }

    /// `f`, a write qcow2 makes straight from the driver while the disk
    /// grows to `new` bytes: the disk is `new` bytes long meanwhile, and no
    /// dirty bitmap sees the write (the block layer above does not).
    fn hidden_write(
        &mut self,
        new: u64,
        f: impl FnOnce(&mut Self) -> SimResult<()>,
    ) -> SimResult<()> {
        let dirty = self.bitmaps.as_ref().map(|b| b.dirty.len());
        let saved = self.size;
        self.size = new;
        let r = f(self);
        self.size = saved;
        if let (Some(b), Some(n)) = (self.bitmaps.as_mut(), dirty) {
            b.dirty.truncate(n);
        }
        r
    }

    /// Whether the layer under this image is longer than `len` bytes (for an
    /// overlay, the image under it, whose disk size it shows).
    fn backing_longer_than(&self, len: u64) -> SimResult<bool> {
        match &self.backing {
            Some(chain) => Ok(chain.layers.first().map_or(0, |l| l.size()) > len),
            None if self.backing_named => Err(SimError::NotModelled(format!(
                "growing an image whose backing file qinspect could not open (QEMU zero-fills the new area when the backing file is longer): {}",
                self.backing_unread()
            ))),
            None => Ok(false),
        }
    }

    /// `qcow2_co_truncate` with `BDRV_REQ_ZERO_WRITE`, growing from `old` to
    /// `new` bytes: zero (sub)clusters from the first subcluster boundary at
    /// or after `old` to the new end (`qcow2_subcluster_zeroize`, no unmap),
    /// then a plain write of zeros over the part of the old last subcluster
    /// past `old`.
    fn zero_fill_growth(&mut self, old: u64, new: u64) -> SimResult<()> {
        let unit = self.geo.subcluster_size().max(1);
        let zero_start = old.div_ceil(unit).saturating_mul(unit).min(new);
        // The block layer still counts the old size while qcow2 zeroes.
        let total = old & !511;
        self.note(format!(
            "the backing file is longer than the old disk ({old} bytes): QEMU makes guest {old:#x}..{new:#x} read as zeros, so that it does not show through"
        ));
        if new > zero_start {
            self.why("growing over a longer backing file: the new area reads as zeros");
            if let Some(why) =
                self.zeroize(GuestOffset(zero_start), GuestOffset(new), false, total)?
            {
                return Err(SimError::Qemu(format!(
                    "Failed to zero out new clusters: Operation not supported ({why})"
                )));
            }
        }
        if zero_start > old {
            // qcow2_co_pwritev_part straight from the driver: past the old end,
            // within one subcluster (so the L2 slice size, which depends on the
            // disk size, does not matter), and no dirty bitmap sees it.
            let r = self.hidden_write(new, |sim| {
                sim.write_zeros(GuestOffset(old), zero_start.saturating_sub(old))
            });
            r.map_err(|e| match e {
                SimError::Qemu(m) => {
                    SimError::Qemu(format!("Failed to zero out the new area: {m}"))
                }
                other => other,
            })?;
        }
        Ok(())
    }

    /// QEMU's `qcow2_shrink_l1_table`: the entries past `keep` are zeroed and
    /// their L2 tables freed (the table keeps its size).
    pub(super) fn shrink_l1_table(&mut self, keep: u64) -> SimResult<()> {
        let len = self.l1.len() as u64;
        if keep >= len {
            return Ok(());
        }
        let off = self.l1_table_offset;
        let zeros = vec![0u8; len.saturating_sub(keep).saturating_mul(8) as usize];
        self.write_bytes(off.saturating_entry(keep, 8), &zeros)?;
        for i in (keep..len).rev() {
            let e = self.l1.get(i as usize).copied().unwrap_or_default();
            let Some(l2) = e.l2_offset().filter(|&o| o != HostOffset(0)) else {
                continue;
            };
            self.why("shrinking: the L1 entry is past the new end");
            self.record(
                Target::L1Entry {
                    table: "active L1".into(),
                    table_offset: off,
                    index: i,
                    snapshot: None,
                },
                e.0,
                0,
            );
            self.free_clusters(
                l2,
                self.cs,
                &format!("the L2 table of active L1[{i}], past the new end"),
                Discard::Always,
            );
            if let Some(slot) = self.l1.get_mut(i as usize) {
                *slot = L1Entry::UNALLOCATED;
            }
        }
        Ok(())
    }

    /// QEMU's `qcow2_shrink_reftable`: refcount blocks that count nothing (but
    /// perhaps themselves) are dropped from the table.
    pub(super) fn shrink_reftable(&mut self) -> SimResult<()> {
        let bb = self.block_bits();
        let order = self.order;
        let mut dropped = Vec::new();
        for ti in 0..self.reftable_len() {
            let at = self.reftable_entry_offset(ti);
            let block = crate::refcount::RefTableEntry(self.read_u64(at))
                .block_offset()
                .map_or(0, |o| o.0);
            if block == 0 {
                continue;
            }
            let bc = self.cluster_of(block);
            let own = (bc >> bb == ti).then(|| bc & low_mask(bb));
            let data = self.cluster(bc).to_vec();
            let mut scratch = data;
            if let Some(idx) = own {
                set_refcount(&mut scratch, order, idx, 0);
            }
            if scratch.iter().all(|&b| b == 0) {
                dropped.push((ti, block));
            }
        }
        for &(ti, block) in &dropped {
            self.why(format!(
                "shrinking: refcount block {ti} counts nothing and leaves the table"
            ));
            let at = self.reftable_entry_offset(ti);
            self.write_u64(at, 0)?;
            self.record(Target::RefcountTableEntry { index: ti, at }, block, 0);
        }
        for (ti, block) in dropped {
            let bc = self.cluster_of(block);
            if bc >> bb != ti {
                // Counted by another block: its entry goes from 1 to 0.
                let oti = bc >> bb;
                let ob =
                    crate::refcount::RefTableEntry(self.read_u64(self.reftable_entry_offset(oti)))
                        .block_offset()
                        .map_or(0, |o| o.0);
                if ob != 0 {
                    let idx = bc & low_mask(bb);
                    let obc = self.cluster_of(ob);
                    let cur = get_refcount(self.cluster(obc), order, idx);
                    set_refcount(self.cluster(obc), order, idx, 0);
                    self.record(Target::Refcount { cluster: bc }, cur, 0);
                }
            }
            if bc < self.free_cluster_index {
                self.free_cluster_index = bc;
            }
            self.freed
                .push((bc, format!("refcount block {ti}, no longer needed")));
        }
        Ok(())
    }
}

//! Copy-on-read (`qemu-io -C -c 'read OFFSET LENGTH'`): the block layer's
//! `bdrv_co_do_copy_on_readv`. The read is widened to whole clusters (whole
//! subclusters with extended L2 entries); every run the top layer does not
//! allocate (one block-status answer: one kind of (sub)cluster, within one L2
//! slice, at most 16 MiB, QEMU's bounce buffer)
//! is read from the layers below and written to the top layer: as zero
//! clusters when the whole run reads as zeros, else as a normal write of the
//! run. Zero and data clusters of the top layer are left alone, and the
//! writes do not reach dirty bitmaps (they go to the driver directly).

use super::{Sim, SimError, SimResult, Target};
use crate::chain::{Chain, OpenOptions};
use crate::lookup::{ReadCache, read};
use crate::tables::{L2Entry, SubclusterType};
use crate::types::{GuestOffset, HostOffset};

/// QEMU's `MAX_BOUNCE_BUFFER`: 32768 sectors.
const MAX_BOUNCE: u64 = 32768 * 512;

impl Sim {
    /// `read OFFSET LENGTH` with copy-on-read on, then the flush of QEMU's
    /// caches at qemu-io's exit ([`Sim::held_flush`]: the block layer's
    /// copy-on-read writes are not followed by one).
    pub(super) fn copy_on_read(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
        self.held_flush(true, |s| s.read_request(offset, length))
    }

    /// The read request with copy-on-read on.
    fn read_request(&mut self, offset: GuestOffset, length: u64) -> SimResult<()> {
        let Some(end) = offset
            .checked_add(length)
            .filter(|e| e.get() <= self.disk_end())
        else {
            return Err(SimError::Qemu(format!(
                "read failed: Input/output error (the request ends past the end of the disk, {} bytes, so the block layer refuses all of it)",
                self.disk_end()
            )));
        };
        if length == 0 {
            return Ok(());
        }
        // The backing chain is lent to the copy while the writes run (they
        // look only at whether there is one, which `backing_named` says).
        let own = self.overlay_below()?;
        let lent = if own.is_none() {
            self.backing.take()
        } else {
            None
        };
        if own.is_none() && lent.is_none() && self.backing_named {
            return Err(SimError::NotModelled(format!(
                "copy-on-read over a backing file qinspect could not open: {}",
                self.backing_unread()
            )));
        }
        // Widened to whole subclusters (whole clusters without extended L2).
        let unit = self.geo.subcluster_size().max(1);
        let mut pos = GuestOffset(
            offset
                .get()
                .saturating_sub(offset.get().checked_rem(unit).unwrap_or(0)),
        );
        let stop = GuestOffset(
            end.get()
                .div_ceil(unit)
                .saturating_mul(unit)
                .min(self.disk_end()),
        );
        // The writes copy-on-read makes bypass the dirty bitmaps.
        let dirty = self.bitmaps.as_ref().map(|b| b.dirty.len());
        let r = self.copy_runs(&mut pos, stop, own.as_ref().or(lent.as_ref()));
        if lent.is_some() {
            self.backing = lent;
        }
        if let (Some(b), Some(n)) = (self.bitmaps.as_mut(), dirty) {
            b.dirty.truncate(n);
        }
        r
    }

    fn copy_runs(
        &mut self,
        pos: &mut GuestOffset,
        stop: GuestOffset,
        below: Option<&Chain>,
    ) -> SimResult<()> {
        let cs = self.cs;
        let unit = self.geo.subcluster_size();
        let slice = self.slice_entries().max(1);
        let start = *pos;
        while *pos < stop {
            self.block_status_asked();
            let g = *pos;
            let first = g == start;
            let l2_index = self.geo.l2_index(g);
            let in_slice = slice.saturating_sub(l2_index.checked_rem(slice).unwrap_or(0));
            let avail = in_slice
                .saturating_mul(cs)
                .saturating_sub(self.within(g))
                .min(stop.saturating_sub(g));
            if avail == 0 {
                break;
            }
            // The run of (sub)clusters of one kind from g, as block status
            // finds it.
            let (allocated, run) = if let Some(l2) = self.l2_table_of(g) {
                let ty = self.top_type(l2, g);
                if ty == SubclusterType::Invalid {
                    return Err(self.cor_meets_invalid(g, first));
                }
                // Block status counts the run into the next cluster too,
                // and fails on an invalid entry there as on its first.
                let mut n = unit;
                while n < avail {
                    let at = g.saturating_add(n);
                    let t = self.top_type(l2, at);
                    if t == SubclusterType::Invalid {
                        return Err(self.cor_meets_invalid(at, first));
                    }
                    if t != ty {
                        break;
                    }
                    n = n.saturating_add(unit);
                }
                (
                    !matches!(
                        ty,
                        SubclusterType::UnallocatedPlain | SubclusterType::UnallocatedAlloc
                    ),
                    n.min(avail),
                )
            } else {
                (false, avail)
            };
            if allocated {
                let to = g.saturating_add(run);
                self.note(format!(
                    "copy-on-read: guest {g:#x}..{to:#x} is allocated here (data or zeros): nothing to copy"
                ));
                *pos = to;
                continue;
            }
            let n = run.min(MAX_BOUNCE);
            let zeros = match below {
                None => true,
                Some(chain) => {
                    let mut buf = vec![0u8; n as usize];
                    read(chain, g, &mut buf, &mut ReadCache::default())?;
                    buf.iter().all(|&b| b == 0)
                }
            };
            let to = g.saturating_add(n);
            if zeros {
                let why = if below.is_some() {
                    "reads as zeros below"
                } else {
                    "reads as zeros (no backing file)"
                };
                self.note(format!(
                    "copy-on-read: guest {g:#x}..{to:#x} is not allocated here and {why}: QEMU writes zeros there"
                ));
                self.zeroes_request(g, n, false)?;
            } else {
                let into = if self.has_data_file {
                    "into this image (its data file)"
                } else {
                    "into this image"
                };
                self.note(format!(
                    "copy-on-read: guest {g:#x}..{to:#x} is not allocated here: QEMU writes what the backing file holds there {into}"
                ));
                let first = self.steps.len();
                let saved = self.data.new;
                self.data.new = super::data::NewData::Below;
                let r = self.write(g, n);
                self.data.new = saved;
                // What the write puts there is what the layers below hold.
                for c in self.steps.iter_mut().skip(first) {
                    if let Target::Copy { from, .. } = &mut c.target
                        && from == "the guest"
                    {
                        *from = format!("guest {g:#x} of the layers below");
                        c.reason = "the data copy-on-read read from below".into();
                    }
                }
                r?;
            }
            *pos = to;
        }
        Ok(())
    }

    /// Block status meets the invalid L2 entry of guest `g`: the image is
    /// marked corrupt. The first look (the block layer's, before any copy)
    /// fails the read; a later one (copy-on-read's own, for the next run)
    /// is taken as "not allocated", and the read from the image that
    /// follows finds it unusable.
    fn cor_meets_invalid(&mut self, g: GuestOffset, first: bool) -> SimError {
        let failure = if first {
            format!(
                "read failed: Input/output error (the L2 entry of guest {g:#x} has contradictory bits: the image is marked corrupt)"
            )
        } else {
            format!(
                "read failed: No medium found (copy-on-read asks block status up to guest {g:#x}, whose L2 entry has contradictory bits: the image is marked corrupt and unusable, and the read that follows finds none)"
            )
        };
        self.invalid_entry_met(g, "a copy-on-read", failure)
    }

    /// The kind of the (sub)cluster at guest `g` in the top layer, whose L2
    /// table is at `l2`.
    pub(super) fn top_type(&mut self, l2: HostOffset, g: GuestOffset) -> SubclusterType {
        let index = self.geo.l2_index(g);
        let sc = self.geo.subcluster_index(g);
        // qcow2_get_host_offset: the slice through QEMU's L2 cache.
        self.l2_slice_used(l2, index, false);
        let (raw, bitmap) = self.l2_entry_at(l2, index);
        L2Entry { raw, bitmap }.subcluster_type(&self.geo, self.has_data_file, sc)
    }

    /// For an overlay, the image under it as shown: its snapshot's view at
    /// the image's own disk size, as `qemu-nbd -l` loads it.
    fn overlay_below(&self) -> SimResult<Option<Chain>> {
        let Some((base, snap)) = &self.overlay_of else {
            return Ok(None);
        };
        let opts = OpenOptions {
            snapshot: snap.clone(),
            snapshot_active_size: true,
            ..Default::default()
        };
        Ok(Some(Chain::open(base, &opts)?))
    }
}

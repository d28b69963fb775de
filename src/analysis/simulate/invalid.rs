//! An L2 entry QEMU calls invalid (`QCOW2_SUBCLUSTER_INVALID`, extended L2
//! only): a data cluster whose bitmap has a subcluster both allocated and
//! zero, or an unallocated cluster with allocation bits. Whatever subcluster
//! of it QEMU asks about, the answer is the same: every path that looks at
//! its subcluster type (block status, which a partial write-zeroes and a
//! copy-on-read ask; a guest write's `calculate_l2_meta`, for the first and
//! the last cluster it covers) calls `qcow2_signal_corruption`, fatal: the
//! corrupt bit is set in the header at once, and the image is unusable from
//! then on, so nothing QEMU holds in its caches is written afterwards.
//!
//! That is simulated when the operation (its open included: a dirty image's
//! repair) has changed no metadata before it gets there; after a change,
//! which may sit in QEMU's caches and be lost, it is not.

use super::{Sim, SimError, SimResult, Target};
use crate::header::Field;
use crate::tables::{L1Entry, L2Entry, SubclusterType};
use crate::types::{GuestOffset, HostOffset};

impl Sim {
    /// The L2 table the active L1 table names for guest `g`, if any (none
    /// past the end of the L1 table, or for an entry of offset 0).
    pub(super) fn l2_table_of(&self, g: GuestOffset) -> Option<HostOffset> {
        self.l1
            .get(self.geo.l1_index(g) as usize)
            .and_then(L1Entry::l2_offset)
            .filter(|&o| o != HostOffset(0))
    }

    /// QEMU meets the invalid L2 entry of guest `g` in `what` (an operation,
    /// in words): the image is marked corrupt and the operation fails as
    /// `failure` says. Once this operation has changed metadata, which QEMU
    /// would then never write, it is not simulated.
    pub(super) fn invalid_entry_met(
        &mut self,
        g: GuestOffset,
        what: &str,
        failure: String,
    ) -> SimError {
        if self.steps.iter().any(|c| !matches!(c.target, Target::Note)) {
            return SimError::NotModelled(format!(
                "{what} that meets the L2 entry of guest {g:#x}, whose bits contradict each other, after it changed metadata (QEMU marks the image corrupt there, and what of those changes sits in its caches is never written)"
            ));
        }
        let l2 = self.l2_table_of(g).unwrap_or_default();
        // QEMU names the entry by its index in the L2 slice it loaded.
        let slice = self.slice_entries().max(1);
        let index = self.geo.l2_index(g).checked_rem(slice).unwrap_or(0);
        let saved = self.reason.clone();
        self.why(format!(
            "Marking image as corrupt: Invalid cluster entry found (L2 offset: {l2:#x}, L2 index: {index:#x})"
        ));
        let features = self.header_field(Field::IncompatibleFeatures);
        let r = self.set_header(
            Field::IncompatibleFeatures,
            features | crate::header::INCOMPAT_CORRUPT,
        );
        self.reason = saved;
        match r {
            Ok(()) => SimError::Qemu(failure),
            Err(e) => e,
        }
    }

    /// `calculate_l2_meta`'s look at a piece of a guest write from `pos`
    /// covering `count` clusters, entries `index..` of the L2 table at `l2`:
    /// the first and the last of them must not be invalid.
    pub(super) fn write_piece_valid(
        &mut self,
        l2: HostOffset,
        index: u64,
        count: u64,
        pos: GuestOffset,
    ) -> SimResult<()> {
        let start = self.guest_cluster_start(pos);
        for k in [0, count.saturating_sub(1)] {
            let (raw, bitmap) = self.l2_entry_at(l2, index.saturating_add(k));
            let ty = L2Entry { raw, bitmap }.subcluster_type(&self.geo, self.has_data_file, 0);
            if ty == SubclusterType::Invalid {
                let g = start.saturating_add(k.saturating_mul(self.cs));
                return Err(self.invalid_entry_met(
                    g,
                    "a write",
                    format!(
                        "write failed: Input/output error (the L2 entry of guest {g:#x} has contradictory bits: the image is marked corrupt)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

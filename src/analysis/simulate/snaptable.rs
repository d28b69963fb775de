//! The snapshot table as `qemu-img check -r all` reads it
//! (`qcow2_check_read_snapshot_table` with `BDRV_FIX_ERRORS`): an entry
//! with more extra data than QEMU reads keeps only the first
//! [`MAX_EXTRA_DATA`](crate::snapshot::MAX_EXTRA_DATA) bytes of it, the check
//! counts the table as it was read, and the table is written anew once the
//! refcounts are repaired.

use super::{Sim, SimSnapshot};
use crate::image::Qcow2;

impl Sim {
    /// When `img`'s snapshot table cannot be read only because entries
    /// hold too much extra data: those entries (index, the extra data size
    /// stored), and with `all` the table read as QEMU's repair reads it,
    /// into `img` and the simulation. `None` when the table reads, or fails
    /// for another reason.
    pub(super) fn cut_extra_data(
        &mut self,
        img: &mut Qcow2,
        all: bool,
    ) -> Option<Vec<(usize, u64)>> {
        img.snapshots.error.as_ref()?;
        let h = &img.header;
        let (table, dropped) = crate::snapshot::read_table_discarding(
            img.src.as_ref(),
            h.snapshots_offset,
            h.nb_snapshots,
        );
        if dropped.is_empty() || table.error.is_some() {
            return None;
        }
        if all {
            self.snapshots_size = table.size;
            img.snapshots = table;
            self.snapshots = SimSnapshot::from_image(img);
        }
        Some(dropped)
    }

    /// What QEMU prints for each entry whose extra data it cuts.
    pub(super) fn cut_lines(dropped: &[(usize, u64)]) -> Vec<String> {
        let max = crate::snapshot::MAX_EXTRA_DATA;
        dropped
            .iter()
            .map(|(i, stored)| {
                format!(
                    "Discarding too much extra metadata in snapshot table entry {i} ({stored} > {max})"
                )
            })
            .collect()
    }
}

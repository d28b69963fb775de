//! `check_oflag_copied` with a repair: the COPIED flags of the active L1
//! and L2 tables set to what the refcounts say, the last step of
//! `qemu-img check -r` ([`Sim::repair`]). Each rewritten L1 entry and L2 table
//! goes through QEMU's overlap check first and is then written to the file at
//! once; one that would land on metadata (an L1 table that names itself as an
//! L2 table) marks the image corrupt and ends the check, and the refcounts
//! repaired before it, still in QEMU's refcount block cache, are never
//! written, while the L1 entries and L2 tables the COPIED repair wrote before
//! it stay written.

use super::change::StepMark;
use super::overlap::Meta;
use super::{Change, Sim, SimError, SimResult, Target};
use crate::tables::{ClusterType, L2Entry};
use crate::types::HostOffset;

/// How a check that fails with EIO ends, before the cause.
const CHECK_FAILED: &str = "Check failed: Input/output error (";

impl Sim {
    /// Make the read of the active L2 table at `l2` in the COPIED check
    /// (`check_oflag_copied`) of the next repair (`qemu-img check -r`, or
    /// the one QEMU runs when it opens a dirty image) fail with EIO, once,
    /// after the references were counted (that read of the table succeeds)
    /// and the refcounts repaired: what blkdebug's `inject-error` at the
    /// table's sector does when the `refblock_load` event of the refcount
    /// comparison arms it. The check fails there; what it repaired before
    /// stays.
    pub fn fail_copied_read(&mut self, l2: HostOffset) {
        self.copied_read_fails = Some(l2);
    }

    /// How the check ends when its COPIED check cannot read the active L2
    /// table at `l2`.
    pub(super) fn copied_read_failed(l2: HostOffset) -> SimError {
        SimError::Qemu(format!(
            "ERROR: Could not read L2 table: Input/output error; {CHECK_FAILED}the COPIED check's read of the active L2 table at {l2:#x} fails; what was repaired before it stays)"
        ))
    }

    /// [`Sim::repair_copied`] after `compare_refcounts` repaired `repaired`
    /// (each cluster with the refcount it had; the records before it were
    /// `steps`, and `freed` clusters were freed before it).
    pub(super) fn repair_copied_after(
        &mut self,
        repaired: &[(u64, u64)],
        steps: StepMark,
        freed: usize,
    ) -> SimResult<()> {
        // Only a stop of the COPIED repair's own counts.
        self.overlap_stop = None;
        let failing = self.copied_read_fails.take();
        let r = self.repair_copied(failing);
        if r.is_err() && self.stopped_by_overlap() {
            self.drop_cached_refcounts(repaired, steps, freed)?;
        }
        r
    }

    /// The COPIED repair was stopped by the overlap check, which left QEMU's
    /// image unusable: the refcounts `compare_refcounts` repaired (each
    /// cluster of `repaired` with the refcount it had) sit in QEMU's refcount
    /// block cache, which is then never written back. They are set back, and
    /// their records (since `steps`, and the freed clusters past `freed`)
    /// dropped; the COPIED repair's own L1 and L2 entries, which QEMU writes
    /// to the file directly, stay.
    fn drop_cached_refcounts(
        &mut self,
        repaired: &[(u64, u64)],
        steps: StepMark,
        freed: usize,
    ) -> SimResult<()> {
        // The records before the repair are as they were (none was extended).
        let cached = self.steps_since(&steps).is_some_and(|since| {
            since.iter().all(|c| {
                matches!(
                    c.target,
                    Target::Refcount { .. }
                        | Target::Header { .. }
                        | Target::Note
                        | Target::L1Entry { .. }
                        | Target::L2Entry { .. }
                )
            })
        });
        if !cached {
            return Err(SimError::NotModelled(
                "the refcount repair before the failed COPIED repair changed more than refcounts, or its first change joined the record before it (which changes QEMU's refcount block cache held is then not known)".into(),
            ));
        }
        for &(c, old) in repaired {
            self.put_refcount(c, old)?;
        }
        let since: Vec<Change> = self.steps.drain(steps.len()..).collect();
        self.steps.extend(
            since
                .into_iter()
                .filter(|c| !matches!(c.target, Target::Refcount { .. })),
        );
        self.freed.truncate(freed);
        if !repaired.is_empty() {
            self.note("the refcounts repaired before are in QEMU's refcount block cache, which is not written once the image is marked corrupt: they stay as they were".into());
        }
        Ok(())
    }

    /// How `qemu-img check` ends when a write of the COPIED repair fails
    /// with `e` (QEMU's check stops there, with what it has written): a stop
    /// by the overlap check ends the check with EIO.
    fn check_failed(&self, e: SimError) -> SimError {
        match e {
            SimError::Qemu(why) if self.stopped_by_overlap() => {
                let why = why.strip_suffix(" (EIO)").unwrap_or(&why).to_string();
                SimError::Qemu(format!("{CHECK_FAILED}{why})"))
            }
            other => other,
        }
    }

    /// Whether the overlap check stopped a write of the COPIED repair (which
    /// leaves QEMU's image unusable, whether or not it was marked corrupt
    /// before).
    fn stopped_by_overlap(&self) -> bool {
        self.overlap_stop.is_some()
    }

    /// `check_oflag_copied` with `BDRV_FIX_ERRORS`: COPIED on exactly the
    /// active entries whose cluster has refcount 1, up to the L2 table
    /// whose read fails (`failing`, after its L1 entry), where the check
    /// fails.
    fn repair_copied(&mut self, failing: Option<HostOffset>) -> SimResult<()> {
        let l1_off = self.l1_table_offset;
        for i in 0..self.l1.len() as u64 {
            let e = self.l1.get(i as usize).copied().unwrap_or_default();
            let l2 = e.l2_offset().unwrap_or_default();
            if l2 == HostOffset(0) {
                continue;
            }
            let r = self.get_refcount(self.cluster_of(l2))?;
            let want = e.with_copied(r == 1);
            if want != e {
                self.why(format!(
                    "Repairing OFLAG_COPIED L2 cluster: l1_index={i} refcount={r}"
                ));
                // qcow2_write_l1_entry: the entry alone, checked against
                // every metadata structure but the active L1 table (an L2
                // table the L1 table names may be the L1 table itself).
                let at = l1_off.saturating_entry(i, 8);
                self.overlap_check(Some(Meta::ActiveL1), at, 8)
                    .map_err(|e| self.check_failed(e))?;
                self.write_u64(at, want.0)?;
                self.record(
                    Target::L1Entry {
                        table: "active L1".into(),
                        table_offset: l1_off,
                        index: i,
                        snapshot: None,
                    },
                    e.0,
                    want.0,
                );
                if let Some(slot) = self.l1.get_mut(i as usize) {
                    *slot = want;
                }
            }
            if failing == Some(l2) {
                return Err(Self::copied_read_failed(l2));
            }
            for j in 0..self.geo.l2_entries() {
                let (raw, bm) = self.l2_entry_at(l2, j);
                let ty = L2Entry { raw, bitmap: bm }.cluster_type(&self.geo, self.has_data_file);
                if !matches!(ty, ClusterType::Normal | ClusterType::ZeroAlloc) {
                    continue;
                }
                // Data in an external data file has no refcount: QEMU takes
                // it as 1.
                let off = L2Entry::from_word(raw).host_offset().0;
                let r = if self.has_data_file {
                    1
                } else {
                    self.get_refcount(self.cluster_of(off))?
                };
                let want = L2Entry::from_word(raw).with_copied(r == 1).raw;
                if want != raw {
                    self.why(format!(
                        "Repairing OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={r}"
                    ));
                    self.set_l2_entry(l2, j, want, bm)
                        .map_err(|e| self.check_failed(e))?;
                }
            }
        }
        Ok(())
    }
}

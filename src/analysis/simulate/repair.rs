//! `qemu-img check -r leaks|all`, and the repair QEMU runs by itself when it
//! opens a dirty (lazy refcounts) image read-write (`qcow2_co_check_locked`
//! with `BDRV_FIX_LEAKS | BDRV_FIX_ERRORS`).
//!
//! The references are counted as `qemu-img check` counts them (the checker's
//! in-memory refcount table); then, cluster by cluster in order, each stored
//! refcount that is too high is lowered (leaks), and with `all` each that is
//! too low is raised; a stored 0 for a cluster in use is what makes QEMU
//! rebuild the whole refcount structure instead. With `all` (or with `leaks`
//! when no error is left), the COPIED flags
//! of the active tables are set to what the refcounts now say. An image left
//! without corruptions is marked clean and consistent.

use super::{Sim, SimError, SimResult, Target};
use crate::check::{Category, CheckOptions, FindingKind, check};
use crate::header::Field;
use crate::tables::{ClusterType, L2Entry};
use crate::types::HostOffset;

impl Sim {
    /// `qemu-img check -r leaks` (`all == false`) or `-r all`.
    pub(super) fn repair(&mut self, all: bool) -> SimResult<()> {
        self.repair_pass(all, false)
    }

    /// One pass of the check and repair; `rebuilt` once the refcount
    /// structure has been rebuilt (then it is not rebuilt again).
    fn repair_pass(&mut self, all: bool, rebuilt: bool) -> SimResult<()> {
        if self.marks_bitmaps() && !self.snapshots.is_empty() {
            // qemu-img check opens with BDRV_O_CHECK, which leaves the snapshot
            // table unread until the check; marking the bitmaps in use on that
            // open rewrites the header from what is in memory: no snapshots.
            self.note("QEMU opens the image for the check before reading its snapshot table, and marking the persistent bitmaps in use rewrites the header with no snapshots: the snapshots are lost and their clusters become leaks".into());
            self.why("the header is rewritten before the snapshot table is read");
            self.set_header(Field::NbSnapshots, 0u64)?;
            self.set_header(Field::SnapshotsOffset, 0u64)?;
            self.snapshots.clear();
            self.snapshots_offset = HostOffset(0);
            self.snapshots_size = 0;
        }
        let img = self
            .image()
            .map_err(|e| SimError::Qemu(format!("Could not open the image: {e}")))?;
        let report = check(&img, &CheckOptions::default());
        if let Some(a) = &report.aborted {
            return Err(SimError::NotModelled(format!("the check stops early: {a}")));
        }
        // Unaligned zero clusters: QEMU's check_refcounts_l2 rewrites them as
        // plain zero clusters with -r all (before it counts them, so their
        // old cluster becomes a leak); with -r leaks they stay, corrupt.
        let zero_fixes: Vec<(u64, String)> = report
            .findings
            .iter()
            .filter(|f| Self::fixable_zero_cluster(f))
            .filter_map(|f| f.offset.map(|o| (o, f.message.clone())))
            .collect();
        if all && !zero_fixes.is_empty() {
            let mut changed = false;
            for (at, message) in &zero_fixes {
                changed |= self.fix_unaligned_zero_cluster(*at, message)?;
            }
            if !changed {
                return Err(SimError::NotModelled(format!(
                    "the check still finds {}",
                    zero_fixes.first().map_or("", |f| f.1.as_str())
                )));
            }
            return self.repair_pass(all, rebuilt);
        }
        let unusual = report
            .findings
            .iter()
            .find(|f| {
                f.kind != FindingKind::Note
                    && !matches!(f.category, Category::Refcount | Category::Copied)
                    && !Self::fixable_zero_cluster(f)
                    && !Self::left_as_is(f)
            })
            .map(|f| f.message.clone());
        let kept = report.findings.iter().find(|f| Self::left_as_is(f));
        if let Some(f) = kept {
            self.note(format!(
                "QEMU's repair leaves this corruption as it is: {}",
                f.message
            ));
        }
        if let Some(m) = unusual {
            return Err(SimError::NotModelled(format!(
                "QEMU's repair of this would do more than fix refcounts, COPIED flags and unaligned zero clusters{}: {m}",
                Self::what_qemu_does(&m)
            )));
        }
        let Some(imrt) = report.imrt.clone() else {
            return Err(SimError::NotModelled(
                "the check did not count the references".into(),
            ));
        };
        if !all && !rebuilt && self.needs_rebuild(&imrt)? {
            // qcow2_check_refcounts: with BDRV_FIX_LEAKS alone a needed
            // rebuild is an error, and nothing is repaired.
            return Err(SimError::Qemu(
                "Check failed: Input/output error (ERROR need to rebuild refcount structures: a cluster in use has a stored refcount of 0, and only -r all rebuilds them)".into(),
            ));
        }
        if all && !rebuilt && self.needs_rebuild(&imrt)? {
            let saved = self.reason.clone();
            self.rebuild_refcounts(&imrt)?;
            self.reason = saved;
            // The references are counted again over the new structure: the
            // old table and blocks are now leaks, repaired as any other.
            return self.repair_pass(true, true);
        }
        let saved = self.reason.clone();
        let mut left_corrupt = !zero_fixes.is_empty() || kept.is_some();
        for c in 0..imrt.nb_clusters {
            let stored = self.get_refcount(c)?;
            let reference = imrt.get(c);
            if stored == reference {
                continue;
            }
            if stored == 0 {
                if all {
                    return Err(SimError::NotModelled(format!(
                        "cluster {c} is in use with a stored refcount of 0 after the refcount structure was rebuilt"
                    )));
                }
                left_corrupt = true;
                continue;
            }
            if stored > reference {
                self.why(format!(
                    "Repairing cluster {c} refcount={stored} reference={reference} (leaked)"
                ));
                self.update_refcount(
                    self.cluster_start(c),
                    1,
                    stored.saturating_sub(reference),
                    true,
                )?;
            } else if all {
                self.why(format!(
                    "Repairing cluster {c} refcount={stored} reference={reference}"
                ));
                self.update_refcount(
                    self.cluster_start(c),
                    1,
                    reference.saturating_sub(stored),
                    false,
                )?;
            } else {
                left_corrupt = true;
            }
        }
        // check_oflag_copied repairs with -r all, and with -r leaks when the
        // refcounts are now right (then the flags can be trusted to them).
        if all || !left_corrupt {
            self.repair_copied()?;
        }
        if !left_corrupt {
            // qcow2_mark_clean and qcow2_mark_consistent.
            let before = self.header_field(Field::IncompatibleFeatures);
            let after = before & !(crate::header::INCOMPAT_DIRTY | crate::header::INCOMPAT_CORRUPT);
            if after != before {
                self.why("no corruption left: the image is marked clean and consistent");
                self.set_header(Field::IncompatibleFeatures, after)?;
            }
        }
        self.reason = saved;
        Ok(())
    }

    /// An L2 entry of a zero cluster whose preallocated offset is not
    /// cluster aligned (which `-r all` turns into a plain zero cluster).
    fn fixable_zero_cluster(f: &crate::check::Finding) -> bool {
        f.kind == FindingKind::Corruption
            && f.category == Category::Unaligned
            && f.repair.is_some()
            && f.message
                .contains("Preallocated cluster is not properly aligned")
    }

    /// What QEMU's repair does with the finding `m`, where that is known.
    fn what_qemu_does(m: &str) -> &'static str {
        if m.contains("Table is not cluster aligned") {
            " (QEMU reads the L2 table at the unaligned offset all the same, and counts and repairs whatever entries it finds there)"
        } else if m.contains("is outside image") {
            " (QEMU grows the file to hold the refcount block, then rebuilds the whole refcount structure)"
        } else if m.contains("not cluster aligned; refcount table entry") {
            " (QEMU marks the image corrupt, and its rebuild of the refcount structure then fails: ERROR writing refblock: Input/output error)"
        } else {
            ""
        }
    }

    /// A corruption `qemu-img check -r all` reports and leaves as it is,
    /// counting the references as it would without it: reserved bits in an
    /// L1 or L2 entry, a corrupt subcluster bitmap, a data cluster whose
    /// offset is not cluster aligned.
    fn left_as_is(f: &crate::check::Finding) -> bool {
        f.kind == FindingKind::Corruption
            && match f.category {
                Category::ReservedBits | Category::Subclusters => true,
                Category::Unaligned => f.message.contains("Data cluster is not properly aligned"),
                _ => false,
            }
    }

    /// The L2 entry at host offset `at` becomes a plain zero cluster (with
    /// extended L2 entries: entry 0, the subcluster bitmap as it is).
    fn fix_unaligned_zero_cluster(&mut self, at: u64, message: &str) -> SimResult<bool> {
        let size = self.geo.l2_entry_size().max(1);
        let l2 = HostOffset(at.saturating_sub(self.within(at)));
        let index = self.within(at).checked_div(size).unwrap_or(0);
        let (raw, bitmap) = self.l2_entry_at(l2, index);
        let want = if self.geo.extended_l2 {
            0
        } else {
            crate::tables::OFLAG_ZERO
        };
        let saved = self.reason.clone();
        self.why(message.replacen("ERROR", "Repairing", 1));
        let r = self.set_l2_entry(l2, index, want, bitmap);
        self.reason = saved;
        r?;
        Ok(raw != want)
    }

    /// `check_oflag_copied` with `BDRV_FIX_ERRORS`: COPIED on exactly the
    /// active entries whose cluster has refcount 1.
    fn repair_copied(&mut self) -> SimResult<()> {
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
                self.write_u64(l1_off.saturating_entry(i, 8), want.0)?;
                self.record(
                    Target::L1Entry {
                        table: "active L1".into(),
                        table_offset: l1_off,
                        index: i,
                    },
                    e.0,
                    want.0,
                );
                if let Some(slot) = self.l1.get_mut(i as usize) {
                    *slot = want;
                }
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
                    self.set_l2_entry(l2, j, want, bm)?;
                }
            }
        }
        Ok(())
    }
}

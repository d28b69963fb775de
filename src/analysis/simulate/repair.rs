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
//! of the active tables are set to what the refcounts now say (`copied.rs`). An image left
//! without corruptions is marked clean and consistent.

use super::alloc::Discard;
use super::{Sim, SimError, SimResult};
use crate::check::{CheckOptions, Refusal, check};
use crate::header::Field;
use crate::types::HostOffset;
use std::sync::Arc;

impl Sim {
    /// `qemu-img check -r leaks` (`all == false`) or `-r all`.
    pub(super) fn repair(&mut self, all: bool) -> SimResult<()> {
        let r = self.repair_pass(all, false, false);
        // A failing read asked for lasts one check.
        self.copied_read_fails = None;
        r
    }

    /// One pass of the check and repair; `rebuilt` once the refcount
    /// structure has been rebuilt (then it is not rebuilt again);
    /// `unreadable` once a refcount could not be read (QEMU's check then
    /// counts a check error, and the image is not marked clean).
    fn repair_pass(&mut self, all: bool, rebuilt: bool, unreadable: bool) -> SimResult<()> {
        if self.marks_bitmaps() && !self.snapshots.is_empty() {
            self.forget_snapshots()?;
        }
        let mut img = self
            .image()
            .map_err(|e| SimError::Qemu(format!("Could not open the image: {e}")))?;
        let cut = self.cut_extra_data(&mut img, all);
        if let (Some(&(i, stored)), false) = (cut.as_ref().and_then(|c| c.first()), all) {
            return Err(SimError::Qemu(format!(
                "ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry {i}; Check failed: File too large ({stored} bytes of extra data, more than QEMU reads; only -r all discards them)"
            )));
        }
        let cut = Self::cut_lines(&cut.unwrap_or_default());
        let report = check(&img, &CheckOptions::default());
        // qcow2_check_refcounts counts at most INT_MAX clusters of the file,
        // and the check stops there as it does (a file grown by this check
        // is counted on).
        if let Some(r @ Refusal::FileTooLarge { .. }) = &report.aborted
            && !rebuilt
            && self.counted_before_growth.is_none()
        {
            return Err(SimError::Qemu(format!(
                "Check failed: {r} (nothing is repaired)"
            )));
        }
        // Unaligned zero clusters: QEMU's check_refcounts_l2 rewrites them as
        // plain zero clusters with -r all (before it counts them, so their
        // old cluster becomes a leak); with -r leaks they stay, corrupt.
        let zero_fixes: Vec<(u64, String)> = report
            .findings
            .iter()
            .filter(|f| Self::fixable_zero_cluster(f))
            .filter_map(|f| f.offset.map(|o| (o.get(), f.message.clone())))
            .collect();
        if let Some(Refusal::TooManySnapshots { count }) = &report.aborted
            && all
            && !self.snapshot_offset_invalid(crate::snapshot::MAX_SNAPSHOTS)
        {
            self.discard_overhanging(*count)?;
            return self.repair_pass(all, rebuilt, unreadable);
        }
        if let Some(l2) = Self::unreadable_l2(&report) {
            let mut fixed = false;
            if all && !zero_fixes.is_empty() {
                // check_refcounts_l2 fixed the unaligned zero clusters of
                // the tables it read before the one whose read fails.
                let before = self.l2_tables_read_before(l2);
                for (at, message) in &zero_fixes {
                    if before.contains(&HostOffset(at.saturating_sub(self.within(*at)))) {
                        fixed |= self.fix_unaligned_zero_cluster(*at, message)?;
                    }
                }
            }
            return Err(Self::check_fails_at_l2(l2, fixed));
        }
        let table_eio = Self::bitmap_table_unreadable(&img, report.aborted.as_ref());
        if let Some(a) = &report.aborted {
            if all && (Self::stops_at_bitmaps(a) || table_eio) {
                // calculate_refcounts walks (and with -r all repairs) the L1
                // and L2 tables before it reaches the bitmaps.
                for (at, message) in &zero_fixes {
                    self.fix_unaligned_zero_cluster(*at, message)?;
                }
            }
            return Err(self.check_stops(a, all, table_eio));
        }
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
            return self.repair_pass(all, rebuilt, unreadable);
        }
        // check_refblocks: with -r all a refcount block past the end of the
        // file makes QEMU grow the file to hold it, and it is counted as any
        // other (its refcounts, all zeros, then call for a rebuild); a block
        // it cannot grow the file for, an unaligned block, reserved bits in
        // a refcount table entry or a block referenced more than once make
        // it rebuild the refcount structure.
        let outside: Vec<u64> = report
            .findings
            .iter()
            .filter(|f| Self::refblock_outside(f))
            .filter_map(|f| f.offset.map(u64::from))
            .collect();
        let mut broken = report.findings.iter().any(Self::refblock_broken);
        if all && !rebuilt && !outside.is_empty() {
            let clusters_before = self.file_len.div_ceil(self.cs);
            let (grew, failed) = self.grow_for_refblocks(&outside)?;
            broken |= failed;
            if grew {
                if let Some(first) = report.imrt.clone() {
                    let blocks = outside.iter().map(|&o| self.cluster_of(HostOffset(o)));
                    self.counted_before_growth = Some((first, clusters_before, blocks.collect()));
                }
                return self.repair_pass(all, rebuilt, unreadable);
            }
        }
        let kept = report.findings.iter().find(|f| Self::left_as_is(f));
        // An active L2 table the count did not read, and the COPIED check
        // cannot: check_oflag_copied fails there.
        if let Some(at) = report
            .findings
            .iter()
            .find(|f| f.detail == crate::check::FindingDetail::CopiedL2TableUnreadable)
            .and_then(|f| f.offset)
        {
            self.copied_read_fails.get_or_insert(at);
        }
        self.refuse_unusual(&report, all)?;
        let Some(mut imrt) = report.imrt.clone() else {
            return Err(SimError::NotModelled(
                "the check did not count the references".into(),
            ));
        };
        if let Some(before) = self.counted_before_growth.take() {
            imrt = Arc::new(Self::counts_before_growth(&imrt, before));
        }
        // compare_refcounts, first without repairing: it reads every stored
        // refcount (a read through an unaligned block marks the image
        // corrupt), and a stored 0 for a cluster in use calls for a rebuild.
        let (zero_in_use, unread) = if rebuilt {
            (false, false)
        } else {
            self.needs_rebuild(&imrt)?
        };
        let unreadable = unreadable || unread;
        if !all && !rebuilt && (zero_in_use || broken) {
            // qcow2_check_refcounts: with BDRV_FIX_LEAKS alone a needed
            // rebuild is an error, and nothing is repaired.
            let why = if zero_in_use {
                "a cluster in use has a stored refcount of 0"
            } else {
                "a refcount block is broken"
            };
            return Err(SimError::Qemu(format!(
                "Check failed: Input/output error (ERROR need to rebuild refcount structures: {why}, and only -r all rebuilds them)"
            )));
        }
        if all && !rebuilt && (zero_in_use || broken) {
            let saved = self.reason.clone();
            let why = if broken {
                "a refcount block or its refcount table entry is broken"
            } else {
                "a cluster in use has a stored refcount of 0"
            };
            self.rebuild_refcounts(&imrt, why)?;
            self.reason = saved;
            // The references are counted again over the new structure: the
            // old table and blocks are now leaks, repaired as any other.
            return self.repair_pass(true, true, unreadable);
        }
        let saved = self.reason.clone();
        // qcow2_check_read_snapshot_table: a v3 snapshot table entry with
        // less than 16 bytes of extra data, which -r all rewrites once the
        // refcounts are repaired.
        let incomplete = report
            .findings
            .iter()
            .find(|f| Self::snapshot_incomplete(f))
            .map(|f| f.message.replacen("ERROR", "Repairing", 1));
        let mut left_corrupt = !zero_fixes.is_empty()
            || kept.is_some()
            || unreadable
            || broken
            || !outside.is_empty()
            || (incomplete.is_some() && !all);
        let (steps, freed) = (self.step_mark(), self.freed.len());
        let (left, repaired) = self.repair_refcounts(&imrt, all, rebuilt)?;
        left_corrupt |= left;
        // check_oflag_copied repairs with -r all, and with -r leaks when the
        // refcounts are now right (then the flags can be trusted to them).
        if all || !left_corrupt {
            self.repair_copied_after(&repaired, steps, freed)?;
        } else if let Some(l2) = self.copied_read_fails.take() {
            // check_oflag_copied reads the tables without repairing them.
            if self.l1.iter().any(|e| e.l2_offset() == Some(l2)) {
                return Err(Self::copied_read_failed(l2));
            }
        }
        self.fix_snapshot_table(all, incomplete, &cut)?;
        if !left_corrupt {
            self.mark_clean()?;
        }
        self.reason = saved;
        Ok(())
    }

    /// `qcow2_check_fix_snapshot_table` with `-r all`: a table with an entry
    /// whose extra data was incomplete (`incomplete`) or cut (`cut`, the lines
    /// QEMU prints) is written anew, every entry with its full extra data.
    fn fix_snapshot_table(
        &mut self,
        all: bool,
        incomplete: Option<String>,
        cut: &[String],
    ) -> SimResult<()> {
        if all {
            for line in cut {
                self.note(line.clone());
            }
        }
        let incomplete = incomplete.or_else(|| cut.first().cloned());
        if let Some(why) = incomplete.filter(|_| all) {
            // qcow2_check_fix_snapshot_table: the table is written anew,
            // every entry with its full extra data.
            self.why(why);
            self.write_snapshots().map_err(|e| {
                let t = e.text();
                match t.strip_suffix(" (EIO)") {
                    Some(why) => SimError::Qemu(format!(
                        "ERROR failed to update snapshot table: Input/output error; Check failed: Input/output error ({why})"
                    )),
                    None => SimError::Qemu(format!("ERROR failed to update snapshot table: {t}")),
                }
            })?;
            if !cut.is_empty() {
                // The table reads now: QEMU opens the image for anything again.
                self.check_only = None;
            }
        }
        Ok(())
    }

    /// What marking the persistent bitmaps in use does before QEMU's check
    /// reads the snapshot table.
    fn forget_snapshots(&mut self) -> SimResult<()> {
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
        Ok(())
    }

    /// `compare_refcounts` with the repair: each stored refcount that is too
    /// high is lowered, and with `all` each that is too low is raised, but
    /// once the refcount structure was `rebuilt`, when QEMU repairs leaks
    /// only. Whether a wrong refcount is left, and each repaired cluster with
    /// the refcount it had.
    fn repair_refcounts(
        &mut self,
        imrt: &crate::check::Imrt,
        all: bool,
        rebuilt: bool,
    ) -> SimResult<(bool, Vec<(u64, u64)>)> {
        let all = all && !rebuilt;
        let mut left_corrupt = false;
        let mut still_broken = false;
        let mut repaired = Vec::new();
        for c in self.compared_clusters(imrt) {
            let stored = self.get_refcount(c)?;
            let reference = imrt.get(c);
            if stored == reference {
                continue;
            }
            if stored == 0 {
                // Before a rebuild, a stored 0 makes -r all rebuild (it never
                // gets here); after one, QEMU says so and goes on, and what
                // this comparison finds does not keep the image from being
                // marked clean.
                if rebuilt {
                    self.note(format!(
                        "ERROR cluster {c} refcount=0 reference={reference}"
                    ));
                    still_broken = true;
                } else {
                    left_corrupt = true;
                }
                continue;
            }
            if stored > reference || all {
                repaired.push((c, stored));
            }
            if stored > reference {
                self.why(format!(
                    "Repairing cluster {c} refcount={stored} reference={reference} (leaked)"
                ));
                // QCOW2_DISCARD_ALWAYS: a leak freed to 0 is punched.
                self.update_refcount(
                    self.cluster_start(c),
                    1,
                    stored.saturating_sub(reference),
                    true,
                    Discard::Always,
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
                    Discard::Always,
                )?;
            } else if rebuilt {
                self.note(format!(
                    "ERROR cluster {c} refcount={stored} reference={reference}"
                ));
            } else {
                left_corrupt = true;
            }
        }
        if still_broken {
            self.note("ERROR rebuilt refcount structure is still broken".into());
        }
        Ok((left_corrupt, repaired))
    }

    /// How QEMU's check ends when it cannot read the snapshot table
    /// (`qcow2_check_read_snapshot_table`): it fails before it repairs
    /// anything. With `-r all`, more snapshots than QEMU's limit are cut to
    /// the limit first. Or when it cannot load the bitmap directory or a
    /// bitmap table (`qcow2_check_bitmaps_refcounts`): it fails before it
    /// compares any refcount.
    /// `table_eio`: a bitmap table QEMU's read fails for (it would end past
    /// `BDRV_MAX_LENGTH`).
    fn check_stops(&self, why: &crate::check::Refusal, all: bool, table_eio: bool) -> SimError {
        let max = crate::snapshot::MAX_SNAPSHOTS;
        let offset_invalid = |nb: u64| self.snapshot_offset_invalid(nb);
        match why {
            Refusal::SnapshotTableOffset { .. } => SimError::Qemu(
                "ERROR snapshot table offset invalid; Check failed: Invalid argument (nothing is repaired)".into(),
            ),
            Refusal::TooManySnapshots { count } if !all => SimError::Qemu(format!(
                "ERROR snapshot table too large; Check failed: File too large ({count} snapshots, more than QEMU's limit of {max}; only -r all discards the overhanging ones)"
            )),
            Refusal::TooManySnapshots { count } if offset_invalid(max) => SimError::Qemu(format!(
                "Discarding {} overhanging snapshots; ERROR snapshot table offset invalid; Check failed: Invalid argument (nothing is repaired)",
                count.saturating_sub(max)
            )),
            Refusal::TooManySnapshots { count } => SimError::NotModelled(format!(
                "{count} snapshots are still more than QEMU's limit of {max} after they were cut to it"
            )),
            Refusal::BitmapDirectory { .. } | Refusal::BitmapTableEntry { .. } => {
                SimError::Qemu(format!(
                    "Check failed: Invalid argument (the check stops at the bitmaps: {}; no refcount is repaired)",
                    why.to_string().trim_end_matches(" (Invalid argument)")
                ))
            }
            Refusal::BitmapTable { .. } if table_eio => SimError::Qemu(format!(
                "Check failed: Input/output error (the check stops at the bitmaps: {why}, QEMU's read of it fails; no refcount is repaired)"
            )),
            // A table past the end of the file short of BDRV_MAX_LENGTH is
            // read as zeros and the check goes on; what is left are tables
            // QEMU refuses before it reads them.
            Refusal::BitmapTable { error, .. } => SimError::NotModelled(format!(
                "qinspect's check stops at a bitmap table it did not read: {error}"
            )),
            other => SimError::NotModelled(format!("the check stops early: {other}")),
        }
    }

    /// `validate_table_offset` for a snapshot table of `nb` entries: not
    /// cluster aligned, or ending past `INT64_MAX`.
    fn snapshot_offset_invalid(&self, nb: u64) -> bool {
        let at = self.snapshots_offset.get();
        self.within(at) != 0 || at > (i64::MAX as u64).saturating_sub(nb.saturating_mul(40))
    }

    /// `qcow2_check_read_snapshot_table` with `-r all` and more than
    /// QEMU's limit of snapshots (`count`): the header's `nb_snapshots` is
    /// cut to the limit at once, and the first entries up to it are read
    /// as the snapshot table (what the rest held becomes a leak).
    fn discard_overhanging(&mut self, count: u64) -> SimResult<()> {
        let max = crate::snapshot::MAX_SNAPSHOTS;
        let saved = self.reason.clone();
        self.why(format!(
            "Discarding {} overhanging snapshots",
            count.saturating_sub(max)
        ));
        let r = self.set_header(Field::NbSnapshots, u32::try_from(max).unwrap_or(u32::MAX));
        self.reason = saved;
        r?;
        let img = self
            .image()
            .map_err(|e| SimError::Qemu(format!("Could not open the image: {e}")))?;
        // The entries past the end of the file read as zeros (QEMU's read
        // of the table is padded with them); the check then counts only the
        // clusters of the table inside the file.
        if img.snapshots.error.is_none() {
            // The table reads now: QEMU opens the image for anything again.
            self.check_only = None;
        }
        self.snapshots = super::SimSnapshot::from_image(&img);
        self.snapshots_size = img.snapshots.size;
        Ok(())
    }

    /// Whether the check stops at the bitmaps in a way QEMU's
    /// `qcow2_check_bitmaps_refcounts` stops with `-EINVAL` (the directory
    /// or a bitmap table cannot be loaded), after the L1 and L2 tables were
    /// walked.
    fn stops_at_bitmaps(why: &crate::check::Refusal) -> bool {
        matches!(
            why,
            Refusal::BitmapDirectory { .. } | Refusal::BitmapTableEntry { .. }
        )
    }

    /// Whether the check stopped at a bitmap table QEMU cannot read at all:
    /// one that would end past the largest offset QEMU's block layer reads
    /// (`BDRV_MAX_LENGTH`), where its read fails (EIO).
    fn bitmap_table_unreadable(
        img: &crate::image::Qcow2,
        why: Option<&crate::check::Refusal>,
    ) -> bool {
        let Some(crate::check::Refusal::BitmapTable { name, offset, .. }) = why else {
            return false;
        };
        let Some(Ok(list)) = &img.bitmaps else {
            return false;
        };
        list.iter()
            .filter(|b| &b.name == name && b.table_offset == *offset)
            .any(crate::bitmap::BitmapEntry::table_ends_past_limit)
    }

    /// The L2 tables QEMU's check (`calculate_refcounts`) reads before its
    /// first read of `failing`, which fails: those named by the active L1
    /// table in order, then those of each snapshot's L1 table (but a table
    /// it skips: not cluster aligned, or more entries than QEMU's limit).
    /// All of them when `failing` is not known.
    fn l2_tables_read_before(
        &mut self,
        failing: Option<HostOffset>,
    ) -> std::collections::BTreeSet<HostOffset> {
        let mut read = std::collections::BTreeSet::new();
        let mut l1s: Vec<(HostOffset, u64)> = vec![(HostOffset(0), 0)];
        l1s.extend(
            self.snapshots
                .iter()
                .filter(|sn| {
                    self.within(sn.l1_table_offset.get()) == 0
                        && u64::from(sn.l1_size) <= crate::tables::MAX_L1_ENTRIES
                })
                .map(|sn| (sn.l1_table_offset, u64::from(sn.l1_size))),
        );
        for (n, (table, size)) in l1s.into_iter().enumerate() {
            let entries: Vec<crate::tables::L1Entry> = if n == 0 {
                self.l1.clone()
            } else {
                (0..size)
                    .map(|i| crate::tables::L1Entry(self.read_u64(table.saturating_entry(i, 8))))
                    .collect()
            };
            for l2 in entries.iter().filter_map(crate::tables::L1Entry::l2_offset) {
                if Some(l2) == failing {
                    return read;
                }
                read.insert(l2);
            }
        }
        read
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
}

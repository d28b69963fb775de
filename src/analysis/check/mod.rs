//! Consistency checking, the way `qemu-img check` does it, and more.
//!
//! A qcow2 image stores a refcount for every host cluster. The check recomputes
//! those refcounts from scratch by following every structure that references a
//! cluster, in QEMU's order (`calculate_refcounts` in `block/qcow2-refcount.c`):
//!
//! 1. the header cluster;
//! 2. the active L1 table, each L2 table it names, and each data or compressed
//!    cluster those name (an L2 table shared by several L1 tables counts once per
//!    L1 table that names it);
//! 3. every snapshot's L1 table and what it reaches, the same way;
//! 4. the snapshot table, the refcount table, the LUKS header, the bitmap
//!    directory, bitmap tables and bitmap data;
//! 5. the refcount blocks themselves (each must end up with refcount exactly 1).
//!
//! The result, the in-memory refcount table (IMRT), is compared with the stored
//! refcounts: a stored refcount **lower** than the computed one is a corruption
//! (the cluster could be freed while still in use), a **higher** one is a leak
//! (space wasted, data safe). Finally the COPIED flags of the active tables must
//! say "refcount is exactly 1" truthfully.
//!
//! qinspect counts exactly what QEMU counts, so the totals equal `qemu-img check`'s,
//! but it walks an L2 table shared by many L1 tables once and adds its weight, and
//! it keeps a note of who referenced what so each finding can name its owners.

mod bitmaps;
mod clusters;
mod compare;
mod copied;
mod detail;
mod imrt;
mod l2;
mod overlaps;
mod referrers;
mod refusal;
mod report;
#[cfg(test)]
mod tests;
mod visit;
mod walk;

pub use clusters::{ClusterInfo, ROLES, clusters, for_each_cluster, role_map};
pub use detail::FindingDetail;
pub use imrt::Imrt;
pub use refusal::Refusal;
pub use report::{
    Category, CheckOptions, CheckReport, Finding, FindingKind, L1Id, Progress, Referrer, Role,
};

use crate::error::Error;
use crate::image::Qcow2;
use compare::compare;
use copied::Copied;
use overlaps::overlaps;
use std::sync::Arc;
use visit::Counter;
use walk::Walk;

/// How many detailed findings are kept (counts are always exact).
pub const MAX_FINDINGS: usize = 100_000;
/// How many refcounts past the end of the file are looked at.
pub const PAST_EOF_BUDGET: u64 = 1 << 22;
/// How many referrers are listed for one cluster.
pub const MAX_REFERRERS: usize = 64;
/// How many clusters get their referrers listed.
pub const MAX_OWNER_CLUSTERS: usize = 10_000;
/// The most clusters of the image file QEMU's check counts (`INT_MAX`): the
/// check of a longer file fails ("Check failed: File too large").
pub const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;

/// Run the check.
pub fn check(img: &Qcow2, opts: &CheckOptions) -> CheckReport {
    let mut walk = Walk::new(img, true);
    walk.progress = opts.progress;
    let h = &img.header;
    let cs = walk.cs;
    walk.report.total_clusters = (h.size & !511).div_ceil(cs);
    if h.dirty() {
        walk.report.warnings.push(
            "the dirty bit is set: the image was not closed cleanly (lazy refcounts), so stored refcounts may lag behind; QEMU would repair them when opening it read-write. The computed refcounts below are what they should be.".into(),
        );
    }
    if let Some(why) = &img.check_refusal {
        walk.report.qemu_refuses = Some(Refusal::Open(why.clone()));
    }
    // Step 1: the snapshot table (qcow2_check_read_snapshot_table).
    let nb = u64::from(h.nb_snapshots);
    if nb > crate::snapshot::MAX_SNAPSHOTS {
        let msg = "ERROR snapshot table too large".to_string();
        walk.find(
            FindingKind::CheckError,
            Category::SnapshotTable,
            FindingDetail::TooManySnapshots,
            msg,
            1,
        );
        walk.report.aborted = Some(Refusal::TooManySnapshots { count: nb });
        return finish(walk, None);
    }
    // The offset must be aligned even when there are no snapshots.
    let snapshots_at = h.snapshots_offset.get();
    if snapshots_at & walk.cmask != 0
        || snapshots_at > (i64::MAX as u64).saturating_sub(nb.saturating_mul(40))
    {
        walk.find(
            FindingKind::CheckError,
            Category::SnapshotTable,
            FindingDetail::SnapshotTableOffset,
            "ERROR snapshot table offset invalid".into(),
            1,
        );
        walk.report.aborted = Some(Refusal::SnapshotTableOffset {
            offset: h.snapshots_offset,
        });
        return finish(walk, None);
    }
    if let Some(e) = &img.snapshots.error {
        let msg = format!("ERROR failed to read the snapshot table: {e}");
        walk.find(
            FindingKind::CheckError,
            Category::SnapshotTable,
            FindingDetail::SnapshotTableUnreadable,
            msg,
            1,
        );
        walk.report.aborted = Some(Refusal::SnapshotTable(Error::clone(e)));
        return finish(walk, None);
    }
    if h.version >= 3 {
        for (i, s) in img.snapshots.snapshots.iter().enumerate() {
            if s.extra_data_size < 16 {
                let msg = format!("ERROR snapshot table entry {i} is incomplete");
                if let Some(f) = walk.find(
                    FindingKind::Corruption,
                    Category::SnapshotTable,
                    FindingDetail::SnapshotExtraIncomplete,
                    msg,
                    1,
                ) {
                    f.offset = Some(s.entry_offset);
                    f.repair = Some("qemu-img check -r all rewrites the snapshot table with 24 bytes of extra data".into());
                }
            }
        }
    }
    let file_clusters = walk.file_len.div_ceil(cs);
    // qcow2_check_refcounts: the file's clusters are counted in an array
    // indexed by an int.
    if let Some(refusal) = Refusal::file_too_large(file_clusters) {
        walk.report.check_errors = walk.report.check_errors.saturating_add(1);
        walk.report.aborted = Some(refusal);
        return finish(walk, None);
    }
    let mut counter = Counter {
        imrt: Imrt::new(file_clusters),
        max: img.refcount_geometry().max(),
    };
    // The COPIED check is handed each active L2 table as the recount reads it.
    walk.copied = Some(Box::new(Copied::start(img)));
    walk.head(&mut counter);
    if opts.one_thread {
        walk.l2_phase(&mut counter);
    } else {
        walk.l2_phase_split(&mut counter);
    }
    walk.tail(&mut counter);
    let mut copied = walk.copied.take();
    if let Some(cp) = copied.as_mut() {
        let refs = &walk.l2_refs;
        cp.rest(&|l2| refs.contains_key(&l2));
    }
    if walk.report.aborted.is_none() {
        compare(&mut walk, &counter);
    }
    if walk.report.aborted.is_some() {
        return finish(walk, Some(counter));
    }
    if let Some(cp) = copied {
        walk.absorb(cp.report(&counter.imrt, counter.max));
    }
    overlaps(&mut walk, &counter);
    finish(walk, Some(counter))
}

fn finish(mut walk: Walk, counter: Option<Counter>) -> CheckReport {
    if let Some(c) = counter {
        walk.report.imrt = Some(Arc::new(c.imrt));
    }
    walk.report
}

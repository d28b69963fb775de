//! The COPIED flags of the active tables (`check_oflag_copied`).
//!
//! The L1 half runs before the walk; the L2 half is handed each active L2 table
//! by the walk as it reads it, so every table is read once for both the recount
//! and this check.

use super::MAX_REFERRERS;
use super::detail::FindingDetail;
use super::imrt::Imrt;
use super::report::{Category, CheckReport, FindingKind, L1Id, Referrer, Role};
use super::walk::Walk;
use crate::image::{Qcow2, RefcountReader};
use crate::io::read_into;
use crate::tables::{ClusterType, L2E_OFFSET_MASK, L2Entry};
use crate::types::HostOffset;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Each active L2 table: how many active L1 entries name it, and which.
pub(super) type ActiveL2s = BTreeMap<HostOffset, (u64, Vec<u64>)>;

/// The COPIED check's state: its own findings (reported after the refcount
/// comparison, as QEMU does), the stored refcounts it reads, and whether it has
/// stopped at an unreadable L2 table.
pub(super) struct Copied<'a> {
    /// Collects this check's findings.
    pub(super) walk: Walk<'a>,
    stored: RefcountReader<'a>,
    /// The active L2 tables, shared by the walks of both halves of the L1 range.
    pub(super) tables: Arc<ActiveL2s>,
    /// An L2 table could not be read: QEMU stops the COPIED check there.
    pub(super) stopped: bool,
}

impl<'a> Copied<'a> {
    /// The check with its L1 half done (over the image's active L1 table).
    pub(super) fn start(img: &'a Qcow2) -> Self {
        let mut walk = Walk::new(img, true);
        let mut stored = RefcountReader::new(img);
        let tables = Arc::new(l1_half(&mut walk, &mut stored));
        Copied {
            walk,
            stored,
            tables,
            stopped: false,
        }
    }

    /// A check of further L2 tables that shares `tables`, with no findings yet.
    pub(super) fn fork(&self) -> Self {
        let img = self.walk.img;
        Copied {
            walk: Walk::new(img, true),
            stored: RefcountReader::new(img),
            tables: Arc::clone(&self.tables),
            stopped: false,
        }
    }

    /// Append the findings of a fork that checked the tables after this one's.
    pub(super) fn absorb(&mut self, later: Copied<'a>) {
        if !self.stopped {
            self.stopped = later.stopped;
            self.walk.absorb(later.walk.report);
        }
    }

    /// The L2 half for table `l2`, given its contents (`None`: it could not be read).
    pub(super) fn table(&mut self, l2: HostOffset, buf: Option<&[u8]>) {
        if self.stopped {
            return;
        }
        let tables = Arc::clone(&self.tables);
        let Some((w, l1s)) = tables.get(&l2) else {
            return;
        };
        match buf {
            Some(b) => l2_half(self, l2, *w, l1s, b),
            None => {
                if let Some(f) = self.walk.find(
                    FindingKind::CheckError,
                    Category::Io,
                    FindingDetail::CopiedL2TableUnreadable,
                    "ERROR: Could not read L2 table".into(),
                    1,
                ) {
                    f.offset = Some(l2);
                }
                self.stopped = true;
            }
        }
    }

    /// Check, by reading them, the active tables in `tables` that the walk did
    /// not hand over (only when the active L1 read by the walk differs from the
    /// image's, as for an L1 table QEMU cannot read).
    pub(super) fn rest(&mut self, seen: &dyn Fn(HostOffset) -> bool) {
        let tables = Arc::clone(&self.tables);
        let mut buf = vec![0u8; self.walk.cs as usize];
        for l2 in tables.keys().filter(|l2| !seen(**l2)) {
            let ok = read_into(self.walk.img.src.as_ref(), "L2 table", *l2, &mut buf).is_ok();
            self.table(*l2, ok.then_some(buf.as_slice()));
        }
    }

    /// The findings, for the main report, each repair worded by the refcount
    /// `qemu-img check -r` leaves rather than the stored one: QEMU fixes the
    /// refcounts (to the `counted` references, at most `max`) before it checks
    /// the COPIED flags, so a flag that is right for the counted references is
    /// left as it is, and only its refcount changes.
    pub(super) fn report(mut self, counted: &Imrt, max: u64) -> CheckReport {
        let has_df = self.walk.img.header.has_data_file();
        for f in &mut self.walk.report.findings {
            let applies = match f.detail {
                FindingDetail::CopiedL1 => true,
                FindingDetail::CopiedL2 => !has_df,
                _ => false,
            };
            if let (true, Some(c), Some(r)) = (applies, f.cluster, f.refcount) {
                settle(&mut f.repair, r, counted.get(c), max);
            }
        }
        self.walk.report
    }
}

/// A COPIED finding's repair once QEMU has set the stored refcount `r` to the
/// `counted` references: when the flag is right for those (`counted` is 1
/// exactly when `r` is not), the flag stays and only the refcount changes.
fn settle(repair: &mut Option<String>, r: u64, counted: u64, max: u64) {
    if counted == 0 || counted > max || (counted == 1) == (r == 1) {
        return;
    }
    *repair = Some(format!(
        "none to bit 63: qemu-img check -r {} sets the refcount to {counted}, and the flag is right for that",
        if r > counted { "leaks" } else { "all" }
    ));
}

/// The L1 half: each active L1 entry's COPIED flag against its L2 table's refcount.
fn l1_half(walk: &mut Walk, stored: &mut RefcountReader) -> ActiveL2s {
    let img = walk.img;
    // Each active L2 table is read once; its entries are checked once per L1 entry naming it.
    let mut weights = ActiveL2s::new();
    for (i, e) in img.l1.iter().enumerate() {
        let Some(l2) = e.l2_offset().filter(|o| o.get() != 0) else {
            continue;
        };
        let Ok(r) = stored.get(l2.get() >> walk.cbits) else {
            continue;
        };
        if (r == 1) != e.copied() {
            let msg = format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={r}",
                e.0
            );
            let cbits = walk.cbits;
            if let Some(f) = walk.find(
                FindingKind::Corruption,
                Category::Copied,
                FindingDetail::CopiedL1,
                msg,
                1,
            ) {
                f.cluster = Some(l2.get() >> cbits);
                f.offset = Some(img.header.l1_table_offset.saturating_entry(i as u64, 8));
                f.refcount = Some(r);
                f.repair = Some(format!(
                    "{} bit 63 of active L1[{i}]",
                    if r == 1 { "set" } else { "clear" }
                ));
            }
        }
        let w = weights.entry(l2).or_default();
        w.0 = w.0.saturating_add(1);
        w.1.push(i as u64);
    }
    weights
}

/// The L2 half for one table: each data entry's COPIED flag against its
/// cluster's stored refcount, counted `w` times (once per active L1 entry
/// naming the table, listed in `l1s`).
fn l2_half(cp: &mut Copied, l2: HostOffset, w: u64, l1s: &[u64], buf: &[u8]) {
    let img = cp.walk.img;
    let geo = img.geometry();
    let has_df = img.header.has_data_file();
    let cs = cp.walk.cs;
    let cbits = cp.walk.cbits;
    let step = geo.l2_entry_size() as usize;
    let raw_at = |j: usize| {
        buf.get(j.saturating_mul(step)..)
            .filter(|b| b.len() >= 8)
            .map_or(0, |b| crate::bytes::be64(b, 0))
    };
    let entries = buf.len().checked_div(step).unwrap_or(0);
    let mut bad: Vec<(usize, u64)> = Vec::new();
    let mut j = 0usize;
    while j < entries {
        let raw = raw_at(j);
        let e = L2Entry { raw, bitmap: 0 };
        let ct = e.cluster_type(&geo, has_df);
        if !matches!(ct, ClusterType::Normal | ClusterType::ZeroAlloc) {
            j = j.saturating_add(1);
            continue;
        }
        let c = L2Entry::from_word(raw).host_offset().0 >> cbits;
        // The entries after this one that continue it (same flags, next host
        // cluster) are judged with it, one refcount block span at a time.
        let mut k = 1usize;
        if !has_df {
            // Adding a cluster keeps the flags and moves the offset on while the
            // offset field (bits 9..=55) does not carry into the flags: `room`
            // more entries at most.
            let off = L2Entry::from_word(raw).host_offset().0;
            let room = (L2E_OFFSET_MASK | 0x1ff).saturating_sub(off) >> cbits;
            let room = usize::try_from(room).unwrap_or(usize::MAX);
            let mut want = raw;
            k = k.saturating_add(
                buf.get(j.saturating_add(1).saturating_mul(step)..)
                    .unwrap_or(&[])
                    .chunks_exact(step)
                    .take(room)
                    .map(|b| crate::bytes::be64(b, 0))
                    .take_while(|&r| {
                        want = want.wrapping_add(cs);
                        r == want
                    })
                    .count(),
            );
        }
        if has_df {
            if !e.copied() {
                bad.push((j, 1));
            }
        } else {
            cp.stored
                .each_copied_mismatch(c, k as u64, e.copied(), &mut |x, r| {
                    bad.push((j.saturating_add(x as usize), r));
                });
        }
        j = j.saturating_add(k);
    }
    for (j, r) in bad.drain(..) {
        let raw = raw_at(j);
        let msg = format!("ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={r}");
        let name = cp.walk.l1_name(L1Id::Active);
        if let Some(f) = cp.walk.find(
            FindingKind::Corruption,
            Category::Copied,
            FindingDetail::CopiedL2,
            msg,
            w,
        ) {
            f.cluster = Some(L2Entry::from_word(raw).host_offset().0 >> cbits);
            f.offset = Some(l2.saturating_entry(j as u64, step as u64));
            f.refcount = Some(r);
            f.repair = Some(format!(
                "{} bit 63 of the L2 entry",
                if r == 1 { "set" } else { "clear" }
            ));
            // Capped as every referrer list is: a hostile image can name one L2
            // table from millions of L1 entries.
            if l1s.len() > MAX_REFERRERS {
                f.referrers.push(Referrer::plain(
                    Role::Data,
                    Some(format!(
                        "L2 {l2:#x}[{j}], an L2 table named by {} L1 entries (the first {MAX_REFERRERS} follow)",
                        l1s.len()
                    )),
                ));
            }
            for l1i in l1s.iter().take(MAX_REFERRERS) {
                f.referrers.push(Referrer {
                    l1: Some(name.clone()),
                    l1_index: Some(*l1i),
                    l2_table: Some(l2),
                    l2_index: Some(j as u64),
                    guest_offset: geo.guest_offset(*l1i, j as u64, 0),
                    l1_table: Some(L1Id::Active),
                    ..Referrer::plain(Role::Data, None)
                });
            }
        }
    }
}

//! Naming who references a cluster.

use super::MAX_REFERRERS;
use super::report::{L1Id, Referrer, Role};
use super::visit::Ctx;
use super::walk::Walk;

impl Walk<'_> {
    pub(super) fn referrers(&self, list: &[(Ctx, u64)]) -> Vec<Referrer> {
        let geo = self.img.geometry();
        let mut out = Vec::new();
        for (ctx, _w) in list {
            match *ctx {
                Ctx::Entry { l2, index, role } => {
                    let all = self.l2_refs.get(&l2).map(Vec::as_slice).unwrap_or(&[]);
                    if all.len() > MAX_REFERRERS {
                        out.push(Referrer::plain(
                            role,
                            Some(format!(
                                "L2 {l2:#x}[{index}], an L2 table named by {} L1 entries (the first {MAX_REFERRERS} follow)",
                                all.len()
                            )),
                        ));
                    }
                    for (id, l1i) in all.iter().take(MAX_REFERRERS) {
                        let role = match id {
                            L1Id::Snapshot { index }
                                if role == Role::Data && self.in_vm_state(*index, *l1i) =>
                            {
                                Role::VmState
                            }
                            _ => role,
                        };
                        out.push(Referrer {
                            role,
                            l1: Some(self.l1_name(*id)),
                            l1_index: Some(*l1i),
                            l2_table: Some(l2),
                            l2_index: Some(index),
                            guest_offset: geo.guest_offset(*l1i, index, 0),
                            detail: None,
                            l1_table: Some(*id),
                        });
                    }
                }
                Ctx::L2Table(id, i) => out.push(Referrer {
                    l1: Some(self.l1_name(id)),
                    l1_index: Some(i),
                    l1_table: Some(id),
                    ..Referrer::plain(Role::L2Table, None)
                }),
                Ctx::L1Table(id) => out.push(Referrer {
                    l1_table: Some(id),
                    ..Referrer::plain(Role::L1Table, Some(self.l1_name(id)))
                }),
                Ctx::Header => out.push(Referrer::plain(Role::Header, None)),
                Ctx::SnapshotTable => out.push(Referrer::plain(Role::SnapshotTable, None)),
                Ctx::RefcountTable => out.push(Referrer::plain(Role::RefcountTable, None)),
                Ctx::RefcountBlock(i) => out.push(Referrer::plain(
                    Role::RefcountBlock,
                    Some(format!("refcount table entry {i}")),
                )),
                Ctx::Crypto => out.push(Referrer::plain(Role::CryptoHeader, None)),
                Ctx::BitmapDirectory => out.push(Referrer::plain(Role::BitmapDirectory, None)),
                Ctx::BitmapTable(b) => out.push(Referrer::plain(
                    Role::BitmapTable,
                    Some(self.bitmap_name(b)),
                )),
                Ctx::BitmapData(b, j) => out.push(Referrer::plain(
                    Role::BitmapData,
                    Some(format!("{} table entry {j}", self.bitmap_name(b))),
                )),
            }
        }
        out.sort();
        // Referrers through two records with one ID and name read alike: listed
        // once, as the output names them (the first record's, which sorts first).
        out.dedup_by(|b, a| a.reads_as(b));
        if out.len() > MAX_REFERRERS * 2 {
            let more = out.len().saturating_sub(MAX_REFERRERS);
            out.truncate(MAX_REFERRERS);
            let role = out.first().map_or(Role::Header, |f| f.role);
            out.push(Referrer::plain(
                role,
                Some(format!("... and {more} more referrers")),
            ));
        }
        out
    }

    /// Whether L1 index `l1i` of snapshot `index` maps its VM state: QEMU saves
    /// it at the guest offsets just past the disk (`qcow2_vm_state_offset`, the
    /// first L1 entry not needed for the snapshot's disk size).
    pub(super) fn in_vm_state(&self, index: usize, l1i: u64) -> bool {
        self.img.snapshots.snapshots.get(index).is_some_and(|s| {
            s.vm_state_size > 0
                && l1i
                    >= self
                        .img
                        .geometry()
                        .l1_entries_for(s.effective_disk_size(self.img.header.size))
        })
    }

    pub(super) fn bitmap_name(&self, b: usize) -> String {
        match &self.img.bitmaps {
            Some(Ok(l)) => l
                .get(b)
                .map(|x| format!("bitmap '{}'", x.name))
                .unwrap_or_default(),
            _ => format!("bitmap #{b}"),
        }
    }
}

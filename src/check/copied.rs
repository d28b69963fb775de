//! The COPIED flags of the active tables.

use super::report::{Category, FindingKind, L1Id, Referrer, Role};
use super::walk::Walk;
use crate::image::RefcountReader;
use crate::io::read_into;
use crate::tables::{ClusterType, L1E_OFFSET_MASK, L2E_OFFSET_MASK, L2Entry};
use std::collections::BTreeMap;

/// `check_oflag_copied` over the active L1 table.
pub(super) fn copied(walk: &mut Walk) {
    let img = walk.img;
    let geo = img.geometry();
    let has_df = img.header.has_data_file();
    let mut stored = RefcountReader::new(img);
    let mut buf = vec![0u8; walk.cs as usize];
    // Each active L2 table is read once; its entries are checked once per L1 entry naming it.
    let mut weights: BTreeMap<u64, (u64, Vec<u64>)> = BTreeMap::new();
    for (i, e) in img.l1.iter().enumerate() {
        let l2 = e.0 & L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let Ok(r) = stored.get(l2 >> walk.cbits) else {
            continue;
        };
        if (r == 1) != e.copied() {
            let msg = format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:x} refcount={r}",
                e.0
            );
            let cbits = walk.cbits;
            if let Some(f) = walk.find(FindingKind::Corruption, Category::Copied, msg, 1) {
                f.cluster = Some(l2 >> cbits);
                f.offset = Some(
                    img.header
                        .l1_table_offset
                        .saturating_add((i as u64).saturating_mul(8)),
                );
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
    for (l2, (w, l1s)) in weights {
        if read_into(img.src.as_ref(), "L2 table", l2, &mut buf).is_err() {
            walk.find(
                FindingKind::CheckError,
                Category::Io,
                "ERROR: Could not read L2 table".into(),
                1,
            );
            return;
        }
        let step = geo.l2_entry_size() as usize;
        let entries = buf.len().checked_div(step).unwrap_or(0);
        let raw_at = |j: usize| crate::bytes::be64(&buf, j.saturating_mul(step));
        let mut j = 0usize;
        while j < entries {
            let raw = raw_at(j);
            let e = L2Entry { raw, bitmap: 0 };
            let ct = e.cluster_type(&geo, has_df);
            if !matches!(ct, ClusterType::Normal | ClusterType::ZeroAlloc) {
                j = j.saturating_add(1);
                continue;
            }
            let c = (raw & L2E_OFFSET_MASK) >> walk.cbits;
            // The entries after this one that continue it (same flags, next host
            // cluster) are judged with it, one refcount block span at a time.
            let mut k = 1usize;
            if !has_df {
                while j.saturating_add(k) < entries
                    && raw_at(j.saturating_add(k))
                        == raw.wrapping_add((k as u64).wrapping_mul(walk.cs))
                    && (raw_at(j.saturating_add(k)) & L2E_OFFSET_MASK) > (raw & L2E_OFFSET_MASK)
                {
                    k = k.saturating_add(1);
                }
            }
            let mut bad: Vec<(usize, u64)> = Vec::new();
            if has_df {
                if !e.copied() {
                    bad.push((j, 1));
                }
            } else {
                stored.each_copied_mismatch(c, k as u64, e.copied(), &mut |x, r| {
                    bad.push((j.saturating_add(x as usize), r));
                });
            }
            j = j.saturating_add(k);
            for (j, r) in bad {
                let raw = raw_at(j);
                let msg = format!("ERROR OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={r}");
                let cbits = walk.cbits;
                let name = walk.l1_name(L1Id::Active);
                if let Some(f) = walk.find(FindingKind::Corruption, Category::Copied, msg, w) {
                    f.cluster = Some((raw & L2E_OFFSET_MASK) >> cbits);
                    f.offset = Some(l2.saturating_add((j as u64).saturating_mul(step as u64)));
                    f.refcount = Some(r);
                    f.repair = Some(format!(
                        "{} bit 63 of the L2 entry",
                        if r == 1 { "set" } else { "clear" }
                    ));
                    for l1i in &l1s {
                        f.referrers.push(Referrer {
                            l1: Some(name.clone()),
                            l1_index: Some(*l1i),
                            l2_table: Some(l2),
                            l2_index: Some(j as u64),
                            guest_offset: geo.guest_offset(*l1i, j as u64, 0).map(|g| g.0),
                            ..Referrer::plain(Role::Data, None)
                        });
                    }
                }
            }
        }
    }
}

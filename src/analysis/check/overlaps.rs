//! Sharing that qemu-img does not report.

use super::MAX_OWNER_CLUSTERS;
use super::detail::FindingDetail;
use super::imrt::{CHUNK_BITS, Counts, kind_shift};
use super::report::{Category, FindingKind, Referrer, Role};
use super::visit::{Counter, Owners};
use super::walk::Walk;
use crate::types::{GuestOffset, HostOffset};
use std::collections::{BTreeMap, BTreeSet};

/// Clusters looked at together by [`quiet`].
const BLOCK: usize = 64;

/// Whether none of the `BLOCK` clusters from index `at` of a chunk (kind bits
/// `kbs`) can be suspicious: none is both metadata and data, and every count is
/// at most 1, or at most `nb_l1` where there is only data. A cheap test that
/// lets the scan below skip the clean bulk of an image.
fn quiet(kbs: &[u8], counts: &Counts, at: usize, nb_l1: u64) -> bool {
    let Counts::U8(all) = counts else {
        return false;
    };
    let Some(cs) = all.get(at..at.saturating_add(BLOCK)) else {
        return false;
    };
    let both = kbs.iter().fold(0u8, |acc, k| acc | (k & (k >> 1) & 0x55));
    let meta = kbs.iter().fold(0u8, |acc, k| acc | (k & 0x55));
    let top = u64::from(cs.iter().copied().max().unwrap_or(0));
    both == 0 && (top <= 1 || (meta == 0 && top <= nb_l1))
}

/// Beyond qemu-img: metadata used as data, and data clusters mapped at two guest offsets.
pub(super) fn overlaps(walk: &mut Walk, counter: &Counter) {
    let nb_l1 = (walk.snapshot_l1_count as u64).saturating_add(1);
    let mut suspects: BTreeSet<u64> = BTreeSet::new();
    let nb = counter.imrt.nb_clusters;
    for (ci, chunk) in counter.imrt.chunks.iter().enumerate() {
        let Some(chunk) = chunk else {
            continue;
        };
        let first = (ci as u64) << CHUNK_BITS;
        for (b, kbs) in chunk.kinds.chunks(BLOCK / 4).enumerate() {
            if quiet(kbs, &chunk.counts, b.saturating_mul(BLOCK), nb_l1) {
                continue;
            }
            for (bi, kb) in kbs.iter().enumerate() {
                let i = b.saturating_mul(BLOCK / 4).saturating_add(bi);
                if *kb == 0 {
                    continue;
                }
                for j in 0..4 {
                    // Byte i holds clusters 4i..4i+4 of the chunk; first is a multiple
                    // of CHUNK and the index is below CHUNK, so `|` adds them exactly.
                    let idx = (i << 2) | j;
                    let c = first | idx as u64;
                    if c >= nb {
                        break;
                    }
                    let k = (kb >> kind_shift(j)) & 3;
                    if k == 0 {
                        continue;
                    }
                    let n = chunk.counts.get(idx);
                    let both = k == 3;
                    let meta_shared = k == 1 && n > 1;
                    let data_over = k == 2 && n > nb_l1;
                    if (both || meta_shared || data_over) && suspects.len() < MAX_OWNER_CLUSTERS {
                        suspects.insert(c);
                    }
                }
            }
        }
    }
    // Also clusters whose refcount is wrong, to name their owners.
    for f in &walk.report.findings {
        if let (Some(c), Some(_)) = (f.cluster, f.reference)
            && suspects.len() < MAX_OWNER_CLUSTERS
        {
            suspects.insert(c);
        }
    }
    if suspects.is_empty() {
        return;
    }
    let want = |c: u64| suspects.contains(&c);
    let mut owners = Owners {
        want: &want,
        found: BTreeMap::new(),
    };
    let mut again = Walk::new(walk.img, false);
    again.calculate(&mut owners);
    walk.l2_refs = std::mem::take(&mut again.l2_refs);
    // Ordered, so the notes come out in cluster order on every run.
    let mut named: BTreeMap<u64, Vec<Referrer>> = BTreeMap::new();
    for (c, list) in &owners.found {
        named.insert(*c, walk.referrers(list));
    }
    for f in walk.report.findings.iter_mut() {
        if let Some(c) = f.cluster
            && f.referrers.is_empty()
            && let Some(r) = named.get(&c)
        {
            f.referrers = r.clone();
        }
    }
    let cs = walk.cs;
    for (c, refs) in named {
        let kinds = counter.imrt.kinds(c);
        let guests: BTreeSet<GuestOffset> = refs
            .iter()
            .filter(|r| matches!(r.role, Role::Data | Role::Compressed))
            .filter_map(|r| r.guest_offset)
            .collect();
        let metas: Vec<&Referrer> = refs.iter().filter(|r| r.role.is_metadata()).collect();
        let has_data = refs
            .iter()
            .any(|r| matches!(r.role, Role::Data | Role::Compressed));
        let _ = kinds;
        let what = if has_data && !metas.is_empty() {
            Some("metadata and guest data share")
        } else if metas.len() > 1 && metas.iter().any(|m| m.role != Role::L2Table) {
            Some("two metadata structures share")
        } else if guests.len() > 1 && refs.iter().all(|r| r.role == Role::Data) {
            Some("two different guest offsets map to")
        } else {
            None
        };
        if let Some(what) = what {
            let msg = format!(
                "{what} host cluster {c} (offset {:#x}): {}",
                c.saturating_mul(cs),
                refs.iter()
                    .map(Referrer::describe)
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if let Some(f) = walk.find(
                FindingKind::Note,
                Category::CrossLink,
                FindingDetail::CrossLink,
                msg,
                1,
            ) {
                f.cluster = Some(c);
                f.offset = Some(HostOffset(c.saturating_mul(cs)));
                f.reference = Some(counter.imrt.get(c));
                f.referrers = refs;
                f.repair = Some("no automatic repair: a write to one owner changes what the other reads; copy the data out first".into());
            }
        }
    }
}

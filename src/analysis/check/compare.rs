//! Stored refcounts against computed ones.

use super::PAST_EOF_BUDGET;
use super::detail::FindingDetail;
use super::imrt::{CHUNK, CHUNK_BITS, Counts};
use super::report::{Category, FindingKind};
use super::visit::Counter;
use super::walk::Walk;
use crate::image::RefcountReader;
use crate::refcount::get_refcount;
use crate::types::{HostOffset, low_mask};
use std::collections::BTreeMap;

/// `compare_refcounts`, plus what lies past the end of the file.
pub(super) fn compare(walk: &mut Walk, counter: &Counter) {
    let img = walk.img;
    let nb = counter.imrt.nb_clusters;
    let mut stored = RefcountReader::new(img);
    let mut highest = 0u64;
    let mut unreadable: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    let bb = stored.block_bits;
    let order = stored.order();
    let mask = low_mask(bb);
    let mut c = 0u64;
    while c < nb {
        let ti = c >> bb;
        // The start of the next refcount block (c < nb, so c is not u64::MAX).
        let end = (c | mask).saturating_add(1).min(nb);
        walk.tick("refcounts", c, nb);
        let block = match stored.block(ti) {
            Ok(b) => b,
            Err(off) => {
                unreadable.insert(ti, (off, c, end.saturating_sub(c)));
                c = end;
                continue;
            }
        };
        // No refcount block and nothing counted here: every cluster is 0 = 0.
        // (Skipping keeps the pass proportional to what is used, not to the file
        // length.)
        if block.is_none()
            && ((c >> CHUNK_BITS)..=(end.saturating_sub(1) >> CHUNK_BITS))
                .all(|x| counter.imrt.chunk(x << CHUNK_BITS).is_none())
        {
            c = end;
            continue;
        }
        // Fast path for the common case (16-bit refcounts, counts below 256):
        // skip the stretch of clusters whose stored refcount equals the count.
        let mut from = c;
        if let (Some(b), 4, Some(Counts::U8(counts))) =
            (block, order, counter.imrt.chunk(c).map(|ch| &ch.counts))
        {
            let lo = (c & (CHUNK - 1)) as usize;
            let n = end.saturating_sub(c) as usize;
            let stored = b
                .get((c & mask).saturating_mul(2) as usize..)
                .unwrap_or(&[]);
            if let Some(mine) = counts.get(lo..lo.saturating_add(n)) {
                // Whole stretches of WIDE clusters at once, in a loop without
                // branches the compiler can vectorize, while they agree.
                const WIDE: usize = 64;
                let (pairs, _) = stored.as_chunks::<2>();
                let mut done = 0usize;
                for (sp, mp) in pairs.chunks_exact(WIDE).zip(mine.chunks_exact(WIDE)) {
                    let same = sp
                        .iter()
                        .zip(mp)
                        .fold(true, |same, (&[hi, lo], &m)| same & (hi == 0) & (lo == m));
                    if !same {
                        break;
                    }
                    if let Some(p) = mp.iter().rposition(|&m| m != 0) {
                        highest = c.saturating_add(done.saturating_add(p) as u64);
                    }
                    done = done.saturating_add(WIDE);
                }
                from = c.saturating_add(done as u64);
                let (pairs, mine) = (
                    pairs.get(done..).unwrap_or(&[]),
                    mine.get(done..).unwrap_or(&[]),
                );
                for (cc, (pair, &m)) in (from..end).zip(pairs.iter().zip(mine)) {
                    let r = u16::from_be_bytes(*pair);
                    if r != u16::from(m) {
                        break;
                    }
                    if r != 0 {
                        highest = cc;
                    }
                    // cc < end: no overflow.
                    from = cc.saturating_add(1);
                }
            }
        }
        for c in from..end {
            let computed = counter.imrt.get(c);
            let r = block.map_or(0, |b| get_refcount(b, order, c & mask));
            if r == 0 && computed == 0 {
                continue;
            }
            if r > 0 || computed > 0 {
                highest = c;
            }
            if r != computed {
                let (kind, word) = if r < computed {
                    (FindingKind::Corruption, "ERROR")
                } else {
                    (FindingKind::Leak, "Leaked")
                };
                let msg = format!("{word} cluster {c} refcount={r} reference={computed}");
                let cs = walk.cs;
                if let Some(f) = walk.find(
                    kind,
                    Category::Refcount,
                    FindingDetail::RefcountMismatch,
                    msg,
                    1,
                ) {
                    f.cluster = Some(c);
                    f.offset = Some(HostOffset(c.saturating_mul(cs)));
                    f.refcount = Some(r);
                    f.reference = Some(computed);
                    f.repair = Some(if r == 0 {
                        "qemu-img check -r all rebuilds the refcount structure (a used cluster has refcount 0)".to_string()
                    } else if r < computed {
                        format!("qemu-img check -r all sets the refcount to {computed}")
                    } else {
                        format!(
                            "qemu-img check -r leaks sets the refcount to {computed}{}",
                            if computed == 0 {
                                " (frees the cluster)"
                            } else {
                                ""
                            }
                        )
                    });
                }
            }
        }
        c = end;
    }
    walk.tick("refcounts", nb, nb);
    for (ti, (off, first, n)) in unreadable {
        let msg = format!(
            "Can't get refcount for cluster {first} (and {} more): refcount block {ti} at {off:#x} is not cluster aligned (Input/output error)",
            n.saturating_sub(1)
        );
        if let Some(f) = walk.find(
            FindingKind::CheckError,
            Category::Refblock,
            FindingDetail::RefcountUnreadable,
            msg,
            n,
        ) {
            f.cluster = Some(first);
            f.offset = Some(HostOffset(off));
        }
    }
    walk.report.image_end_offset = HostOffset(highest.saturating_add(1).saturating_mul(walk.cs));
    past_eof(walk, &mut stored, nb);
}

/// Beyond qemu-img: refcounts for clusters past the end of the file (cluster
/// `nb` and on), within [`PAST_EOF_BUDGET`].
fn past_eof(walk: &mut Walk, stored: &mut RefcountReader, nb: u64) {
    let table = stored.table.clone();
    let per = 1u64 << stored.block_bits;
    let mut past: Vec<(u64, u64)> = Vec::new();
    let mut past_total = 0u64;
    // Only real blocks (aligned, inside the file) are read, and at most
    // PAST_EOF_BUDGET refcounts in all, so a table of garbage entries stays cheap.
    let mut budget = PAST_EOF_BUDGET;
    let mut cut_short = false;
    for (ti, e) in table.iter().enumerate() {
        let first = (ti as u64).saturating_mul(per);
        let last = first.saturating_add(per);
        let readable = e
            .block_offset()
            .is_some_and(|o| walk.img.geometry().is_cluster_aligned(o.0) && o.0 < walk.file_len);
        if last <= nb || !readable {
            continue;
        }
        let span = last.saturating_sub(first.max(nb));
        if span > budget {
            cut_short = true;
            break;
        }
        budget = budget.saturating_sub(span);
        for c in first.max(nb)..last {
            if let Ok(r) = stored.get(c)
                && r != 0
            {
                past_total = past_total.saturating_add(1);
                if past.len() < 1000 {
                    past.push((c, r));
                }
            }
        }
    }
    if cut_short {
        walk.find(
            FindingKind::Note,
            Category::RefcountPastEof,
            FindingDetail::RefcountPastEof,
            format!("refcounts past the end of the file were looked at for the first {PAST_EOF_BUDGET} clusters only"),
            1,
        );
    }
    for (c, r) in &past {
        let msg = format!(
            "cluster {c} (offset {:#x}) is past the end of the file but has refcount {r}; qemu-img check does not look there",
            c.saturating_mul(walk.cs)
        );
        let at = c.saturating_mul(walk.cs);
        if let Some(f) = walk.find(
            FindingKind::Note,
            Category::RefcountPastEof,
            FindingDetail::RefcountPastEof,
            msg,
            1,
        ) {
            f.cluster = Some(*c);
            f.offset = Some(HostOffset(at));
            f.refcount = Some(*r);
            f.reference = Some(0);
        }
    }
    if past_total > past.len() as u64 {
        let msg = format!(
            "{} more clusters past the end of the file have a refcount",
            past_total.saturating_sub(past.len() as u64)
        );
        walk.find(
            FindingKind::Note,
            Category::RefcountPastEof,
            FindingDetail::RefcountPastEof,
            msg,
            1,
        );
    }
}

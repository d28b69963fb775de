//! The refcount walk (`qcow2_update_snapshot_refcount`): addend +1, 0 or -1
//! over every L2 table and cluster an L1 table names, then the COPIED flags.

use super::Sim;
use super::SimError;
use super::SimResult;
use super::change::Target;
use super::overlap::Meta;
use crate::refcount::get_refcount;
use crate::tables::ClusterType;
use crate::tables::CompressedDescriptor;
use crate::tables::L1Entry;
use crate::tables::L2Entry;
use crate::types::HostOffset;
use crate::types::low_mask;

/// The reasons the walk over one L2 table gives: the addend on a data
/// cluster, on compressed data, and the COPIED change.
const DATA: usize = 0;
const COMPRESSED: usize = 1;
const COPIED: usize = 2;

/// A walk alternates between reasons on every entry (a refcount, then the
/// entry's COPIED flag): they are moved in and out of `Sim::reason` rather
/// than copied each time. `Sim::reason` always holds the one put last.
struct Reasons {
    text: [String; 3],
    /// Which one is in `Sim::reason` now (its slot holds what was there).
    out: Option<usize>,
}

impl Reasons {
    /// Make `reason` read reason `k`.
    fn put(&mut self, reason: &mut String, k: usize) {
        if self.out == Some(k) {
            return;
        }
        if let Some(o) = self.out.and_then(|o| self.text.get_mut(o)) {
            std::mem::swap(reason, o);
        }
        if let Some(t) = self.text.get_mut(k) {
            std::mem::swap(reason, t);
            self.out = Some(k);
        }
    }

    /// Reason `k` now reads `text`.
    fn set(&mut self, reason: &mut String, k: usize, text: String) {
        if self.out == Some(k) {
            *reason = text;
        } else if let Some(t) = self.text.get_mut(k) {
            *t = text;
        }
    }
}

/// One L2 table's walk: what its entries share.
struct Walk {
    l2: HostOffset,
    addend: i32,
    reasons: Reasons,
    /// The refcount the COPIED reason was written for.
    copied_for: u64,
}

/// An L2 table taken in bulk: its entry words read once and written back once
/// (nothing else reads or writes the table meanwhile), and the refcount block
/// of the last cluster counted.
struct Bulk {
    /// The table's cluster.
    table: u64,
    /// The first word of every entry, as the walk has left it.
    words: Vec<u64>,
    /// Whether any word changed.
    changed: bool,
    /// The refcount table index last looked up and its block's cluster.
    block: Option<(u64, Option<u64>)>,
}

#[cfg(test)]
thread_local! {
    /// Every table entry by entry, to compare the two paths.
    static PER_ENTRY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the bulk path is switched off (only ever by a test).
fn bulk_disabled() -> bool {
    #[cfg(test)]
    {
        PER_ENTRY.with(std::cell::Cell::get)
    }
    #[cfg(not(test))]
    {
        false
    }
}

impl Sim {
    // ---- the refcount walk ---------------------------------------------------

    pub(super) fn l1_label(&self, offset: HostOffset) -> String {
        if offset == self.l1_table_offset {
            return "active L1".into();
        }
        match self.snapshots.iter().find(|s| s.l1_table_offset == offset) {
            Some(s) => format!("snapshot {} '{}' L1", s.id, s.name),
            None => format!("L1 at {offset:#x}"),
        }
    }

    /// QEMU's `qcow2_update_snapshot_refcount`. `active` selects the in-memory
    /// active table (QEMU uses it when the offset is the active L1's).
    pub(super) fn update_snapshot_refcount(
        &mut self,
        l1_offset: HostOffset,
        l1_size: u64,
        addend: i32,
    ) -> SimResult<()> {
        let label = self.l1_label(l1_offset);
        let active = l1_offset == self.l1_table_offset;
        // The snapshot record the label names (the first at this offset).
        let record = (!active)
            .then(|| {
                self.snapshots
                    .iter()
                    .position(|s| s.l1_table_offset == l1_offset)
            })
            .flatten();
        // QEMU keeps a snapshot's VM state in the L1 range past its disk
        // (qcow2_vm_state_offset): entries from this index on name VM state.
        let disk = record
            .and_then(|k| self.snapshots.get(k))
            .map_or(self.size, |s| s.disk_size);
        let vm_from = self.geo.l1_entries_for(disk);
        let mut table: Vec<L1Entry> = if active {
            self.l1.clone()
        } else {
            let raw = self.read_bytes(l1_offset, l1_size.saturating_mul(8));
            raw.chunks_exact(8)
                .map(|c| L1Entry(crate::bytes::be64(c, 0)))
                .collect()
        };
        let mut l1_modified = false;
        let mut result = Ok(());
        for i in 0..table.len() {
            let Some(&old_l1) = table.get(i) else { break };
            if old_l1 == L1Entry::UNALLOCATED {
                continue;
            }
            let l2 = old_l1.l2_offset().unwrap_or_default();
            if !l2.is_multiple_of(self.cs) {
                result = Err(SimError::Qemu(format!(
                    "L2 table offset {l2:#x} unaligned (L1 index: {i:#x}) (EIO)"
                )));
                break;
            }
            let vm = if (i as u64) >= vm_from {
                " (VM state, past the disk)"
            } else {
                ""
            };
            if let Err(e) = self.walk_l2(l2, addend, &label, i, vm) {
                result = Err(e);
                break;
            }
            if addend != 0 {
                self.why(format!(
                    "{}: the L2 table named by {label}[{i}]{vm}",
                    if addend > 0 { "+1" } else { "-1" }
                ));
                if let Err(e) = self.update_one(self.cluster_of(l2), 1, addend < 0) {
                    result = Err(e);
                    break;
                }
            }
            let r = match self.get_refcount(self.cluster_of(l2)) {
                Ok(r) => r,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            // Only the offset and COPIED are kept: reserved bits are dropped.
            let new_l1 = L1Entry::l2_table(l2, r == 1);
            if new_l1 != old_l1 {
                if let Some(slot) = table.get_mut(i) {
                    *slot = new_l1;
                }
                l1_modified = true;
                self.why(if r == 1 {
                    "COPIED set: the L2 table's refcount is exactly 1".to_string()
                } else if r == 0 {
                    "COPIED cleared: the L2 table's refcount is now 0 (freed)".to_string()
                } else {
                    format!("COPIED cleared: the L2 table's refcount is {r} (shared)")
                });
                self.record(
                    Target::L1Entry {
                        table: label.clone(),
                        table_offset: l1_offset,
                        index: i as u64,
                        snapshot: record,
                    },
                    old_l1.0,
                    new_l1.0,
                );
            }
        }
        if active {
            // QEMU modified its in-memory table in place.
            self.l1.clone_from(&table);
        }
        if result.is_ok() && addend >= 0 && l1_modified {
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            result = self.write_bytes(l1_offset, &bytes);
        } else if l1_modified && addend < 0 {
            self.note(format!(
                "the {label} is not written back: with addend -1 QEMU does not write it (snapshot-delete frees this L1 next; in snapshot-apply the snapshot's L1 is already written over it)"
            ));
        }
        result
    }

    /// The L2 pass of the walk over the table at `l2` (named by `label[i]`):
    /// the addend on every cluster it names, then COPIED on every entry whose
    /// cluster's refcount is now exactly 1.
    ///
    /// Entries go in bulk (see [`Bulk`]) while the walk's own writes cannot
    /// land on the table; any other entry goes through [`Sim::walk_entry`],
    /// and so does the rest of its table.
    fn walk_l2(
        &mut self,
        l2: HostOffset,
        addend: i32,
        label: &str,
        i: usize,
        vm: &str,
    ) -> SimResult<()> {
        let entries = self.geo.l2_entries();
        let sign = if addend > 0 { "+1" } else { "-1" };
        let mut walk = Walk {
            l2,
            addend,
            reasons: Reasons {
                text: [
                    format!("{sign}: data cluster named by {label}[{i}] -> L2 {l2:#x}{vm}"),
                    format!("{sign}: compressed data named by {label}[{i}] -> L2 {l2:#x}{vm}"),
                    String::new(),
                ],
                out: None,
            },
            copied_for: u64::MAX,
        };
        let mut bulk = self.bulk_start(l2);
        for j in 0..entries {
            if let Some(b) = bulk.as_mut() {
                if self.bulk_entry(b, &mut walk, j) {
                    continue;
                }
                // This entry and the rest of the table, one by one, on the
                // table as the bulk entries left it.
                self.bulk_finish(b);
                bulk = None;
            }
            self.walk_entry(&mut walk, j)?;
        }
        if let Some(b) = bulk.as_ref() {
            self.bulk_finish(b);
        }
        Ok(())
    }

    /// Entry `j` of the walk's table, as QEMU takes it: read, the addend on its
    /// cluster, COPIED written back through the overlap check.
    fn walk_entry(&mut self, w: &mut Walk, j: u64) -> SimResult<()> {
        let (l2, addend) = (w.l2, w.addend);
        let step = self.geo.l2_entry_size();
        let eoff = l2.saturating_entry(j, step);
        let old = self.read_u64(eoff);
        let entry = L2Entry::from_word(old).with_copied(false).raw;
        let off = L2Entry::from_word(entry).host_offset();
        let e = L2Entry {
            raw: entry,
            bitmap: 0,
        };
        let refcount = match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Compressed => {
                if addend != 0 {
                    let d = CompressedDescriptor::decode(entry, &self.geo);
                    w.reasons.put(&mut self.reason, COMPRESSED);
                    self.update_refcount(d.offset, d.size, 1, addend < 0)?;
                }
                2
            }
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                if !off.is_multiple_of(self.cs) {
                    return Err(SimError::Qemu(format!(
                        "Cluster allocation offset {off:#x} unaligned (L2 offset: {l2:#x}, L2 index: {j:#x}) (EIO)"
                    )));
                }
                if addend != 0 {
                    w.reasons.put(&mut self.reason, DATA);
                    self.update_one_to(self.cluster_of(off), 1, addend < 0)?
                } else {
                    self.get_refcount(self.cluster_of(off))?
                }
            }
            _ => 0,
        };
        let new = L2Entry::from_word(entry).with_copied(refcount == 1).raw;
        if new != old {
            self.copied_reason(w, new, refcount);
            self.overlap_check(Some(Meta::ActiveL2), eoff, step)?;
            self.write_u64(eoff, new)?;
            self.record(
                Target::L2Entry {
                    table_offset: l2,
                    index: j,
                },
                old,
                new,
            );
        }
        Ok(())
    }

    /// Make the reason read why entry word `new` has COPIED as it has, for a
    /// cluster whose refcount is now `refcount`.
    fn copied_reason(&mut self, w: &mut Walk, new: u64, refcount: u64) {
        if w.copied_for != refcount {
            w.copied_for = refcount;
            let text = if L2Entry::from_word(new).copied() {
                "COPIED set: refcount is now exactly 1".to_string()
            } else if refcount == 0 {
                "COPIED cleared: refcount is now 0 (freed)".to_string()
            } else {
                format!("COPIED cleared: refcount is now {refcount} (shared)")
            };
            w.reasons.set(&mut self.reason, COPIED, text);
        }
        w.reasons.put(&mut self.reason, COPIED);
    }

    /// The table at `l2` in bulk, if the walk's writes can neither land on it
    /// nor fail: it is clear of every structure the overlap check knows (so it
    /// is no refcount block, not the refcount table, no L1 table, not the
    /// header), and a write anywhere in it is one QEMU can make. While only
    /// bulk entries run, the refcount table and the blocks stay where they
    /// are, so the overlap check of each entry's write passes as this one did.
    fn bulk_start(&mut self, l2: HostOffset) -> Option<Bulk> {
        if bulk_disabled() {
            return None;
        }
        self.write_end(l2, self.cs).ok()?;
        if self.overlap_of(Some(Meta::ActiveL2), l2, self.cs).is_some() {
            return None;
        }
        let step = self.geo.l2_entry_size() as usize;
        let tc = self.cluster_of(l2);
        let words: Vec<u64> = self
            .cluster_ro(tc)
            .chunks_exact(step.max(8))
            .map(|c| crate::bytes::be64(c, 0))
            .collect();
        Some(Bulk {
            table: tc,
            words,
            changed: false,
            block: None,
        })
    }

    /// Entry `j` in bulk, with the same effects, records and reasons as
    /// [`Sim::walk_entry`], the table's write left for [`Sim::bulk_finish`].
    /// False, with nothing done, when the entry is not for the bulk path: a
    /// compressed or unaligned cluster, a refcount block that would have to
    /// be allocated or that is unaligned, a refcount that would overflow or
    /// go below 0.
    fn bulk_entry(&mut self, b: &mut Bulk, w: &mut Walk, j: u64) -> bool {
        let Some(&old) = b.words.get(j as usize) else {
            return false;
        };
        let entry = L2Entry::from_word(old).with_copied(false).raw;
        let e = L2Entry {
            raw: entry,
            bitmap: 0,
        };
        let refcount = match e.cluster_type(&self.geo, self.has_data_file) {
            ClusterType::Compressed => return false,
            ClusterType::Normal | ClusterType::ZeroAlloc => {
                let off = e.host_offset();
                if !off.is_multiple_of(self.cs) {
                    return false;
                }
                let c = self.cluster_of(off);
                let ti = c >> self.block_bits();
                let block = match b.block {
                    Some((t, blk)) if t == ti => blk,
                    _ => {
                        let blk = match self.refcount_block_of(ti) {
                            Ok(blk) => blk,
                            Err(_) => return false,
                        };
                        b.block = Some((ti, blk));
                        blk
                    }
                };
                let idx = c & low_mask(self.block_bits());
                let order = self.order;
                match (block, w.addend) {
                    (None, 0) => 0,
                    // The block would be allocated.
                    (None, _) => return false,
                    (Some(bc), 0) => get_refcount(self.cluster_ro(bc), order, idx),
                    (Some(bc), addend) => {
                        let slot = self.clusters.slot(bc, &self.base, self.zero_from);
                        let cur = get_refcount(self.clusters.at(slot, false), order, idx);
                        let Some(new) = self.refcount_after(cur, 1, addend < 0) else {
                            return false;
                        };
                        w.reasons.put(&mut self.reason, DATA);
                        self.store_refcount(slot, idx, c, cur, new);
                        new
                    }
                }
            }
            _ => 0,
        };
        #[cfg(test)]
        BULK_ENTRIES.with(|n| n.set(n.get().saturating_add(1)));
        let new = L2Entry::from_word(entry).with_copied(refcount == 1).raw;
        if new != old {
            self.copied_reason(w, new, refcount);
            let eoff = w.l2.saturating_entry(j, self.geo.l2_entry_size());
            // What the write of the entry does besides its bytes.
            self.written(eoff, eoff.saturating_add(8));
            if let Some(slot) = b.words.get_mut(j as usize) {
                *slot = new;
            }
            b.changed = true;
            self.record(
                Target::L2Entry {
                    table_offset: w.l2,
                    index: j,
                },
                old,
                new,
            );
        }
        true
    }

    /// Write the bulk entries' words into the table.
    fn bulk_finish(&mut self, b: &Bulk) {
        if !b.changed {
            return;
        }
        let step = self.geo.l2_entry_size() as usize;
        let table = self.cluster(b.table);
        for (dst, w) in table.chunks_exact_mut(step.max(8)).zip(&b.words) {
            if let Some(d) = dst.get_mut(..8) {
                d.copy_from_slice(&w.to_be_bytes());
            }
        }
    }

    pub(super) fn refcount_walk(&mut self, l1: &str, addend: i32) -> SimResult<()> {
        if l1 == "active" {
            return self.update_snapshot_refcount(
                self.l1_table_offset,
                self.l1.len() as u64,
                addend,
            );
        }
        let Some(i) = self.find_snapshot(l1) else {
            return Err(SimError::Qemu(format!(
                "no snapshot '{l1}' (use 'active' or a snapshot ID or name)"
            )));
        };
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| SimError::Qemu("no snapshot".into()))?;
        self.check_snapshot_l1(&sn)?;
        self.update_snapshot_refcount(sn.l1_table_offset, u64::from(sn.l1_size), addend)
    }
}

#[cfg(test)]
thread_local! {
    /// How many entries went in bulk on this thread.
    static BULK_ENTRIES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
mod tests {
    // Test-only code, working on values it made itself.
    #![allow(
        clippy::arithmetic_side_effects,
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used
    )]

    use super::*;
    use crate::header::Field;
    use crate::image::{Qcow2, Strictness};
    use crate::io::MemSource;
    use std::sync::Arc;

    const CB: u32 = 9;
    const CS: u64 = 1 << CB;
    /// Clusters in the file.
    const N: u64 = 160;
    const L1_SIZE: u64 = 4;

    /// splitmix64.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn put64(b: &mut [u8], at: u64, v: u64) {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn put32(b: &mut [u8], at: u64, v: u32) {
        b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// A random image: refcount width `1 << order`, tables of every kind of
    /// entry, clusters shared within and between tables, refcounts at 0 and
    /// at the largest value, now and then a missing refcount block, an
    /// unaligned entry, or an L2 table on other metadata.
    fn image(r: &mut Rng, order: u32) -> Vec<u8> {
        let mut b = vec![0u8; (N * CS) as usize];
        let per_block = (CS * 8) >> order;
        let blocks = N.div_ceil(per_block);
        let (reftable, block0) = (1u64, 2u64);
        let l1 = block0 + blocks;
        let l2s: Vec<u64> = (l1 + 1..l1 + 4).collect();
        let first_data = l1 + 4;
        let head = |b: &mut [u8], f: Field, v: u64| match f.size() {
            4 => put32(b, f.offset(), v as u32),
            _ => put64(b, f.offset(), v),
        };
        b[..4].copy_from_slice(b"QFI\xfb");
        head(&mut b, Field::Version, 3);
        head(&mut b, Field::ClusterBits, u64::from(CB));
        head(&mut b, Field::Size, L1_SIZE * (CS / 8) * CS);
        head(&mut b, Field::L1Size, L1_SIZE);
        head(&mut b, Field::L1TableOffset, l1 * CS);
        head(&mut b, Field::RefcountTableOffset, reftable * CS);
        head(&mut b, Field::RefcountTableClusters, 1);
        head(&mut b, Field::RefcountOrder, u64::from(order));
        head(&mut b, Field::HeaderLength, 104);
        for i in 0..blocks {
            if r.below(12) != 0 || i == 0 {
                put64(&mut b, reftable * CS + 8 * i, (block0 + i) * CS);
            }
        }
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        for c in 0..N {
            let v = match r.below(60) {
                0 => 0,
                1 => max,
                2..=9 => 2.min(max),
                _ => 1,
            };
            let bc = block0 + c / per_block;
            crate::refcount::set_refcount(
                &mut b[(bc * CS) as usize..((bc + 1) * CS) as usize],
                order,
                c % per_block,
                v,
            );
        }
        for (i, &t) in l2s.iter().enumerate() {
            let mut e = t * CS;
            if r.below(10) == 0 {
                // On a refcount block, the refcount table or the L1 table.
                e = [block0, reftable, l1][r.below(3) as usize] * CS;
            }
            if r.below(2) == 0 {
                e |= 1 << 63;
            }
            put64(&mut b, l1 * CS + 8 * i as u64, e);
        }
        if r.below(3) == 0 {
            // A table named twice.
            let e0 = u64::from_be_bytes(
                b[(l1 * CS) as usize..(l1 * CS) as usize + 8]
                    .try_into()
                    .unwrap(),
            );
            put64(&mut b, l1 * CS + 8 * 3, e0);
        }
        let entries = CS / 8;
        for &t in &l2s {
            for j in 0..entries {
                let data = first_data + r.below(N - first_data);
                let copied = r.below(2) << 63;
                let w = match r.below(16) {
                    0..=2 => 0,
                    3 => 1,
                    4 => (data * CS) | 1 | copied,
                    5 => (1 << 62) | (r.below(2) << 61) | (data * CS + r.below(CS)),
                    6 if r.below(20) == 0 => (data * CS + 512 / 2) | copied,
                    6 if r.below(4) == 0 => (r.below(first_data) * CS) | copied,
                    _ => (data * CS) | copied,
                };
                put64(&mut b, t * CS + 8 * j, w);
            }
        }
        b
    }

    /// Everything a run of `ops` leaves: the records, allocations and
    /// releases, and the bytes of the simulated file.
    fn run(bytes: &[u8], ops: &[i32], per_entry: bool) -> Option<(String, Vec<u8>)> {
        PER_ENTRY.with(|p| p.set(per_entry));
        let src: crate::io::SharedSource = Arc::new(MemSource::new("r.qcow2", bytes.to_vec()));
        let img = Qcow2::open(src, Strictness::Lenient).ok()?;
        let mut sim = Sim::new(&img, std::path::Path::new("r.qcow2")).ok()?;
        for &addend in ops {
            sim.apply(&super::super::Op::RefcountUpdate {
                l1: "active".into(),
                addend,
            });
        }
        PER_ENTRY.with(|p| p.set(false));
        let log = format!(
            "{:?}\n{:?}\n{:?}\n{}",
            sim.records
                .iter()
                .map(|r| (&r.description, &r.steps, &r.error))
                .collect::<Vec<_>>(),
            sim.allocated,
            sim.freed,
            sim.file_len
        );
        let src = sim.source();
        let mut out = vec![0u8; sim.file_len as usize];
        src.read_at(&mut out, 0).ok()?;
        Some((log, out))
    }

    #[test]
    fn bulk_and_per_entry_walks_agree() {
        let mut r = Rng(0x5157_0014);
        let (mut compared, mut failed_ops) = (0u64, 0u64);
        BULK_ENTRIES.with(|b| b.set(0));
        for case in 0..200u64 {
            let order = (case % 7) as u32;
            let bytes = image(&mut r, order);
            let ops: Vec<i32> = (0..1 + r.below(3))
                .map(|_| [-1, 0, 1][r.below(3) as usize])
                .collect();
            let Some(bulk) = run(&bytes, &ops, false) else {
                continue;
            };
            let each = run(&bytes, &ops, true).expect("the same image opens twice");
            assert!(
                bulk.0 == each.0,
                "case {case} (order {order}, ops {ops:?}): the change logs differ:\nbulk: {}\neach: {}",
                bulk.0,
                each.0
            );
            assert!(bulk.1 == each.1, "case {case}: the simulated bytes differ");
            compared += 1;
            failed_ops += u64::from(bulk.0.contains("Some(\""));
        }
        let bulk_entries = BULK_ENTRIES.with(std::cell::Cell::get);
        // The cases must reach both paths and both outcomes.
        assert!(compared > 180, "only {compared} images opened");
        assert!(
            failed_ops > 20 && failed_ops + 20 < compared,
            "{failed_ops} of {compared} failed"
        );
        assert!(
            bulk_entries > 4_000,
            "only {bulk_entries} entries went in bulk"
        );
    }
}

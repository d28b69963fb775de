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

//! Lookups on images built in memory: one L2 entry of every kind, extended-L2
//! subclusters, a backing file underneath, and the entries QEMU fails with EIO.

// Test arithmetic on offsets the test chose.
#![allow(clippy::arithmetic_side_effects)]

use super::*;
use crate::tables::{CompressedDescriptor, OFLAG_COPIED, Subclusters};
use crate::testing::{ImageBuilder, raw_layer, stack};
use flate2::Compression;
use flate2::write::DeflateEncoder;
use std::io::Write;

const CS: u64 = 64 << 10;

/// The run at `guest`, through the decoded-table cache and, the same answer
/// required, through an [`L2Walker`] over the table's bytes (as `map` reads).
fn run_at(b: &ImageBuilder, guest: u64) -> Result<Run> {
    let guest = GuestOffset(guest);
    let img = b.open();
    let view = img.active_view();
    let cached = layer_run(&img, &view, guest, CS, "built.qcow2");
    let walked = layer_run_with(&img, &view, guest, CS, "built.qcow2", &mut L2Walker::new());
    match (&cached, &walked) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "guest {guest:#x}"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "guest {guest:#x}"),
        _ => panic!("guest {guest:#x}: {cached:?} against {walked:?}"),
    }
    cached
}

fn read_at(chain: &crate::chain::Chain, guest: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0x5a; len];
    read(
        chain,
        GuestOffset(guest),
        &mut buf,
        &mut ReadCache::default(),
    )
    .unwrap();
    buf
}

fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Entries 0..=4: data, unallocated, zero, zero with a preallocated cluster,
/// compressed. The preallocated cluster holds 0xbb, which a read must not return.
fn every_kind() -> (ImageBuilder, HostOffset, HostOffset, CompressedDescriptor) {
    let mut b = ImageBuilder::new(16, 1 << 20);
    let data = b.cluster(&[0xaa; CS as usize]);
    let prealloc = b.cluster(&[0xbb; CS as usize]);
    // The compressed bytes start 0x10 into their cluster, as QEMU packs them.
    let z = deflate(&[0xcc; CS as usize]);
    let mut packed = vec![0u8; 0x10];
    packed.extend_from_slice(&z);
    let zc = b.cluster(&packed);
    let start = zc.0 + 0x10;
    let sectors = (0x10 + z.len() as u64).div_ceil(512);
    let word = CompressedDescriptor::encode(start, sectors, &b.geometry());
    let d = CompressedDescriptor::decode(word, &b.geometry());
    let b = b
        .l2(0, OFLAG_COPIED | data.0, 0)
        .l2(2, 1, 0)
        .l2(3, OFLAG_COPIED | prealloc.0 | 1, 0)
        .l2(4, word, 0);
    (b, data, prealloc, d)
}

#[test]
fn an_l2_entry_of_every_kind_decodes_and_resolves() {
    let (b, data, prealloc, d) = every_kind();
    let img = b.open();
    let geo = img.geometry();
    let l2 = img.l2_table(img.l1[0].l2_offset().unwrap()).unwrap();
    let m = |j: usize| l2[j].mapping(&geo, false);
    assert_eq!(
        m(0),
        L2Mapping::Data {
            host: data,
            copied: true,
            subclusters: None
        }
    );
    assert_eq!(m(1), L2Mapping::Unallocated { subclusters: None });
    assert_eq!(
        m(2),
        L2Mapping::Zero {
            preallocated: None,
            copied: false
        }
    );
    assert_eq!(
        m(3),
        L2Mapping::Zero {
            preallocated: Some(prealloc),
            copied: true
        }
    );
    assert_eq!(
        m(4),
        L2Mapping::Compressed {
            descriptor: d,
            copied: false
        }
    );
    assert_eq!(m(3).host_cluster(), Some(prealloc));
    assert_eq!(m(4).host_cluster(), None);

    let status = |j: u64| run_at(&b, j * CS + 0x100).unwrap().status;
    assert_eq!(
        status(0),
        Status::Data {
            host: HostOffset(data.0 + 0x100),
            in_data_file: false
        }
    );
    assert_eq!(status(1), Status::Unallocated { host: None });
    assert_eq!(status(2), Status::Zero { host: None });
    assert_eq!(
        status(3),
        Status::Zero {
            host: Some(HostOffset(prealloc.0 + 0x100))
        }
    );
    assert_eq!(
        status(4),
        Status::Compressed {
            descriptor: d,
            in_cluster: 0x100
        }
    );

    let chain = b.chain();
    let bytes = read_at(&chain, 0, 5 * CS as usize);
    let cluster = |j: usize| &bytes[j * CS as usize..(j + 1) * CS as usize];
    assert!(cluster(0).iter().all(|&x| x == 0xaa));
    assert!(cluster(1).iter().all(|&x| x == 0), "no backing file: zeros");
    assert!(cluster(2).iter().all(|&x| x == 0));
    assert!(
        cluster(3).iter().all(|&x| x == 0),
        "not the 0xbb kept there"
    );
    assert!(cluster(4).iter().all(|&x| x == 0xcc), "inflated");
}

#[test]
fn runs_stop_where_the_type_or_the_host_contiguity_changes() {
    let mut b = ImageBuilder::new(16, 1 << 20);
    let a = b.cluster(&[1; 8]);
    let c = b.cluster(&[2; 8]);
    let far = b.cluster(&[3; 8]);
    let far = b.cluster(&[4; 8]).0.max(far.0);
    // Entries 0 and 1 are contiguous data, entry 2 jumps, entries 3..5 are zeros.
    let b = b
        .l2(0, a.0, 0)
        .l2(1, c.0, 0)
        .l2(2, far, 0)
        .l2(3, 1, 0)
        .l2(4, 1, 0);
    let img = b.open();
    let view = img.active_view();
    let run = |g| layer_run(&img, &view, GuestOffset(g), 1 << 20, "t").unwrap();
    assert_eq!(run(0).len, 2 * CS);
    assert_eq!(run(2 * CS).len, CS);
    assert_eq!(run(3 * CS).len, 2 * CS);
    // Unallocated from entry 5 on: the run goes as far as asked (1 MiB), inside
    // the L2 table; where the disk ends is the caller's limit.
    assert_eq!(run(5 * CS).len, 1 << 20);
}

#[test]
fn extended_l2_subclusters_resolve_one_by_one_over_a_backing_file() {
    // 64 KiB clusters, 2 KiB subclusters: 0 and 1 allocated, 2 zero, the rest unallocated.
    let mut b = ImageBuilder::new(16, 1 << 20).extended_l2();
    let host = b.cluster(&[0xdd; CS as usize]);
    let bits = Subclusters {
        alloc: 0b11,
        zero: 0b100,
    };
    let b = b.l2(0, OFLAG_COPIED | host.0, bits.word());
    let img = b.open();
    let geo = img.geometry();
    let l2 = img.l2_table(img.l1[0].l2_offset().unwrap()).unwrap();
    assert_eq!(
        l2[0].mapping(&geo, false),
        L2Mapping::Data {
            host,
            copied: true,
            subclusters: Some(bits)
        }
    );
    let view = img.active_view();
    let r0 = layer_run(&img, &view, GuestOffset(0), CS, "t").unwrap();
    assert_eq!((r0.len, r0.subcluster), (4096, SubclusterType::Normal));
    let r2 = layer_run(&img, &view, GuestOffset(4096), CS, "t").unwrap();
    assert_eq!((r2.len, r2.subcluster), (2048, SubclusterType::ZeroAlloc));
    let r3 = layer_run(&img, &view, GuestOffset(6144), CS, "t").unwrap();
    assert_eq!(r3.subcluster, SubclusterType::UnallocatedAlloc);
    assert_eq!(r3.len, CS - 6144);

    let chain = stack(vec![b.chain(), raw_layer(vec![0xee; 1 << 20])]);
    let bytes = read_at(&chain, 0, 8192);
    assert!(bytes[..4096].iter().all(|&x| x == 0xdd));
    assert!(bytes[4096..6144].iter().all(|&x| x == 0), "the zero bit");
    assert!(
        bytes[6144..].iter().all(|&x| x == 0xee),
        "from the backing file"
    );
}

#[test]
fn unallocated_entries_fall_through_to_the_backing_file() {
    let mut b = ImageBuilder::new(16, 1 << 20);
    let data = b.cluster(&[0x77; CS as usize]);
    let b = b.l2(1, data.0, 0);
    let chain = stack(vec![b.chain(), raw_layer(vec![0x11; 1 << 20])]);
    let bytes = read_at(&chain, 0, 2 * CS as usize);
    assert!(bytes[..CS as usize].iter().all(|&x| x == 0x11));
    assert!(bytes[CS as usize..].iter().all(|&x| x == 0x77));
    let t = trace(&chain, GuestOffset(0x10));
    let last = t.steps.last().unwrap();
    assert_eq!(last.depth, 1, "answered by the base");
    assert!(
        matches!(&last.kind, StepKind::Data { host_offset, .. } if *host_offset == HostOffset(0x10))
    );
}

#[test]
fn entries_qemu_fails_with_eio_are_guest_io_errors() {
    let mut b = ImageBuilder::new(16, 1 << 20);
    let data = b.cluster(&[0; 8]);
    // A data cluster not aligned to a cluster, and contradictory subcluster bits.
    let unaligned = b.clone().l2(0, data.0 + 0x200, 0);
    assert!(matches!(
        run_at(&unaligned, 0),
        Err(Error::GuestIo {
            guest: GuestOffset(0),
            ..
        })
    ));
    let mut e = ImageBuilder::new(16, 1 << 20).extended_l2();
    let h = e.cluster(&[0; 8]);
    let both = Subclusters { alloc: 1, zero: 1 };
    let e = e.l2(0, h.0, both.word());
    assert!(matches!(run_at(&e, 0), Err(Error::GuestIo { .. })));
    // An L1 entry whose L2 table is not aligned.
    let l1 = b.l1_0(OFLAG_COPIED | 0x4_0200);
    assert!(matches!(
        run_at(&l1, CS),
        Err(Error::GuestIo { guest, .. }) if guest == GuestOffset(CS)
    ));
}

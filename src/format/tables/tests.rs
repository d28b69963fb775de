//! Decoding L1 and L2 entries, checked against values from the specification.

use super::*;
use crate::types::HostOffset;

#[test]
fn compressed_descriptors_decode_as_the_spec_says() {
    // (cluster_bits, raw entry, offset, sectors, size), worked out by hand from
    // docs/interop/qcow2.rst: x = 62 - (cluster_bits - 8); offset = low x bits;
    // sectors = next (cluster_bits - 8) bits + 1; size = sectors * 512 - offset % 512.
    let cases: [(u32, u64, u64, u64, u64); 4] = [
        // 512-byte clusters: x = 61, a 1-bit count (bit 61).
        (9, 0x6000_0000_1234_5678, 0x1234_5678, 2, 904),
        // 4 KiB: x = 58, count 0xf in bits 58..62.
        (12, 0x7c00_0000_0005_0200, 0x5_0200, 16, 8192),
        // 64 KiB: x = 54, count 2 in bits 54..62.
        (16, 0x4080_0000_0007_0010, 0x7_0010, 3, 1520),
        // 2 MiB: x = 49, count 0x1fff in bits 49..62.
        (21, 0x7ffe_0001_2345_6789, 0x1_2345_6789, 8192, 4_193_911),
    ];
    for (bits, raw, offset, sectors, size) in cases {
        let g = Geometry::new(bits, false);
        let d = CompressedDescriptor::decode(raw, &g);
        assert_eq!(
            (d.offset.0, d.sectors, d.size),
            (offset, sectors, size),
            "bits {bits}"
        );
        assert_eq!(
            CompressedDescriptor::encode(offset, sectors, &g),
            raw,
            "bits {bits}"
        );
        let e = L2Entry { raw, bitmap: 0 };
        assert_eq!(e.cluster_type(&g, false), ClusterType::Compressed);
        assert_eq!(
            e.mapping(&g, false),
            L2Mapping::Compressed {
                descriptor: d,
                copied: false
            }
        );
    }
}

#[test]
fn cluster_types_follow_qemu() {
    let g = Geometry::new(16, false);
    let e = |raw| L2Entry { raw, bitmap: 0 };
    assert_eq!(e(0).cluster_type(&g, false), ClusterType::Unallocated);
    assert_eq!(e(1).cluster_type(&g, false), ClusterType::ZeroPlain);
    assert_eq!(e(0x50001).cluster_type(&g, false), ClusterType::ZeroAlloc);
    assert_eq!(
        e(0x8000000000050000).cluster_type(&g, false),
        ClusterType::Normal
    );
    assert_eq!(
        e(OFLAG_COPIED).cluster_type(&g, false),
        ClusterType::Unallocated
    );
    assert_eq!(e(OFLAG_COPIED).cluster_type(&g, true), ClusterType::Normal);
    assert_eq!(e(1 << 56 | 0x50000).reserved_bits(&g), 1 << 56);
    // Bit 9 belongs to the offset, bits 0 and 56 are reserved (0x7f000000000001ff).
    assert_eq!(L1Entry(0x8000_0000_0004_0200).reserved_bits(), 0);
    assert_eq!(
        L1Entry(0x8000_0000_0004_0200).mapping(),
        L1Mapping::L2Table {
            offset: HostOffset(0x4_0200),
            copied: true,
            reserved: 0
        }
    );
    assert_eq!(
        L1Entry(0x0100_0000_0003_0001).reserved_bits(),
        0x0100_0000_0000_0001
    );
    assert_eq!(L1Entry(0x8000000000000000).l2_offset(), None);
    assert_eq!(
        L1Entry(0x8000_0000_0000_0000).mapping(),
        L1Mapping::Unallocated { reserved: 0 }
    );
}

#[test]
fn extended_l2_subclusters() {
    let g = Geometry::new(16, true);
    // allocated subclusters 2..=3, zero subcluster 5
    let e = L2Entry {
        raw: 0x8000000000050000,
        bitmap: (1 << (32 + 5)) | 0b1100,
    };
    assert_eq!(
        e.subcluster_type(&g, false, 0),
        SubclusterType::UnallocatedAlloc
    );
    assert_eq!(
        e.subcluster_run(&g, false, 0),
        Some((SubclusterType::UnallocatedAlloc, 2))
    );
    assert_eq!(
        e.subcluster_run(&g, false, 2),
        Some((SubclusterType::Normal, 2))
    );
    assert_eq!(
        e.subcluster_run(&g, false, 5),
        Some((SubclusterType::ZeroAlloc, 1))
    );
    assert_eq!(
        e.subcluster_run(&g, false, 6),
        Some((SubclusterType::UnallocatedAlloc, 26))
    );
    let bad = L2Entry {
        raw: 0x50000,
        bitmap: (1 << 33) | 0b10,
    };
    assert_eq!(bad.subcluster_type(&g, false, 9), SubclusterType::Invalid);
    let unalloc_with_alloc_bits = L2Entry { raw: 0, bitmap: 1 };
    assert_eq!(
        unalloc_with_alloc_bits.subcluster_type(&g, false, 3),
        SubclusterType::Invalid
    );
    let zero_plain = L2Entry {
        raw: 0,
        bitmap: 0xffff_ffff << 32,
    };
    assert_eq!(
        zero_plain.subcluster_run(&g, false, 7),
        Some((SubclusterType::ZeroPlain, 25))
    );
    // bit 0 is reserved with extended L2
    assert_eq!(L2Entry { raw: 1, bitmap: 0 }.reserved_bits(&g), 1);
}

#[test]
fn l1_entries_are_built_and_flagged_as_the_spec_lays_them_out() {
    // Bit 63 is COPIED, bits 55..9 the L2 table's offset (docs/interop/qcow2.rst).
    let e = L1Entry::l2_table(HostOffset(0x5_0000), true);
    assert_eq!(e.0, 0x8000_0000_0005_0000);
    assert_eq!(L1Entry::l2_table(HostOffset(0x5_0000), false).0, 0x5_0000);
    // Only bit 63 moves: a reserved bit (bit 0) and the offset stay as stored.
    let odd = L1Entry(0x8000_0000_0005_0001);
    assert_eq!(odd.with_copied(false).0, 0x0000_0000_0005_0001);
    assert_eq!(L1Entry(0x5_0001).with_copied(true).0, 0x8000_0000_0005_0001);
    assert_eq!(odd.to_be_bytes(), [0x80, 0, 0, 0, 0, 0x05, 0, 0x01]);
    assert_eq!(L1Entry::UNALLOCATED.l2_offset(), None);
    assert_eq!(L1Entry::default(), L1Entry::UNALLOCATED);
}

#[test]
fn l2_entry_flags_read_and_set_single_bits() {
    // Bit 63 COPIED, bit 0 the zero flag, reserved bits 61..56 and 8..1.
    let e = L2Entry {
        raw: 0x8000_0000_0005_0001,
        bitmap: 0xffff_0000,
    };
    let cleared = e.with_copied(false);
    assert_eq!(cleared.raw, 0x0000_0000_0005_0001);
    assert_eq!(cleared.bitmap, 0xffff_0000);
    assert_eq!(
        L2Entry::from_word(0x5_0000).with_copied(true).raw,
        0x8000_0000_0005_0000
    );
    assert!(e.zero_flag());
    assert!(!L2Entry::from_word(0x8000_0000_0005_0000).zero_flag());
    assert_eq!(
        L2Entry::from_word(0x8000_0000_0005_0001).std_reserved_bits(),
        0
    );
    // Bit 1 and bit 56 are reserved; bit 0 (zero) and bit 62 (compressed) are not.
    assert_eq!(
        L2Entry::from_word(0x4100_0000_0005_0003).std_reserved_bits(),
        0x0100_0000_0000_0002
    );
}

#[test]
fn zeroing_an_entry_sets_the_bits_the_spec_names() {
    let std = Geometry::new(16, false);
    let ext = Geometry::new(16, true);
    // Standard entry: bit 0 is the zero flag; COPIED and the offset stay.
    let e = L2Entry::from_word(0x8000_0000_0005_0000).with_zero(&std);
    assert_eq!((e.raw, e.bitmap), (0x8000_0000_0005_0001, 0));
    // Extended L2: the standard word stays, the bitmap becomes "all zeros":
    // zero bits 32..63 set, allocation bits 0..31 clear.
    let e = L2Entry {
        raw: 0x8000_0000_0005_0000,
        bitmap: 0x0000_0000_ffff_ffff,
    }
    .with_zero(&ext);
    assert_eq!(
        (e.raw, e.bitmap),
        (0x8000_0000_0005_0000, 0xffff_ffff_0000_0000)
    );
    // A discarded cluster of a v3 image: no offset, zero flag only.
    assert_eq!(
        (L2Entry::zeroed(&std).raw, L2Entry::zeroed(&std).bitmap),
        (1, 0)
    );
    assert_eq!(
        (L2Entry::zeroed(&ext).raw, L2Entry::zeroed(&ext).bitmap),
        (0, 0xffff_ffff_0000_0000)
    );
    // Subclusters 2 and 3 of an entry whose subclusters 0..8 are allocated:
    // allocation bits 2, 3 cleared (0xff -> 0xf3), zero bits 34, 35 set.
    let e = L2Entry {
        raw: 0x8000_0000_0005_0000,
        bitmap: 0xff,
    }
    .with_subclusters_zeroed(2, 2);
    assert_eq!(
        (e.raw, e.bitmap),
        (0x8000_0000_0005_0000, 0x0000_000c_0000_00f3)
    );
    // A run past subcluster 31 stops there: 30, 31 only.
    let e = L2Entry::from_word(0).with_subclusters_zeroed(30, 5);
    assert_eq!(e.bitmap, 0xc000_0000_0000_0000);
}

/// An entry at or past the disk's end is never read, whatever it holds; below the
/// end the description is the entry's own.
#[test]
fn entries_past_the_disk_end_say_they_are_never_read() {
    let g = Geometry::new(16, false);
    let e = |raw| L2Entry { raw, bitmap: 0 };
    let size = 4 << 20;
    let last = crate::types::GuestOffset(size - 0x10000);
    let end = crate::types::GuestOffset(size);
    assert_eq!(
        e(0).describe_at(&g, false, last, size),
        e(0).describe(&g, false)
    );
    assert_eq!(
        e(0).describe_at(&g, false, end, size),
        "past disk end: never read"
    );
    assert_eq!(
        e(0x8000000000050000).describe_at(&g, false, end, size),
        "data at host offset 0x50000, COPIED; past disk end: never read"
    );
}

/// In the words of the image around the table: a host cluster of an image with
/// an external data file is named as in that file (a data cluster, aligned or
/// not, and a preallocated zero cluster), and without a backing file an
/// unallocated entry reads as zeros.
#[test]
fn an_entry_is_described_in_the_data_file_and_without_a_backing_file() {
    use crate::types::GuestOffset;
    let g = Geometry::new(16, false);
    let size = 4 << 20;
    let with_df = Surroundings {
        data_file: Some("disk.raw"),
        backing: true,
        disk_size: size,
    };
    let alone = Surroundings {
        data_file: None,
        backing: false,
        disk_size: size,
    };
    let said = |raw: u64, around: &Surroundings<'_>, guest: u64| {
        let e = L2Entry { raw, bitmap: 0 };
        let m = e.mapping(&g, around.data_file.is_some());
        e.describe_in(&m, &g, GuestOffset(guest), around)
    };
    assert_eq!(
        said(0x8000_0000_0005_0000, &with_df, 0),
        "data at host offset 0x50000 in disk.raw, COPIED"
    );
    // Offset 0 with COPIED: the data is at the guest offset of the data file.
    assert_eq!(
        said(0x8000_0000_0000_0000, &with_df, 0),
        "data at host offset 0x0 in disk.raw, COPIED"
    );
    assert_eq!(
        said(0x8000_0000_0005_0200, &with_df, 0),
        "data at host offset 0x50200 in disk.raw, NOT cluster-aligned (QEMU fails reads with EIO), COPIED"
    );
    assert_eq!(
        said(0x0000_0000_0006_0001, &with_df, 0),
        "reads as zeros, host cluster 0x60000 in disk.raw kept allocated"
    );
    assert_eq!(
        said(0, &with_df, 0),
        "unallocated: reads fall through to the backing file"
    );
    assert_eq!(
        said(0, &alone, 0),
        "unallocated: reads as zeros: no backing file"
    );
    assert_eq!(
        said(0x8000_0000_0005_0000, &alone, 0),
        "data at host offset 0x50000, COPIED"
    );
    // Past the end of the disk the entry is still named where it points.
    assert_eq!(
        said(0x8000_0000_0005_0000, &with_df, size),
        "data at host offset 0x50000 in disk.raw, COPIED; past disk end: never read"
    );
    assert_eq!(said(0, &alone, size), "past disk end: never read");
}

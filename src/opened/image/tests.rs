use super::*;
use crate::io::MemSource;

/// A minimal valid image: header, refcount table, one refblock, L1, nothing mapped.
pub(crate) fn tiny_image() -> Vec<u8> {
    let cs = 512usize;
    let mut b = vec![0u8; cs * 4];
    b[0..4].copy_from_slice(&header::QCOW2_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&9u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    b[36..40].copy_from_slice(&64u32.to_be_bytes());
    b[40..48].copy_from_slice(&(3 * cs as u64).to_be_bytes());
    b[48..56].copy_from_slice(&(cs as u64).to_be_bytes());
    b[56..60].copy_from_slice(&1u32.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&112u32.to_be_bytes());
    b[cs..cs + 8].copy_from_slice(&(2 * cs as u64).to_be_bytes());
    for i in 0..4 {
        b[2 * cs + 2 * i + 1] = 1;
    }
    b
}

#[test]
fn opens_a_tiny_image_and_reads_refcounts() {
    let img = Qcow2::open(
        Arc::new(MemSource::new("t", tiny_image())),
        Strictness::Qemu,
    )
    .unwrap();
    assert_eq!(img.l1.len(), 64);
    assert!(img.problems.is_empty());
    assert_eq!(img.refcount(HostCluster(3)).unwrap(), 1);
    assert_eq!(img.refcount(HostCluster(4)).unwrap(), 0);
    assert_eq!(img.refcount(HostCluster(1 << 40)).unwrap(), 0);
}

#[test]
fn copied_mismatches_are_found_per_cluster_and_in_spans_of_ones() {
    // 512-byte clusters, 16-bit refcounts: 256 refcounts per block. Block 0
    // (at cluster 2) says 1 for clusters 0..=255 but 2 for cluster 7; block 1
    // (a new one at cluster 4) says 1 for 256..=511; there is no block 2.
    let mut b = tiny_image();
    b.resize(512 * 5, 0);
    b[512 + 8..512 + 16].copy_from_slice(&(4u64 * 512).to_be_bytes());
    for i in 0..256 {
        b[2 * 512 + 2 * i..2 * 512 + 2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
        b[4 * 512 + 2 * i..4 * 512 + 2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    b[2 * 512 + 2 * 7 + 1] = 2;
    let img = Qcow2::open(Arc::new(MemSource::new("t", b)), Strictness::Lenient).unwrap();
    let mut r = RefcountReader::new(&img);
    let mut got = Vec::new();
    r.each_copied_mismatch(0, 520, true, &mut |k, rc| got.push((k, rc)));
    let mut want = vec![(7, 2)];
    want.extend((512..520).map(|k| (k, 0)));
    assert_eq!(got, want);
    // COPIED clear: every refcount of 1 is the mismatch.
    let mut got = Vec::new();
    r.each_copied_mismatch(5, 4, false, &mut |k, rc| got.push((k, rc)));
    assert_eq!(got, vec![(0, 1), (1, 1), (3, 1)]);
    // Far past the refcount table: no block, refcount 0.
    let mut got = Vec::new();
    r.each_copied_mismatch(1 << 30, 2, true, &mut |k, rc| got.push((k, rc)));
    assert_eq!(got, vec![(0, 0), (1, 0)]);
}

#[test]
fn lenient_open_lists_problems() {
    let mut b = tiny_image();
    b[96..100].copy_from_slice(&7u32.to_be_bytes());
    let src: SharedSource = Arc::new(MemSource::new("t", b));
    assert!(Qcow2::open(src.clone(), Strictness::Qemu).is_err());
    let img = Qcow2::open(src, Strictness::Lenient).unwrap();
    // The problem names the field and its offset in the header.
    assert!(matches!(
        &img.problems[0],
        Error::Invalid {
            kind: CorruptKind::HeaderField(crate::header::Field::RefcountOrder),
            offset: crate::types::HostOffset(96),
            ..
        }
    ));
    assert!(
        img.problems[0]
            .to_string()
            .contains("Reference count entry width too large")
    );
}

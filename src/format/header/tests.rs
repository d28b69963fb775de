//! Unit tests of header parsing, validation and the field layout.

use super::*;
use crate::error::Error;

fn v3_header() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    b[36..40].copy_from_slice(&2u32.to_be_bytes());
    b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
    b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
    b[56..60].copy_from_slice(&1u32.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&112u32.to_be_bytes());
    b
}

#[test]
fn parses_v3_fields() {
    let h = Header::parse(&v3_header()).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.size, 1 << 30);
    assert_eq!(h.refcount_bits(), 16);
    assert_eq!(h.compression_type(), CompressionType::Deflate);
    assert!(h.validate(1 << 20).is_empty(), "{:?}", h.validate(1 << 20));
}

#[test]
fn v2_implies_refcount_order_4() {
    let mut b = v3_header();
    b[4..8].copy_from_slice(&2u32.to_be_bytes());
    b[96..100].copy_from_slice(&6u32.to_be_bytes());
    let h = Header::parse(&b).unwrap();
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.incompatible_features, 0);
}

#[test]
fn rejects_bad_magic_and_short_buffers() {
    let mut b = v3_header();
    b[0] = 0;
    assert!(
        Header::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("not in qcow2 format")
    );
    assert!(matches!(
        Header::parse(&v3_header()[..50]),
        Err(Error::Truncated { .. })
    ));
}

#[test]
fn validate_uses_qemu_messages() {
    let mut b = v3_header();
    b[20..24].copy_from_slice(&8u32.to_be_bytes());
    let e = Header::parse(&b).unwrap().validate(0);
    assert!(e[0].to_string().contains("Unsupported cluster size: 2^8"));
    let mut b = v3_header();
    b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
    b[96..100].copy_from_slice(&7u32.to_be_bytes());
    b[32..36].copy_from_slice(&9u32.to_be_bytes());
    let e: Vec<String> = Header::parse(&b)
        .unwrap()
        .validate(0)
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        e.iter()
            .any(|m| m.contains("Unsupported qcow2 feature(s): bits 9")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains("Reference count entry width too large"))
    );
    assert!(
        e.iter()
            .any(|m| m.contains("Unsupported encryption method 9"))
    );
    let mut b = v3_header();
    b[36..40].copy_from_slice(&1u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let e = Header::parse(&b).unwrap().validate(0);
    assert!(e[0].to_string().contains("L1 table is too small"));
}

#[test]
fn walks_extensions_and_names_features() {
    let mut b = v3_header();
    // backing format "raw"
    b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    b[116..120].copy_from_slice(&3u32.to_be_bytes());
    b[120..123].copy_from_slice(b"raw");
    // feature table with one entry naming incompatible bit 0
    b[128..132].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
    b[132..136].copy_from_slice(&48u32.to_be_bytes());
    b[136] = 0;
    b[137] = 0;
    b[138..143].copy_from_slice(b"dirty");
    b[72..80].copy_from_slice(&(1u64 | 1 << 40).to_be_bytes());
    let h = Header::parse(&b).unwrap();
    let (exts, err) = parse_extensions(&h, &b);
    assert!(err.is_none());
    assert_eq!(exts.len(), 2);
    assert_eq!(
        exts[0].kind,
        ExtensionKind::BackingFormat {
            format: "raw".into()
        }
    );
    let feats = named_features(&h, &exts);
    assert_eq!(feats[0].name, "dirty");
    assert!(!feats[1].known);
    assert!(feats[1].name.contains("unknown"));
}

#[test]
fn oversized_extension_is_reported() {
    let mut b = v3_header();
    b[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
    b[116..120].copy_from_slice(&0x10_0000u32.to_be_bytes());
    let h = Header::parse(&b).unwrap();
    let (exts, err) = parse_extensions(&h, &b);
    assert!(exts.is_empty());
    assert!(
        err.unwrap()
            .to_string()
            .contains("Header extension too large")
    );
}

#[test]
fn the_field_layout_is_the_specifications() {
    // docs/interop/qcow2.rst, "Header": byte ranges of each field.
    let spec: [(&str, u64, u64); 19] = [
        ("magic", 0, 4),
        ("version", 4, 4),
        ("backing_file_offset", 8, 8),
        ("backing_file_size", 16, 4),
        ("cluster_bits", 20, 4),
        ("size", 24, 8),
        ("crypt_method", 32, 4),
        ("l1_size", 36, 4),
        ("l1_table_offset", 40, 8),
        ("refcount_table_offset", 48, 8),
        ("refcount_table_clusters", 56, 4),
        ("nb_snapshots", 60, 4),
        ("snapshots_offset", 64, 8),
        ("incompatible_features", 72, 8),
        ("compatible_features", 80, 8),
        ("autoclear_features", 88, 8),
        ("refcount_order", 96, 4),
        ("header_length", 100, 4),
        ("compression_type", 104, 1),
    ];
    let got: Vec<_> = FIELDS
        .iter()
        .map(|f| (f.name(), f.offset(), f.size()))
        .collect();
    assert_eq!(got, spec);
    assert_eq!(Field::SnapshotsOffset.end(), u64::from(V2_HEADER_LEN));
    assert_eq!(Field::HeaderLength.end(), u64::from(V3_MIN_HEADER_LEN));
}

#[test]
fn fields_lists_what_the_header_stores_read_from_the_layout() {
    let mut b = v3_header();
    b[104] = 1; // zstd
    let h = Header::parse(&b).unwrap();
    let f = h.fields();
    assert_eq!(f.len(), 19, "header_length 112 stores compression_type");
    let l1 = f.iter().find(|x| x.field == Field::L1TableOffset).unwrap();
    assert_eq!((l1.offset, l1.size, l1.value), (HostOffset(40), 8, 0x30000));
    assert_eq!(l1.meaning, "active L1 table at host cluster 3");
    let ct = f
        .iter()
        .find(|x| x.field == Field::CompressionType)
        .unwrap();
    assert_eq!(ct.value, 1);
    assert_eq!(Field::L1Size.read(&b), 2);
    // A version 2 header stores the first 72 bytes only.
    b[4..8].copy_from_slice(&2u32.to_be_bytes());
    let v2 = Header::parse(&b).unwrap();
    let names: Vec<_> = v2.fields().iter().map(|x| x.name).collect();
    assert_eq!(names.len(), 13);
    assert_eq!(names.last(), Some(&"snapshots_offset"));
}

#[test]
fn validation_errors_name_the_field_for_code_to_match() {
    use crate::error::CorruptKind;
    let kinds = |b: &[u8]| -> Vec<(Option<CorruptKind>, u64)> {
        Header::parse(b)
            .unwrap()
            .validate(1 << 20)
            .iter()
            .map(|e| match e {
                Error::Invalid { kind, offset, .. } => (Some(*kind), offset.get()),
                _ => (None, 0),
            })
            .collect()
    };
    let mut b = v3_header();
    b[96..100].copy_from_slice(&7u32.to_be_bytes());
    assert_eq!(
        kinds(&b),
        [(Some(CorruptKind::HeaderField(Field::RefcountOrder)), 96)]
    );
    let mut b = v3_header();
    b[40..48].copy_from_slice(&0x30200u64.to_be_bytes());
    assert_eq!(kinds(&b), [(Some(CorruptKind::L1Table), 40)]);
    let mut b = v3_header();
    b[20..24].copy_from_slice(&30u32.to_be_bytes());
    assert_eq!(
        kinds(&b),
        [(Some(CorruptKind::HeaderField(Field::ClusterBits)), 20)]
    );
    let mut b = v3_header();
    b[0] = b'X';
    let e = Header::parse(&b).unwrap_err();
    assert_eq!(e.corrupt_kind(), Some(CorruptKind::HeaderMagic));
}

#[test]
fn a_table_error_names_the_header_field_that_holds_the_wrong_value() {
    use crate::error::CorruptKind;
    let first = |b: &[u8]| -> (Option<CorruptKind>, String, u64, String) {
        match Header::parse(b).unwrap().validate(1 << 20).first() {
            Some(Error::Invalid {
                kind,
                what,
                offset,
                reason,
            }) => (Some(*kind), what.clone(), offset.get(), reason.clone()),
            other => panic!("expected one Invalid error, got {other:?}"),
        }
    };
    // A misaligned l1_table_offset: the field at 0x28, not a table there.
    let mut b = v3_header();
    b[40..48].copy_from_slice(&0x30200u64.to_be_bytes());
    let (kind, what, off, reason) = first(&b);
    assert_eq!(kind, Some(CorruptKind::L1Table));
    assert_eq!(
        (what.as_str(), off),
        ("L1 table offset in the header", 0x28)
    );
    assert!(
        reason.starts_with("Active L1 table offset invalid"),
        "{reason}"
    );
    // An l1_size over QEMU's limit: the size field at 0x24.
    let mut b = v3_header();
    b[36..40].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    let (kind, what, off, reason) = first(&b);
    assert_eq!(kind, Some(CorruptKind::L1Table));
    assert_eq!((what.as_str(), off), ("L1 table size in the header", 0x24));
    assert!(reason.starts_with("Active L1 table too large"), "{reason}");
    // A misaligned snapshots_offset: the field at 0x40.
    let mut b = v3_header();
    b[60..64].copy_from_slice(&1u32.to_be_bytes());
    b[64..72].copy_from_slice(&0x10001u64.to_be_bytes());
    let (kind, what, off, _) = first(&b);
    assert_eq!(kind, Some(CorruptKind::SnapshotTable));
    assert_eq!(
        (what.as_str(), off),
        ("snapshot table offset in the header", 0x40)
    );
    // Too many snapshots: nb_snapshots at 0x3c.
    let mut b = v3_header();
    b[60..64].copy_from_slice(&70000u32.to_be_bytes());
    let (kind, what, off, _) = first(&b);
    assert_eq!(kind, Some(CorruptKind::SnapshotTable));
    assert_eq!((what.as_str(), off), ("snapshot count in the header", 0x3c));
}

#[test]
fn a_field_is_written_where_and_as_wide_as_the_specification_says() {
    let mut b = [0u8; 112];
    Field::HeaderLength.write(&mut b, 112);
    assert_eq!(b[100..104], [0, 0, 0, 0x70]);
    Field::CompressionType.write(&mut b, 0x101);
    assert_eq!(b[104], 0x01, "one byte wide: the high bits are dropped");
    assert_eq!(b[105], 0);
    Field::BackingFileOffset.write(&mut b, 0x1234);
    assert_eq!(b[8..16], [0, 0, 0, 0, 0, 0, 0x12, 0x34]);
    Field::AutoclearFeatures.write(&mut b, 1);
    assert_eq!(b[88..96], [0, 0, 0, 0, 0, 0, 0, 1]);
    // A version-2 header's buffer has no autoclear field: nothing is written.
    let mut v2 = [0u8; 72];
    Field::AutoclearFeatures.write(&mut v2, u64::MAX);
    assert_eq!(v2, [0u8; 72]);
}

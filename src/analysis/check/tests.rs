//! The check's refusals on images built in memory: each cause is its variant.

#![allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used
)]

use super::{CheckOptions, Refusal, check};
use crate::CorruptKind;
use crate::header::Field;
use crate::image::{Qcow2, Strictness};
use crate::io::MemSource;
use crate::testing::ImageBuilder;
use crate::types::HostOffset;
use std::sync::Arc;

/// The builder's image with `bytes` written at `offset`, opened leniently.
fn patched(offset: usize, bytes: &[u8]) -> Qcow2 {
    let mut b = ImageBuilder::new(16, 1 << 20).bytes();
    b[offset..offset + bytes.len()].copy_from_slice(bytes);
    Qcow2::open(Arc::new(MemSource::new("p.qcow2", b)), Strictness::Lenient).unwrap()
}

#[test]
fn a_clean_image_is_neither_refused_nor_aborted() {
    let r = check(
        &ImageBuilder::new(16, 1 << 20).open(),
        &CheckOptions::default(),
    );
    assert!(r.qemu_refuses.is_none() && r.aborted.is_none(), "{r:?}");
    assert_eq!(r.exit_code(), 0);
}

#[test]
fn an_unknown_incompatible_bit_is_an_open_refusal_about_that_field() {
    let img = patched(72, &(1u64 << 9).to_be_bytes());
    let r = check(&img, &CheckOptions::default());
    let Some(Refusal::Open(e)) = &r.qemu_refuses else {
        panic!("{:?}", r.qemu_refuses);
    };
    assert_eq!(
        e.corrupt_kind(),
        Some(CorruptKind::HeaderField(Field::IncompatibleFeatures))
    );
    // The check still counts what it can read.
    assert!(r.aborted.is_none());
    assert_eq!(r.exit_code(), 1);
}

#[test]
fn too_many_snapshots_aborts_with_the_count() {
    let img = patched(60, &65537u32.to_be_bytes());
    let r = check(&img, &CheckOptions::default());
    assert!(
        matches!(r.aborted, Some(Refusal::TooManySnapshots { count: 65537 })),
        "{:?}",
        r.aborted
    );
    assert_eq!(r.exit_code(), 1);
}

#[test]
fn an_unaligned_snapshot_table_aborts_naming_its_offset() {
    let img = patched(64, &0x10200u64.to_be_bytes());
    let r = check(&img, &CheckOptions::default());
    assert!(
        matches!(
            r.aborted,
            Some(Refusal::SnapshotTableOffset {
                offset: HostOffset(0x10200)
            })
        ),
        "{:?}",
        r.aborted
    );
}

#[test]
fn refusals_say_what_qemu_img_check_says() {
    let r = check(
        &patched(60, &65537u32.to_be_bytes()),
        &CheckOptions::default(),
    );
    assert_eq!(
        r.aborted.map(|a| a.to_string()).as_deref(),
        Some("65537 snapshots is more than QEMU's limit of 65536 (File too large)")
    );
    let r = check(
        &patched(64, &0x10200u64.to_be_bytes()),
        &CheckOptions::default(),
    );
    assert_eq!(
        r.clone().aborted.map(|a| a.to_string()).as_deref(),
        Some("snapshot table offset invalid (Invalid argument)")
    );
    // JSON carries the same words.
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(
        v["aborted"],
        "snapshot table offset invalid (Invalid argument)"
    );
}

#[test]
fn an_io_error_clones_with_its_words_and_kind() {
    let e = crate::io::FileSource::open(std::path::Path::new("/nonexistent/q.qcow2")).unwrap_err();
    let copy = e.clone();
    assert_eq!(copy.to_string(), e.to_string());
    let crate::Error::Io { source, .. } = copy else {
        panic!("{copy:?}");
    };
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn a_file_is_too_large_to_check_past_qemus_count_only() {
    let max = super::MAX_CHECK_CLUSTERS;
    assert!(Refusal::file_too_large(max).is_none());
    assert!(matches!(
        Refusal::file_too_large(max + 1),
        Some(Refusal::FileTooLarge { clusters }) if clusters == max + 1
    ));
}

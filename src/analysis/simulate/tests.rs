//! The simulator's header writes and the change records' output.

// Test-only code, working on values it made itself.
#![allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used
)]

use super::{Change, Sim, Target};
use crate::header::Field;
use crate::testing::ImageBuilder;
use crate::types::HostOffset;
use std::path::Path;

fn sim() -> Sim {
    let img = ImageBuilder::new(16, 1 << 20).open();
    Sim::new(&img, Path::new("built.qcow2")).expect("the simulation starts")
}

fn change(target: Target, before: u64, after: u64) -> Change {
    Change {
        target,
        count: 1,
        before,
        after,
        reason: "r".into(),
    }
}

#[test]
fn header_fields_are_read_and_set_where_the_specification_puts_them() {
    let mut s = sim();
    // The builder's header: one L1 entry, 16-bit refcounts, no extensions.
    assert_eq!(s.header_field(Field::L1Size), 1);
    assert_eq!(s.header_field(Field::RefcountOrder), 4);
    assert_eq!(s.header_field(Field::HeaderLength), 104);
    let around = |s: &mut Sim| {
        (
            s.read_bytes(HostOffset(32), 4),
            s.read_bytes(HostOffset(40), 8),
        )
    };
    let untouched = around(&mut s);

    // l1_size: 4 bytes at 36.
    s.set_header(Field::L1Size, 7u64).unwrap();
    assert_eq!(s.read_bytes(HostOffset(36), 4), [0, 0, 0, 7]);
    assert_eq!(around(&mut s), untouched);
    assert_eq!(s.header_field(Field::L1Size), 7);
    let last = s.steps.last().expect("the change is recorded");
    assert_eq!(
        last.target,
        Target::Header {
            field: Field::L1Size
        }
    );
    assert_eq!((last.before, last.after), (1, 7));

    // The same value again changes nothing and records nothing.
    let n = s.steps.len();
    s.set_header(Field::L1Size, 7u64).unwrap();
    assert_eq!(s.steps.len(), n);

    // compression_type: the one byte at 104, its low byte only.
    s.set_header(Field::CompressionType, 0x1ffu64).unwrap();
    assert_eq!(s.read_bytes(HostOffset(103), 3), [104, 0xff, 0]);
    let last = s.steps.last().expect("the change is recorded");
    assert_eq!((last.before, last.after), (0, 0xff));

    // snapshots_offset: 8 bytes at 64, a host offset.
    s.set_header(Field::SnapshotsOffset, HostOffset(0x5_0000))
        .unwrap();
    assert_eq!(s.read_bytes(HostOffset(64), 8), [0, 0, 0, 0, 0, 5, 0, 0]);
}

#[test]
fn header_changes_print_and_serialise_as_the_fields_they_name() {
    let c = change(
        Target::Header {
            field: Field::NbSnapshots,
        },
        2,
        1,
    );
    assert_eq!(c.describe(), "header nb_snapshots: 0x2 -> 0x1 (r)");
    let j = serde_json::to_value(&c).unwrap();
    assert_eq!(j["kind"], "header");
    assert_eq!(j["field"], "nb_snapshots");

    // A refcount table entry reads as it always has: kind "header".
    let c = change(
        Target::RefcountTableEntry {
            index: 3,
            at: HostOffset(0x1_0018),
        },
        0,
        0x5_0000,
    );
    assert_eq!(
        c.describe(),
        "header refcount table entry: 0x0 -> 0x50000 (r)"
    );
    let j = serde_json::to_value(&c).unwrap();
    assert_eq!(j["kind"], "header");
    assert_eq!(j["field"], "refcount table entry");
    assert!(j.get("index").is_none() && j.get("at").is_none(), "{j}");

    let c = change(
        Target::ExtensionField {
            field: "bitmap_directory_offset",
            at: HostOffset(0x88),
        },
        0x3_0000,
        0x6_0000,
    );
    let j = serde_json::to_value(&c).unwrap();
    assert_eq!(j["kind"], "header");
    assert_eq!(j["field"], "bitmap_directory_offset");
    assert!(j.get("at").is_none(), "{j}");

    // Host offsets in records are plain numbers in JSON and hex in text.
    let c = change(
        Target::Allocate {
            offset: HostOffset(0x5_0000),
            length: 65536,
            purpose: "p".into(),
        },
        5,
        5,
    );
    assert_eq!(
        c.describe(),
        "allocate 65536 bytes at 0x50000 (cluster 5) for p"
    );
    assert_eq!(serde_json::to_value(&c).unwrap()["offset"], 0x5_0000);
}

#[test]
fn a_write_may_end_at_the_block_layers_limit_and_not_past_it() {
    let s = sim();
    let limit = super::BDRV_MAX_LENGTH;
    assert_eq!(limit, 0x7fff_ffff_c000_0000);
    // Ending at the limit: the block layer lets it through, the file system
    // refuses to grow the file that far.
    let at = HostOffset(limit - 4096);
    let e = s.write_end(at, 4096).expect_err("no file grows that far");
    assert!(
        matches!(&e, super::SimError::Qemu(m) if m.ends_with("(EFBIG)")),
        "{e}"
    );
    // One byte past it, or anywhere up to INT64_MAX: the block layer
    // refuses the request itself.
    for (off, len) in [(limit - 4096, 4097), (i64::MAX as u64 - 8, 8)] {
        let e = s
            .write_end(HostOffset(off), len)
            .expect_err("past the limit");
        assert!(
            matches!(&e, super::SimError::Qemu(m) if m.ends_with("(EIO)")),
            "{off:#x}+{len}: {e}"
        );
    }
}

/// A mark of the change log gives back the records made after it, and
/// none once a change after it extended a record from before it.
#[test]
fn a_step_mark_sees_records_after_it_and_records_before_it_extended() {
    let mut s = sim();
    s.why("first");
    s.record(Target::Refcount { cluster: 5 }, 0, 1);
    let mark = s.step_mark();
    assert_eq!(mark.len(), 1);
    assert_eq!(s.steps_since(&mark).map(<[Change]>::len), Some(0));
    s.why("second");
    s.record(Target::Refcount { cluster: 9 }, 1, 0);
    let since = s
        .steps_since(&mark)
        .expect("nothing before the mark changed");
    assert_eq!(since.len(), 1);
    assert_eq!(since[0].target, Target::Refcount { cluster: 9 });
    // Cluster 6 the same way for the same reason extends the first record,
    // the one before the last.
    s.why("first");
    s.record(Target::Refcount { cluster: 6 }, 0, 1);
    assert_eq!(s.steps.len(), 2);
    assert_eq!(s.steps[0].count, 2);
    assert!(s.steps_since(&mark).is_none());
}

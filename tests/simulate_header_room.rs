//! A header QEMU cannot write again in its cluster: `qcow2_update_header`
//! writes the whole header cluster anew, and where what it writes does not
//! fit (its own feature name table added to a version 3 image with 64 KiB
//! clusters, an end mark added to extensions that ran to the end of the
//! cluster without one, a backing file name that no longer fits after
//! them) it writes nothing and fails with ENOSPC. Built by filling cluster
//! 0 with an extension QEMU does not know, and compared with qemu-io and
//! qemu-img on a copy, every byte: the corrupt bit of a corruption found
//! stays in QEMU's memory (the write fails, the next command does not see
//! it), and an open that must update the header for its bitmaps (dropping
//! an ignored extension, marking them in use) fails, as every later one.
//! The dirty bit of an image with lazy refcounts stays on disk when the
//! close cannot write the header to clear it, and the repair on the next
//! open fails.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::{same_bytes, same_file};
use sim_compare::compare_metadata;

/// The bitmaps extension's type.
const BITMAPS: u32 = 0x2385_2875;

/// QEMU's feature name table's type.
const FEATURES: u32 = 0x6803_f857;

/// The bytes the feature name table of `image`, as QEMU wrote it, takes
/// with its extension header.
fn table_room(w: &Work, image: &str) -> usize {
    let b = std::fs::read(w.path(image)).expect("read the image");
    let mut at = be32(&b, 100);
    while be32(&b, at) != 0 {
        let len = be32(&b, at + 4).next_multiple_of(8);
        if be32(&b, at) as u32 == FEATURES {
            return 8 + len;
        }
        at += 8 + len;
    }
    panic!("{image}: no feature name table");
}

fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize
}

fn be64(b: &[u8], at: usize) -> usize {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes")) as usize
}

/// Rewrite the extensions of the 64 KiB header cluster of `image`: those of
/// the types in `keep` stay, in their order, the others go (the feature
/// name table among them), then one extension of a type QEMU does not know
/// runs to `slack` bytes before where the extensions end (the backing file
/// name, moved to the end of the cluster, or the cluster's end), with no
/// end mark where `slack` is 0.
fn fill(w: &Work, image: &str, keep: &[u32], slack: usize) {
    let b = std::fs::read(w.path(image)).expect("read the image");
    assert_eq!(be32(&b, 20), 16, "{image}: 64 KiB clusters");
    let cs = 0x10000;
    let header_len = be32(&b, 100);
    let (name_at, name_len) = (be64(&b, 8), be32(&b, 16));
    let name = b[name_at..name_at + name_len].to_vec();
    let mut out = Vec::new();
    let mut at = header_len;
    while be32(&b, at) != 0 {
        let (t, len) = (be32(&b, at) as u32, be32(&b, at + 4));
        if keep.contains(&t) {
            out.extend_from_slice(&b[at..at + 8 + len.next_multiple_of(8)]);
        }
        at += 8 + len.next_multiple_of(8);
    }
    let end = cs - name.len() - slack;
    let len = end - header_len - out.len() - 8;
    out.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.resize(out.len() + len, 0x5a);
    out.resize(cs - header_len - name.len(), 0);
    if !name.is_empty() {
        w.patch(image, 8, &((cs - name.len()) as u64).to_be_bytes());
    }
    out.extend_from_slice(&name);
    w.patch(image, header_len as u64, &out);
}

/// A 4M extended-L2 image made with `opts`: guest 0..64k and 128k..132k
/// written, the second entry's bitmap made to say subcluster 0 is also
/// zero (a write there marks the image corrupt).
fn contradictory(w: &Work, image: &str, opts: &str) {
    let o = format!("extended_l2=on{opts}");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, image, "4M"]);
    w.qemu_io(image, &["write -P 1 0 64k", "write -P 2 128k 4k"]);
    let entry = 0x40020 + 8;
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    assert_eq!(be64(&bytes, entry), 0x3, "{image}: layout moved");
    w.patch(image, entry as u64, &0x0000_0001_0000_0003u64.to_be_bytes());
}

/// The corrupt bit QEMU cannot write: the write that finds the corruption
/// fails, nothing of the header changes, and the next command's write goes
/// through (its open sees no corrupt bit). QEMU's rewrite gets past its
/// feature name table in both: then there is no room for the end mark
/// ("no_end"), or none for the backing file name after it ("no_name").
#[test]
fn a_corrupt_bit_whose_header_does_not_fit_stays_in_memory() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    type Make = Box<dyn Fn(&Work, &str)>;
    let cases: [(&str, Make); 2] = [
        (
            "no_end.qcow2",
            Box::new(|w: &Work, image: &str| {
                contradictory(w, image, "");
                // The feature name table stays, and the extension after it
                // runs to the cluster's end: QEMU writes both again, the
                // same length, and the end mark does not fit.
                fill(w, image, &[FEATURES], 0);
            }),
        ),
        (
            "no_name.qcow2",
            Box::new(|w: &Work, image: &str| {
                contradictory(w, image, ",backing_file=base.qcow2,backing_fmt=qcow2");
                assert_eq!(table_room(w, image), 392, "{image}");
                // The backing format and the end mark stay, and the 10-byte
                // name ends the cluster. QEMU puts its feature name table
                // (392 bytes) before the extension, which then ends 8 bytes
                // before the cluster's end: the end mark fits, the name
                // does not.
                let fmt = 0xe279_2aca;
                fill(w, image, &[fmt], 392 + 8 - 10);
            }),
        ),
    ];
    for (name, make) in cases {
        let before = {
            make(&w, &format!("{name}.orig"));
            std::fs::read(w.path(&format!("{name}.orig"))).expect("read")
        };
        let (errors, is_corrupt) = same_bytes(&w, name, make, &["write:131584:512", "write:0:512"]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(first.contains("Input/output error"), "{name}: {first}");
        assert_eq!(errors[1], None, "{name}");
        assert!(!is_corrupt, "{name}: QEMU stored the corrupt bit");
        let after = std::fs::read(w.path(&format!("{name}.qemu"))).expect("read");
        assert!(
            after[..0x10000] == before[..0x10000],
            "{name}: header changed"
        );
    }
}

/// The same two images with room enough before the cluster's end (8 bytes
/// more, for the end mark) or before the name (16 more: the extension keeps
/// its 8-byte alignment, and the name needs 10): QEMU's rewrite fits, and
/// the corrupt bit is stored. So the cases above fail at the end mark and
/// at the name, not before.
#[test]
fn with_room_enough_the_corrupt_bit_is_stored() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    let cases: [(&str, &str, u32, usize); 2] = [
        ("end.qcow2", "", FEATURES, 8),
        (
            "name.qcow2",
            ",backing_file=base.qcow2,backing_fmt=qcow2",
            0xe279_2aca,
            392 + 8 - 10 + 16,
        ),
    ];
    for (name, opts, keep, slack) in cases {
        let make = |w: &Work, image: &str| {
            contradictory(w, image, opts);
            fill(w, image, &[keep], slack);
        };
        let (errors, is_corrupt) = same_bytes(&w, name, make, &["write:131584:512"]);
        let e = errors[0].as_deref().unwrap_or_default();
        assert!(e.contains("Input/output error"), "{name}: {e}");
        assert!(is_corrupt, "{name}: QEMU did not store the corrupt bit");
    }
}

/// An open that writes the header for its bitmaps, where that header does
/// not fit: the open fails, this command's and the next one's, and nothing
/// is written (the bitmaps are not stored either). Marking them in use
/// (the bitmaps extension kept, QEMU's feature name table added) and
/// dropping the extension a program without bitmap support left.
#[test]
fn an_open_whose_bitmap_header_does_not_fit_fails() {
    let w = Work::new();
    for (name, ignored, words) in [
        (
            "mark.qcow2",
            false,
            "Can't update bitmap directory: No space left on device",
        ),
        (
            "drop.qcow2",
            true,
            "Could not update qcow2 header: No space left on device",
        ),
    ] {
        let make = |w: &Work, image: &str| {
            w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
            w.qemu_img(&["bitmap", "--add", image, "bm"]);
            w.qemu_io(image, &["write -P 1 0 64k"]);
            fill(w, image, &[BITMAPS], 0);
            if ignored {
                w.patch(image, 88, &0u64.to_be_bytes());
            }
        };
        let ops = ["write:65536:512", "snapshot-create:s", "repair:all"];
        let (errors, is_corrupt) = same_bytes(&w, name, make, &ops);
        for (op, e) in ops.iter().zip(&errors) {
            let e = e.as_deref().unwrap_or_default();
            assert!(e.contains(words), "{name}: {op}: {e}");
        }
        assert!(!is_corrupt, "{name}");
        let ours = std::fs::read(w.path(name)).expect("read");
        let theirs = std::fs::read(w.path(&format!("{name}.qemu"))).expect("read");
        assert!(ours == theirs, "{name}: QEMU wrote");
    }
}

/// Autoclear bits QEMU does not know (bit 5): the open writes the header
/// again to clear them. Where that does not fit, the open fails, this
/// command's and the next one's, and nothing is written; where it fits,
/// QEMU's feature name table goes in before the bitmaps extension, which
/// moves, and the close repoints the extension where it now is. The same
/// with autoclear bit 0 alone: the bitmaps' marking in use writes the
/// header so too.
#[test]
fn an_open_that_clears_unknown_autoclear_bits() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
        w.qemu_io(image, &["write -P 1 0 64k"]);
        fill(w, image, &[], 0);
        w.patch(image, 88, &(1u64 << 5).to_be_bytes());
    };
    let ops = ["write:65536:512", "repair:all"];
    let (errors, _) = same_bytes(&w, "full.qcow2", make, &ops);
    for (op, e) in ops.iter().zip(&errors) {
        let e = e.as_deref().unwrap_or_default();
        assert!(
            e.contains("Could not update qcow2 header: No space left on device"),
            "{op}: {e}"
        );
    }
    for (name, autoclear) in [("moved.qcow2", 1u64 << 5 | 1), ("marked.qcow2", 1)] {
        let make = |w: &Work, image: &str| {
            w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
            w.qemu_img(&["bitmap", "--add", image, "bm"]);
            w.qemu_io(image, &["write -P 1 0 64k"]);
            fill(w, image, &[BITMAPS], 4096);
            w.patch(image, 88, &autoclear.to_be_bytes());
        };
        make(&w, name);
        let ops = ["write:65536:512", "write:0:512"];
        let sim =
            compare_metadata(w.dir.path(), name, &ops).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(sim.records.iter().all(|r| r.error.is_none()), "{name}");
        same_file(&w, name, &sim);
    }
}

/// The dirty bit of an image with lazy refcounts, where QEMU's header
/// rewrite does not fit its cluster (the feature name table it adds, 392
/// bytes with its extension header, has no room): a write's link marks the
/// image dirty (`qcow2_mark_dirty` writes the 8 bytes of the field alone),
/// and the close's `qcow2_mark_clean` fails to write the header, which it
/// ignores: the bit stays on disk. The next qemu-io's open repairs the
/// dirty image and fails as marking it clean fails ("Could not repair dirty
/// image"); qemu-img check -r all fails the same way ("Check failed"). Where
/// the rewrite fits (room left after the extension), the close writes the
/// header anew, QEMU's feature name table put back, and the bit clear.
#[test]
fn a_dirty_bit_whose_header_does_not_fit_stays_on_disk() {
    let w = Work::new();
    for (name, slack) in [("tight.qcow2", 0), ("room.qcow2", 1024)] {
        let make = |w: &Work, image: &str| {
            let o = "lazy_refcounts=on";
            w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, image, "4M"]);
            fill(w, image, &[], slack);
        };
        let ops = ["write:0:512", "write:65536:512", "repair:all"];
        let (errors, is_corrupt) = same_bytes(&w, name, make, &ops);
        assert!(!is_corrupt, "{name}");
        let after = std::fs::read(w.path(&format!("{name}.qemu"))).expect("read");
        let dirty = be64(&after, 72) & 1 != 0;
        if slack == 0 {
            assert_eq!(errors[0], None, "{name}");
            let e = errors[1].as_deref().unwrap_or_default();
            assert!(
                e.contains("Could not repair dirty image: No space left on device"),
                "{name}: {e}"
            );
            let e = errors[2].as_deref().unwrap_or_default();
            assert!(
                e.contains("Check failed: No space left on device"),
                "{name}: {e}"
            );
            assert!(dirty, "{name}: QEMU cleared the dirty bit");
        } else {
            assert!(errors.iter().all(Option::is_none), "{name}: {errors:?}");
            assert!(!dirty, "{name}: the dirty bit stayed");
            let table = FEATURES.to_be_bytes();
            assert!(
                after[..0x10000].windows(4).any(|x| x == table),
                "{name}: QEMU did not write its feature name table"
            );
        }
    }
}

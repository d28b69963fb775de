//! Marking an image corrupt (`qcow2_mark_corrupt`): QEMU writes the whole
//! header cluster anew from what its open read (`qcow2_update_header`), not
//! only the corrupt bit. Where that differs from the file (no feature name
//! table, a 104-byte header, a version 2 header over version 3 leftovers,
//! an extension QEMU does not know; with a backing file or a data file
//! named after or among the extensions), each of the three places the
//! simulator follows, an L2 entry with contradictory subcluster bits, the
//! overlap check and a refcount read through an unaligned refcount block, is
//! compared with a real qemu-io or qemu-img on a copy, every byte. The
//! overlap check, fatal as the invalid entry is, loses what QEMU's caches
//! held of the write it stops. So too a LUKS image (qemu-io given its key,
//! the simulation the same key), names with a NUL inside, and bitmaps, which
//! the open marked in use; a bitmap name whose cut at its NUL changes the
//! directory's size fails the open.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::{corrupt, same_bytes};

/// Where the L2 entry of guest 0x20000 sits in the extended-L2 image.
const ENTRY: u64 = 0x40020;

/// The feature name table's extension type.
const FEATURE_TABLE: u32 = 0x6803_f857;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A 4M extended-L2 image made with `opts`: guest 0..64k and 128k..132k
/// written, the second entry's bitmap made to say subcluster 0 is also zero.
fn contradictory(w: &Work, image: &str, opts: &str) {
    let o = format!("extended_l2=on{opts}");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, image, "4M"]);
    w.qemu_io(image, &["write -P 1 0 64k", "write -P 2 128k 4k"]);
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let bitmap = u64::from_be_bytes(bytes[ENTRY as usize + 8..][..8].try_into().expect("8"));
    assert_eq!(bitmap, 0x3, "{image}: layout moved");
    w.patch(image, ENTRY + 8, &0x0000_0001_0000_0003u64.to_be_bytes());
}

/// A 4M image made with `opts` whose L1 entry 0 names the L1 table itself
/// as its L2 table (and so, as a data cluster, the L1 table): a write to
/// guest 0 lands on the active L1 table.
fn over_l1(w: &Work, image: &str, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([image, "4M"]);
    w.qemu_img(&args);
    w.qemu_io(image, &["write -P 0x11 0 64k"]);
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().expect("8"));
    w.patch(image, l1, &(0x8000_0000_0000_0000 | l1).to_be_bytes());
}

/// A 4M image with 64k of data whose refcount block 0 is said to sit at
/// 0x20200, not cluster aligned: its refcounts cannot be read.
fn unaligned_block(w: &Work, image: &str) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
    w.qemu_io(image, &["write -P 3 0 64k"]);
    w.patch(image, 0x10000, &0x20200u64.to_be_bytes());
}

/// Drop the feature name table: what follows it in cluster 0 (the end
/// mark, the backing file name) moves up, the backing file offset with it.
fn no_feature_table(w: &Work, image: &str) {
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let mut at = be32(&bytes, 100) as usize;
    while be32(&bytes, at) != FEATURE_TABLE {
        assert_ne!(be32(&bytes, at), 0, "{image}: no feature name table");
        at += 8 + (be32(&bytes, at + 4) as usize).next_multiple_of(8);
    }
    let cut = 8 + (be32(&bytes, at + 4) as usize).next_multiple_of(8);
    let mut c0 = bytes[at + cut..0x10000].to_vec();
    c0.resize(0x10000 - at, 0);
    w.patch(image, at as u64, &c0);
    let name_at = u64::from_be_bytes(bytes[8..16].try_into().expect("8"));
    if name_at > at as u64 {
        w.patch(image, 8, &(name_at - cut as u64).to_be_bytes());
    }
}

/// Give the feature name table a type QEMU does not know.
fn unknown_extension(w: &Work, image: &str) {
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let at = be32(&bytes, 100) as usize;
    assert_eq!(be32(&bytes, at), FEATURE_TABLE, "{image}: extensions moved");
    w.patch(image, at as u64, &0x1234_5678u32.to_be_bytes());
}

/// A 104-byte header, as older QEMU wrote it: the extensions moved 8 bytes
/// earlier (no backing file name to move with them).
fn short_header(w: &Work, image: &str) {
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    assert_eq!(be32(&bytes, 100), 112, "{image}: header length");
    assert_eq!(&bytes[8..12], &[0; 4], "{image}: has a backing file");
    let rest = bytes[112..0x10000].to_vec();
    w.patch(image, 104, &rest);
    w.patch(image, 100, &104u32.to_be_bytes());
}

/// A version 3 header that says version 2: what follows its 72 bytes (the
/// version 3 fields, then the feature name table) QEMU does not read, and
/// the zero incompatible features end its extensions at once.
fn says_version_2(w: &Work, image: &str) {
    w.patch(image, 4, &2u32.to_be_bytes());
}

/// Whether QEMU's copy (`NAME.qemu`) has another header cluster than the
/// image had, past the incompatible features and the disk size (so that
/// setting the corrupt bit alone could not match it).
fn rewritten(w: &Work, name: &str) -> bool {
    let before = std::fs::read(w.path(name)).expect("read the image");
    let after = std::fs::read(w.path(&format!("{name}.qemu"))).expect("read QEMU's copy");
    (0..0x10000).any(|i| !(24..32).contains(&i) && !(72..80).contains(&i) && before[i] != after[i])
}

#[test]
fn a_contradictory_entry_marks_corrupt_with_the_header_qemu_writes() {
    let w = Work::new();
    type Patch = fn(&Work, &str);
    let cases: [(&str, &str, Patch); 3] = [
        ("nf.qcow2", "", no_feature_table),
        ("uk.qcow2", "", unknown_extension),
        ("sh.qcow2", "", short_header),
    ];
    for (name, opts, patch) in cases {
        let make = |w: &Work, image: &str| {
            contradictory(w, image, opts);
            patch(w, image);
        };
        let (errors, is_corrupt) = same_bytes(&w, name, make, &["write:131584:512"]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(first.contains("Input/output error"), "{name}: {first}");
        assert!(is_corrupt, "{name}");
        assert!(
            rewritten(&w, name),
            "{name}: QEMU left the header as it was"
        );
    }
}

#[test]
fn a_contradictory_entry_with_a_backing_file_keeps_its_name_after_the_extensions() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    let make = |w: &Work, image: &str| {
        contradictory(w, image, ",backing_file=base.qcow2,backing_fmt=qcow2");
        no_feature_table(w, image);
    };
    let (errors, is_corrupt) = same_bytes(&w, "b.qcow2", make, &["write:131584:512"]);
    assert!(errors[0].is_some(), "{errors:?}");
    assert!(is_corrupt);
    assert!(rewritten(&w, "b.qcow2"), "QEMU left the header as it was");
}

#[test]
fn a_contradictory_entry_with_a_data_file_keeps_its_name() {
    let w = Work::new();
    // Nothing is written to the data file: QEMU's copy and the simulated
    // image name the same one.
    let make = |w: &Work, image: &str| {
        contradictory(w, image, ",data_file=d.raw");
        no_feature_table(w, image);
    };
    let (errors, is_corrupt) = same_bytes(&w, "df.qcow2", make, &["write:131584:512"]);
    assert!(errors[0].is_some(), "{errors:?}");
    assert!(is_corrupt);
    assert!(rewritten(&w, "df.qcow2"), "QEMU left the header as it was");
}

#[test]
fn the_overlap_check_marks_corrupt_with_the_header_qemu_writes() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    type Patch = fn(&Work, &str);
    let cases: [(&str, &str, Patch); 4] = [
        ("onf.qcow2", "", no_feature_table),
        ("ouk.qcow2", "", unknown_extension),
        ("ov2.qcow2", "", says_version_2),
        (
            "obk.qcow2",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            no_feature_table,
        ),
    ];
    for (name, opts, patch) in cases {
        let make = |w: &Work, image: &str| {
            over_l1(w, image, opts);
            patch(w, image);
        };
        let (errors, _) = same_bytes(&w, name, make, &["write:0:512"]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(
            first.contains("overlaps with active L1 table"),
            "{name}: {first}"
        );
        assert!(
            rewritten(&w, name),
            "{name}: QEMU left the header as it was"
        );
    }
    // A version 2 header keeps no corrupt bit; the others do.
    assert!(!corrupt(&w, "ov2.qcow2"));
    assert!(corrupt(&w, "onf.qcow2") && corrupt(&w, "obk.qcow2"));
}

#[test]
fn an_unaligned_refcount_block_marks_corrupt_with_the_header_qemu_writes() {
    let w = Work::new();
    let make = |w: &Work, image: &str| {
        unaligned_block(w, image);
        no_feature_table(w, image);
    };
    same_bytes(&w, "rb.qcow2", make, &["repair:all"]);
    assert!(rewritten(&w, "rb.qcow2"), "QEMU left the header as it was");
}

/// An image of `size` with guest `at`..`at`+64k written (`at` the second
/// cluster of an L2 table's range: the table lands at 0x40000, the data at
/// 0x50000) whose L2 entry 1 then names the active L1 table (0x30000) as its
/// data.
fn l2_entry_over_l1(w: &Work, image: &str, size: &str, at: u64) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, size]);
    w.qemu_io(image, &[&format!("write -P 0x11 {at} 64k")]);
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let entry = u64::from_be_bytes(bytes[0x40008..0x40010].try_into().expect("8"));
    assert_eq!(entry, 0x8000_0000_0005_0000, "{image}: layout moved");
    w.patch(image, 0x40008, &0x8000_0000_0003_0000u64.to_be_bytes());
}

#[test]
fn an_overlap_after_an_allocation_loses_what_qemus_caches_held() {
    let w = Work::new();
    // Guest 0 gets a new cluster (its refcount and L2 entry in QEMU's
    // caches, its data written), then the write of guest 64k lands on the
    // active L1 table: the data stays in the file, named by nothing and
    // counted by nothing; the next write is refused, the image corrupt.
    let make = |w: &Work, image: &str| l2_entry_over_l1(w, image, "4M", 0x10000);
    let ops = ["write:0:131072:P=5", "write:0:512"];
    let (errors, is_corrupt) = same_bytes(&w, "oa.qcow2", make, &ops);
    let first = errors[0].as_deref().unwrap_or_default();
    assert!(first.contains("overlaps with active L1 table"), "{first}");
    assert!(errors[1].is_some(), "{errors:?}");
    assert!(is_corrupt);
    // Guest 512M-64k first, in a new L2 table (which writes QEMU's caches
    // back), then guest 512M, then guest 512M+64k onto the L1 table.
    let make = |w: &Work, image: &str| l2_entry_over_l1(w, image, "1G", 0x2001_0000);
    let (errors, is_corrupt) = same_bytes(&w, "ob.qcow2", make, &["write:536805376:196608:P=5"]);
    let first = errors[0].as_deref().unwrap_or_default();
    assert!(first.contains("overlaps with active L1 table"), "{first}");
    assert!(is_corrupt);
}

/// The secret and the image options qemu-io opens the LUKS images with.
const SECRET: &str = "secret,id=s0,data=pw";

/// `cmds` by one qemu-io on the LUKS image `image`, opened with its key:
/// the first line of its output that says a command failed, if any.
fn luks_io(w: &Work, image: &str, cmds: &[&str]) -> Option<String> {
    let opts = format!("driver=qcow2,file.filename={image},encrypt.key-secret=s0");
    let mut args = vec!["--object", SECRET, "--image-opts", &opts];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = std::process::Command::new("qemu-io")
        .args(&args)
        .current_dir(w.dir.path())
        .output()
        .expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| l.contains("failed"))
        .map(str::to_string)
}

/// A 4M LUKS image (`opts` added to its options), guest 0..64k and
/// 128k..132k written: where its active L1 table and L2 table 0 are.
fn luks_image(w: &Work, image: &str, opts: &str) -> (u64, u64) {
    let o = format!("encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10{opts}");
    let object = format!("--object={SECRET}");
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", &object, "-o", &o, image, "4M",
    ]);
    let failed = luks_io(w, image, &["write -P 1 0 64k", "write -P 2 128k 4k"]);
    assert_eq!(failed, None, "{image}");
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().expect("8"));
    let l2 =
        u64::from_be_bytes(bytes[l1 as usize..][..8].try_into().expect("8")) & ((1 << 56) - 512);
    (l1, l2)
}

/// Reverse the order of the header extensions (the crypto header pointer,
/// first as qemu-img writes it, goes last): nothing else in cluster 0 moves.
fn reversed_extensions(w: &Work, image: &str) {
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let start = be32(&bytes, 100) as usize;
    let (mut at, mut exts) = (start, Vec::new());
    while be32(&bytes, at) != 0 {
        let len = 8 + (be32(&bytes, at + 4) as usize).next_multiple_of(8);
        exts.push(bytes[at..at + len].to_vec());
        at += len;
    }
    assert!(exts.len() > 1, "{image}: one extension");
    exts.reverse();
    w.patch(image, start as u64, &exts.concat());
}

/// `op` on a copy of the LUKS image `name` by qemu-io with its key, and in
/// the simulator given the same key: QEMU's failure, and the file every
/// byte the same.
fn same_luks_bytes(w: &Work, name: &str, op: &str, qemu_cmd: &str) -> Option<String> {
    let copy = format!("{name}.qemu");
    std::fs::copy(w.path(name), w.path(&copy)).expect("copy the image");
    let failed = luks_io(w, &copy, &[qemu_cmd]);
    let img = sim_compare::open_path(&w.path(name)).expect("open the image");
    let key = qinspect::crypto::DataKey::unlock(&img, b"pw").expect("unlock");
    assert!(img.set_data_key(key));
    let mut sim = qinspect::simulate::Sim::new(&img, &w.path(name)).expect("simulate");
    sim.apply(&sim_compare::parse_op(op));
    let error = sim.records[0].error.clone();
    assert_eq!(
        error.is_some(),
        failed.is_some(),
        "{name}: {error:?} {failed:?}"
    );
    sim_bytes::same_file(w, name, &sim);
    error
}

#[test]
fn an_encrypted_image_marked_corrupt_keeps_its_crypto_extension_first() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    let cases = [
        ("el2.qcow2", ",extended_l2=on"),
        (
            "ebk.qcow2",
            ",extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2",
        ),
    ];
    for (name, opts) in cases {
        // Guest 128k's entry made to say subcluster 0 is also zero.
        let (_, l2) = luks_image(&w, name, opts);
        w.patch(name, l2 + 0x28, &0x0000_0001_0000_0003u64.to_be_bytes());
        reversed_extensions(&w, name);
        let error = same_luks_bytes(&w, name, "write:131584:512", "write 131584 512");
        let error = error.unwrap_or_default();
        assert!(error.contains("Input/output error"), "{name}: {error}");
        assert!(corrupt(&w, name), "{name}");
        assert!(
            rewritten(&w, name),
            "{name}: QEMU left the header as it was"
        );
    }
    // L1 entry 0 names the L1 table as its L2 table: the write of guest 0
    // lands on it, past its encryption.
    let (l1, _) = luks_image(&w, "eov.qcow2", "");
    w.patch("eov.qcow2", l1, &(0x8000_0000_0000_0000 | l1).to_be_bytes());
    reversed_extensions(&w, "eov.qcow2");
    let error = same_luks_bytes(&w, "eov.qcow2", "write:0:512", "write 0 512");
    let error = error.unwrap_or_default();
    assert!(error.contains("overlaps with active L1 table"), "{error}");
    assert!(corrupt(&w, "eov.qcow2"));
    assert!(rewritten(&w, "eov.qcow2"), "QEMU left the header as it was");
}

#[test]
fn simulate_refuses_an_encrypted_image_it_has_no_key_for() {
    let w = Work::new();
    luks_image(&w, "e.qcow2", "");
    // qemu-io's open fails without the key, and so does the simulation's.
    let out = w.qinspect(&["simulate", "e.qcow2", "write:0:512"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let img = sim_compare::open_path(&w.path("e.qcow2")).expect("open the image");
    let refused = qinspect::simulate::Sim::new(&img, &w.path("e.qcow2")).err();
    assert!(
        matches!(refused, Some(qinspect::error::Error::Unsupported { .. })),
        "{refused:?}"
    );
}

/// Where the extension of type `t` starts in the image's cluster 0.
fn extension_at(w: &Work, image: &str, t: u32) -> usize {
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let mut at = be32(&bytes, 100) as usize;
    while be32(&bytes, at) != t {
        assert_ne!(be32(&bytes, at), 0, "{image}: no extension {t:#x}");
        at += 8 + (be32(&bytes, at + 4) as usize).next_multiple_of(8);
    }
    at
}

/// Give the extension of type `t` (a name of 5 bytes, padded to 8) a
/// length of 8: its name, a NUL, then "zz".
fn nul_in_extension(w: &Work, image: &str, t: u32) {
    let at = extension_at(w, image, t);
    assert_eq!(
        be32(&std::fs::read(w.path(image)).expect("read"), at + 4),
        5
    );
    w.patch(image, at as u64 + 4, &8u32.to_be_bytes());
    w.patch(image, at as u64 + 13, b"\0zz");
}

/// Make the backing file name (followed by zeros) 3 bytes longer: a NUL,
/// then "zz".
fn nul_in_backing_name(w: &Work, image: &str) {
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let at = u64::from_be_bytes(bytes[8..16].try_into().expect("8"));
    let len = be32(&bytes, 16);
    assert_eq!(&bytes[(at + u64::from(len)) as usize..][..3], &[0; 3]);
    w.patch(image, at + u64::from(len), b"\0zz");
    w.patch(image, 16, &(len + 3).to_be_bytes());
}

/// Cut the first name of the feature name table ("dirty bit") with a NUL.
fn nul_in_feature_name(w: &Work, image: &str) {
    let at = extension_at(w, image, FEATURE_TABLE);
    w.patch(image, at as u64 + 8 + 2 + 5, b"\0");
}

#[test]
fn names_with_a_nul_inside_are_written_back_to_the_nul() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    let backing = ",backing_file=base.qcow2,backing_fmt=qcow2";
    type Patch = fn(&Work, &str);
    let cases: [(&str, &str, Patch); 4] = [
        ("nb.qcow2", backing, nul_in_backing_name),
        ("nf.qcow2", backing, |w, i| {
            nul_in_extension(w, i, 0xe279_2aca)
        }),
        ("nd.qcow2", ",data_file=d.raw", |w, i| {
            nul_in_extension(w, i, 0x4441_5441)
        }),
        ("nt.qcow2", "", nul_in_feature_name),
    ];
    for (name, opts, patch) in cases {
        let make = |w: &Work, image: &str| {
            contradictory(w, image, opts);
            if name == "nb.qcow2" {
                no_feature_table(w, image);
            }
            patch(w, image);
        };
        let (errors, is_corrupt) = same_bytes(&w, name, make, &["write:131584:512"]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(first.contains("Input/output error"), "{name}: {first}");
        assert!(is_corrupt, "{name}");
        assert!(
            rewritten(&w, name),
            "{name}: QEMU left the header as it was"
        );
    }
    // qemu-img info names the backing file as its open read it, to the NUL.
    w.assert_info_matches("nb.qcow2");
}

/// The contradictory image with bitmap `name` added, its byte 2 then made a
/// NUL when `cut`.
fn with_bitmap(w: &Work, image: &str, name: &str, cut: bool) {
    contradictory(w, image, "");
    w.qemu_img(&["bitmap", "--add", image, name]);
    if cut {
        let bytes = std::fs::read(w.path(image)).expect("read the image");
        let at = bytes.windows(name.len()).position(|s| s == name.as_bytes());
        w.patch(image, at.expect("the bitmap's name") as u64 + 2, b"\0");
    }
}

#[test]
fn bitmaps_stay_marked_in_use_when_the_image_is_marked_corrupt() {
    let w = Work::new();
    // The open marks the bitmap in use in place; the close, which would
    // store it again, does not come. "b0" to the NUL keeps the directory's
    // size (32 bytes): the open writes it with the name cut.
    let cases = [("bu.qcow2", "b0ab", false), ("bc.qcow2", "b0ab", true)];
    for (image, name, cut) in cases {
        let make = |w: &Work, i: &str| with_bitmap(w, i, name, cut);
        let (errors, is_corrupt) = same_bytes(&w, image, make, &["write:131584:512"]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(first.contains("Input/output error"), "{image}: {first}");
        assert!(is_corrupt, "{image}");
        let img = sim_compare::open_path(&w.path(&format!("{image}.qemu"))).expect("open");
        let dir = img.bitmaps.expect("bitmaps").expect("a directory");
        assert_eq!(
            (dir[0].name.as_str(), dir[0].flags & 1),
            ("b0ab".get(..if cut { 2 } else { 4 }).expect("name"), 1)
        );
    }
}

#[test]
fn a_bitmap_name_cut_to_another_directory_size_fails_the_open() {
    let w = Work::new();
    // "b0" to the NUL: a directory of 32 bytes where the file's has 40.
    // The open clears autoclear bit 0 (the bitmaps extension goes) and
    // fails; the next open knows no bitmaps.
    let make = |w: &Work, i: &str| with_bitmap(w, i, "b0abcdefghi", true);
    let ops = ["write:131584:512", "write:131584:512"];
    let (errors, is_corrupt) = same_bytes(&w, "bf.qcow2", make, &ops);
    let first = errors[0].as_deref().unwrap_or_default();
    assert!(
        first.contains("Can't update bitmap directory: Invalid argument"),
        "{first}"
    );
    let second = errors[1].as_deref().unwrap_or_default();
    assert!(second.contains("Input/output error"), "{second}");
    assert!(is_corrupt);
    let img = sim_compare::open_path(&w.path("bf.qcow2.qemu")).expect("open");
    assert!(img.bitmaps.is_none());
    assert_eq!(img.header.autoclear_features & 1, 0);
}

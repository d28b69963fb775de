//! Operations over an extended-L2 entry whose subcluster bitmap contradicts
//! itself (a subcluster both allocated and zero: QEMU's invalid subcluster
//! type), each compared with a real qemu-io on a copy (see `sim_compare`).

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use qinspect::simulate::{Sim, SimError};
use sim_bytes::{corrupt, same_bytes};
use sim_compare::{compare_metadata, open_path};

/// Where the L2 entry of guest 0x20000 sits (L1 at 0x30000, its L2 table
/// at 0x40000, entries of 16 bytes).
const ENTRY: u64 = 0x40020;

/// A 4M extended-L2 image: guest 0..64k written (data at 0x50000), guest
/// 128k..132k written (data at 0x60000, subclusters 0 and 1), and that
/// second entry's bitmap made to say subcluster 0 is also zero.
fn contradictory(w: &Work, image: &str) {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        image,
        "4M",
    ]);
    w.qemu_io(image, &["write -P 1 0 64k", "write -P 2 128k 4k"]);
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let at = ENTRY as usize;
    let entry = u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let bitmap = u64::from_be_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
    assert_eq!(
        (entry, bitmap),
        (0x8000_0000_0006_0000, 0x3),
        "layout moved"
    );
    w.patch(image, ENTRY + 8, &0x0000_0001_0000_0003u64.to_be_bytes());
}

/// Compare `ops` on a fresh copy of the contradictory image (all but the
/// guest disk, which neither can read through the entry); return each
/// operation's error.
fn same(w: &Work, name: &str, ops: &[&str]) -> Vec<Option<String>> {
    contradictory(w, name);
    let sim = compare_metadata(w.dir.path(), name, ops).unwrap_or_else(|e| panic!("{ops:?}: {e}"));
    sim.records.iter().map(|r| r.error.clone()).collect()
}

#[test]
fn a_partial_write_zeroes_in_a_contradictory_entry_marks_the_image_corrupt() {
    let w = Work::new();
    // In the contradictory subcluster and in another one of the same entry
    // (QEMU calls the whole entry invalid), with and without unmap: block
    // status marks the image corrupt, and the fallback write finds no image.
    // The write after it is refused at the open.
    for (i, op) in [
        "write-zeroes:131584:512",
        "write-zeroes:131584:512:unmap",
        "write-zeroes:133120:512",
        "write-zeroes:135168:512:unmap",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("z{i}.qcow2");
        let errors = same(&w, &name, &[op, "write:0:512"]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(
            first.starts_with("write failed: No medium found"),
            "{op}: {first}"
        );
        assert!(errors[1].is_some(), "{op}: {errors:?}");
        assert!(corrupt(&w, &name), "{op}");
    }
}

#[test]
fn whole_subclusters_and_clusters_of_a_contradictory_entry_are_zeroed() {
    let w = Work::new();
    // Whole subclusters change the bitmap alone (subcluster 0 ends up
    // consistent); whole clusters make it all zeros, with unmap releasing
    // the cluster. No block status is asked: nothing is marked corrupt.
    for (i, op) in [
        "write-zeroes:131072:2048",
        "write-zeroes:135168:2048",
        "write-zeroes:131072:65536",
        "write-zeroes:131072:65536:unmap",
        "discard:131072:65536",
        "discard:131072:2048",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("w{i}.qcow2");
        assert_eq!(same(&w, &name, &[op]), vec![None], "{op}");
        assert!(!corrupt(&w, &name), "{op}");
    }
}

#[test]
fn a_write_or_copy_on_read_over_a_contradictory_entry_marks_the_image_corrupt() {
    let w = Work::new();
    for (i, op) in [
        "write:131584:512",
        "write:133120:2048",
        "write:131072:65536",
        "read:131072:512",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("p{i}.qcow2");
        let errors = same(&w, &name, &[op]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(
            first.contains("failed: Input/output error"),
            "{op}: {first}"
        );
        assert!(corrupt(&w, &name), "{op}");
    }
}

#[test]
fn a_write_that_meets_a_contradictory_entry_after_allocating_keeps_only_its_data() {
    let w = Work::new();
    // Guest 64k..128k gets a new cluster (its refcount and L2 entry in
    // QEMU's caches), then the write reaches the entry at 128k: the data
    // written stays in the file, named by nothing and counted by nothing.
    // With guest 0..64k rewritten in place first, likewise.
    for (i, op) in [
        "write:65536:131072:P=5",
        "write:0:135168:P=5",
        "write:65536:65537",
    ]
    .iter()
    .enumerate()
    {
        let (errors, corrupt) = same_bytes(&w, &format!("m{i}.qcow2"), contradictory, &[op]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(first.contains("Input/output error"), "{op}: {first}");
        assert!(corrupt, "{op}");
    }
}

#[test]
fn a_write_zeroes_or_copy_on_read_that_zeroed_clusters_first_loses_them() {
    let w = Work::new();
    // Whole clusters zeroed (and with unmap released: QEMU passes the
    // discard down, so the file's cluster reads as zeros), then the partial
    // subcluster at 128k asks block status: the L2 entries and refcounts
    // stay as they were.
    for (i, op) in [
        "write-zeroes:65536:66048",
        "write-zeroes:65536:66048:unmap",
        "write-zeroes:0:131584",
        "write-zeroes:0:131584:unmap",
    ]
    .iter()
    .enumerate()
    {
        let (errors, corrupt) = same_bytes(&w, &format!("y{i}.qcow2"), contradictory, &[op]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(
            first.starts_with("write failed: No medium found"),
            "{op}: {first}"
        );
        assert!(corrupt, "{op}");
    }
    // Copy-on-read: block status counts an unallocated run on into the
    // next cluster and fails there, before anything is copied (the read
    // fails); a later look, after a run that was allocated, is taken as
    // "not allocated" and the read that follows finds no image.
    for (i, (op, words)) in [
        ("read:65536:69632", "Input/output error"),
        ("read:0:135168", "No medium found"),
    ]
    .iter()
    .enumerate()
    {
        let (errors, corrupt) = same_bytes(&w, &format!("c{i}.qcow2"), contradictory, &[op]);
        let first = errors[0].as_deref().unwrap_or_default();
        assert!(
            first.starts_with(&format!("read failed: {words}")),
            "{op}: {first}"
        );
        assert!(corrupt, "{op}");
    }
    // Guest 96k..128k written: copy-on-read writes zeros over 64k..96k
    // (whole subclusters zeroed, in QEMU's cache) before its look at the
    // written run reaches 128k; the zeroed bits are lost.
    let half = |w: &Work, n: &str| {
        contradictory(w, n);
        w.qemu_io(n, &["write -P 3 96k 32k"]);
    };
    let (errors, corrupt) = same_bytes(&w, "c2.qcow2", half, &["read:65536:69632"]);
    let first = errors[0].as_deref().unwrap_or_default();
    assert!(first.starts_with("read failed: No medium found"), "{first}");
    assert!(corrupt);
}

#[test]
fn a_discard_over_earlier_clusters_and_a_contradictory_entry_goes_through() {
    let w = Work::new();
    // A discard never asks the entry's subcluster type: no corruption.
    for (i, op) in [
        "discard:65536:66048",
        "discard:0:132096",
        "discard:0:196608",
    ]
    .iter()
    .enumerate()
    {
        let (errors, corrupt) = same_bytes(&w, &format!("d{i}.qcow2"), contradictory, &[op]);
        assert_eq!(errors, vec![None], "{op}");
        assert!(!corrupt, "{op}");
    }
}

/// A 32M extended-L2 image of 16k clusters (an L2 table covers 16M):
/// guest 16M..16M+4k written (its L2 table for active L1[1] at `table`),
/// with `early` guest 0..4k first, and `snapshot` a snapshot after (the
/// tables shared); entry 0 of L1[1]'s table then made contradictory.
fn two_tables(w: &Work, image: &str, early: bool, snapshot: bool, table: u64) {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=16k",
        image,
        "32M",
    ]);
    if early {
        w.qemu_io(image, &["write -P 1 0 4k"]);
    }
    w.qemu_io(image, &["write -P 2 16M 4k"]);
    if snapshot {
        w.qemu_img(&["snapshot", "-c", "s1", image]);
    }
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let at = table as usize;
    let bitmap = u64::from_be_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
    assert_eq!(bitmap, 0xff, "layout moved");
    w.patch(image, table + 8, &0x0000_0001_0000_00ffu64.to_be_bytes());
}

#[test]
fn a_new_l2_table_before_a_contradictory_entry_writes_qemus_caches_back() {
    let w = Work::new();
    // Guest 16M-16k needs a new L2 table (L1[0] is empty): QEMU writes its
    // refcounts and the new table out, and the L1 entry; the data
    // cluster's refcount and entry are lost at 16M.
    let fresh = |w: &Work, n: &str| two_tables(w, n, false, false, 0x10000);
    let (errors, corrupt) = same_bytes(&w, "t0.qcow2", fresh, &["write:16760832:16896:P=5"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
    // With both tables shared by a snapshot: the copy of L1[0]'s table, and
    // the release of the old one (in the refcount cache), then the data
    // cluster's refcount are written back when L1[1]'s table is copied in
    // turn; the data cluster's L2 entry waits for its data and never makes
    // it, and the old L1[1] table's release is lost. The entry is met in
    // the copy.
    let shared = |w: &Work, n: &str| two_tables(w, n, true, true, 0x18000);
    let (errors, corrupt) = same_bytes(&w, "t1.qcow2", shared, &["write:16760832:16896:P=5"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
    // A write-zeroes that zeroes the cluster before 16M in the copy of
    // L1[0]'s table (QEMU's cache holds that entry) and then asks block
    // status of the shared L1[1] table for the rest of the subcluster at
    // 16M: three tables through QEMU's L2 cache of two, the old L1[0] one
    // the least recently used and unchanged, so nothing changed is
    // written back.
    let (errors, corrupt) = same_bytes(&w, "t2.qcow2", shared, &["write-zeroes:16760832:16640"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
}

#[test]
fn a_write_through_several_new_tables_before_a_contradictory_entry() {
    let w = Work::new();
    // 48M, three L2 tables, the first and the last shared, the last one's
    // entry 0 (guest 32M) contradictory; a write from 16M-16k to 32M+512.
    // The new table for L1[1] is made while the first piece is still being
    // placed, so only the copy of L1[2]'s table writes the caches back
    // after the first piece's entry began to wait: it is lost, as all the
    // others, and the refcounts stay written.
    let three = |w: &Work, n: &str| {
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=16k",
            n,
            "48M",
        ]);
        w.qemu_io(n, &["write -P 1 0 4k", "write -P 2 32M 4k"]);
        w.qemu_img(&["snapshot", "-c", "s1", n]);
        w.patch(n, 0x18008, &0x0000_0001_0000_00ffu64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "p.qcow2", three, &["write:16760832:16794112:P=5"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
    // 64M, four L2 tables, the first and the last shared by a snapshot, the
    // last one's entry 0 (guest 48M) contradictory. A write from 16M-16k to
    // 48M+512: the first piece's entry waits for its data while the next
    // pieces make L1[1]'s and L1[2]'s tables and copy L1[3]'s. Whether the
    // first entry is set before the last copy writes the cache back (QEMU
    // here writes it) depends on when its data write finished.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=16k",
        "q.qcow2",
        "64M",
    ]);
    w.qemu_io("q.qcow2", &["write -P 1 0 4k", "write -P 2 48M 4k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "q.qcow2"]);
    w.patch("q.qcow2", 0x18008, &0x0000_0001_0000_00ffu64.to_be_bytes());
    let img = open_path(&w.path("q.qcow2")).expect("open");
    let mut sim = Sim::new(&img, &w.path("q.qcow2")).expect("sim");
    sim.apply(&sim_compare::parse_op("write:16760832:33571328:P=5"));
    let r = &sim.records[0];
    assert!(
        matches!(r.cause, Some(SimError::NotModelled(_))),
        "{:?}",
        r.error
    );
}

#[test]
fn a_new_refcount_block_before_a_contradictory_entry_stays() {
    let w = Work::new();
    // 64-bit refcounts: a refcount block of 16k counts 32M of file. The
    // image fills exactly that; the write's data cluster needs a second
    // block, which QEMU writes out with the refcount table entry (and the
    // data); the data cluster's own refcount and entry are lost.
    let make = |w: &Work, image: &str| {
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=16k,refcount_bits=64",
            image,
            "64M",
        ]);
        w.qemu_io(image, &["write -P 2 40M 4k", "write -P 1 0 33423360"]);
        assert_eq!(
            std::fs::metadata(w.path(image)).expect("stat").len(),
            32 << 20,
            "layout moved"
        );
        // Guest 40M: entry 512 of the L2 table at 0x10000.
        w.patch(image, 0x12008, &0x0000_0001_0000_00ffu64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "r.qcow2", make, &["write:41926656:16896:P=5"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
}

#[test]
fn refcount_blocks_past_qemus_refcount_cache() {
    let w = Work::new();
    // 160M preallocated (falloc) with 64-bit refcounts and 16k clusters:
    // six refcount blocks, every cluster allocated. Guest 16k's entry made
    // contradictory. (An unmapping write-zeroes that asks block status is
    // in tests/simulate_caches.rs.) A write asks no block status: guest
    // 0..16k unmapped first, then a write over it takes that cluster again
    // (the search for it reads the first block only) and reaches 16k; the
    // new refcount is lost.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=16k,refcount_bits=64,preallocation=falloc",
        "f.qcow2",
        "160M",
    ]);
    let bytes = std::fs::read(w.path("f.qcow2")).expect("read the image");
    let entry = u64::from_be_bytes(bytes[0x4010..0x4018].try_into().expect("8 bytes"));
    assert_eq!(entry, 0x8000_0000_0002_c000, "layout moved");
    drop(bytes);
    w.patch("f.qcow2", 0x4018, &0x0000_0001_0000_0001u64.to_be_bytes());
    let sim = compare_metadata(
        w.dir.path(),
        "f.qcow2",
        &["write-zeroes:0:16384:unmap", "write:0:16640:P=5"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sim.records[0].error, None);
    assert!(sim.records[1].error.is_some());
    assert!(corrupt(&w, "f.qcow2"));
}

#[test]
fn a_write_zeroes_at_the_end_of_a_disk_of_odd_size_over_a_contradictory_entry() {
    let w = Work::new();
    // A disk of 1M+1024+300 bytes in the header (QEMU's is 1M+1024, whole
    // sectors), its last cluster written (guest 1M..1M+1024) and made
    // contradictory. The whole rest of the disk is zeroed as a cluster; a
    // request past 1M+1024 is refused; a partial subcluster asks block
    // status, and marking the image corrupt writes the header with QEMU's
    // size. A write, discard or copy-on-read past 1M+1024 is refused as
    // well, before it looks at the entry.
    let make = |w: &Work, image: &str| {
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            image,
            "1049600",
        ]);
        w.qemu_io(image, &["write -P 2 1M 1024"]);
        w.patch(image, 24, &1_049_900u64.to_be_bytes());
        // Guest 1M: entry 16 of the L2 table at 0x40000.
        w.patch(image, 0x40108, &0x0000_0001_0000_0001u64.to_be_bytes());
    };
    for (i, (op, fails, marked)) in [
        ("write-zeroes:1048576:1024", false, false),
        ("write-zeroes:1048576:1024:unmap", false, false),
        ("write-zeroes:1048576:1324", true, false),
        ("write-zeroes:1049088:812", true, false),
        ("write:1048576:1324", true, false),
        ("discard:1048576:1324", true, false),
        ("read:1048576:1324", true, false),
        ("discard:1048576:1024", false, false),
        ("write-zeroes:1048576:512", true, true),
        ("write-zeroes:1049088:512", true, true),
    ]
    .iter()
    .enumerate()
    {
        let (errors, corrupt) = same_bytes(&w, &format!("e{i}.qcow2"), make, &[op]);
        assert_eq!(errors[0].is_some(), *fails, "{op}: {errors:?}");
        assert_eq!(corrupt, *marked, "{op}");
        if *marked {
            let img = open_path(&w.path(&format!("e{i}.qcow2.qemu"))).expect("open");
            assert_eq!(img.header.size, 1_049_600, "{op}");
        }
    }
}

#[test]
fn a_dirty_images_repair_on_open_before_the_entry_loses_what_it_left_in_the_cache() {
    let w = Work::new();
    // Lazy refcounts, killed after its writes: the image is dirty. Each
    // open repairs it first: the rebuild writes a new refcount structure
    // directly, and the old table and block, now leaks, are freed through
    // QEMU's refcount cache. With the contradictory bitmap left the image
    // stays unclean, so QEMU does not write those refcounts back; the
    // write-zeroes then marks the image corrupt and they are lost (QEMU's
    // file keeps refcount 1 for the refcount table and block the rebuild
    // replaced).
    let make = |w: &Work, n: &str| {
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,lazy_refcounts=on",
            n,
            "4M",
        ]);
        let out = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 64k",
                "-c",
                "write -P 2 128k 4k",
                "-c",
                "sigraise 9",
                n,
            ])
            .current_dir(w.dir.path())
            .output()
            .expect("qemu-io");
        assert!(!out.status.success());
        let img = open_path(&w.path(n)).expect("open");
        assert!(img.header.dirty());
        w.patch(n, ENTRY + 8, &0x0000_0001_0000_0003u64.to_be_bytes());
    };
    let (errors, corrupt) = same_bytes(&w, "d.qcow2", make, &["write-zeroes:131584:512"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
    let img = open_path(&w.path("d.qcow2.qemu")).expect("open");
    let report = qinspect::check::check(&img, &qinspect::check::CheckOptions::default());
    assert!(report.leaks >= 2, "{} leaks", report.leaks);
}

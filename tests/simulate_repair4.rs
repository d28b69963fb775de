//! `repair:all` and `repair:leaks` where an L1 or L2 entry names the L1
//! table it sits in, each compared with a real `qemu-img check -r` on a copy
//! (see `sim_compare`). More repairs in `simulate_repair3.rs`.

mod common;
mod sim_compare;
use common::Work;
use qinspect::simulate::{Sim, Target};
use sim_compare::compare;

/// Overwrite the 8 bytes at `at` of `image` with `value`.
fn poke(w: &Work, image: &str, at: u64, value: u64) {
    w.patch(image, at, &value.to_be_bytes());
}

/// The big-endian u64 at `at` of `image`.
fn peek(w: &Work, image: &str, at: usize) -> u64 {
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let word = bytes.get(at..at + 8).expect("inside the image");
    u64::from_be_bytes(word.try_into().expect("8 bytes"))
}

fn ok(w: &Work, image: &str, ops: &[&str]) -> Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{image}: {e}"))
}

/// A 4M image with two clusters written (L1 at 0x30000, its L2 table at
/// 0x40000, data at 0x50000 and 0x60000).
fn written(w: &Work, image: &str) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
    w.qemu_io(image, &["write -P 1 0 64k", "write -P 2 1M 64k"]);
}

/// Whether the first operation's record changed any refcount.
fn changed_refcounts(sim: &Sim) -> bool {
    sim.records[0]
        .steps
        .iter()
        .any(|c| matches!(c.target, Target::Refcount { .. }))
}

#[test]
fn an_l1_table_that_names_itself_as_its_l2_table_fails_the_copied_repair() {
    let w = Work::new();
    for name in ["a.qcow2", "l.qcow2", "r.qcow2"] {
        written(&w, name);
        poke(&w, name, 0x30000, 0x8000_0000_0003_0000);
    }
    // Cluster 3 already counted 3 times: only leaks are left.
    w.set_refcount("r.qcow2", 3, 3);
    // -r all raises cluster 3 (L1, L2 and data at once) to 3 and frees the
    // leaks in its refcount cache; clearing L1[0]'s COPIED flag is a write
    // onto an active L2 table (the L1 table itself): QEMU marks the image
    // corrupt and the check fails, the cached refcounts never written. A
    // second check -r all fails the same way.
    let sim = ok(&w, "a.qcow2", &["repair:all", "repair:all"]);
    for rec in &sim.records {
        let e = rec.error.as_deref().unwrap_or_default();
        assert!(
            e.starts_with("Check failed: Input/output error")
                && e.contains("overlaps with active L2 table"),
            "{e}"
        );
    }
    assert!(!changed_refcounts(&sim), "{:?}", sim.records[0].steps);
    assert!(sim.freed.is_empty(), "{:?}", sim.freed);
    assert!(
        sim.records[0]
            .steps
            .iter()
            .any(|c| matches!(c.target, Target::Header { .. }) && c.after & 2 != 0)
    );
    // -r leaks frees the leaks and, with cluster 3 left too low, repairs no
    // COPIED flag: nothing is written over metadata.
    let sim = ok(&w, "l.qcow2", &["repair:leaks", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert_eq!(sim.freed.len(), 3, "{:?}", sim.freed);
    // With no error left, -r leaks repairs the COPIED flags too: the same
    // write stops it, and the leaks it freed in its cache stay.
    let sim = ok(&w, "r.qcow2", &["repair:leaks"]);
    let e = sim.records[0].error.as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L2 table"), "{e}");
    assert!(!changed_refcounts(&sim), "{:?}", sim.records[0].steps);
    assert!(sim.freed.is_empty(), "{:?}", sim.freed);
}

#[test]
fn a_snapshot_l1_table_that_names_itself_is_counted_and_left() {
    let w = Work::new();
    written(&w, "s.qcow2");
    w.qemu_img(&["snapshot", "-c", "s1", "s.qcow2"]);
    let table = usize::try_from(peek(&w, "s.qcow2", 0x40)).expect("offset");
    let l1 = peek(&w, "s.qcow2", table);
    assert_ne!(l1, 0x30000, "the snapshot has an L1 table of its own");
    poke(&w, "s.qcow2", l1, l1);
    // The COPIED repair walks only the active tables: QEMU raises the
    // snapshot L1 table's refcount (L1, L2 and data) and frees the old L2
    // table's share, and no write lands on metadata.
    let sim = ok(&w, "s.qcow2", &["repair:all", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert!(changed_refcounts(&sim), "{:?}", sim.records[0].steps);
}

#[test]
fn an_l2_entry_naming_the_l1_table_as_data_is_repaired() {
    let w = Work::new();
    written(&w, "d.qcow2");
    poke(&w, "d.qcow2", 0x40000, 0x8000_0000_0003_0000);
    // Cluster 3 is the L1 table and a data cluster: raised to 2, the L2
    // entry's COPIED flag cleared (a write into the L2 table at 0x40000, no
    // overlap), and the old data cluster at 0x50000 freed.
    let sim = ok(&w, "d.qcow2", &["repair:all", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    let r: Vec<&str> = sim.records[0]
        .steps
        .iter()
        .map(|c| c.reason.as_str())
        .collect();
    assert!(
        r.contains(&"Repairing cluster 3 refcount=1 reference=2")
            && r.contains(
                &"Repairing OFLAG_COPIED data cluster: l2_entry=8000000000030000 refcount=2"
            ),
        "{r:?}"
    );
}

#[test]
fn an_l2_table_the_copied_repair_wrote_before_the_overlap_stays_written() {
    let w = Work::new();
    // 1G: guest 0 (L2 table at 0x40000, data at 0x50000) and guest 512M
    // (L2 table at 0x60000, data at 0x70000), each under an L1 entry of
    // its own.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "c.qcow2", "1G"]);
    w.qemu_io("c.qcow2", &["write -P 1 0 64k", "write -P 2 512M 64k"]);
    assert_eq!(peek(&w, "c.qcow2", 0x30008), 0x8000_0000_0006_0000);
    // L1[0] without COPIED (the L1 table, read as an L2 table, names its
    // cluster as data too: refcount 2), L1[1] naming the L1 table itself,
    // and the data entry at 0x40000 without COPIED.
    poke(&w, "c.qcow2", 0x30000, 0x40000);
    poke(&w, "c.qcow2", 0x30008, 0x8000_0000_0003_0000);
    poke(&w, "c.qcow2", 0x40000, 0x50000);
    // -r all raises clusters 3 and 4 and frees the leaks 6 and 7 in its
    // refcount cache; the COPIED repair writes the L2 table at 0x40000 (its
    // entry gets COPIED back) and then stops at L1[1]: the L2 table stays
    // written, the cached refcounts are lost.
    let sim = ok(&w, "c.qcow2", &["repair:all"]);
    let rec = &sim.records[0];
    let e = rec.error.as_deref().unwrap_or_default();
    assert!(
        e.starts_with("Check failed: Input/output error")
            && e.contains("overlaps with active L2 table"),
        "{e}"
    );
    assert!(!changed_refcounts(&sim), "{:?}", rec.steps);
    assert!(sim.freed.is_empty(), "{:?}", sim.freed);
    assert!(rec.steps.iter().any(|c| {
        matches!(c.target, Target::L2Entry { index: 0, .. })
            && c.before == 0x50000
            && c.after == 0x8000_0000_0005_0000
    }));
}

#[test]
fn growing_the_file_for_a_refcount_block_stops_at_the_block_layers_limit() {
    let w = Work::new();
    // Refcount table entry 1 names a block whose end is the block layer's
    // limit (2^63 less 1 GiB) exactly, or one cluster past it: the first
    // resize fails in the file system ("File too large"), the second in the
    // block layer ("Input/output error"); either way QEMU rebuilds.
    let limit: u64 = 0x7fff_ffff_c000_0000;
    for (i, block) in [limit - 0x10000, limit].into_iter().enumerate() {
        let name = format!("g{i}.qcow2");
        w.qemu_img(&["create", "-q", "-f", "qcow2", &name, "4M"]);
        w.qemu_io(&name, &["write -P 1 0 64k"]);
        poke(&w, &name, 0x10008, block);
        let real = format!("real-{name}");
        w.run("cp", &[&name, &real]);
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-r", "all", &real])
            .current_dir(w.dir.path())
            .output()
            .expect("qemu-img check");
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("ERROR could not resize image: "))
            .unwrap_or_else(|| panic!("{name}: {text}"))
            .to_string();
        let sim = ok(&w, &name, &["repair:all"]);
        assert_eq!(sim.records[0].error, None);
        assert!(
            sim.records[0]
                .steps
                .iter()
                .any(|c| c.reason.starts_with(&line)),
            "{name}: QEMU says '{line}'; {:?}",
            sim.records[0].steps
        );
    }
}

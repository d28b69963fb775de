//! What the commands say about images QEMU refuses or that are cut short: every
//! word on screen is true of the file. Each image is made by qemu-img and then
//! patched; qemu-img's own answer on it is asserted beside qinspect's.

mod common;
use common::Work;
use serde_json::Value;
use std::process::Command;

/// base.qcow2: 4 MiB, `write -P 1 0 64k` (L1 at 0x30000, L2 at 0x40000, data at
/// 0x50000). b.qcow2: the same with l1_size (header 0x24) set to 0x7fffffff,
/// which QEMU refuses ("Active L1 table too large").
fn images(w: &Work) {
    w.qemu_img(&["create", "-f", "qcow2", "base.qcow2", "4M"]);
    w.qemu_io("base.qcow2", &["write -P 1 0 64k"]);
    std::fs::copy(w.path("base.qcow2"), w.path("b.qcow2")).unwrap();
    w.patch("b.qcow2", 0x24, &0x7fff_ffffu32.to_be_bytes());
}

fn qemu(w: &Work, args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .current_dir(w.dir.path())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn dump_l1_says_the_refused_table_is_not_read() {
    let w = Work::new();
    images(&w);
    let q = qemu(&w, &["info", "b.qcow2"]);
    assert_eq!(q.status.code(), Some(1));
    assert!(text(&q.stderr).contains("Active L1 table too large"));
    // The file holds the real entry there; the dump must not show it as zero.
    let bytes = std::fs::read(w.path("b.qcow2")).unwrap();
    assert_eq!(
        bytes[0x30000..0x30008],
        0x8000_0000_0004_0000u64.to_be_bytes()
    );

    let out = text(&w.qinspect_ok(&["dump", "l1", "b.qcow2", "--all"]));
    assert!(
        out.contains("not read: L1 table size in the header at 0x24: Active L1 table too large"),
        "{out}"
    );
    assert!(!out.contains("no non-zero entries"), "{out}");
    assert!(!out.contains("0x0000000000000000"), "{out}");
    assert!(out.contains("(2147483647 entries in the header)"), "{out}");

    let v = Work::json(&w.qinspect_ok(&["dump", "l1", "b.qcow2", "--json"]));
    assert_eq!(v["entries"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(
        v["not_read"]
            .as_str()
            .unwrap()
            .contains("L1 table size in the header at 0x24"),
        "{v}"
    );
    // A healthy image's JSON has no such key.
    let v = Work::json(&w.qinspect_ok(&["dump", "l1", "base.qcow2", "--json"]));
    assert_eq!(v.get("not_read"), None, "{v}");

    // dump l2 through the unread table is an error, not "unallocated".
    let out = w.qinspect(&["dump", "l2", "b.qcow2", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("not read") && !err.contains("unallocated"),
        "{err}"
    );
}

#[test]
fn clusters_count_nothing_through_an_unread_l1_and_call_nothing_free_there() {
    let w = Work::new();
    images(&w);
    let v = Work::json(&w.qinspect_ok(&["clusters", "b.qcow2", "--range", "3..5", "--json"]));
    let cl = v["clusters"].as_array().unwrap();
    assert_eq!(cl.len(), 3);
    for c in cl {
        // Neither read nor counted: no role, no reference, no referrer.
        assert_eq!(c["roles"], Value::Array(vec![]), "{c}");
        assert_eq!(c["reference"], 0, "{c}");
        assert_eq!(
            c["refcount"], 1,
            "the stored refcount is what the block says: {c}"
        );
    }
    let out = text(&w.qinspect_ok(&["clusters", "b.qcow2", "--range", "3..5"]));
    assert!(!out.contains("free"), "{out}");
    assert!(out.contains("the active L1 table is not read"), "{out}");
    assert!(out.contains("not counted"), "{out}");
    // The healthy image's listing is unchanged: the L1 table, and free beyond.
    let out = text(&w.qinspect_ok(&["clusters", "base.qcow2", "--range", "3..3"]));
    assert!(out.contains("l1-table"), "{out}");
}

#[test]
fn clusters_past_the_end_of_the_file_are_called_so_with_who_names_them() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "t.qcow2", "4M"]);
    w.qemu_io("t.qcow2", &["write -P 1 0 192k"]);
    // Data in clusters 5, 6 and 7; cut the file after cluster 5.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("t.qcow2"))
        .unwrap();
    f.set_len(0x60000).unwrap();
    let q = qemu(&w, &["check", "--output=json", "t.qcow2"]);
    assert_eq!(q.status.code(), Some(2), "qemu-img check finds corruptions");
    let qv = Work::json(&q.stdout);

    let v = Work::json(&w.qinspect_ok(&["clusters", "t.qcow2", "--range", "4..8", "--json"]));
    let cl = v["clusters"].as_array().unwrap();
    for c in &cl[2..4] {
        // Named by an L2 entry, but counted by neither qemu-img check nor us.
        assert_eq!(c["roles"], serde_json::json!(["data"]), "{c}");
        assert_eq!(c["reference"], 0, "{c}");
        assert_eq!(c["referrers"][0]["l2_table"], 0x40000, "{c}");
    }
    assert_eq!(cl[4]["roles"], Value::Array(vec![]));
    let out = text(&w.qinspect_ok(&["clusters", "t.qcow2", "--range", "4..8"]));
    assert!(!out.contains("free"), "{out}");
    assert_eq!(
        out.matches("past the end of the file: data").count(),
        2,
        "{out}"
    );
    // The check agrees with qemu-img's: the references past EOF are not counted.
    let ours = Work::json(&w.qinspect(&["check", "--json", "t.qcow2"]).stdout);
    assert_eq!(ours["corruptions"], qv["corruptions"]);

    let out = text(&w.qinspect_ok(&["clusters", "t.qcow2", "--host", "99G"]));
    assert!(out.contains("past the end of the file"), "{out}");
    assert!(!out.contains("free"), "{out}");
}

#[test]
fn a_misaligned_table_offset_names_the_header_field() {
    let w = Work::new();
    images(&w);
    std::fs::copy(w.path("base.qcow2"), w.path("c.qcow2")).unwrap();
    w.patch("c.qcow2", 0x28, &0x30200u64.to_be_bytes());
    let q = qemu(&w, &["info", "c.qcow2"]);
    assert!(text(&q.stderr).contains("Active L1 table offset invalid"));
    let out = w.qinspect(&["info", "c.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("L1 table offset in the header at 0x28: Active L1 table offset invalid"),
        "{err}"
    );
    // snapshots_offset (header 0x40), misaligned.
    std::fs::copy(w.path("base.qcow2"), w.path("s.qcow2")).unwrap();
    w.patch("s.qcow2", 0x40, &0x10001u64.to_be_bytes());
    let q = qemu(&w, &["info", "s.qcow2"]);
    assert!(text(&q.stderr).contains("Snapshot table offset invalid"));
    let err = text(&w.qinspect(&["info", "s.qcow2"]).stderr);
    assert!(
        err.contains("snapshot table offset in the header at 0x40: Snapshot table offset invalid"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_named_once() {
    let w = Work::new();
    let out = w.qinspect(&["info", "nothere.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn a_pool_audit_leaves_images_qemu_img_cannot_check_out_of_the_totals() {
    let w = Work::new();
    images(&w);
    std::fs::create_dir(w.path("pool")).unwrap();
    for n in ["base.qcow2", "b.qcow2"] {
        std::fs::copy(w.path(n), w.path(&format!("pool/{n}"))).unwrap();
    }
    // qemu-img check cannot open b.qcow2 and prints no counts for it.
    let q = qemu(&w, &["check", "--output=json", "pool/b.qcow2"]);
    assert_eq!(q.status.code(), Some(1));
    assert!(q.stdout.is_empty(), "{}", text(&q.stdout));
    let qb = Work::json(&qemu(&w, &["check", "--output=json", "pool/base.qcow2"]).stdout);

    let out = w.qinspect(&["check", "--recursive", "pool"]);
    assert_eq!(out.status.code(), Some(1));
    let table = text(&out.stdout);
    let row = |name: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row("pool/b.qcow2")[1..6],
        ["check", "failed", "-", "-", "-"],
        "{table}"
    );
    let total = row("total:");
    let allocated = format!("{}/64", qb["allocated-clusters"]);
    assert_eq!(total[3..6], ["0", "0", allocated.as_str()], "{table}");
    assert!(
        table.contains("1 clean, 1 check failed; exit code 1"),
        "{table}"
    );
    assert!(
        table.contains("pool/b.qcow2: qemu-img check fails: L1 table size in the header at 0x24"),
        "{table}"
    );
}

/// A snapshot's L1 is the active L1 copied as it was, COPIED bits included, while
/// the snapshot makes its L2 table shared (refcount 2): the bit in the snapshot's
/// copy says nothing, and qemu-img check does not look at it.
#[test]
fn copied_in_a_snapshot_l1_is_not_called_a_promise() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "s.qcow2", "4M"]);
    w.qemu_io("s.qcow2", &["write -P 1 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "s.qcow2"]);
    let q = qemu(&w, &["check", "s.qcow2"]);
    assert_eq!(q.status.code(), Some(0), "{}", text(&q.stdout));

    let snap = text(&w.qinspect_ok(&["dump", "l1", "s.qcow2", "--snapshot", "s1"]));
    assert!(snap.contains("0x8000000000040000"), "{snap}");
    assert!(!snap.contains("claims refcount 1"), "{snap}");
    assert!(!snap.contains("QEMU writes it in place"), "{snap}");
    assert!(snap.contains("no meaning in a snapshot's L1"), "{snap}");

    let trace = text(&w.qinspect_ok(&["trace", "s.qcow2", "0", "--snapshot", "s1"]));
    assert!(!trace.contains("QEMU writes it in place"), "{trace}");
    assert!(trace.contains("no meaning in a snapshot's L1"), "{trace}");

    // The active L1's entry lost COPIED when the snapshot shared its table.
    let active = text(&w.qinspect_ok(&["dump", "l1", "s.qcow2"]));
    assert!(active.contains("0x0000000000040000"), "{active}");
    assert!(
        active.contains("not COPIED (shared or unknown: QEMU copies it before a write)"),
        "{active}"
    );
}

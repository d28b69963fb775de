//! `qinspect compare` against qemu-img: the clusters it says differ between the
//! active state and a snapshot are exactly the guest clusters where
//! `qemu-img map --output=json` of the image and of a copy on which
//! `qemu-img snapshot -a` applied the snapshot disagree (present, zero, data,
//! offset). `--closest` is checked on images whose answer is known by construction.

mod common;
use common::Work;
use serde_json::Value;
use std::collections::BTreeSet;

const CS: u64 = 65536;

/// Per guest cluster: what `qemu-img map --output=json` says about it.
fn map_clusters(w: &Work, image: &str) -> Vec<(bool, bool, bool, Option<u64>)> {
    let v = Work::json(&w.qemu_img(&["map", "--output=json", image]).stdout);
    let mut out = Vec::new();
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        assert_eq!(start % CS, 0);
        for k in 0..len.div_ceil(CS) {
            out.push((
                e["present"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
                e["offset"].as_u64().map(|o| o + k * CS),
            ));
        }
    }
    out
}

/// Guest offsets of the clusters the two maps disagree about.
fn map_diff(w: &Work, image: &str, snapshot: &str) -> BTreeSet<u64> {
    let copy = format!("applied-{snapshot}.qcow2");
    std::fs::copy(w.path(image), w.path(&copy)).unwrap();
    w.qemu_img(&["snapshot", "-a", snapshot, &copy]);
    let a = map_clusters(w, image);
    let b = map_clusters(w, &copy);
    let n = a.len().max(b.len());
    let past = (false, true, false, None);
    (0..n)
        .filter(|&k| a.get(k).unwrap_or(&past) != b.get(k).unwrap_or(&past))
        .map(|k| k as u64 * CS)
        .collect()
}

fn ours(w: &Work, image: &str, a: &str, b: &str) -> Value {
    Work::json(&w.qinspect_ok(&["compare", image, a, b, "--json"]))
}

/// Snapshots s1..s4, each after more writes (data, zeros over data, a discard),
/// then the active state rolled back to s2 and one cluster written.
fn build(w: &Work) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "32M"]);
    w.qemu_io("a.qcow2", &["write -P 1 0 2M"]);
    w.qemu_img(&["snapshot", "-c", "s1", "a.qcow2"]);
    w.qemu_io(
        "a.qcow2",
        &[
            "write -P 2 256k 192k",
            "write -z 1M 64k",
            "write -P 3 9M 128k",
        ],
    );
    w.qemu_img(&["snapshot", "-c", "s2", "a.qcow2"]);
    w.qemu_io(
        "a.qcow2",
        &[
            "write -P 4 4M 1M",
            "write -z -u 64k 64k",
            "discard 1536k 128k",
        ],
    );
    w.qemu_img(&["snapshot", "-c", "s3", "a.qcow2"]);
    w.qemu_io("a.qcow2", &["write -P 5 0 8M"]);
    w.qemu_img(&["snapshot", "-c", "s4", "a.qcow2"]);
    w.qemu_img(&["snapshot", "-a", "s2", "a.qcow2"]);
    w.qemu_io("a.qcow2", &["write -P 6 20M 64k"]);
}

#[test]
fn active_vs_each_snapshot_equals_qemu_img_map_of_both_states() {
    let w = Work::new();
    build(&w);
    for s in ["s1", "s2", "s3", "s4"] {
        let want = map_diff(&w, "a.qcow2", s);
        let v = ours(&w, "a.qcow2", "active", s);
        let got: BTreeSet<u64> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["guest"].as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "active vs {s}");
        assert_eq!(v["differing"].as_u64().unwrap(), want.len() as u64, "{s}");
        assert!(!want.is_empty(), "{s}: the construction makes them differ");
        assert_eq!(v["clusters"].as_u64().unwrap(), 32 << 20 >> 16);
    }
    // Snapshot vs snapshot: the same as the two snapshots applied one after the other.
    let a = map_diff(&w, "a.qcow2", "s1");
    let b = map_diff(&w, "a.qcow2", "s3");
    let m1 = map_clusters(&w, "applied-s1.qcow2");
    let m3 = map_clusters(&w, "applied-s3.qcow2");
    let want: BTreeSet<u64> = (0..m1.len().max(m3.len()))
        .filter(|&k| m1.get(k) != m3.get(k))
        .map(|k| k as u64 * CS)
        .collect();
    let v = ours(&w, "a.qcow2", "s1", "s3");
    assert_eq!(v["differing"].as_u64().unwrap(), want.len() as u64);
    assert!(!a.is_empty() && !b.is_empty());
}

#[test]
fn words_name_each_kind_of_difference() {
    let w = Work::new();
    build(&w);
    let text = String::from_utf8(w.qinspect_ok(&["compare", "a.qcow2", "active", "s3"])).unwrap();
    assert!(
        text.contains("A: the active state · B: snapshot 3 's3'"),
        "{text}"
    );
    // 9M was written after s1, so it is data in both s2 (now active) and s3, shared.
    assert!(text.contains("shared host cluster: same data"), "{text}");
    // 20M: written after rolling back to s2; unallocated in s3.
    assert!(text.contains("0x1400000  data at "), "{text}");
    assert!(
        text.contains("in this file vs unallocated (zeros)"),
        "{text}"
    );
    // 64k: zeroed with unmap before s3, data in s2.
    assert!(text.contains("0x10000  data at "), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("      0x10000  "))
        .unwrap();
    assert!(line.ends_with(" vs zero"), "{line}");
}

#[test]
fn closest_snapshot_is_the_one_the_active_state_was_rolled_back_to() {
    let w = Work::new();
    build(&w);
    let before = w.fingerprint("a.qcow2");
    let v = Work::json(&w.qinspect_ok(&["compare", "a.qcow2", "--closest", "--json"]));
    let ranked = v.as_array().unwrap();
    assert_eq!(ranked.len(), 4);
    // By construction: one cluster written since s2 was applied.
    assert_eq!(ranked[0]["name"], "s2");
    assert_eq!(ranked[0]["differing"], 1);
    for r in ranked {
        let name = r["name"].as_str().unwrap();
        let want = map_diff(&w, "a.qcow2", name);
        assert_eq!(
            r["differing"].as_u64().unwrap(),
            want.len() as u64,
            "{name}"
        );
    }
    let d: Vec<u64> = ranked
        .iter()
        .map(|r| r["differing"].as_u64().unwrap())
        .collect();
    assert!(d.windows(2).all(|p| p[0] <= p[1]), "{d:?}");
    assert!(d[0] < d[1], "{d:?}");
    let text = String::from_utf8(w.qinspect_ok(&["compare", "a.qcow2", "--closest"])).unwrap();
    assert!(text.contains("snapshot 2 's2'  ← closest"), "{text}");
    w.qinspect_ok(&["compare", "a.qcow2", "active", "s1"]);
    assert_eq!(w.fingerprint("a.qcow2"), before, "compare writes nothing");
}

#[test]
fn a_snapshot_of_a_smaller_disk_and_a_huge_disk() {
    let w = Work::new();
    // s1 of a 1 MiB disk; the disk then grows to 2 MiB and 1.5M is written.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "r.qcow2", "1M"]);
    w.qemu_io("r.qcow2", &["write -P 1 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "r.qcow2"]);
    w.qemu_img(&["resize", "-q", "r.qcow2", "2M"]);
    w.qemu_io("r.qcow2", &["write -P 2 1536k 64k"]);
    let v = ours(&w, "r.qcow2", "active", "s1");
    assert_eq!(v["clusters"], 32);
    assert_eq!(v["differing"], 16, "{v}");
    assert_eq!(v["kinds"]["unallocated vs past the end"], 15, "{v}");
    assert_eq!(v["kinds"]["data vs past the end"], 1, "{v}");
    let text = String::from_utf8(w.qinspect_ok(&["compare", "r.qcow2", "active", "s1"])).unwrap();
    assert!(
        text.contains("0x180000  data at ") && text.contains(" vs past the end of the disk"),
        "{text}"
    );
    // A 2 PiB disk: 32 Gi guest clusters, counted without visiting each one.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "h.qcow2", "2P"]);
    w.qemu_io("h.qcow2", &["write -P 1 1T 64k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "h.qcow2"]);
    w.qemu_io("h.qcow2", &["write -P 2 1P 64k"]);
    let v = ours(&w, "h.qcow2", "active", "s1");
    assert_eq!(v["clusters"].as_u64(), Some(2u64 << 50 >> 16));
    assert_eq!(v["differing"], 1);
    assert_eq!(v["rows"][0]["guest"].as_u64(), Some(1u64 << 50));
    assert_eq!(v["counts"]["shared host cluster: same data"], 1);
    assert_eq!(
        v["counts"]["same mapping, no host cluster"].as_u64(),
        Some((2u64 << 50 >> 16) - 2)
    );
}

#[test]
fn l1_entries_naming_one_table_are_counted_alike_when_rows_are_full() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "m.qcow2", "2G"]);
    w.qemu_io("m.qcow2", &["write -P 1 0 128k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "m.qcow2"]);
    // The active L1[1..4] name L1[0]'s table too (a corruption compare reads as is).
    let bytes = std::fs::read(w.path("m.qcow2")).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap());
    let e0: [u8; 8] = bytes[l1 as usize..l1 as usize + 8].try_into().unwrap();
    for i in 1..4u64 {
        w.patch("m.qcow2", l1 + 8 * i, &e0);
    }
    let v = ours(&w, "m.qcow2", "active", "s1");
    assert_eq!(v["differing"], 6, "{v}");
    let guests: Vec<u64> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["guest"].as_u64().unwrap())
        .collect();
    let g = 512u64 << 20;
    assert_eq!(guests, [g, g + CS, 2 * g, 2 * g + CS, 3 * g, 3 * g + CS]);
    // With one row listed, the repeated pairs are counted from the first one.
    let text =
        String::from_utf8(w.qinspect_ok(&["compare", "m.qcow2", "active", "s1", "--limit", "1"]))
            .unwrap();
    assert!(text.contains("6 differ\n"), "{text}");
    assert!(text.contains("           6  data vs unallocated"), "{text}");
    assert!(
        text.contains("… 5 more differing cluster(s) not listed"),
        "{text}"
    );
    assert!(
        text.contains("           2  shared host cluster: same data"),
        "{text}"
    );
}

/// A snapshot table QEMU refuses (nb_snapshots = 0xffffffff at header offset 60):
/// compare names it instead of saying there are no snapshots.
#[test]
fn a_snapshot_table_qemu_refuses_is_the_answer_not_no_snapshots() {
    let w = Work::new();
    build(&w);
    let mut b = std::fs::read(w.path("a.qcow2")).unwrap();
    b[60..64].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(w.path("h.qcow2"), &b).unwrap();
    let qemu = std::process::Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(w.path("h.qcow2"))
        .output()
        .unwrap();
    assert!(!qemu.status.success(), "qemu-img refuses the table too");
    for args in [
        &["compare", "h.qcow2", "--closest"][..],
        &["compare", "h.qcow2", "active", "s1"][..],
    ] {
        let out = w.qinspect(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("snapshot table at"), "{args:?}: {err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("no internal snapshots"));
    }
}

#[test]
fn closest_keeps_two_records_with_one_id_apart() {
    // A corrupt table: snapshot 's2' carries the ID of 's1'. Each record is
    // still its own state, and qemu-img finds 's2' by its name.
    let w = Work::new();
    build(&w);
    let mut b = std::fs::read(w.path("a.qcow2")).unwrap();
    let at = b
        .windows(3)
        .position(|x| x == b"2s2")
        .expect("the record of s2: ID '2', name 's2'");
    b[at] = b'1';
    std::fs::write(w.path("a.qcow2"), &b).unwrap();
    let v = Work::json(&w.qinspect_ok(&["compare", "a.qcow2", "--closest", "--json"]));
    let ranked = v.as_array().unwrap();
    assert_eq!(ranked.len(), 4);
    for name in ["s1", "s2"] {
        let r = ranked.iter().find(|r| r["name"] == name).unwrap();
        assert_eq!(r["id"], "1", "{name}");
        assert_eq!(
            r["differing"].as_u64().unwrap(),
            map_diff(&w, "a.qcow2", name).len() as u64,
            "{name}"
        );
    }
    assert_eq!(ranked[0]["name"], "s2");
    assert_eq!(ranked[0]["differing"], 1);
}

//! `qinspect check` against `qemu-img check` on images corrupted by byte patches:
//! same exit code, same counts, and a finding for every per-cluster line.

mod common;
use common::Work;
use serde_json::Value;

/// The reference base image: L1 at 0x30000, L2 at 0x40000, data in clusters 5-7
/// (guest 0..128k and 1M..1M+64k), 16-bit refcounts in a block at 0x20000.
fn base(w: &Work, name: &str, opts: &str) {
    w.qemu_img(&["create", "-f", "qcow2", "-o", opts, name, "1G"]);
    w.qemu_io(name, &["write -P 0xaa 0 128k", "write -P 0xbb 1M 64k"]);
}

fn l2_entry(w: &Work, name: &str, index: u64, raw: u64) {
    w.patch(name, 0x40000 + index * 8, &raw.to_be_bytes());
}

fn findings(v: &Value) -> &Vec<Value> {
    v["findings"].as_array().unwrap()
}

fn has(v: &Value, category: &str) -> bool {
    findings(v).iter().any(|f| f["category"] == category)
}

#[test]
fn refcount_lowered_to_zero() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    w.set_refcount("a.qcow2", 5, 0);
    let v = w.assert_check_matches("a.qcow2");
    assert_eq!(v["corruptions"], 2);
    // The finding names the L2 entry that uses the cluster.
    let f = findings(&v)
        .iter()
        .find(|f| f["category"] == "refcount")
        .unwrap();
    assert_eq!(f["cluster"], 5);
    assert_eq!(f["referrers"][0]["l2_table"], 0x40000);
    assert_eq!(f["referrers"][0]["l2_index"], 0);
    assert_eq!(f["referrers"][0]["l1"], "active L1");
}

#[test]
fn refcount_raised_on_unshared_cluster() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    w.set_refcount("a.qcow2", 5, 2);
    let v = w.assert_check_matches("a.qcow2");
    assert_eq!(
        (v["leaks"].as_u64(), v["corruptions"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(has(&v, "copied"));
}

#[test]
fn leak_from_a_zeroed_l2_entry() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    l2_entry(&w, "a.qcow2", 16, 0);
    let v = w.assert_check_matches("a.qcow2");
    assert_eq!(v["leaks"], 1);
    let f = findings(&v).iter().find(|f| f["kind"] == "leak").unwrap();
    assert_eq!(
        (
            f["cluster"].as_u64(),
            f["refcount"].as_u64(),
            f["reference"].as_u64()
        ),
        (Some(7), Some(1), Some(0))
    );
}

#[test]
fn misaligned_and_past_eof_l2_entries() {
    let w = Work::new();
    base(&w, "m.qcow2", "cluster_size=64k");
    l2_entry(&w, "m.qcow2", 16, 0x8000000000070200);
    let v = w.assert_check_matches("m.qcow2");
    assert!(has(&v, "unaligned"));
    base(&w, "e.qcow2", "cluster_size=64k");
    l2_entry(&w, "e.qcow2", 16, 0x8000000010000000);
    let v = w.assert_check_matches("e.qcow2");
    assert!(has(&v, "past-eof"));
}

#[test]
fn two_l2_entries_share_a_cluster() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    l2_entry(&w, "a.qcow2", 16, 0x8000000000050000);
    let v = w.assert_check_matches("a.qcow2");
    // Beyond qemu-img: both owners named, at their guest offsets.
    let f = findings(&v)
        .iter()
        .find(|f| f["category"] == "cross-link")
        .expect("cross-link note");
    assert_eq!(f["cluster"], 5);
    let guests: Vec<u64> = f["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["guest_offset"].as_u64().unwrap())
        .collect();
    assert_eq!(guests, vec![0, 0x100000]);
}

#[test]
fn copied_flag_missing() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    l2_entry(&w, "a.qcow2", 0, 0x50000);
    let v = w.assert_check_matches("a.qcow2");
    assert_eq!(v["corruptions"], 1);
    let f = &findings(&v)[0];
    assert_eq!(f["category"], "copied");
    assert!(f["repair"].as_str().unwrap().contains("set bit 63"));
}

/// The COPIED repairs say what `qemu-img check -r all` does to bit 63: QEMU
/// fixes the refcounts first, so a set flag on a leaked cluster (stored 2,
/// referenced once) stays set, while a missing flag on a refcount-1 cluster is set.
#[test]
fn copied_repairs_follow_the_fixed_refcounts() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    w.set_refcount("a.qcow2", 5, 2);
    l2_entry(&w, "a.qcow2", 1, 0x60000);
    let v = w.assert_check_matches("a.qcow2");
    std::fs::copy(w.path("a.qcow2"), w.path("b.qcow2")).unwrap();
    w.qemu_img(&["check", "-r", "all", "b.qcow2"]);
    let before = std::fs::read(w.path("a.qcow2")).unwrap();
    let after = std::fs::read(w.path("b.qcow2")).unwrap();
    let bit63 = |img: &[u8], at: usize| img[at] & 0x80 != 0;
    let mut seen = Vec::new();
    for f in findings(&v).iter().filter(|f| f["category"] == "copied") {
        let at = f["offset"].as_u64().unwrap() as usize;
        let repair = f["repair"].as_str().unwrap();
        let (was, is) = (bit63(&before, at), bit63(&after, at));
        let says = if repair.starts_with("set bit 63") {
            "set"
        } else if repair.starts_with("clear bit 63") {
            "clear"
        } else {
            assert!(repair.starts_with("none to bit 63"), "{repair}");
            "none"
        };
        let did = match (was, is) {
            (false, true) => "set",
            (true, false) => "clear",
            _ => "none",
        };
        assert_eq!(says, did, "finding at {at:#x}: {repair}");
        seen.push(says);
    }
    seen.sort_unstable();
    assert_eq!(seen, ["none", "set"]);
}

#[test]
fn wrong_refcount_with_4_bit_refcounts() {
    let w = Work::new();
    base(&w, "r4.qcow2", "refcount_bits=4");
    w.set_refcount("r4.qcow2", 6, 3);
    let v = w.assert_check_matches("r4.qcow2");
    assert_eq!(v["leaks"], 1);
}

#[test]
fn leak_in_a_compat_010_image() {
    let w = Work::new();
    base(&w, "v2.qcow2", "compat=0.10");
    l2_entry(&w, "v2.qcow2", 1, 0);
    let v = w.assert_check_matches("v2.qcow2");
    assert_eq!(v["leaks"], 1);
}

#[test]
fn shared_cluster_under_counted_with_many_snapshots() {
    let w = Work::new();
    base(&w, "s.qcow2", "cluster_size=64k");
    for i in 0..12 {
        w.qemu_img(&["snapshot", "-c", &format!("s{i}"), "s.qcow2"]);
        w.qemu_io("s.qcow2", &[&format!("write -P {i} {}k 4k", 256 + i * 64)]);
    }
    w.assert_check_matches("s.qcow2");
    w.set_refcount("s.qcow2", 6, 3);
    let v = w.assert_check_matches("s.qcow2");
    let f = findings(&v)
        .iter()
        .find(|f| f["category"] == "refcount")
        .unwrap();
    assert_eq!(f["refcount"], 3);
    // Every snapshot's L1 reaches it through a shared L2 table: all are named.
    assert!(f["referrers"].as_array().unwrap().len() >= 12);
}

#[test]
fn bitmaps_clean_and_with_autoclear_cleared() {
    let w = Work::new();
    base(&w, "b.qcow2", "cluster_size=64k");
    w.qemu_img(&["bitmap", "--add", "b.qcow2", "b0"]);
    w.qemu_img(&["bitmap", "--add", "b.qcow2", "b1"]);
    w.qemu_io("b.qcow2", &["write -P 1 2M 64k"]);
    w.assert_check_matches("b.qcow2");
    // Clear autoclear bit 0: QEMU stops counting the bitmap clusters: leaks.
    w.patch("b.qcow2", 88, &0u64.to_be_bytes());
    let v = w.assert_check_matches("b.qcow2");
    assert!(v["leaks"].as_u64().unwrap() >= 3);
}

/// An image whose one bitmap has its table entry 0 replaced by `raw` (`entry(data)`
/// of the data cluster qemu-io's write gave it), marked in use or not.
fn bitmap_entry_patched(w: &Work, name: &str, in_use: bool, entry: impl Fn(u64) -> u64) {
    base(w, name, "cluster_size=64k");
    w.qemu_img(&["bitmap", "--add", name, "b0"]);
    w.qemu_io(name, &["write -P 1 2M 64k"]);
    let dir = Work::json(&w.qinspect_ok(&["dump", "bitmaps", name, "--json"]));
    let table = dir["entries"][0]["table_offset"].as_u64().unwrap();
    let flags_at = dir["entries"][0]["entry_offset"].as_u64().unwrap() + 12;
    let t = Work::json(&w.qinspect_ok(&["dump", "bitmaps", name, "0", "--json"]));
    let data = t["entries"][0]["data_offset"].as_u64().unwrap();
    w.patch(name, table, &entry(data).to_be_bytes());
    if in_use {
        // in_use | auto
        w.patch(name, flags_at, &3u32.to_be_bytes());
    }
}

#[test]
fn bitmap_table_entries_qemu_refuses() {
    let w = Work::new();
    // Entries the specification forbids: a reserved bit (1, 56), bit 0 beside a
    // data cluster, a data cluster off a 64 KiB boundary.
    type Patch = fn(u64) -> u64;
    let bad: [(&str, Patch); 4] = [
        ("reserved bit 1", |d| d | 2),
        ("reserved bit 56", |d| d | 1 << 56),
        ("bit 0 with data", |d| d | 1),
        ("unaligned", |d| d + 0x200),
    ];
    for (i, (what, f)) in bad.iter().enumerate() {
        // Not in use: QEMU loads the table when it opens the image and the open
        // fails, for check and for info alike.
        let name = format!("open{i}.qcow2");
        bitmap_entry_patched(&w, &name, false, f);
        let v = w.assert_check_matches(&name);
        assert!(
            v["qemu-refuses-to-open"]
                .as_str()
                .is_some_and(|s| s.contains("Could not read bitmap_table table")),
            "{what}: {v}"
        );
        let q = std::process::Command::new("qemu-img")
            .args(["info", &name])
            .current_dir(w.path("."))
            .output()
            .unwrap();
        let ours = w.qinspect(&["info", &name]);
        assert_eq!(ours.status.success(), q.status.success(), "{what}");
        assert!(!ours.status.success(), "{what}");
        assert!(
            String::from_utf8_lossy(&ours.stderr)
                .contains("Could not read bitmap_table table from image for bitmap 'b0'"),
            "{what}"
        );
        // In use: QEMU does not load it on open, and the check fails on it.
        let name = format!("inuse{i}.qcow2");
        bitmap_entry_patched(&w, &name, true, f);
        let v = w.assert_check_matches(&name);
        assert!(v["qemu-refuses-to-open"].is_null(), "{what}: {v}");
        assert!(v["aborted"].is_string(), "{what}: {v}");
        assert!(
            findings(&v)
                .iter()
                .any(|f| f["category"] == "bitmaps" && f["offset"].is_u64()),
            "{what}: {v}"
        );
    }
    // Offset 0 with bit 0 set is valid (all ones): the old data cluster leaks.
    bitmap_entry_patched(&w, "ones.qcow2", false, |_| 1);
    let v = w.assert_check_matches("ones.qcow2");
    assert_eq!(v["leaks"], 1);
}

#[test]
fn compressed_clusters_packed_in_one_host_cluster() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "raw", "src.raw", "1M"]);
    w.qemu_io("src.raw", &["write -P 0x61 0 512k"]);
    w.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "src.raw",
        "c.qcow2",
    ]);
    let v = w.assert_check_matches("c.qcow2");
    assert!(v["compressed-clusters"].as_u64().unwrap() > 100);
    // Find a host cluster holding many compressed clusters and lower its refcount.
    let cl = Work::json(&w.qinspect_ok(&["clusters", "c.qcow2", "--json"]));
    let packed = cl["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["roles"] == serde_json::json!(["compressed"]) && c["reference"].as_u64().unwrap() > 3
        })
        .expect("a host cluster shared by several compressed clusters");
    let c = packed["cluster"].as_u64().unwrap();
    let n = packed["reference"].as_u64().unwrap();
    w.set_refcount("c.qcow2", c, n - 1);
    let v = w.assert_check_matches("c.qcow2");
    assert_eq!(v["corruptions"], 1);
    // COPIED on a compressed entry is a corruption too.
    let l2 =
        Work::json(&w.qinspect_ok(&["dump", "l1", "c.qcow2", "--json"]))["entries"][0]["l2_offset"]
            .as_u64()
            .unwrap();
    let mut e = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(w.path("c.qcow2")).unwrap(),
        &mut e,
        l2,
    )
    .unwrap();
    let raw = u64::from_be_bytes(e) | (1 << 63);
    w.patch("c.qcow2", l2, &raw.to_be_bytes());
    let v = w.assert_check_matches("c.qcow2");
    assert!(has(&v, "copied"));
}

#[test]
fn refcounts_past_the_end_of_the_file() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    // Cluster 40 is far past the end of the 8-cluster file; qemu-img never looks.
    w.set_refcount("a.qcow2", 40, 1);
    let v = w.assert_check_matches("a.qcow2");
    assert_eq!(v["leaks"], 0);
    let f = findings(&v)
        .iter()
        .find(|f| f["category"] == "refcount-past-eof")
        .expect("note");
    assert_eq!(f["cluster"], 40);
    assert_eq!(f["kind"], "note");
}

#[test]
fn metadata_overlapping_data_names_both_owners() {
    let w = Work::new();
    base(&w, "o.qcow2", "cluster_size=64k");
    // Guest cluster 1 now "stores its data" in the L2 table's own cluster.
    l2_entry(&w, "o.qcow2", 1, 0x8000000000040000);
    let v = w.assert_check_matches("o.qcow2");
    let f = findings(&v)
        .iter()
        .find(|f| f["category"] == "cross-link")
        .expect("overlap note");
    assert_eq!(f["cluster"], 4);
    let roles: Vec<&str> = f["referrers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["role"].as_str().unwrap())
        .collect();
    assert!(
        roles.contains(&"l2-table") && roles.contains(&"data"),
        "{roles:?}"
    );
}

#[test]
fn bad_refcount_blocks_and_snapshot_entries() {
    let w = Work::new();
    // A refcount table entry with reserved bits.
    base(&w, "rb.qcow2", "cluster_size=64k");
    w.patch("rb.qcow2", 0x10000, &0x20001u64.to_be_bytes());
    w.assert_check_matches("rb.qcow2");
    // A refcount block "outside the image".
    base(&w, "ro.qcow2", "cluster_size=64k");
    w.patch("ro.qcow2", 0x10008, &0x1000_0000u64.to_be_bytes());
    w.assert_check_matches("ro.qcow2");
    // An unaligned refcount block 0: refcounts cannot be read (check errors).
    base(&w, "ru.qcow2", "cluster_size=64k");
    w.patch("ru.qcow2", 0x10000, &0x20200u64.to_be_bytes());
    w.assert_check_matches("ru.qcow2");
    // A snapshot entry with only 8 bytes of extra data: "incomplete".
    base(&w, "sn.qcow2", "cluster_size=64k");
    w.qemu_img(&["snapshot", "-c", "x", "sn.qcow2"]);
    let so = u64::from_be_bytes(
        std::fs::read(w.path("sn.qcow2")).unwrap()[64..72]
            .try_into()
            .unwrap(),
    );
    w.patch("sn.qcow2", so + 36, &8u32.to_be_bytes());
    // Keep id and name where they were by moving them 16 bytes earlier.
    let bytes = std::fs::read(w.path("sn.qcow2")).unwrap();
    let tail = bytes[(so + 64) as usize..(so + 64 + 2) as usize].to_vec();
    w.patch("sn.qcow2", so + 48, &tail);
    let v = w.assert_check_matches("sn.qcow2");
    assert!(
        findings(&v)
            .iter()
            .any(|f| f["message"].as_str().unwrap().contains("incomplete"))
    );
}

#[test]
fn dirty_image_gets_a_warning_and_no_write() {
    let w = Work::new();
    base(&w, "d.qcow2", "lazy_refcounts=on");
    let incompat = 1u64; // dirty bit
    w.patch("d.qcow2", 72, &incompat.to_be_bytes());
    let before = w.fingerprint("d.qcow2");
    let v = w.assert_check_matches("d.qcow2");
    assert!(v["warnings"][0].as_str().unwrap().contains("dirty"));
    assert_eq!(w.fingerprint("d.qcow2"), before);
}

#[test]
fn clusters_names_every_role() {
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    let v = Work::json(&w.qinspect_ok(&["clusters", "a.qcow2", "--json"]));
    let roles: Vec<String> = v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["roles"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    assert_eq!(
        roles,
        [
            "header",
            "refcount-table",
            "refcount-block",
            "l1-table",
            "l2-table",
            "data",
            "data",
            "data"
        ]
    );
    let one = Work::json(&w.qinspect_ok(&["clusters", "a.qcow2", "--host", "0x70000", "--json"]));
    let c = &one["clusters"][0];
    assert_eq!(
        (
            c["cluster"].as_u64(),
            c["refcount"].as_u64(),
            c["reference"].as_u64()
        ),
        (Some(7), Some(1), Some(1))
    );
    assert_eq!(c["referrers"][0]["guest_offset"], 0x100000);
}

#[test]
fn images_qemu_refuses_are_checked_anyway() {
    let w = Work::new();
    base(&w, "u.qcow2", "cluster_size=64k");
    // An unknown incompatible feature bit: qemu-img check cannot open the image.
    w.patch("u.qcow2", 72, &(1u64 << 5).to_be_bytes());
    let q = std::process::Command::new("qemu-img")
        .args(["check", "u.qcow2"])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert_eq!(q.status.code(), Some(1));
    let out = w.qinspect(&["check", "--json", "u.qcow2"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "QEMU refuses it, so the check cannot pass"
    );
    let v = Work::json(&out.stdout);
    assert!(
        v["qemu-refuses-to-open"]
            .as_str()
            .unwrap()
            .contains("Unsupported qcow2 feature")
    );
    // ...but the refcounts were still recounted.
    assert_eq!(v["allocated-clusters"], 3);
    assert_eq!(v["corruptions"], 0);
    // The cause, as the library gives it: QEMU's open fails on that header field.
    let r = library_check(&w, "u.qcow2");
    let Some(qinspect::check::Refusal::Open(e)) = &r.qemu_refuses else {
        panic!("{:?}", r.qemu_refuses);
    };
    assert_eq!(
        e.corrupt_kind(),
        Some(qinspect::CorruptKind::HeaderField(
            qinspect::header::Field::IncompatibleFeatures
        ))
    );
}

/// The library's check of `name`, opened leniently as `qinspect check` opens it.
fn library_check(w: &Work, name: &str) -> qinspect::check::CheckReport {
    let img = qinspect::image::Qcow2::open(
        std::sync::Arc::new(qinspect::io::FileSource::open(&w.path(name)).unwrap()),
        qinspect::image::Strictness::Lenient,
    )
    .unwrap();
    qinspect::check::check(&img, &qinspect::check::CheckOptions::default())
}

#[test]
fn hostile_tables_finish_quickly_and_boundedly() {
    let w = Work::new();
    // 1Mi L1 entries all aimed at one L2 table.
    w.qemu_img(&["create", "-f", "qcow2", "big.qcow2", "512T"]);
    w.qemu_io("big.qcow2", &["write -P 1 0 64k"]);
    let img = qinspect::image::Qcow2::open(
        std::sync::Arc::new(qinspect::io::FileSource::open(&w.path("big.qcow2")).unwrap()),
        qinspect::image::Strictness::Lenient,
    )
    .unwrap();
    let (l1_off, n, first) = (img.header.l1_table_offset.get(), img.l1.len(), img.l1[0].0);
    assert_eq!(n, 1 << 20);
    let all: Vec<u8> = std::iter::repeat_n(first.to_be_bytes(), n)
        .flatten()
        .collect();
    w.patch("big.qcow2", l1_off, &all);
    let out = w.qinspect(&["check", "--json", "big.qcow2"]);
    let v = Work::json(&out.stdout);
    // The L2 table's 16-bit refcount overflows; each problem is one finding with a count.
    assert!(v["corruptions"].as_u64().unwrap() > 1_000_000, "{v}");
    assert!(v["findings"].as_array().unwrap().len() < 100);
    // An L1 entry naming the L1 table itself, and a refcount table claiming 2^32-1 clusters.
    base(&w, "loop.qcow2", "cluster_size=64k");
    w.patch("loop.qcow2", 0x30008, &0x8000000000030000u64.to_be_bytes());
    w.patch("loop.qcow2", 56, &u32::MAX.to_be_bytes());
    let out = w.qinspect(&["check", "--json", "loop.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let v = Work::json(&out.stdout);
    assert!(
        v["qemu-refuses-to-open"]
            .as_str()
            .unwrap()
            .contains("refcount table"),
        "{v}"
    );
    let r = library_check(&w, "loop.qcow2");
    assert!(
        matches!(&r.qemu_refuses, Some(qinspect::check::Refusal::Open(e))
            if e.corrupt_kind() == Some(qinspect::CorruptKind::RefcountTable)),
        "{:?}",
        r.qemu_refuses
    );
}

/// The library's findings carry a category callers can match on; each cause
/// found here is told apart by its variant, not by its message.
#[test]
fn library_findings_name_their_category() {
    use qinspect::check::{Category, CheckOptions, FindingKind, check};
    use qinspect::image::{Qcow2, Strictness};
    let w = Work::new();
    base(&w, "a.qcow2", "cluster_size=64k");
    // Cluster 6 is a data cluster of the active L2 table: refcount 2 is a leak
    // and makes its COPIED flag wrong.
    w.set_refcount("a.qcow2", 6, 2);
    // An L2 entry with a reserved bit set (bit 1 of a standard entry).
    l2_entry(&w, "a.qcow2", 100, 0x8000_0000_0007_0002);
    let open = || {
        let src = std::sync::Arc::new(qinspect::io::FileSource::open(&w.path("a.qcow2")).unwrap());
        Qcow2::open(src, Strictness::Lenient).unwrap()
    };
    let r = check(&open(), &CheckOptions::default());
    let of = |c: Category| {
        r.findings
            .iter()
            .filter(|f| f.category == c)
            .collect::<Vec<_>>()
    };
    let leak = of(Category::Refcount);
    assert!(
        leak.iter()
            .any(|f| f.kind == FindingKind::Leak && f.cluster == Some(6)),
        "{leak:?}"
    );
    let copied = of(Category::Copied);
    assert!(copied.iter().any(|f| f.cluster == Some(6)), "{copied:?}");
    let reserved = of(Category::ReservedBits);
    assert_eq!(reserved.len(), 1, "{:?}", r.findings);
    assert_eq!(reserved[0].offset.map(u64::from), Some(0x40000 + 100 * 8));
    assert!(of(Category::Io).is_empty());
}

/// An image with 80 L2 tables, one data cluster in each (the check walks the two
/// halves of its L2 tables on two threads): (offset of L2 table i, offset of its
/// first data cluster).
fn eighty_tables(w: &Work, name: &str, opts: &str) -> impl Fn(usize) -> (u64, u64) {
    w.qemu_img(&["create", "-f", "qcow2", "-o", opts, name, "40G"]);
    let cmds: Vec<String> = (0..80)
        .map(|i| format!("write -P {} {}M 64k", i + 1, i * 512))
        .collect();
    w.qemu_io(name, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let bytes = std::fs::read(w.path(name)).unwrap();
    move |i: usize| {
        let be = |o: u64| {
            let o = o as usize;
            u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap())
        };
        let mask = 0x00ff_ffff_ffff_fe00u64;
        let l2 = be(be(40) + 8 * i as u64) & mask;
        (l2, be(l2) & mask)
    }
}

#[test]
fn findings_in_both_halves_of_the_l2_tables() {
    let w = Work::new();
    let at = eighty_tables(&w, "a.qcow2", "cluster_size=64k");
    w.set_refcount("a.qcow2", at(3).1 >> 16, 0);
    w.set_refcount("a.qcow2", at(70).1 >> 16, 2);
    // The last table's second entry maps the first table's data cluster too.
    w.patch("a.qcow2", at(79).0 + 8, &(at(0).1 | 1 << 63).to_be_bytes());
    let v = w.assert_check_matches("a.qcow2");
    let clusters: Vec<(u64, String)> = findings(&v)
        .iter()
        .filter_map(|f| Some((f["cluster"].as_u64()?, f["category"].as_str()?.to_string())))
        .collect();
    for c in [at(3).1 >> 16, at(70).1 >> 16, at(0).1 >> 16] {
        assert!(
            clusters.contains(&(c, "refcount".into())),
            "{c}: {clusters:?}"
        );
    }
    assert!(
        clusters.contains(&(at(70).1 >> 16, "copied".into())),
        "{clusters:?}"
    );
    assert!(has(&v, "cross-link"));
}

#[test]
fn overflow_across_both_halves_of_the_l2_tables() {
    let w = Work::new();
    let at = eighty_tables(&w, "a.qcow2", "cluster_size=64k,refcount_bits=1");
    // With 1-bit refcounts a second reference overflows: one from each half.
    w.patch("a.qcow2", at(79).0 + 8, &(at(0).1 | 1 << 63).to_be_bytes());
    let v = w.assert_check_matches("a.qcow2");
    assert!(has(&v, "overflow"), "{v:#}");
}

#[test]
fn snapshots_sharing_tables_across_both_halves() {
    let w = Work::new();
    let at = eighty_tables(&w, "a.qcow2", "cluster_size=64k");
    w.qemu_img(&["snapshot", "-c", "s1", "a.qcow2"]);
    w.qemu_io("a.qcow2", &["write -P 0xee 0 64k", "write -P 0xee 39G 64k"]);
    w.qemu_img(&["snapshot", "-c", "s2", "a.qcow2"]);
    // A data cluster still shared by both snapshots and the active table
    // (refcount 3), lowered to 1; and one of the last table, raised to 5.
    w.set_refcount("a.qcow2", at(10).1 >> 16, 1);
    w.set_refcount("a.qcow2", at(75).1 >> 16, 5);
    let v = w.assert_check_matches("a.qcow2");
    let refcount_clusters: Vec<u64> = findings(&v)
        .iter()
        .filter(|f| f["category"] == "refcount")
        .filter_map(|f| f["cluster"].as_u64())
        .collect();
    assert!(refcount_clusters.contains(&(at(10).1 >> 16)), "{v:#}");
    assert!(refcount_clusters.contains(&(at(75).1 >> 16)), "{v:#}");
}

/// One L2 table named by 80 active L1 entries, its data entry without COPIED:
/// the COPIED finding lists the first 64 L1 entries and says how many there are,
/// as every referrer list does, instead of growing with the L1 table.
#[test]
fn copied_finding_on_an_l2_table_named_by_many_l1_entries_caps_its_referrers() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "big.qcow2", "80G"]);
    w.qemu_io("big.qcow2", &["write -P 0xaa 0 64k"]);
    let l1 = 0x30000u64;
    let e0 = std::fs::read(w.path("big.qcow2")).unwrap()[l1 as usize..l1 as usize + 8].to_vec();
    for i in 1..80u64 {
        w.patch("big.qcow2", l1 + i * 8, &e0);
    }
    w.patch("big.qcow2", 0x40000, &0x50000u64.to_be_bytes());
    let v = w.assert_check_matches("big.qcow2");
    let copied: Vec<&Value> = findings(&v)
        .iter()
        .filter(|f| f["category"] == "copied")
        .collect();
    assert!(!copied.is_empty(), "{v}");
    for f in copied {
        let refs = f["referrers"].as_array().unwrap();
        assert_eq!(refs.len(), 65, "{f}");
        assert!(
            refs[0].to_string().contains("named by 80 L1 entries"),
            "{f}"
        );
    }
}

/// A file that remembers every read made of it: `(offset, length)`.
#[derive(Debug)]
struct Recording {
    inner: qinspect::io::FileSource,
    reads: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl qinspect::io::Source for Recording {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.reads.lock().unwrap().push((offset, buf.len() as u64));
        self.inner.read_at(buf, offset)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn name(&self) -> &std::path::Path {
        self.inner.name()
    }
}

/// `clusters --range` / `--host` read the metadata that can name a cluster (L1
/// and L2 tables, the refcount table) and the refcount blocks of the range only:
/// never a data cluster nor another refcount block, and the rows are the same as
/// the whole listing's for those clusters.
#[test]
fn clusters_of_a_range_read_only_its_refcount_blocks() {
    use qinspect::check::for_each_cluster;
    use qinspect::image::{Qcow2, Strictness};
    use std::sync::Arc;
    let w = Work::new();
    // 512-byte clusters: 128 L2 tables, 8192 data clusters, 256 refcounts a block.
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,preallocation=metadata",
        "r.qcow2",
        "4M",
    ]);
    let src = Arc::new(Recording {
        inner: qinspect::io::FileSource::open(&w.path("r.qcow2")).unwrap(),
        reads: Default::default(),
    });
    let img = Qcow2::open(src.clone(), Strictness::Lenient).unwrap();
    let cs = img.geometry().cluster_size();
    let blocks: Vec<u64> = img
        .refcount_table()
        .unwrap()
        .iter()
        .filter_map(|e| e.block_offset().map(|o| o.0))
        .collect();
    assert!(blocks.len() > 30, "{} refcount blocks", blocks.len());
    let listing = |first: u64, last: u64| {
        src.reads.lock().unwrap().clear();
        let mut rows = Vec::new();
        for_each_cluster(&img, first, last, |c| {
            rows.push(serde_json::to_value(&c).unwrap());
            Ok::<(), ()>(())
        })
        .unwrap();
        let reads = std::mem::take(&mut *src.reads.lock().unwrap());
        // The refcount blocks touched by a read, by their index in the table.
        let mut touched: Vec<usize> = blocks
            .iter()
            .enumerate()
            .filter(|&(_, &b)| reads.iter().any(|&(o, n)| o < b + cs && b < o + n))
            .map(|(i, _)| i)
            .collect();
        touched.dedup();
        (rows, reads, touched)
    };
    let last = img.file_len().div_ceil(cs) - 1;
    let (all, _, all_touched) = listing(0, last);
    // The whole listing reads every block: the recording sees block reads.
    assert_eq!(all_touched.len(), blocks.len());
    let metadata = |c: u64| {
        all[c as usize]["roles"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r != "data")
    };
    for (first, last) in [(4000, 4010), (4100, 4100)] {
        let (rows, reads, touched) = listing(first, last);
        assert_eq!(rows, all[first as usize..=last as usize]);
        // The range's clusters are counted by one block (256 refcounts a block).
        assert_eq!(touched, [first as usize / 256], "range {first}..={last}");
        for (o, n) in reads {
            for c in o / cs..(o + n).div_ceil(cs) {
                assert!(metadata(c), "range {first}..={last} read cluster {c}");
            }
        }
    }
}

/// Among a long run of shared data clusters (no COPIED flag, refcount 2), one
/// whose refcount says 1 is a COPIED finding, as qemu-img check says: the check
/// skips agreeing stretches of refcounts at once, and must not skip this one.
#[test]
fn copied_missing_inside_a_long_shared_run() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "s.qcow2", "1G"]);
    // 512 contiguous data clusters, 5..=516, then shared with a snapshot.
    w.qemu_io("s.qcow2", &["write -P 0x5a 0 32M"]);
    w.qemu_img(&["snapshot", "-c", "s", "s.qcow2"]);
    w.set_refcount("s.qcow2", 300, 1);
    let v = w.assert_check_matches("s.qcow2");
    let copied: Vec<&Value> = findings(&v)
        .iter()
        .filter(|f| f["category"] == "copied")
        .collect();
    assert_eq!(copied.len(), 1, "{copied:?}");
    assert_eq!(copied[0]["cluster"], 300);
    assert_eq!(copied[0]["refcount"], 1);
}

/// On an image of more than 1 Mi clusters (the L2 tables walked in two halves),
/// a wrong refcount near each end is found, as qemu-img check finds it, and the
/// findings come out in cluster order.
#[test]
fn refcounts_wrong_in_both_halves_of_a_large_image() {
    let w = Work::new();
    // 4 KiB clusters: about 1.03 Mi clusters in the file.
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k,preallocation=metadata",
        "h.qcow2",
        "4100M",
    ]);
    let nb = std::fs::metadata(w.path("h.qcow2")).unwrap().len() / 4096;
    assert!(nb > 1 << 20, "{nb} clusters");
    let late = nb - 1000;
    w.set_refcount("h.qcow2", 1000, 2);
    w.set_refcount("h.qcow2", late, 0);
    let v = w.assert_check_matches("h.qcow2");
    let wrong: Vec<u64> = findings(&v)
        .iter()
        .filter(|f| f["category"] == "refcount")
        .map(|f| f["cluster"].as_u64().unwrap())
        .collect();
    assert_eq!(wrong, [1000, late]);
    // Cluster 1000 is leaked; the other is a corruption, and both are also
    // COPIED findings (their flags no longer match a refcount of 1).
    assert_eq!(
        (v["leaks"].as_u64(), v["corruptions"].as_u64()),
        (Some(1), Some(3))
    );
}

/// A file of more clusters than QEMU's check counts (2^31 - 1; here a sparse
/// file of 2^31 + 1 clusters of 512 bytes): qemu-img check fails at once,
/// "Check failed: File too large", exit 1, and so does qinspect's.
#[test]
fn a_file_of_more_clusters_than_the_check_counts() {
    use qinspect::check::{CheckOptions, MAX_CHECK_CLUSTERS, Refusal, check};
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "big.qcow2",
        "1M",
    ]);
    w.qemu_io("big.qcow2", &["write 0 4k"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("big.qcow2"))
        .unwrap();
    f.set_len((MAX_CHECK_CLUSTERS + 2) * 512).unwrap();
    let q = std::process::Command::new("qemu-img")
        .args(["check", "big.qcow2"])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert_eq!(q.status.code(), Some(1));
    let err = String::from_utf8_lossy(&q.stderr);
    assert!(err.contains("Check failed: File too large"), "{err}");
    let v = w.assert_check_matches("big.qcow2");
    assert_eq!(v["check-errors"], 1);
    assert!(
        v["aborted"].as_str().unwrap().starts_with("File too large"),
        "{v}"
    );
    let text = w.qinspect(&["check", "big.qcow2"]);
    assert_eq!(text.status.code(), Some(1));
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(out.contains("Check failed: File too large"), "{out}");
    let img = qinspect::image::Qcow2::open(
        std::sync::Arc::new(qinspect::io::FileSource::open(&w.path("big.qcow2")).unwrap()),
        qinspect::image::Strictness::Qemu,
    )
    .unwrap();
    let r = check(&img, &CheckOptions::default());
    assert!(
        matches!(r.aborted, Some(Refusal::FileTooLarge { clusters }) if clusters == MAX_CHECK_CLUSTERS + 2),
        "{:?}",
        r.aborted
    );
}

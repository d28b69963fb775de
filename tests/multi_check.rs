//! `qinspect check` over many images: one row per image and a total, the most
//! severe exit code in the documented order, and NDJSON equal to single-image
//! `check --json`. Each image's own verdict is compared with `qemu-img check`.

mod common;

use common::Work;
use serde_json::Value;
use std::process::Command;

/// healthy.qcow2 (clean), leaking.qcow2 (one leaked data cluster: its L2 entry
/// was zeroed), truncated.qcow2 (cut short in the middle of its data).
fn pool(w: &Work) {
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        "healthy.qcow2",
        "1G",
    ]);
    w.qemu_io(
        "healthy.qcow2",
        &["write -P 0xaa 0 128k", "write -P 0xbb 1M 64k"],
    );
    std::fs::copy(w.path("healthy.qcow2"), w.path("leaking.qcow2")).unwrap();
    let img = qinspect::image::Qcow2::open(
        std::sync::Arc::new(qinspect::io::FileSource::open(&w.path("leaking.qcow2")).unwrap()),
        qinspect::image::Strictness::Qemu,
    )
    .unwrap();
    let l2 = img.l1[0].0 & qinspect::tables::L1E_OFFSET_MASK;
    // Guest 1 MiB is L2 entry 16: forget it, and its data cluster leaks.
    w.patch("leaking.qcow2", l2 + 16 * 8, &0u64.to_be_bytes());
    std::fs::copy(w.path("healthy.qcow2"), w.path("truncated.qcow2")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("truncated.qcow2"))
        .unwrap();
    f.set_len(300_000).unwrap();
}

/// `qemu-img check --output=json IMAGE`: exit code and JSON (Null if none).
fn qemu_check(w: &Work, image: &str) -> (i32, Value) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", image])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    let v = if out.stdout.is_empty() {
        Value::Null
    } else {
        Work::json(&out.stdout)
    };
    (out.status.code().unwrap(), v)
}

fn qinspect_code(w: &Work, args: &[&str]) -> (i32, String) {
    let out = w.qinspect(args);
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// The row of `name` in the summary table, split into columns.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name} in\n{table}"))
        .split_whitespace()
        .collect()
}

#[test]
fn three_images_one_row_each_and_a_total() {
    let w = Work::new();
    pool(&w);
    let (code, table) = qinspect_code(
        &w,
        &["check", "healthy.qcow2", "leaking.qcow2", "truncated.qcow2"],
    );
    println!("{table}");
    let (hc, hq) = qemu_check(&w, "healthy.qcow2");
    let (lc, lq) = qemu_check(&w, "leaking.qcow2");
    let (tc, tq) = qemu_check(&w, "truncated.qcow2");
    assert_eq!((hc, lc, tc), (0, 3, 2), "qemu-img's own verdicts");
    // Columns: image, verdict, corruptions, leaks, allocated/total, dirty, backing.
    assert_eq!(
        row(&table, "healthy.qcow2")[1..6],
        ["clean", "0", "0", "3/16384", "no"]
    );
    assert_eq!(row(&table, "healthy.qcow2")[6], "none");
    assert_eq!(hq["allocated-clusters"], 3);
    assert_eq!(
        row(&table, "leaking.qcow2")[1..6],
        ["leaks", "0", "1", "2/16384", "no"]
    );
    assert_eq!(lq["leaks"], 1);
    let t = row(&table, "truncated.qcow2");
    assert_eq!(t[1], "corrupt");
    assert_eq!(t[2], tq["corruptions"].as_u64().unwrap().to_string());
    assert_eq!(t[3], "0");
    assert_eq!(
        t[4],
        format!("{}/16384", tq["allocated-clusters"].as_u64().unwrap_or(0))
    );
    // The total adds the rows up.
    let total: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("total: 3 images"))
        .unwrap_or_else(|| panic!("no total in\n{table}"))
        .split_whitespace()
        .collect();
    let corruptions = tq["corruptions"].as_u64().unwrap();
    let allocated = 3 + 2 + tq["allocated-clusters"].as_u64().unwrap_or(0);
    assert_eq!(
        total[3..7],
        [
            corruptions.to_string(),
            "1".to_string(),
            format!("{allocated}/49152"),
            "0".to_string()
        ]
    );
    assert!(
        table.contains("1 clean, 1 leaks, 1 corrupt; exit code 2"),
        "{table}"
    );
    // Corruptions outrank leaks.
    assert_eq!(code, 2);
}

#[test]
fn exit_code_is_the_most_severe_in_the_stated_order() {
    let w = Work::new();
    pool(&w);
    // A qcow2 header cut short: neither tool can open it.
    let head = std::fs::read(w.path("healthy.qcow2")).unwrap();
    std::fs::write(w.path("unreadable.qcow2"), &head[..40]).unwrap();
    let code_of = |name: &str| qemu_check(&w, name).0;
    assert_eq!(code_of("unreadable.qcow2"), 1);
    // The order the help states: corruptions (2), could not check (1), leaks (3), clean (0).
    let rank = |c: i32| match c {
        2 => 3,
        1 => 2,
        3 => 1,
        _ => 0,
    };
    let help = String::from_utf8(w.qinspect_ok(&["check", "--help"])).unwrap();
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains("in this order: 2 (corruptions), then 1 (could not check"),
        "{help}"
    );
    for set in [
        &["healthy.qcow2", "healthy.qcow2"][..],
        &["healthy.qcow2", "leaking.qcow2"],
        &["leaking.qcow2", "unreadable.qcow2", "healthy.qcow2"],
        &["unreadable.qcow2", "truncated.qcow2", "leaking.qcow2"],
        &["truncated.qcow2", "leaking.qcow2"],
        &["healthy.qcow2", "missing.qcow2"],
    ] {
        let expect = set
            .iter()
            .map(|n| code_of(n))
            .max_by_key(|&c| rank(c))
            .unwrap();
        let mut args = vec!["check"];
        args.extend_from_slice(set);
        let (code, table) = qinspect_code(&w, &args);
        assert_eq!(code, expect, "check {set:?}:\n{table}");
        // Every image has its row, however the others fared.
        for n in set {
            row(&table, n);
        }
    }
}

#[test]
fn ndjson_lines_equal_single_image_check_json() {
    let w = Work::new();
    pool(&w);
    let images = [
        "healthy.qcow2",
        "leaking.qcow2",
        "truncated.qcow2",
        "missing.qcow2",
    ];
    let mut args = vec!["check", "--json"];
    args.extend(images);
    let (code, out) = qinspect_code(&w, &args);
    assert_eq!(code, 2);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), images.len(), "{out}");
    for (line, name) in lines.iter().zip(images) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["filename"], name);
        if name == "missing.qcow2" {
            assert!(v["error"].as_str().unwrap().contains("No such file"), "{v}");
            continue;
        }
        // The same object the single-image check prints, which matches qemu-img.
        let single = w.assert_check_matches(name);
        assert_eq!(v, single, "NDJSON line of {name}");
    }
}

#[test]
fn recursive_checks_every_qcow2_under_a_directory() {
    let w = Work::new();
    pool(&w);
    std::fs::create_dir_all(w.path("pool/b")).unwrap();
    std::fs::rename(w.path("healthy.qcow2"), w.path("pool/a.qcow2")).unwrap();
    // No .qcow2 in the name, but the qcow2 magic.
    std::fs::rename(w.path("leaking.qcow2"), w.path("pool/b/vm-disk")).unwrap();
    // qcow2 by name only: not an image at all (its first 4 bytes are not the magic).
    std::fs::write(w.path("pool/b/empty.qcow2"), b"").unwrap();
    std::fs::write(w.path("pool/notes.txt"), b"not an image\n").unwrap();
    let (code, table) = qinspect_code(&w, &["check", "--recursive", "pool"]);
    println!("{table}");
    let names: Vec<&str> = table
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("total"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        names,
        ["pool/a.qcow2", "pool/b/empty.qcow2", "pool/b/vm-disk"]
    );
    assert_eq!(row(&table, "pool/a.qcow2")[1], "clean");
    assert_eq!(row(&table, "pool/b/vm-disk")[1], "leaks");
    // The empty file cannot be checked (qemu-img says so too); the others still are.
    assert_ne!(qemu_check(&w, "pool/b/empty.qcow2").0, 0);
    assert_eq!(row(&table, "pool/b/empty.qcow2")[1], "not");
    assert_eq!(code, 1, "could not check outranks leaks");
    assert!(table.contains("total: 3 images"), "{table}");
    // Without --recursive a directory is named, not walked.
    let (code, table) = qinspect_code(&w, &["check", "pool", "truncated.qcow2"]);
    assert_eq!(code, 2);
    assert_eq!(row(&table, "pool")[1], "unreadable");
    assert!(table.contains("pool: is a directory"), "{table}");
}

#[test]
fn info_and_map_take_several_images() {
    let w = Work::new();
    pool(&w);
    // info --json: one line per image, each the single-image object.
    let (code, out) = qinspect_code(
        &w,
        &[
            "info",
            "--json",
            "healthy.qcow2",
            "missing.qcow2",
            "leaking.qcow2",
        ],
    );
    assert_eq!(code, 1, "one image could not be read");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    for (v, name) in [(&lines[0], "healthy.qcow2"), (&lines[2], "leaking.qcow2")] {
        let single = Work::json(&w.qinspect_ok(&["info", "--json", name]));
        assert_eq!(*v, single, "info line of {name}");
    }
    assert_eq!(lines[1]["filename"], "missing.qcow2");
    assert!(lines[1]["error"].is_string());
    // Readable info: each image's summary in turn, the same as on its own.
    let (code, out) = qinspect_code(&w, &["info", "healthy.qcow2", "leaking.qcow2"]);
    assert_eq!(code, 0);
    let one = String::from_utf8(w.qinspect_ok(&["info", "healthy.qcow2"])).unwrap();
    let two = String::from_utf8(w.qinspect_ok(&["info", "leaking.qcow2"])).unwrap();
    assert_eq!(out, format!("{one}\n{two}"));
    // map: one table per image under its name, the same as on its own.
    let (code, out) = qinspect_code(
        &w,
        &["map", "healthy.qcow2", "missing.qcow2", "leaking.qcow2"],
    );
    assert_eq!(code, 1);
    let one = String::from_utf8(w.qinspect_ok(&["map", "healthy.qcow2"])).unwrap();
    let two = String::from_utf8(w.qinspect_ok(&["map", "leaking.qcow2"])).unwrap();
    assert_eq!(
        out,
        format!("healthy.qcow2\n{one}\nmissing.qcow2\n\nleaking.qcow2\n{two}")
    );
    // qemu-img map's JSON is one array for one image.
    let out = w.qinspect(&["map", "--json", "healthy.qcow2", "leaking.qcow2"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--json maps one image"));
}

#[test]
fn a_backing_chain_that_does_not_open_fails_the_check_as_in_qemu() {
    let w = Work::new();
    pool(&w);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "healthy.qcow2",
        "-F",
        "qcow2",
        "overlay.qcow2",
    ]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "-u",
        "orphan.qcow2",
        "1G",
    ]);
    assert_eq!(qemu_check(&w, "overlay.qcow2").0, 0);
    assert_eq!(
        qemu_check(&w, "orphan.qcow2").0,
        1,
        "qemu-img cannot open it"
    );
    let (code, table) = qinspect_code(&w, &["check", "overlay.qcow2", "orphan.qcow2"]);
    assert_eq!(code, 1, "{table}");
    assert_eq!(row(&table, "overlay.qcow2")[1], "clean");
    assert_eq!(row(&table, "overlay.qcow2")[6..], ["ok", "(1", "below)"]);
    let orphan = row(&table, "orphan.qcow2");
    assert_eq!((orphan[1], orphan[2]), ("check", "failed"));
    assert_eq!(orphan.last(), Some(&"BROKEN"));
    assert!(
        table.contains("Could not open 'gone.qcow2': No such file or directory"),
        "{table}"
    );
    // The single-image check agrees with qemu-img, and says why.
    let v = w.assert_check_matches("orphan.qcow2");
    assert!(
        v["qemu-refuses-to-open"]
            .as_str()
            .unwrap()
            .starts_with("Could not open 'orphan.qcow2'"),
        "{v}"
    );
}

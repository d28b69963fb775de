//! A backing file that does not open. Where QEMU's own open fails (a missing
//! file, a directory, a loop, a backing file QEMU itself refuses), every simulated
//! operation fails as the qemu-io or qemu-img command for it fails, in its words,
//! and changes what that command changes (its own open's writes, nothing else).
//! Where only qinspect cannot read the backing file (a vmdk or vpc one), the
//! operations that do not need its bytes are predicted and compared with QEMU, and
//! the rest say `not simulated:`.

mod common;
mod sim_compare;
use common::Work;
use qinspect::chain::FailureCause;
use qinspect::image::{Qcow2, Strictness};
use qinspect::simulate::{Op, Sim, SimError, simulate_layers};
use sim_compare::{compare_metadata, parse_op, qemu_command};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn open(p: &Path) -> Qcow2 {
    let src = Arc::new(qinspect::io::FileSource::open(p).expect("open"));
    Qcow2::open(src, Strictness::Lenient).expect("qcow2")
}

/// Run a QEMU command in `dir`: its exit code and its message without the
/// program's name (`qemu-io: `, `qemu-img: `, `qemu-nbd: `).
fn qemu_fails(dir: &Path, cmd: &[String]) -> (Option<i32>, String) {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .current_dir(dir)
        .output()
        .expect("run QEMU");
    let err = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}: ", cmd[0]);
    let text = err
        .trim_end()
        .strip_prefix(&prefix)
        .unwrap_or(&err)
        .to_string();
    (out.status.code(), text)
}

/// Images whose backing chain QEMU cannot open, each with the cause qinspect
/// finds for it.
fn unopenable(w: &Work) -> Vec<(&'static str, FailureCause)> {
    let q = |args: &[&str]| {
        w.qemu_img(args);
    };
    // The backing file is gone.
    q(&["create", "-q", "-f", "qcow2", "gone-base.qcow2", "1M"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "gone-base.qcow2",
        "-F",
        "qcow2",
        "gone.qcow2",
    ]);
    w.qemu_io("gone.qcow2", &["write -P 7 64k 4k"]);
    std::fs::remove_file(w.path("gone-base.qcow2")).unwrap();
    // The backing file is a directory.
    std::fs::create_dir(w.path("dir-base")).unwrap();
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "dir-base",
        "-F",
        "qcow2",
        "dir.qcow2",
        "1M",
    ]);
    // The backing file's own backing file is gone.
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "nowhere.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
        "1M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "deep.qcow2",
        "1M",
    ]);
    // An image that is its own backing file, and two that back each other.
    q(&["create", "-q", "-f", "qcow2", "self.qcow2", "1M"]);
    q(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        "self.qcow2",
    ]);
    q(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    q(&[
        "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
    ]);
    q(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]);
    // A backing file said to be qcow2 that is not.
    std::fs::write(w.path("junk.bin"), vec![0x5au8; 1 << 20]).unwrap();
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "junk.bin",
        "-F",
        "qcow2",
        "junk.qcow2",
        "1M",
    ]);
    vec![
        ("gone.qcow2", FailureCause::Os(std::io::ErrorKind::NotFound)),
        ("dir.qcow2", FailureCause::NotRegularFile),
        ("deep.qcow2", FailureCause::Os(std::io::ErrorKind::NotFound)),
        ("self.qcow2", FailureCause::Loop),
        ("a.qcow2", FailureCause::Loop),
        ("junk.qcow2", FailureCause::Refused),
    ]
}

/// Every operation that is a qemu-io or qemu-img command (each opens the image
/// read-write; a read-only open of a loop would never end).
const OPS: [&str; 11] = [
    "write:0:4096",
    "write-compressed:0:65536",
    "write-zeroes:4096:4096",
    "read:0:4096",
    "discard:0:65536",
    "snapshot-create:s",
    "snapshot-delete:s",
    "snapshot-apply:s",
    "resize:2097152",
    "repair:leaks",
    "repair:all",
];

#[test]
fn qemu_fails_every_operation_in_its_own_words() {
    let w = Work::new();
    for (name, cause) in unopenable(&w) {
        // Absolute paths on both sides: QEMU names the backing file as it
        // resolves it, from the image's name.
        let path = w.path(name);
        let shown = path.to_string_lossy().into_owned();
        let before = std::fs::read(&path).unwrap();
        for op in OPS {
            let (code, words) = qemu_fails(w.dir.path(), &qemu_command(op, &shown));
            assert_eq!(code, Some(1), "{name} {op}: QEMU: {words}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                before,
                "{name} {op}: QEMU wrote"
            );
            let mut sim = Sim::new(&open(&path), &path).unwrap();
            sim.apply(&parse_op(op));
            let r = sim.records.last().unwrap();
            assert_eq!(r.error.as_deref(), Some(words.as_str()), "{name} {op}");
            let Some(SimError::BackingOpen { failure, .. }) = &r.cause else {
                panic!("{name} {op}: {:?}", r.cause);
            };
            assert_eq!(failure.cause, cause, "{name} {op}");
            assert!(failure.qemu_fails(), "{name} {op}");
            assert!(r.steps.is_empty(), "{name} {op}: {:?}", r.steps);
            assert!(
                sim.allocated.is_empty() && sim.freed.is_empty(),
                "{name} {op}"
            );
        }
    }
}

#[test]
fn an_overlay_over_such_an_image_fails_as_qemu_nbd_does() {
    let w = Work::new();
    let _ = unopenable(&w);
    for name in ["gone.qcow2", "deep.qcow2", "dir.qcow2", "junk.qcow2"] {
        let path = w.path(name);
        let shown = path.to_string_lossy().into_owned();
        let sock = w.path("nbd.sock").to_string_lossy().into_owned();
        // The open fails before qemu-nbd serves anything, so it returns.
        let cmd: Vec<String> = ["qemu-nbd", "-s", "-k", &sock, &shown]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (code, words) = qemu_fails(w.dir.path(), &cmd);
        assert_eq!(code, Some(1), "{name}: {words}");
        let ops = [Op::Overlay { snapshot: None }, parse_op("write:0:4096")];
        let Err(e) = simulate_layers(&open(&path), &path, &ops) else {
            panic!("{name}: the overlay opened");
        };
        assert!(
            matches!(e, qinspect::error::Error::Request(_)),
            "{name}: {e:?}"
        );
        let ours = e.to_string();
        assert_eq!(
            ours.strip_prefix("qemu-nbd -s fails: "),
            Some(words.as_str()),
            "{name}"
        );
    }
    // A read-only open of a loop does not end (so QEMU is not run here).
    let path = w.path("self.qcow2");
    let ops = [Op::Overlay { snapshot: None }];
    let Err(e) = simulate_layers(&open(&path), &path, &ops) else {
        panic!("the overlay over a loop opened");
    };
    assert!(e.to_string().contains("loop without end"), "{e}");
}

/// A read-write open writes before it opens the backing file: persistent
/// bitmaps are marked in use (and stored again as the failed open closes), a
/// dirty image's refcounts are repaired. Those writes stay.
#[test]
fn what_the_open_writes_before_the_backing_file_fails() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "bm.qcow2",
    ]);
    w.qemu_img(&["bitmap", "--add", "bm.qcow2", "b0"]);
    w.qemu_io("bm.qcow2", &["write 0 4k"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "dirty.qcow2",
    ]);
    // Killed with lazy refcounts: the dirty bit stays set.
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write 0 64k",
            "-c",
            "sigraise 9",
            "dirty.qcow2",
        ])
        .current_dir(w.dir.path())
        .output()
        .expect("qemu-io");
    std::fs::remove_file(w.path("base.qcow2")).unwrap();
    let dirty = open(&w.path("dirty.qcow2"));
    assert_ne!(dirty.header.incompatible_features & 1, 0, "not dirty");
    for (name, op) in [
        ("bm.qcow2", "write:0:4096"),
        ("bm.qcow2", "snapshot-create:s"),
        ("bm.qcow2", "repair:all"),
        ("dirty.qcow2", "write:0:4096"),
        ("dirty.qcow2", "repair:leaks"),
        ("dirty.qcow2", "repair:all"),
    ] {
        let image = w.path(name).to_string_lossy().into_owned();
        let sim = compare_metadata(w.dir.path(), &image, &[op])
            .unwrap_or_else(|e| panic!("{name} {op}: {e}"));
        let r = &sim.records[0];
        assert!(
            matches!(r.cause, Some(SimError::BackingOpen { .. })),
            "{name} {op}: {:?}",
            r.cause
        );
        if name == "dirty.qcow2" && op.starts_with("write") {
            assert!(!r.steps.is_empty(), "the dirty image is repaired on open");
        }
    }
}

/// vmdk and vpc backing files: QEMU opens them, qinspect does not read them.
#[test]
fn a_backing_file_only_qinspect_cannot_read() {
    let w = Work::new();
    for (fmt, base) in [("vmdk", "b.vmdk"), ("vpc", "b.vpc")] {
        let top = format!("on-{fmt}.qcow2");
        w.qemu_img(&["create", "-q", "-f", fmt, base, "1M"]);
        w.run("qemu-io", &["-f", fmt, "-c", "write -P 3 0 128k", base]);
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-b", base, "-F", fmt, &top]);
        let image = w.path(&top).to_string_lossy().into_owned();
        let predicted = [
            "write:4096:4096",
            "write:200000:1000",
            "snapshot-create:s",
            "write:0:4096",
            "write-compressed:262144:65536",
            "discard:0:65536",
            "snapshot-delete:s",
            "repair:all",
            "resize:524288:shrink",
        ];
        let sim = compare_metadata(w.dir.path(), &image, &predicted)
            .unwrap_or_else(|e| panic!("{top}: {e}"));
        for r in &sim.records {
            assert!(r.error.is_none(), "{top}: {:?}", r.error);
            assert!(
                r.steps.iter().any(|c| c
                    .reason
                    .starts_with("qinspect cannot open the backing chain")
                    && c.reason.contains(&format!("format '{fmt}'"))),
                "{top}: {}: no word of the backing file",
                r.description
            );
            for c in &r.steps {
                assert!(!c.reason.contains("no backing file"), "{top}: {}", c.reason);
            }
        }
        let cow = sim.records[0]
            .steps
            .iter()
            .find(|c| c.reason.starts_with("copy-on-write head"))
            .expect("a copy-on-write head");
        assert!(
            cow.reason.contains("which qinspect could not open"),
            "{}",
            cow.reason
        );
        // The guest bytes come from the backing file: not predicted.
        let mut sim = sim;
        assert!(sim.guest_bytes_unknown().is_some(), "{top}");
        // What needs the backing file's bytes or length is not simulated.
        for op in ["write-zeroes:4096:4096", "resize:2097152", "read:0:4096"] {
            let path = w.path(&top);
            let mut sim = Sim::new(&open(&path), &path).unwrap();
            sim.apply(&parse_op(op));
            let r = &sim.records[0];
            assert!(
                matches!(&r.cause, Some(SimError::NotModelled(m)) if m.contains(&format!("format '{fmt}'"))),
                "{top} {op}: {:?}",
                r.cause
            );
            assert!(r.error.as_deref().unwrap().starts_with("not simulated: "));
        }
        // On screen too, what is not simulated is no failure of QEMU's.
        let out = w.qinspect(&["simulate", &top, "resize:2097152"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("\n   not simulated: growing an image"),
            "{text}"
        );
        assert!(!text.contains("QEMU fails here"), "{text}");
    }
}

/// qinspect's own commands on an image whose backing file is gone: check says
/// that qemu-img check would not open it, in qemu-img's words and exit code;
/// map, read and trace fail as qemu-img map does; info opens it as
/// `qemu-img info` does.
#[test]
fn commands_on_an_image_whose_backing_file_is_gone() {
    let w = Work::new();
    let _ = unopenable(&w);
    let (code, words) = qemu_fails(
        w.dir.path(),
        &["qemu-img".into(), "check".into(), "gone.qcow2".into()],
    );
    let out = w.qinspect(&["check", "gone.qcow2"]);
    assert_eq!(out.status.code(), code, "exit code");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!(
            "qemu-img check fails: it cannot open this image, and exits 1 without checking it: {words}\n"
        )),
        "{text}"
    );
    let q = Command::new("qemu-img")
        .args(["check", "--output=json", "gone.qcow2"])
        .current_dir(w.dir.path())
        .output()
        .expect("qemu-img");
    assert_eq!(q.status.code(), code);
    assert!(q.stdout.is_empty(), "qemu-img check prints no JSON");
    let out = w.qinspect(&["check", "--json", "gone.qcow2"]);
    assert_eq!(out.status.code(), code);
    let v = Work::json(&out.stdout);
    assert_eq!(v["qemu-refuses-to-open"], words.as_str());

    let (code, map_words) = qemu_fails(
        w.dir.path(),
        &["qemu-img".into(), "map".into(), "gone.qcow2".into()],
    );
    assert_eq!(map_words, words, "qemu-img map fails as check does");
    for args in [
        &["map", "gone.qcow2"][..],
        &["read", "gone.qcow2", "--offset", "0", "--length", "512"],
        &["trace", "gone.qcow2", "0"],
    ] {
        let out = w.qinspect(args);
        assert_eq!(out.status.code(), code, "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Could not open backing file: Could not open 'gone-base.qcow2': No such file or directory"),
            "{args:?}: {err}"
        );
    }
    let out = w.qinspect_ok(&["info", "gone.qcow2"]);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("gone-base.qcow2  qcow2  cannot be followed"),
        "{text}"
    );
}

/// `qemu-img check` of an image whose backing chain loops (b names a, a
/// names b): its read-only open goes round the loop, one layer deeper each
/// time, until it runs out of file descriptors, and fails then with "Too many
/// open files" (so a higher open-file limit means more layers in its message).
/// qinspect's `check` says so, in text and JSON, with qemu-img's exit code.
#[test]
fn check_of_a_backing_loop_fails_at_the_open_file_limit() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
    ]);
    w.qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]);
    let layers = |limit: u32| {
        let out = Command::new("sh")
            .args([
                "-c",
                &format!("ulimit -n {limit} && exec timeout 60 qemu-img check b.qcow2"),
            ])
            .current_dir(w.dir.path())
            .output()
            .expect("qemu-img");
        let err = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
        assert_eq!(out.status.code(), Some(1), "limit {limit}: {err}");
        let rest = err
            .strip_prefix("qemu-img: Could not open 'b.qcow2': ")
            .unwrap_or_else(|| panic!("limit {limit}: {err}"));
        assert!(
            rest.ends_with(": Too many open files"),
            "limit {limit}: {err}"
        );
        (
            out.status.code(),
            rest.matches("Could not open backing file: ").count(),
        )
    };
    let (code, few) = layers(128);
    let (_, more) = layers(256);
    assert!(few > 10 && more > few, "{few} layers, then {more}");

    let out = w.qinspect(&["check", "b.qcow2"]);
    assert_eq!(out.status.code(), code);
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(
            "qemu-img check fails: qemu-img's read-only open of 'b.qcow2' follows the backing loop"
        ) && first.contains("b.qcow2 -> a.qcow2 -> b.qcow2")
            && first.contains("until it runs out of file descriptors")
            && first.contains("\"Too many open files\"")
            && !first.contains("without checking it:"),
        "{text}"
    );
    let out = w.qinspect(&["check", "--json", "b.qcow2"]);
    assert_eq!(out.status.code(), code);
    let v = Work::json(&out.stdout);
    let why = v["qemu-refuses-to-open"].as_str().unwrap_or_default();
    assert!(first.ends_with(why) && !why.is_empty(), "{v}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        format!("qinspect: qemu-img check fails: {why}")
    );
}

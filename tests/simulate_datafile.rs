//! Operations on images whose guest data lives in an external data file
//! (plain, and `data_file_raw=on`), compared operation by operation with real
//! qemu-img/qemu-io on a copy of the qcow2 file (see `sim_compare`). The copy
//! names the same data file, so QEMU's writes land there; qinspect never
//! writes it, and only the qcow2 file's metadata is predicted.

mod common;
mod sim_compare;
use common::Work;
use sim_compare::compare;

fn ok(w: &Work, image: &str, ops: &[&str]) -> qinspect::simulate::Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{image}: {e}"))
}

/// A 4M image named `name` with its data in `name.raw`, and some data written.
fn with_data_file(w: &Work, name: &str, extra: &str) {
    let mut opts = format!("data_file={name}.raw");
    if !extra.is_empty() {
        opts.push(',');
        opts.push_str(extra);
    }
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, name, "4M"]);
    w.qemu_io(
        name,
        &["write -P 1 0 128k", "write -P 2 1M 4k", "write -z 2M 64k"],
    );
}

const KINDS: [(&str, &str); 3] = [
    ("p.qcow2", ""),
    ("r.qcow2", "data_file_raw=on"),
    ("x.qcow2", "extended_l2=on"),
];

#[test]
fn copy_on_read_with_a_data_file() {
    let w = Work::new();
    for (name, extra) in KINDS {
        with_data_file(&w, name, extra);
        let sim = ok(
            &w,
            name,
            &[
                "read:0:524288",
                "read:1000000:100000",
                "read:2097152:131072",
                "read:4128768:65536",
            ],
        );
        assert!(sim.records.iter().all(|r| r.error.is_none()), "{name}");
        assert!(
            sim.records[0]
                .steps
                .iter()
                .any(|c| c.reason.starts_with("copy-on-read: ")),
            "{name}: the first read copies"
        );
    }
    // A backing file under a data-file image (not allowed with data_file_raw).
    w.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]);
    w.qemu_io("b.qcow2", &["write -P 7 512k 64k", "write -P 0 3M 64k"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=t.raw",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "t.qcow2",
    ]);
    w.qemu_io("t.qcow2", &["write -P 3 0 4k"]);
    ok(&w, "t.qcow2", &["read:0:1048576", "read:3145728:131072"]);
}

#[test]
fn resize_with_a_data_file() {
    let w = Work::new();
    for (name, extra) in KINDS {
        with_data_file(&w, name, extra);
        let sim = ok(
            &w,
            name,
            &[
                "resize:8388608",
                "write:7340032:4096",
                "resize:1048576:shrink",
                "resize:3000000",
                "resize:2000000:shrink",
                "resize:1073741824",
                "write:1000000000:65536",
            ],
        );
        // 3000000 is not a multiple of 512: QEMU refuses it too.
        assert!(sim.records[3].error.is_some(), "{name}");
        assert!(
            sim.records[0]
                .steps
                .iter()
                .any(|c| c.reason.contains("data file")),
            "{name}: {:?}",
            sim.records[0].steps
        );
    }
    // Over a backing file longer than the disk: the new area is zeroed.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "8M"]);
    w.qemu_io("b.qcow2", &["write -P 7 4M 1M"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=t.raw",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "t.qcow2",
        "4M",
    ]);
    w.qemu_io("t.qcow2", &["write -P 3 0 4k"]);
    ok(&w, "t.qcow2", &["resize:6291456", "resize:2097152:shrink"]);
}

#[test]
fn repair_with_a_data_file() {
    let w = Work::new();
    for (name, extra) in KINDS {
        with_data_file(&w, name, extra);
        let a = format!("a{name}");
        let b = format!("b{name}");
        w.run("cp", &[name, &a]);
        w.run("cp", &[name, &b]);
        // Leaks: the L1 table counted 3 times, a free cluster counted once.
        w.set_refcount(name, 3, 3);
        w.set_refcount(name, 40, 1);
        let sim = ok(&w, name, &["repair:leaks", "write:3145728:4096"]);
        assert!(
            sim.records[0].steps.iter().any(|c| matches!(
                c.target,
                qinspect::simulate::Target::Refcount { cluster: 3 }
            ) && (c.before, c.after) == (3, 1)),
            "{name}: {:?}",
            sim.records[0].steps
        );
        // The L2 table counted twice (its COPIED flag now wrong too).
        w.set_refcount(&a, 4, 2);
        ok(
            &w,
            &a,
            &["repair:leaks", "repair:all", "write:3145728:4096"],
        );
        // An L2 table counted 0: -r all rebuilds the refcount structure.
        w.set_refcount(&b, 4, 0);
        ok(
            &w,
            &b,
            &["repair:leaks", "repair:all", "write:3145728:4096"],
        );
    }
}

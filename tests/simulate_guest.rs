//! The guest bytes a simulation predicts, against real QEMU: the same
//! operations by qemu-io on a copy of the image (or on a real overlay made by
//! `qemu-img create -b`, over `qemu-img convert -l S` for a snapshot), then
//! `qemu-img convert -O raw` of the result compared byte for byte with
//! `qinspect simulate ... --guest-raw`. The metadata is compared after every
//! operation as in `simulate_classes`; the image itself must not change.

mod common;
mod sim_compare;
use common::Work;
use sha2::{Digest, Sha256};

fn sha256(w: &Work, name: &str) -> Vec<u8> {
    Sha256::digest(std::fs::read(w.path(name)).expect("read")).to_vec()
}

fn create(w: &Work, name: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    w.qemu_img(&args);
}

/// `a` and `b` hold the same bytes; else where they first differ.
fn same_bytes(w: &Work, a: &str, b: &str, what: &str) {
    let (x, y) = (
        std::fs::read(w.path(a)).expect("read"),
        std::fs::read(w.path(b)).expect("read"),
    );
    assert_eq!(x.len(), y.len(), "{what}: {a} and {b} differ in length");
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{what}: guest byte {i:#x} is {:#04x} in {a} (predicted) and {:#04x} in {b} (QEMU's)",
            x[i], y[i]
        );
    }
}

/// The simulated guest disk of `ops` on `image` (after `overlay`, when
/// given), as the command line writes it to `out`.
fn predict(w: &Work, image: &str, overlay: Option<&str>, ops: &[&str], out: &str) {
    let mut args: Vec<&str> = vec!["simulate", image];
    if let Some(o) = overlay {
        args.push(o);
    }
    args.extend(ops);
    args.extend(["--guest-raw", out]);
    let r = w.qinspect(&args);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() || text.contains("guest disk"),
        "qinspect {args:?}: {text}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(text.contains(&format!("is in {out}")), "{text}");
}

/// Operations on the image itself: qemu-io on a copy, then both guest disks.
fn image_case(w: &Work, image: &str, ops: &[&str]) {
    let before = sha256(w, image);
    sim_compare::compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{image}: {e}"));
    let real = format!("{image}.real.raw");
    w.qemu_img(&["convert", "-O", "raw", &format!("{image}.qemu"), &real]);
    let pred = format!("{image}.pred.raw");
    predict(w, image, None, ops, &pred);
    same_bytes(w, &pred, &real, image);
    assert_eq!(sha256(w, image), before, "{image} changed");
}

/// Operations on a throw-away overlay over `image` or its `snapshot`.
fn overlay_case(w: &Work, image: &str, snapshot: Option<&str>, ops: &[&str]) {
    let before = sha256(w, image);
    let tag = snapshot.unwrap_or("active");
    let base = match snapshot {
        Some(s) => {
            let b = format!("{image}.{s}.base");
            let l = format!("snapshot.name={s}");
            w.qemu_img(&["convert", "-O", "qcow2", "-l", &l, image, &b]);
            b
        }
        None => image.to_string(),
    };
    let ov = format!("{image}.{tag}.ov");
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &ov,
    ]);
    let img = sim_compare::open_path(&w.path(image)).unwrap();
    let sim = qinspect::simulate::Sim::overlay(&img, &w.path(image), snapshot).unwrap();
    sim_compare::compare_sim(w.dir.path(), sim, &ov, ops, ops)
        .unwrap_or_else(|e| panic!("overlay over {image} {tag}: {e}"));
    let real = format!("{ov}.real.raw");
    w.qemu_img(&["convert", "-O", "raw", &ov, &real]);
    let pred = format!("{ov}.pred.raw");
    let op = match snapshot {
        Some(s) => format!("overlay:{s}"),
        None => "overlay".to_string(),
    };
    predict(w, image, Some(&op), ops, &pred);
    same_bytes(w, &pred, &real, &format!("overlay over {image} {tag}"));
    assert_eq!(sha256(w, image), before, "{image} changed");
}

/// An image with data of several patterns in the active disk and in two
/// snapshots, parts of clusters included.
fn vm(w: &Work, name: &str, opts: &str) {
    create(w, name, opts, "8M");
    w.qemu_io(name, &["write -P 1 0 1M", "write -P 2 3M 200k"]);
    w.qemu_img(&["snapshot", "-c", "s1", name]);
    w.qemu_io(name, &["write -P 3 512k 1M", "write -P 9 3100k 1000"]);
    w.qemu_img(&["snapshot", "-c", "s2", name]);
    w.qemu_io(name, &["write -P 4 6M 64k", "write -P 5 100000 3000"]);
}

#[test]
fn overlays_over_the_image_and_its_snapshots_read_as_qemus() {
    let w = Work::new();
    vm(&w, "vm.qcow2", "");
    let ops = [
        // Part of a cluster: the rest is copied from the image below.
        "write:4096:8192:P=0x41",
        // Across clusters, partial at both ends.
        "write:3100000:70000:P=0x42",
        // In place, in the overlay's own cluster.
        "write:4096:100:P=0x43",
        "discard:1048576:65536",
        "write-zeroes:2097152:65536",
        "write-zeroes:5242880:131072:unmap",
        // Copy-on-read of data below.
        "read:3000000:300000",
        // Part of a cluster nothing below holds.
        "write:7000000:1000",
        "write:6291456:4096:P=0x44",
    ];
    overlay_case(&w, "vm.qcow2", None, &ops);
    for s in ["s1", "s2"] {
        overlay_case(&w, "vm.qcow2", Some(s), &ops);
    }
}

#[test]
fn writes_on_the_image_itself_read_as_qemus() {
    let w = Work::new();
    vm(&w, "vm.qcow2", "");
    image_case(
        &w,
        "vm.qcow2",
        &[
            // A cluster shared with the snapshots: copied, then written.
            "write:100000:5000:P=0x61",
            // In place, partial.
            "write:6295000:10:P=0x62",
            // A new cluster, partial: the rest is zeros.
            "write:3300000:10000:P=0x63",
            "discard:0:65536",
            "write-zeroes:65536:65536",
            "write-zeroes:200000:1000",
            "write-compressed:7340032:65536:P=0x77",
            // Part of a compressed cluster: inflated, then written.
            "write:7345000:100:P=0x78",
            "snapshot-apply:s1",
            "write:10000:10000:P=0x64",
            "snapshot-create:s3",
            "write:10000:100:P=0x65",
        ],
    );
}

#[test]
fn copy_on_read_and_cow_from_a_backing_file_read_as_qemus() {
    let w = Work::new();
    create(&w, "back.qcow2", "", "4M");
    w.qemu_io("back.qcow2", &["write -P 7 0 2M", "write -P 8 3M 5000"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "back.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    w.qemu_io("top.qcow2", &["write -P 6 1M 4096"]);
    image_case(
        &w,
        "top.qcow2",
        &[
            "read:0:200000",
            "write:300000:1000:P=0x21",
            "write:1052000:1000:P=0x22",
            "read:3145728:65536",
            "discard:0:65536",
        ],
    );
    // Extended L2: subclusters are written, copied and read through alone.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "back.qcow2",
        "-F",
        "qcow2",
        "ext.qcow2",
    ]);
    image_case(
        &w,
        "ext.qcow2",
        &[
            "write:5000:100:P=0x31",
            "write:70000:3000:P=0x32",
            "write:5100:4000:P=0x33",
            "read:131072:65536",
            "write:140000:20:P=0x34",
        ],
    );
}

#[test]
fn the_guest_disk_is_never_written_over_a_file_the_simulation_reads() {
    let w = Work::new();
    vm(&w, "vm.qcow2", "");
    let before = sha256(&w, "vm.qcow2");
    std::fs::hard_link(w.path("vm.qcow2"), w.path("link.raw")).unwrap();
    for target in ["vm.qcow2", "link.raw"] {
        for pre in [None, Some("overlay:s1")] {
            let mut args = vec!["simulate", "vm.qcow2"];
            args.extend(pre);
            args.extend(["write:0:4096", "--guest-raw", target]);
            let r = w.qinspect(&args);
            assert!(!r.status.success(), "{args:?} wrote over the image");
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(err.contains("refusing to write"), "{err}");
        }
    }
    assert_eq!(sha256(&w, "vm.qcow2"), before);
}

#[test]
fn the_comparison_catches_different_guest_bytes() {
    // The same metadata, another pattern: only the guest bytes tell them apart.
    let w = Work::new();
    vm(&w, "vm.qcow2", "");
    let e = sim_compare::compare_with(
        w.dir.path(),
        "vm.qcow2",
        &["write:4096:8192:P=0x41"],
        &["write:4096:8192:P=0x42"],
    )
    .err()
    .unwrap_or_default();
    assert!(e.contains("guest bytes differ"), "{e}");
}

#[test]
fn data_written_after_the_file_was_cut_reads_as_written() {
    // The shrink cuts the file; the write then allocates past the old cut.
    let w = Work::new();
    create(&w, "cut.qcow2", "cluster_size=4096", "64M");
    w.qemu_io("cut.qcow2", &["write -P 3 15000000 600000"]);
    image_case(
        &w,
        "cut.qcow2",
        &[
            "resize:15594496:shrink",
            "write-zeroes:15590400:4096:unmap",
            "write:13022208:32768:P=0x66",
        ],
    );
}

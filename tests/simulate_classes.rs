//! Each class of scenario where the simulator once differed from QEMU, reduced
//! to a fresh `qemu-img create` image, checked operation by operation against
//! real qemu-img/qemu-io on a copy (see `sim_compare`).

mod common;
mod sim_compare;
use common::Work;
use sim_compare::compare;

fn ok(w: &Work, image: &str, ops: &[&str]) -> qinspect::simulate::Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{e}"))
}

fn create(w: &Work, name: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    w.qemu_img(&args);
}

#[test]
fn persistent_bitmaps_move_on_every_read_write_open() {
    let w = Work::new();
    create(&w, "b.qcow2", "", "64M");
    w.qemu_io("b.qcow2", &["write 0 64k"]);
    w.qemu_img(&["bitmap", "--add", "b.qcow2", "b0"]);
    let sim = ok(&w, "b.qcow2", &["write:4194304:65536"]);
    // The figures: clusters 6 and 7 freed, 9..11 taken; the file
    // ends 32 bytes into cluster 11, after the new bitmap directory (QEMU
    // writes it at its own length, and allocating does not grow the file).
    let freed: Vec<u64> = sim.freed.iter().map(|f| f.0).collect();
    assert_eq!(freed, vec![7, 6]);
    let cs = 65536;
    let taken: Vec<u64> = sim.allocated.iter().map(|a| a.0.get() / cs).collect();
    assert_eq!(taken, vec![8, 9, 10, 11]);
    assert_eq!(sim.file_len(), 720928);
    let real = std::fs::metadata(w.path("b.qcow2.qemu")).unwrap().len();
    assert_eq!(real, 720928);
    // A second bitmap, disabled, with a coarser granularity; writes, a
    // discard, a snapshot and a failing write (the bitmaps move even then).
    w.qemu_img(&["bitmap", "--add", "-g", "512k", "b.qcow2", "b1"]);
    w.qemu_img(&["bitmap", "--disable", "b.qcow2", "b1"]);
    ok(
        &w,
        "b.qcow2",
        &[
            "write:1048576:4096",
            "discard:8388608:4096",
            "snapshot-create:s",
            "write:67108864:4096",
            "write:60000000:5000000",
            "snapshot-delete:s",
        ],
    );
}

#[test]
fn snapshot_apply_with_bitmaps_fails_like_qemu_img() {
    let w = Work::new();
    create(&w, "a.qcow2", "", "64M");
    w.qemu_io("a.qcow2", &["write 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "s", "a.qcow2"]);
    w.qemu_img(&["bitmap", "--add", "a.qcow2", "b0"]);
    let sim = ok(
        &w,
        "a.qcow2",
        &["snapshot-apply:s", "snapshot-apply:nosuch"],
    );
    assert_eq!(
        sim.records[0].error.as_deref(),
        Some("Could not apply snapshot 's': Device has active dirty bitmaps")
    );
}

#[test]
fn a_corrupt_image_is_not_opened_read_write() {
    let w = Work::new();
    create(&w, "c.qcow2", "", "16M");
    w.qemu_io("c.qcow2", &["write 0 64k"]);
    // incompatible_features bit 1 (corrupt), at byte 72..80 of the header.
    w.patch("c.qcow2", 79, &[2]);
    let sim = ok(
        &w,
        "c.qcow2",
        &["write:0:4096", "snapshot-create:s", "discard:0:65536"],
    );
    for r in &sim.records {
        let e = r.error.as_deref().unwrap();
        assert!(
            e.ends_with("qcow2: Image is corrupt; cannot be opened read/write"),
            "{e}"
        );
        assert!(
            matches!(r.cause, Some(qinspect::simulate::SimError::Corrupt(_))),
            "{:?}",
            r.cause
        );
        assert!(r.steps.is_empty());
    }
}

#[test]
fn a_refcount_block_needed_mid_allocation_restarts_the_search() {
    let w = Work::new();
    create(&w, "r.qcow2", "cluster_size=512", "1M");
    w.qemu_io("r.qcow2", &["write 1047552 1024"]);
    let sim = ok(&w, "r.qcow2", &["write:786432:262144"]);
    // The block for clusters 512.. is cluster 512 itself; the data run that
    // wanted it continues at 513.
    let blocks: Vec<u64> = sim
        .allocated
        .iter()
        .filter(|a| a.2 == "refcount block")
        .map(|a| a.0.get() / 512)
        .collect();
    assert_eq!(blocks, vec![267, 512]);
    // 4k clusters: a new block every 8 MiB of host file.
    create(&w, "r4.qcow2", "cluster_size=4096", "64M");
    ok(&w, "r4.qcow2", &["write:0:20971520", "write:33554432:4096"]);
    // Compressed data and snapshots around a new block.
    w.qemu_img(&["create", "-q", "-f", "raw", "src.raw", "16M"]);
    w.qemu_io("src.raw", &["write -P 0x61 0 12M"]);
    w.qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "src.raw",
        "z.qcow2",
    ]);
    ok(
        &w,
        "z.qcow2",
        &["snapshot-create:a", "write:0:10485760", "snapshot-delete:a"],
    );
}

#[test]
fn extended_l2_slices_on_a_200g_disk() {
    let w = Work::new();
    create(&w, "x.qcow2", "extended_l2=on", "200G");
    w.qemu_io("x.qcow2", &["write 0 256k", "discard 64k 128k"]);
    let sim = ok(&w, "x.qcow2", &["write:16711680:196608"]);
    let data: Vec<u64> = sim
        .allocated
        .iter()
        .filter(|a| a.2.starts_with("guest data"))
        .map(|a| a.0.get() / 65536)
        .collect();
    assert_eq!(data, vec![6, 7, 9]);
}

#[test]
fn snapshot_of_a_zero_size_disk() {
    let w = Work::new();
    create(&w, "z.qcow2", "", "0");
    let sim = ok(
        &w,
        "z.qcow2",
        &[
            "snapshot-create:a",
            "snapshot-create:b",
            "snapshot-delete:a",
        ],
    );
    let img = sim.image().unwrap();
    assert_eq!(img.snapshots.snapshots[0].l1_table_offset.get(), 0);
}

#[test]
fn snapshot_delete_matches_names_only() {
    let w = Work::new();
    create(&w, "d.qcow2", "", "16M");
    w.qemu_img(&["snapshot", "-c", "first", "d.qcow2"]);
    w.qemu_img(&["snapshot", "-c", "second", "d.qcow2"]);
    let sim = ok(
        &w,
        "d.qcow2",
        &["snapshot-delete:1", "snapshot-delete:second"],
    );
    let e = sim.records[0].error.as_deref().unwrap();
    assert!(
        e.starts_with("Could not delete snapshot '1': snapshot not found"),
        "{e}"
    );
    // The ID form is a separate operation (QMP's blockdev-snapshot-delete-internal-sync):
    // it deletes what `qemu-img snapshot -d first` deletes.
    let img = sim_compare::open_path(&w.path("d.qcow2")).unwrap();
    let mut by_id = qinspect::simulate::Sim::new(&img, &w.path("d.qcow2")).unwrap();
    by_id.apply(&sim_compare::parse_op("snapshot-delete-id:1"));
    assert!(by_id.records[0].error.is_none());
    let mut by_name = qinspect::simulate::Sim::new(&img, &w.path("d.qcow2")).unwrap();
    by_name.apply(&sim_compare::parse_op("snapshot-delete:first"));
    assert_eq!(by_id.refcounts(), by_name.refcounts());
    let left = by_id.image().unwrap();
    assert_eq!(left.snapshots.snapshots.len(), 1);
    assert_eq!(left.snapshots.snapshots[0].name, "second");
}

#[test]
fn requests_past_the_end_fail_whole() {
    let w = Work::new();
    create(&w, "e.qcow2", "", "1M");
    w.qemu_io("e.qcow2", &["write 0 1M"]);
    let sim = ok(
        &w,
        "e.qcow2",
        &[
            "discard:524288:1048576",
            "write:524288:1048576",
            "discard:0:1048576",
        ],
    );
    assert_eq!(
        sim.records[0]
            .error
            .as_deref()
            .map(|e| e.split(" (").next().unwrap()),
        Some("discard failed: Input/output error")
    );
}

#[test]
fn the_comparison_catches_a_difference() {
    let w = Work::new();
    create(&w, "n.qcow2", "", "16M");
    w.qemu_img(&["bitmap", "--add", "n.qcow2", "b0"]);
    let d = |sim: &str, qemu: &str| match sim_compare::compare_with(
        w.dir.path(),
        "n.qcow2",
        &[sim],
        &[qemu],
    ) {
        Ok(_) => panic!("{sim} and {qemu} compared equal"),
        Err(e) => e,
    };
    assert!(d("write:0:4096", "write:2097152:4096").contains("differ"));
    // Same clusters, different bitmap bits.
    assert!(d("write:0:4096", "write:65536:4096").contains("differ"));
    assert!(d("write:0:4096", "write:0:99999999").contains("QEMU failed"));
}

#[test]
fn growing_the_l1_table_and_resizing() {
    let w = Work::new();
    create(&w, "g.qcow2", "", "1G");
    w.qemu_io("g.qcow2", &["write 0 64k", "write 900M 64k"]);
    w.qemu_img(&["snapshot", "-c", "s", "g.qcow2"]);
    // Grow (a new L1), shrink (the tail discarded, L2 freed, file cut), then
    // back to the snapshot's size through snapshot -a.
    ok(
        &w,
        "g.qcow2",
        &[
            "resize:3221225472",
            "write:3000000000:65536",
            "resize:536870912",
            "resize:536870912:shrink",
            "snapshot-apply:s",
            "resize:1000000",
        ],
    );
    // The snapshot's L1 is larger than the shrunk active one... and with bitmaps.
    create(&w, "h.qcow2", "cluster_size=4096", "64M");
    w.qemu_io("h.qcow2", &["write 0 1M", "write 60M 64k"]);
    w.qemu_img(&["snapshot", "-c", "big", "h.qcow2"]);
    w.qemu_img(&["bitmap", "--add", "h.qcow2", "bm"]);
    ok(
        &w,
        "h.qcow2",
        &[
            "resize:1048576:shrink",
            "write:0:4096",
            "resize:2147483648",
            "write:2000000000:4096",
        ],
    );
    create(&w, "v2.qcow2", "compat=0.10", "16M");
    w.qemu_img(&["snapshot", "-c", "s", "v2.qcow2"]);
    ok(&w, "v2.qcow2", &["resize:33554432"]);
}

#[test]
fn growing_the_refcount_table() {
    let w = Work::new();
    // 512-byte clusters, 64-bit refcounts: one table cluster covers 2 MiB.
    create(&w, "t.qcow2", "cluster_size=512,refcount_bits=64", "16M");
    w.qemu_io("t.qcow2", &["write 0 1M"]);
    let sim = ok(
        &w,
        "t.qcow2",
        &[
            "write:1048576:3145728",
            "snapshot-create:s",
            "write:8388608:4194304",
        ],
    );
    assert!(
        sim.records[0]
            .steps
            .iter()
            .any(|c| c.describe().contains("refcount_table_offset"))
    );
    create(&w, "u.qcow2", "cluster_size=4096,refcount_bits=64", "1G");
    ok(
        &w,
        "u.qcow2",
        &[
            "write:0:67108864",
            "discard:0:33554432",
            "write:100000000:40000000",
        ],
    );
}

#[test]
fn repair_previews_what_qemu_img_check_r_changes() {
    let w = Work::new();
    create(&w, "l.qcow2", "", "64M");
    w.qemu_io("l.qcow2", &["write 0 256k"]);
    w.qemu_img(&["snapshot", "-c", "s", "l.qcow2"]);
    w.qemu_io("l.qcow2", &["write 1M 64k"]);
    w.run("cp", &["l.qcow2", "a.qcow2"]);
    // Leaks: a data cluster counted 3 times, a free cluster past the data
    // counted once.
    w.set_refcount("l.qcow2", 5, 3);
    w.set_refcount("l.qcow2", 40, 1);
    // An error and a leak: a shared cluster counted once (COPIED now wrong
    // too), so -r leaks leaves the error and -r all fixes both.
    w.set_refcount("a.qcow2", 6, 1);
    w.set_refcount("a.qcow2", 41, 2);
    let sim = ok(&w, "l.qcow2", &["repair:leaks", "write:0:4096"]);
    assert!(sim.records[0].steps.iter().any(|c| matches!(
        c.target,
        qinspect::simulate::Target::Refcount { cluster: 5 }
    ) && (c.before, c.after) == (3, 2)));
    w.run("cp", &["a.qcow2", "b.qcow2"]);
    ok(
        &w,
        "a.qcow2",
        &["repair:leaks", "repair:all", "write:327680:65536"],
    );
    // The corrupt bit: refused for writes, cleared by a repair that leaves no
    // corruption.
    w.patch("b.qcow2", 79, &[2]);
    ok(
        &w,
        "b.qcow2",
        &["write:0:4096", "repair:all", "write:0:4096"],
    );
}

#[test]
fn a_dirty_lazy_refcounts_image_is_repaired_on_open() {
    let w = Work::new();
    create(&w, "z.qcow2", "lazy_refcounts=on", "64M");
    w.qemu_io("z.qcow2", &["write 0 128k"]);
    // A dirty image whose refcounts are high (leaks) and low (an error):
    // QEMU checks and repairs it on the next read-write open, then writes.
    w.run("cp", &["z.qcow2", "k.qcow2"]);
    w.patch("z.qcow2", 79, &[1]);
    w.set_refcount("z.qcow2", 5, 2);
    w.set_refcount("z.qcow2", 6, 3);
    let sim = ok(&w, "z.qcow2", &["write:1048576:65536", "snapshot-create:s"]);
    assert!(
        sim.records[0]
            .steps
            .iter()
            .any(|c| c.describe().contains("Repairing cluster 5"))
    );
    // Killed after an allocating write: the new cluster's refcount never
    // reached the file, so QEMU rebuilds the refcount structure.
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 3 2M 64k",
            "-c",
            "sigraise 9",
            "k.qcow2",
        ])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let img = sim_compare::open_path(&w.path("k.qcow2")).unwrap();
    assert!(img.header.dirty());
    w.run("cp", &["k.qcow2", "k2.qcow2"]);
    let sim = ok(&w, "k.qcow2", &["write:0:4096", "snapshot-create:s"]);
    assert!(rebuilt(&sim.records[0]), "{:?}", sim.records[0].steps);
    // The same image repaired by `qemu-img check -r all`.
    let sim = ok(&w, "k2.qcow2", &["repair:all", "write:4194304:4096"]);
    assert!(rebuilt(&sim.records[0]), "{:?}", sim.records[0].steps);
}

/// Whether an operation rebuilt the refcount structure.
fn rebuilt(r: &qinspect::simulate::OpRecord) -> bool {
    r.steps.iter().any(|c| {
        matches!(&c.target, qinspect::simulate::Target::Allocate { purpose, .. }
            if purpose == "the rebuilt refcount table")
    })
}

/// Images killed with lazy refcounts on (iotests 039): on the next
/// read-write open QEMU rebuilds the refcount structure, sometimes in new
/// clusters past the end of the file, and with small clusters over several
/// refcount blocks.
#[test]
fn killed_lazy_refcount_images_get_the_full_rebuild() {
    let w = Work::new();
    let kill = |name: &str, ops: &[&str]| {
        let mut args = vec!["-f", "qcow2"];
        for o in ops {
            args.extend(["-c", o]);
        }
        if !ops.contains(&"abort") {
            args.extend(["-c", "sigraise 9"]);
        }
        args.push(name);
        let out = std::process::Command::new("qemu-io")
            .args(&args)
            .current_dir(w.dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            sim_compare::open_path(&w.path(name))
                .unwrap()
                .header
                .dirty()
        );
    };
    create(&w, "a.qcow2", "compat=1.1,lazy_refcounts=on", "4M");
    kill("a.qcow2", &["write -P 0x5a 0 512"]);
    let sim = ok(&w, "a.qcow2", &["snapshot-create:s"]);
    assert!(rebuilt(&sim.records[0]));
    create(&w, "b.qcow2", "lazy_refcounts=on,cluster_size=4k", "4M");
    w.qemu_io("b.qcow2", &["write -P 1 0 1M"]);
    w.qemu_img(&["snapshot", "-c", "s", "b.qcow2"]);
    kill(
        "b.qcow2",
        &[
            "write -P 2 64k 300k",
            "discard 512k 64k",
            "write -P 3 2M 8k",
        ],
    );
    let sim = ok(&w, "b.qcow2", &["snapshot-create:t", "write:0:8192"]);
    assert!(rebuilt(&sim.records[0]));
    // 512-byte clusters with 16-bit refcounts: 256 clusters per refcount
    // block, so the rebuild writes many blocks and a table of several clusters.
    create(&w, "c.qcow2", "lazy_refcounts=on,cluster_size=512", "8M");
    w.qemu_io("c.qcow2", &["write -P 1 0 1M"]);
    kill("c.qcow2", &["write -P 2 2M 1M", "write -P 3 6M 512"]);
    let sim = ok(&w, "c.qcow2", &["write:7340032:4096"]);
    assert!(rebuilt(&sim.records[0]));
    // qemu-io's `abort` after a flush (iotests 061): the data is there, its
    // refcounts are not.
    create(&w, "e.qcow2", "lazy_refcounts=on", "4M");
    kill("e.qcow2", &["write -P 0x2a 0 128k", "flush", "abort"]);
    let sim = ok(&w, "e.qcow2", &["snapshot-create:s"]);
    assert!(rebuilt(&sim.records[0]));
    // 1-bit refcounts.
    create(&w, "d.qcow2", "lazy_refcounts=on,refcount_bits=1", "16M");
    kill("d.qcow2", &["write -P 2 0 3M"]);
    let sim = ok(&w, "d.qcow2", &["discard:0:65536"]);
    assert!(rebuilt(&sim.records[0]));
}

/// An overlay over `image` (or its snapshot) in the simulator, and for real:
/// `qemu-img create -b` over the image (over `qemu-img convert -l SNAPSHOT`
/// of it for a snapshot), then the same operations by qemu-io on the overlay.
fn overlay_matches(w: &Work, image: &str, snapshot: Option<&str>, ops: &[&str]) {
    let before = w.fingerprint(image);
    let base = match snapshot {
        Some(s) => {
            let b = format!("{image}.{s}.base");
            w.qemu_img(&["convert", "-O", "qcow2", "-l", s, image, &b]);
            b
        }
        None => image.to_string(),
    };
    let ov = format!("{image}.{}.ov", snapshot.unwrap_or("active"));
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &ov,
    ]);
    let img = sim_compare::open_path(&w.path(image)).unwrap();
    let sim = qinspect::simulate::Sim::overlay(&img, &w.path(image), snapshot).unwrap();
    let sim = sim_compare::compare_sim(w.dir.path(), sim, &ov, ops, ops)
        .unwrap_or_else(|e| panic!("overlay over {image} {snapshot:?}: {e}"));
    assert_eq!(w.fingerprint(image), before, "the base image changed");
    assert!(sim.overlay_of().is_some());
}

#[test]
fn throw_away_overlays_over_the_image_and_its_snapshots() {
    let w = Work::new();
    create(&w, "vm.qcow2", "", "1G");
    w.qemu_io("vm.qcow2", &["write -P 1 0 1M"]);
    w.qemu_img(&["snapshot", "-c", "s1", "vm.qcow2"]);
    w.qemu_io("vm.qcow2", &["write -P 2 512k 1M"]);
    w.qemu_img(&["snapshot", "-c", "s2", "vm.qcow2"]);
    w.qemu_img(&["resize", "-q", "vm.qcow2", "2G"]);
    w.qemu_img(&["snapshot", "-c", "s3", "vm.qcow2"]);
    let ops = [
        "write:4096:8192",
        "write:1048576:65536",
        "discard:0:65536",
        "write:1500000000:100000",
        "discard:600000000:4096",
    ];
    overlay_matches(&w, "vm.qcow2", None, &ops);
    for s in ["s1", "s2", "s3"] {
        overlay_matches(&w, "vm.qcow2", Some(s), &ops[..4]);
    }
    // One simulation, three overlays over three snapshots of one image.
    let img = sim_compare::open_path(&w.path("vm.qcow2")).unwrap();
    let ops: Vec<_> = [
        "overlay:s1",
        "write:0:4096",
        "overlay:s2",
        "write:0:4096",
        "write:1048576:4096",
        "overlay:s3",
        "write:1500000000:4096",
    ]
    .iter()
    .map(|o| sim_compare::parse_op(o))
    .collect();
    let layers = qinspect::simulate::simulate_layers(&img, &w.path("vm.qcow2"), &ops).unwrap();
    assert_eq!(layers.len(), 4);
    let allocated: Vec<usize> = layers.iter().map(|l| l.allocated.len()).collect();
    // Each overlay: a new L2 table and one data cluster per write.
    assert_eq!(allocated, vec![0, 2, 3, 2]);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let w = Work::new();
    create(&w, "z.qcow2", "", "64M");
    w.qemu_io("z.qcow2", &["write -P 1 0 1M"]);
    w.qemu_img(&["snapshot", "-c", "s", "z.qcow2"]);
    ok(
        &w,
        "z.qcow2",
        &[
            "write-zeroes:0:131072",
            "write-zeroes:131072:131072:unmap",
            "write-zeroes:300000:70000",
            "write-zeroes:2097152:100000",
            "write-zeroes:4194304:4096:unmap",
            "snapshot-delete:s",
            "write-zeroes:0:1048576:unmap",
        ],
    );
    create(&w, "v2.qcow2", "compat=0.10", "16M");
    w.qemu_io("v2.qcow2", &["write -P 1 0 1M"]);
    ok(
        &w,
        "v2.qcow2",
        &["write-zeroes:0:131072", "write-zeroes:200000:1000"],
    );
}

#[test]
fn trace_through_an_overlay_matches_qemu_img_map() {
    let w = Work::new();
    create(&w, "vm.qcow2", "", "64M");
    w.qemu_io("vm.qcow2", &["write -P 1 0 1M"]);
    w.qemu_img(&["snapshot", "-c", "s1", "vm.qcow2"]);
    w.qemu_io("vm.qcow2", &["write -P 2 2M 64k"]);
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "vm.qcow2", "-F", "qcow2", "ov.qcow2",
    ]);
    w.qemu_io("ov.qcow2", &["write -P 3 0 4k"]);
    let img = sim_compare::open_path(&w.path("vm.qcow2")).unwrap();
    let ops: Vec<_> = [
        "overlay",
        "write:0:4096",
        "trace:4096",
        "trace:524288",
        "trace:2097152",
        "trace:8388608",
        "overlay:s1",
        "trace:2097152",
        "trace:524288",
    ]
    .iter()
    .map(|o| sim_compare::parse_op(o))
    .collect();
    let layers = qinspect::simulate::simulate_layers(&img, &w.path("vm.qcow2"), &ops).unwrap();
    let notes = |l: usize, r: usize| -> String {
        layers[l].records[r]
            .steps
            .iter()
            .map(|c| c.describe())
            .collect::<Vec<_>>()
            .join(" / ")
    };
    // qemu-img map of the real overlay: depth 0 in the overlay, 1 in the image.
    let out = w.qemu_img(&["map", "--output=json", "ov.qcow2"]);
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let at = |g: u64| -> (u64, Option<u64>) {
        let e = map
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap();
                s <= g && g < s + e["length"].as_u64().unwrap()
            })
            .unwrap();
        let off = e["offset"]
            .as_u64()
            .map(|o| o + g - e["start"].as_u64().unwrap());
        (e["depth"].as_u64().unwrap(), off)
    };
    for (r, g) in [(1usize, 4096u64), (2, 524288), (3, 2097152)] {
        let n = notes(1, r);
        let (depth, off) = at(g);
        let off = off.unwrap();
        let layer = if depth == 0 {
            "the overlay"
        } else {
            "vm.qcow2"
        };
        assert!(
            n.contains(&format!("data at host {off:#x} of")) && n.contains(layer),
            "guest {g:#x}: qemu-img map says depth {depth} offset {off:#x}; the trace: {n}"
        );
    }
    assert!(notes(1, 4).contains("reads as zeros"), "{}", notes(1, 4));
    // Over the snapshot: 2M was written after it, so it is not there.
    assert!(notes(2, 0).contains("snapshot 's1'") && notes(2, 0).contains("zeros"));
    assert!(notes(2, 1).contains("snapshot 's1'") && notes(2, 1).contains("data at host"));
}

/// QEMU's metadata overlap check: a write that would land on metadata is not
/// made, the image is marked corrupt and the operation fails. Each image is
/// broken as the wild corpus breaks it; the real qemu-img runs on a copy.
#[test]
fn writes_onto_metadata_are_stopped_by_the_overlap_check() {
    let w = Work::new();
    let be = |v: u64, n: usize| v.to_be_bytes()[8 - n..].to_vec();
    let snapshot_table = |name: &str| {
        let img = sim_compare::open_path(&w.path(name)).unwrap();
        img.header.snapshots_offset.get()
    };
    // The active L1's first entry names the L1 table itself as its L2 table.
    create(&w, "l1.qcow2", "", "4M");
    w.qemu_io("l1.qcow2", &["write -P 0x11 0 64k"]);
    w.patch("l1.qcow2", 0x30000, &be(0x8000000000030000, 8));
    // A snapshot whose L1 table is said to hold 2^28 entries.
    create(&w, "sl1.qcow2", "", "4M");
    w.qemu_io("sl1.qcow2", &["write 0 512"]);
    w.qemu_img(&["snapshot", "-c", "test", "sl1.qcow2"]);
    let at = snapshot_table("sl1.qcow2");
    w.patch("sl1.qcow2", at + 8, &be(0x1000_0000, 4));
    // A snapshot whose ID is said to be 65535 bytes long: the table grows
    // over the clusters after it.
    create(&w, "sid.qcow2", "", "4M");
    w.qemu_io("sid.qcow2", &["write 0 512"]);
    w.qemu_img(&["snapshot", "-c", "test", "sid.qcow2"]);
    let at = snapshot_table("sid.qcow2");
    w.patch("sid.qcow2", at + 12, &be(0xffff, 2));
    for (name, what) in [
        ("l1.qcow2", "active L1 table"),
        ("sl1.qcow2", "inactive L1 table"),
        ("sid.qcow2", "snapshot table"),
    ] {
        let copy = format!("{name}.copy");
        w.run("cp", &[name, &copy]);
        let q = std::process::Command::new("qemu-img")
            .args(["snapshot", "-c", "new", &copy])
            .current_dir(w.dir.path())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&q.stderr).to_string();
        assert!(!q.status.success(), "{name}: {said}");
        assert!(
            said.contains(&format!("overlaps with {what}")),
            "{name}: {said}"
        );
        let real = sim_compare::open_path(&w.path(&copy)).unwrap();
        assert!(real.header.corrupt(), "{name}");
        let img = sim_compare::open_path(&w.path(name)).unwrap();
        let sim = qinspect::simulate::simulate(
            &img,
            &w.path(name),
            &[sim_compare::parse_op("snapshot-create:new")],
        )
        .unwrap();
        let r = &sim.records[0];
        let e = r.error.as_deref().unwrap_or_default();
        assert!(
            e.starts_with("Could not create snapshot 'new': Input/output error")
                && e.contains(&format!("overlaps with {what}")),
            "{name}: {e}"
        );
        assert!(matches!(
            r.cause,
            Some(qinspect::simulate::SimError::Qemu(_))
        ));
        assert!(sim.image().unwrap().header.corrupt(), "{name}");
        // A later operation is refused as QEMU refuses it.
        let mut sim = sim;
        sim.apply(&sim_compare::parse_op("write:0:512"));
        assert!(matches!(
            sim.records[1].cause,
            Some(qinspect::simulate::SimError::Corrupt(_))
        ));
    }
}

/// `write -c` (qemu-io's pattern): where QEMU puts compressed clusters, for
/// every cluster size, after other compressed clusters, over zero clusters,
/// into a snapshot's shared L2 table, at the end of a disk that ends inside a
/// cluster, and the requests QEMU refuses.
#[test]
fn compressed_writes_are_placed_as_qemu_places_them() {
    let w = Work::new();
    for (i, cs) in ["512", "4k", "64k", "2M"].iter().enumerate() {
        let name = format!("c{i}.qcow2");
        create(&w, &name, &format!("cluster_size={cs}"), "16M");
        let c: u64 = match *cs {
            "512" => 512,
            "4k" => 4096,
            "64k" => 65536,
            _ => 2 << 20,
        };
        let ops = [
            format!("write-compressed:0:{c}"),
            format!("write-compressed:{}:{c}", 4 * c),
            format!("write:{}:{}", 2 * c, c),
            format!("write-compressed:{}:{c}", 3 * c),
            // Clusters of one request are packed in the order QEMU's
            // compression threads finish, which varies from run to run: one
            // cluster per request here.
            format!("write-compressed:{}:{c}", 5 * c),
            format!("write-compressed:{}:{c}", 6 * c),
            // Over an allocated cluster: EIO, nothing changes.
            format!("write-compressed:{}:{c}", 2 * c),
        ];
        let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
        ok(&w, &name, &ops);
    }
    create(&w, "z.qcow2", "", "16M");
    w.qemu_io("z.qcow2", &["write -z 0 1M", "write -c 1M 64k"]);
    w.qemu_img(&["snapshot", "-c", "s", "z.qcow2"]);
    let sim = ok(
        &w,
        "z.qcow2",
        &["write-compressed:0:65536", "write-compressed:2097152:65536"],
    );
    assert!(sim.records.iter().all(|r| r.error.is_none()));
    // A disk ending inside a cluster: the last one is padded with zeros.
    create(&w, "e.qcow2", "", "1000000");
    ok(
        &w,
        "e.qcow2",
        &[
            "write-compressed:983040:16960",
            "write-compressed:4096:65536",
        ],
    );
    let sim = ok(&w, "e.qcow2", &["write-compressed:65536:4096"]);
    assert!(
        sim.records[0]
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("write failed: Invalid argument")),
        "{:?}",
        sim.records[0].error
    );
}

#[test]
fn copy_on_read_over_a_backing_file_and_without_one() {
    let w = Work::new();
    create(&w, "b.qcow2", "", "8M");
    w.qemu_io(
        "b.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -z 128k 64k",
            "write -P 0x22 256k 32k",
            "write -P 0x33 2M 64k",
            "write -P 0 3M 64k",
        ],
    );
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2",
    ]);
    w.qemu_io("t.qcow2", &["write -P 0x44 2M 4k"]);
    let sim = ok(
        &w,
        "t.qcow2",
        &[
            // Data, a zero cluster and nothing below, in one run: written as data.
            "read:1000:500000",
            // Nothing below: zero clusters.
            "read:1048576:131072",
            // Already allocated here (by the copy): nothing.
            "read:0:65536",
            // Allocated here, then data below.
            "read:2097152:131072",
            // Data clusters of zeros below: zero clusters.
            "read:3145728:65536",
            "write:4194304:4096",
            "read:4194304:200000",
            // The disk's last byte.
            "read:8388607:1",
        ],
    );
    assert!(
        sim.records[0]
            .steps
            .iter()
            .any(|c| c.reason.starts_with("copy-on-read: ")),
        "the first read copies clusters"
    );
    assert!(
        sim.records[2]
            .steps
            .iter()
            .all(|c| c.reason.ends_with("nothing to copy")),
        "{:?}",
        sim.records[2].steps
    );
    // A read past the end fails and changes nothing, as in QEMU.
    ok(&w, "t.qcow2", &["read:8388000:1000"]);
    // 512-byte clusters: the run is cut at each L2 table (64 clusters).
    create(&w, "sb.qcow2", "cluster_size=512", "1M");
    w.qemu_io("sb.qcow2", &["write -P 1 0 40k", "write -P 0 96k 8k"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-b",
        "sb.qcow2",
        "-F",
        "qcow2",
        "st.qcow2",
    ]);
    ok(&w, "st.qcow2", &["read:0:262144", "read:300000:100000"]);
    // Extended L2: widened to subclusters, runs of one subcluster kind.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "x.qcow2",
    ]);
    ok(
        &w,
        "x.qcow2",
        &[
            "read:1000:100000",
            "read:2100000:4096",
            "read:2097152:65536",
            "read:262144:4096",
        ],
    );
    // compat 0.10 has no zero clusters: the all-zero runs are written as data.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "v2.qcow2",
    ]);
    ok(&w, "v2.qcow2", &["read:0:524288", "read:1048576:65536"]);
    // Without a backing file QEMU still copies: the unallocated clusters read
    // as zeros and become zero clusters; data clusters stay as they are.
    create(&w, "n.qcow2", "", "4M");
    w.qemu_io("n.qcow2", &["write -P 5 64k 64k"]);
    ok(&w, "n.qcow2", &["read:0:524288", "read:0:4194304"]);
    // The copies do not dirty persistent bitmaps (they go to the driver
    // directly); the bitmaps are still stored again on close.
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "bm.qcow2",
    ]);
    w.qemu_img(&["bitmap", "--add", "bm.qcow2", "d"]);
    ok(&w, "bm.qcow2", &["read:0:524288", "write:4194304:4096"]);
}

#[test]
fn copy_on_read_in_throw_away_overlays() {
    let w = Work::new();
    create(&w, "vm.qcow2", "", "64M");
    w.qemu_io("vm.qcow2", &["write -P 1 0 1M"]);
    w.qemu_img(&["snapshot", "-c", "s1", "vm.qcow2"]);
    w.qemu_io("vm.qcow2", &["write -P 2 512k 1M", "write -z 4M 64k"]);
    w.qemu_img(&["snapshot", "-c", "s2", "vm.qcow2"]);
    let ops = [
        "read:0:131072",
        "write:262144:4096",
        "read:200000:200000",
        "read:1048576:1048576",
        "read:4194304:65536",
        "read:8388608:65536",
    ];
    overlay_matches(&w, "vm.qcow2", None, &ops);
    for s in ["s1", "s2"] {
        overlay_matches(&w, "vm.qcow2", Some(s), &ops);
    }
}

/// Whether operation `i` of `sim` fell back to a plain write of zeros.
fn fell_back(sim: &qinspect::simulate::Sim, i: usize) -> bool {
    sim.records[i]
        .steps
        .iter()
        .any(|c| c.reason.contains("(ENOTSUP fallback)"))
}

#[test]
fn partial_write_zeroes_ask_the_backing_chain() {
    let w = Work::new();
    // A chain of three: the bottom 4 MiB long, the middle one 8 MiB with a
    // zero cluster, the top 16 MiB.
    create(&w, "bottom.qcow2", "", "4M");
    w.qemu_io("bottom.qcow2", &["write -P 1 0 64k", "write -P 0 1M 64k"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "bottom.qcow2",
        "-F",
        "qcow2",
        "mid.qcow2",
        "8M",
    ]);
    w.qemu_io("mid.qcow2", &["write -z 192k 64k", "write -P 2 2M 64k"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "16M",
    ]);
    w.qemu_io("top.qcow2", &["write -P 3 3M 64k"]);
    let ops = [
        // Data two layers down (cluster 0): QEMU writes zeros.
        "write-zeroes:4096:8192",
        // Nothing anywhere below cluster 1: a zero cluster.
        "write-zeroes:70000:1000:unmap",
        // A zero cluster in the middle layer: a zero cluster.
        "write-zeroes:200000:4096",
        // Data of zeros at the bottom still counts as data.
        "write-zeroes:1052672:4096",
        // Data in the middle layer.
        "write-zeroes:2101248:512",
        // Past the end of the bottom layer, unallocated in the middle.
        "write-zeroes:5242880:512",
        // Data in this layer: written in place.
        "write-zeroes:3149824:512",
        // Head and tail of one request, around whole clusters.
        "write-zeroes:260000:400000",
        // The last bytes of the disk, below nothing but the top.
        "write-zeroes:16776704:512",
    ];
    let sim = ok(&w, "top.qcow2", &ops);
    let fallbacks: Vec<bool> = (0..ops.len()).map(|i| fell_back(&sim, i)).collect();
    assert_eq!(
        fallbacks,
        [true, false, false, true, true, false, true, false, false]
    );
    // compat=0.10 over a backing file has no zero clusters at all.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "v2.qcow2",
        "8M",
    ]);
    let sim = ok(
        &w,
        "v2.qcow2",
        &["write-zeroes:70000:1000", "write-zeroes:0:131072"],
    );
    assert!(fell_back(&sim, 0) && fell_back(&sim, 1));
    // The fallback writes one 16 MiB bounce buffer at a time: the compressed
    // cluster the first one replaces is free again for the second.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "v2c.qcow2",
        "32M",
    ]);
    w.qemu_io("v2c.qcow2", &["write -c -P 7 0 64k"]);
    let sim = ok(&w, "v2c.qcow2", &["write-zeroes:0:16842752"]);
    // The second buffer, one cluster, goes where the compressed cluster was.
    assert!(
        sim.allocated.last().is_some_and(|a| a.0.get() == 0x50000),
        "{:?}",
        sim.allocated
    );
    // A throw-away overlay asks the image under it (and a snapshot of it).
    w.qemu_img(&["snapshot", "-c", "s", "mid.qcow2"]);
    w.qemu_io("mid.qcow2", &["write -P 4 128k 64k"]);
    overlay_matches(
        &w,
        "mid.qcow2",
        None,
        &["write-zeroes:135168:512", "write-zeroes:200000:512"],
    );
}

#[test]
fn write_zeroes_with_extended_l2_entries() {
    let w = Work::new();
    // 64 KiB clusters of 32 subclusters of 2 KiB.
    create(&w, "x.qcow2", "extended_l2=on", "16M");
    w.qemu_io(
        "x.qcow2",
        &[
            "write -P 1 0 128k",
            "write -P 2 1M 6k",
            "write -c 2M 64k",
            "write -c 3M 64k",
        ],
    );
    w.qemu_img(&["snapshot", "-c", "s", "x.qcow2"]);
    let ops = [
        // Whole subclusters of a data cluster: their zero bits.
        "write-zeroes:4096:8192",
        // Part of a subcluster of data: zeros written.
        "write-zeroes:20000:100",
        // Part of an unallocated subcluster next to data: a zero subcluster.
        "write-zeroes:1054720:100",
        // Subclusters around whole clusters, with unmap.
        "write-zeroes:55296:151552:unmap",
        // Part of a compressed cluster: ENOTSUP, written as data.
        "write-zeroes:2101248:4096",
        // A whole compressed cluster is released.
        "write-zeroes:3145728:65536",
        // Nothing there yet: zero bits in a new L2 entry.
        "write-zeroes:8388608:6144",
        "write-zeroes:16775168:2048:unmap",
    ];
    let sim = ok(&w, "x.qcow2", &ops);
    let fallbacks: Vec<bool> = (0..ops.len()).map(|i| fell_back(&sim, i)).collect();
    assert_eq!(
        fallbacks,
        [false, true, false, false, true, false, false, false]
    );
    // Over a backing file with extended L2 entries of its own, and a disk
    // whose end is not a subcluster boundary.
    create(&w, "xb.qcow2", "extended_l2=on,cluster_size=16k", "4M");
    w.qemu_io("xb.qcow2", &["write -P 5 0 1k", "write -P 6 8k 512"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "xb.qcow2",
        "-F",
        "qcow2",
        "xt.qcow2",
        "5243392",
    ]);
    let ops = [
        "write-zeroes:512:512",
        "write-zeroes:4096:512",
        "write-zeroes:8704:512",
        "write-zeroes:5242880:512",
        // Copy-on-read of subclusters that read as zeros below: zero bits.
        "read:16384:8192",
    ];
    let sim = ok(&w, "xt.qcow2", &ops);
    let fallbacks: Vec<bool> = (0..ops.len()).map(|i| fell_back(&sim, i)).collect();
    assert_eq!(fallbacks, [true, false, true, false, false]);
}

#[test]
fn growing_over_a_longer_backing_file_zeroes_the_new_area() {
    let w = Work::new();
    create(&w, "base.qcow2", "", "4M");
    w.qemu_io("base.qcow2", &["write -P 9 0 4M"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "t.qcow2",
    ]);
    w.qemu_io("t.qcow2", &["write -P 1 0 64k"]);
    ok(
        &w,
        "t.qcow2",
        &[
            // Cluster-aligned: zero clusters over the new area.
            "resize:1048576:shrink",
            "resize:2097152",
            // Unaligned: zeros written over the rest of the old last
            // cluster, zero clusters past it, up to past the backing file.
            "resize:532480:shrink",
            "resize:8388608",
            // Old and new end in one cluster: only zeros written.
            "resize:532480:shrink",
            "resize:580608",
        ],
    );
    // Extended L2: the new area from the next subcluster boundary.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "x.qcow2",
    ]);
    ok(
        &w,
        "x.qcow2",
        &[
            "resize:1000448:shrink",
            "resize:3145728",
            "write:1000000:4096",
        ],
    );
    // compat=0.10 has no zero clusters: the resize fails, the size unchanged.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10,cluster_size=512",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "v2.qcow2",
    ]);
    let sim = ok(&w, "v2.qcow2", &["resize:1048576:shrink", "resize:4194304"]);
    assert!(
        sim.records[1]
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("Failed to zero out new clusters")),
        "{:?}",
        sim.records[1].error
    );
}

#[test]
fn write_zeroes_with_an_external_data_file() {
    let w = Work::new();
    for (name, opts) in [
        ("df.qcow2", "data_file=df.raw"),
        ("dfr.qcow2", "data_file=dfr.raw,data_file_raw=on"),
        ("dfx.qcow2", "data_file=dfx.raw,extended_l2=on"),
    ] {
        create(&w, name, opts, "4M");
        w.qemu_io(name, &["write -P 1 0 128k", "write -P 2 1M 4k"]);
        let sim = ok(
            &w,
            name,
            &[
                // Guest cluster 0 is host offset 0 of the data file.
                "write-zeroes:0:65536",
                "write-zeroes:65536:65536:unmap",
                "write-zeroes:1052672:4096",
                "write-zeroes:1048576:512",
                "write-zeroes:2097152:100000:unmap",
                "write:0:4096",
            ],
        );
        assert!(sim.records.iter().all(|r| r.error.is_none()), "{name}");
    }
}

#[test]
fn partial_write_zeroes_over_a_raw_file_ask_its_holes() {
    use std::os::unix::fs::FileExt;
    let w = Work::new();
    // A sparse raw file: zeros written at 0..64k (allocated: data to QEMU),
    // a hole at 64k..1M, 0x11 at 1M..1M+64k, a hole to its end at 4M.
    let f = std::fs::File::create(w.path("base.raw")).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[0u8; 65536], 0).unwrap();
    f.write_all_at(&[0x11u8; 65536], 1 << 20).unwrap();
    drop(f);
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2", "8M",
    ]);
    let ops = [
        // Allocated zeros in the raw file: data, so QEMU writes zeros.
        "write-zeroes:4096:4096",
        // A hole: a zero cluster.
        "write-zeroes:70000:1000",
        // Data.
        "write-zeroes:1052672:512",
        // A hole up to the raw file's end, then past it.
        "write-zeroes:4132864:4096",
        "write-zeroes:6291456:512",
    ];
    let sim = ok(&w, "ov.qcow2", &ops);
    let fallbacks: Vec<bool> = (0..ops.len()).map(|i| fell_back(&sim, i)).collect();
    assert_eq!(fallbacks, [true, false, true, false, false]);
}

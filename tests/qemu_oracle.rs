//! qinspect against QEMU: images built at test time with qemu-img and qemu-io, then
//! `info --json`, `map --json` and `read` compared with `qemu-img info`, `qemu-img
//! map` and `qemu-img convert -O raw`.

mod common;
use common::Work;

/// A qcow2 image with data, zeros (allocated and not) and a discard.
fn mixed_image(w: &Work, name: &str, opts: &str, size: &str) {
    w.qemu_img(&["create", "-f", "qcow2", "-o", opts, name, size]);
    w.qemu_io(
        name,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 100k 20k",
            "write -P 0x11 1M 192k",
            "write -z 2M 64k",
            "write -z -u 1088k 64k",
            "discard 1152k 64k",
            "write -P 0x77 3000k 1k",
        ],
    );
}

#[test]
fn cluster_sizes_512_64k_2m() {
    let w = Work::new();
    for (name, cs) in [
        ("c512.qcow2", "512"),
        ("c64k.qcow2", "64k"),
        ("c2m.qcow2", "2M"),
    ] {
        mixed_image(&w, name, &format!("cluster_size={cs}"), "8M");
        w.assert_all_match(name);
    }
}

#[test]
fn compat_010_and_11() {
    let w = Work::new();
    mixed_image(&w, "v2.qcow2", "compat=0.10", "4M");
    w.assert_all_match("v2.qcow2");
    mixed_image(&w, "v3.qcow2", "compat=1.1", "4M");
    w.assert_all_match("v3.qcow2");
}

#[test]
fn raw_qcow2_qcow2_chain_with_larger_top() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "raw", "base.raw", "2M"]);
    w.qemu_io(
        "base.raw",
        &["write -P 0x11 0 1M", "write -P 0x12 1536k 4k"],
    );
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
        "4M",
    ]);
    w.qemu_io(
        "mid.qcow2",
        &[
            "write -P 0x22 64k 64k",
            "write -z 256k 64k",
            "write -P 0x33 3M 4k",
            "discard 512k 64k",
        ],
    );
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "6M",
    ]);
    w.qemu_io(
        "top.qcow2",
        &[
            "write -P 0x44 128k 4k",
            "discard 64k 64k",
            "write -z -u 512k 64k",
            "write -P 0x55 5M 64k",
        ],
    );
    for img in ["base.raw", "mid.qcow2", "top.qcow2"] {
        w.assert_all_match(img);
    }
    // The trace of an offset past the raw base says so.
    let t = Work::json(&w.qinspect_ok(&["trace", "top.qcow2", "0x200000", "--json"]));
    let steps = t["steps"].as_array().unwrap();
    assert_eq!(steps.last().unwrap()["step"], "past_end");
    assert_eq!(steps.last().unwrap()["depth"], 2);
}

#[test]
fn zero_writes_and_discards() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "z.qcow2", "4M"]);
    w.qemu_io(
        "z.qcow2",
        &[
            "write -P 0x01 0 1M",
            "write -z 64k 64k",
            "write -z -u 192k 128k",
            "discard 512k 128k",
            "write -z 2M 1M",
        ],
    );
    w.assert_all_match("z.qcow2");
    // A zero cluster with a backing file hides the backing data.
    w.qemu_img(&[
        "create", "-f", "qcow2", "-b", "z.qcow2", "-F", "qcow2", "o.qcow2",
    ]);
    w.qemu_io("o.qcow2", &["write -z 0 64k", "discard 128k 64k"]);
    w.assert_all_match("o.qcow2");
}

#[test]
fn compressed_deflate_and_zstd() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "raw", "src.raw", "2M"]);
    w.qemu_io(
        "src.raw",
        &["write -P 0x61 0 300k", "write -P 0x62 1M 100k"],
    );
    // Random-ish data that does not compress: stored uncompressed by convert -c.
    std::fs::write(
        w.path("noise.bin"),
        (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    w.run(
        "dd",
        &[
            "if=noise.bin",
            "of=src.raw",
            "bs=64k",
            "seek=20",
            "conv=notrunc",
            "status=none",
        ],
    );
    for (name, extra) in [
        ("deflate.qcow2", "cluster_size=4096"),
        ("zstd.qcow2", "cluster_size=4096,compression_type=zstd"),
        ("deflate64k.qcow2", "cluster_size=65536"),
        ("zstd64k.qcow2", "compression_type=zstd"),
    ] {
        w.qemu_img(&["convert", "-c", "-O", "qcow2", "-o", extra, "src.raw", name]);
        w.assert_all_match(name);
    }
    // A compressed cluster partly overwritten.
    w.qemu_io("deflate64k.qcow2", &["write -P 0x99 4k 4k"]);
    w.assert_all_match("deflate64k.qcow2");
}

#[test]
fn extended_l2_alone_and_over_backing() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "e.qcow2",
        "4M",
    ]);
    w.qemu_io(
        "e.qcow2",
        &[
            "write -P 0x11 4k 2k",
            "write -P 0x12 70k 10k",
            "write -z 200k 8k",
            "write -z -u 256k 64k",
            "discard 72k 2k",
        ],
    );
    w.assert_all_match("e.qcow2");
    w.qemu_img(&["create", "-f", "raw", "eb.raw", "4M"]);
    w.qemu_io("eb.raw", &["write -P 0xee 0 4M"]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "-b",
        "eb.raw",
        "-F",
        "raw",
        "eo.qcow2",
    ]);
    w.qemu_io(
        "eo.qcow2",
        &[
            "write -P 0x21 4k 2k",
            "write -z 64k 8k",
            "write -P 0x22 1M 100k",
            "discard 1040k 8k",
        ],
    );
    w.assert_all_match("eo.qcow2");
    // Trace names the subcluster.
    let t = Work::json(&w.qinspect_ok(&["trace", "eo.qcow2", "4k", "--json"]));
    assert_eq!(t["steps"][0]["subcluster"], 1);
}

#[test]
fn refcount_widths() {
    let w = Work::new();
    for bits in ["1", "4", "16", "64"] {
        let name = format!("r{bits}.qcow2");
        mixed_image(&w, &name, &format!("refcount_bits={bits}"), "4M");
        w.assert_all_match(&name);
    }
}

#[test]
fn many_snapshots_some_deleted_one_applied() {
    let w = Work::new();
    let img = "snaps.qcow2";
    w.qemu_img(&["create", "-f", "qcow2", img, "8M"]);
    for i in 0..24u32 {
        let cmd = format!("write -P {} {}k 64k", i + 1, (i % 10) * 256 + i * 4);
        w.qemu_io(img, &[&cmd]);
        w.qemu_img(&["snapshot", "-c", &format!("s{i}"), img]);
    }
    for i in [3, 10, 11, 20] {
        w.qemu_img(&["snapshot", "-d", &format!("s{i}"), img]);
    }
    w.qemu_img(&["snapshot", "-a", "s7", img]);
    w.qemu_io(img, &["write -P 0xfe 4M 128k"]);
    w.assert_all_match(img);
    for s in ["s0", "s7", "s12", "s23", "2"] {
        w.assert_read_matches(img, Some(s));
    }
    // Snapshot list equals qemu-img's, field for field.
    let info = Work::json(&w.qinspect_ok(&["info", "--json", img]));
    assert_eq!(info["snapshots"].as_array().unwrap().len(), 20);
}

#[test]
fn external_data_file() {
    let w = Work::new();
    for (name, opts) in [
        ("df.qcow2", "data_file=df.raw"),
        ("dfr.qcow2", "data_file=dfr.raw,data_file_raw=on"),
    ] {
        w.qemu_img(&["create", "-f", "qcow2", "-o", opts, name, "4M"]);
        w.qemu_io(
            name,
            &[
                "write -P 0x42 64k 128k",
                "write -z 1M 64k",
                "write -P 0x43 3M 4k",
            ],
        );
        w.assert_all_match(name);
    }
}

#[test]
fn persistent_bitmaps() {
    let w = Work::new();
    mixed_image(&w, "bm.qcow2", "cluster_size=64k", "4M");
    w.qemu_img(&["bitmap", "--add", "bm.qcow2", "b0"]);
    w.qemu_img(&["bitmap", "--add", "--granularity", "512k", "bm.qcow2", "b1"]);
    w.qemu_img(&["bitmap", "--add", "--disable", "bm.qcow2", "b2"]);
    w.assert_all_match("bm.qcow2");
    let d = Work::json(&w.qinspect_ok(&["dump", "bitmaps", "bm.qcow2", "--json"]));
    assert_eq!(d["entries"].as_array().unwrap().len(), 3);
}

#[test]
fn preallocation_metadata() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "pm.qcow2",
        "64M",
    ]);
    w.qemu_io("pm.qcow2", &["write -P 0x33 1M 64k", "write -z 2M 64k"]);
    w.assert_all_match("pm.qcow2");
}

#[test]
fn middle_layer_shorter_than_its_backing() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "raw", "b.raw", "4M"]);
    w.qemu_io("b.raw", &["write -P 9 0 4M"]);
    w.qemu_img(&[
        "create", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "m.qcow2", "1M",
    ]);
    w.qemu_img(&[
        "create", "-f", "qcow2", "-b", "m.qcow2", "-F", "qcow2", "t.qcow2", "8M",
    ]);
    w.qemu_io("t.qcow2", &["write -P 1 512k 64k"]);
    w.assert_all_match("t.qcow2");
}

#[test]
fn raw_sizes_that_are_not_sector_multiples() {
    let w = Work::new();
    std::fs::write(w.path("b1000.raw"), vec![0x5au8; 1000]).unwrap();
    std::fs::write(w.path("a5000.raw"), vec![0xa5u8; 5000]).unwrap();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "b1000.raw",
        "-F",
        "raw",
        "t.qcow2",
        "64k",
    ]);
    for img in ["t.qcow2", "a5000.raw"] {
        w.assert_map_matches(img);
        w.assert_read_matches(img, None);
    }
    // An empty image maps to one zero-length extent.
    w.qemu_img(&["create", "-f", "qcow2", "e.qcow2", "0"]);
    w.assert_all_match("e.qcow2");
}

#[test]
fn map_start_offset_and_max_length() {
    let w = Work::new();
    mixed_image(&w, "m.qcow2", "cluster_size=4k", "4M");
    for (s, l) in [
        ("1000", "100"),
        ("65536", "1048576"),
        ("100000", "5000000"),
        ("5000000", "10"),
    ] {
        let q = w
            .qemu_img(&["map", "--output=json", "-s", s, "-l", l, "m.qcow2"])
            .stdout;
        let ours = w.qinspect_ok(&[
            "map",
            "--json",
            "--start-offset",
            s,
            "--max-length",
            l,
            "m.qcow2",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&q),
            "-s {s} -l {l}"
        );
    }
}

#[test]
fn preallocated_image_with_host_holes_and_truncation() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "p.qcow2",
        "32M",
    ]);
    w.qemu_io("p.qcow2", &["write -P 0x44 0 1M", "write -P 0x45 20M 64k"]);
    w.assert_all_match("p.qcow2");
    // Cut the file inside the data area: QEMU sees zeros past the new end.
    let len = std::fs::metadata(w.path("p.qcow2")).unwrap().len();
    w.run(
        "truncate",
        &["-s", &(len - 5 * 65536 - 1000).to_string(), "p.qcow2"],
    );
    w.assert_map_matches("p.qcow2");
    w.assert_read_matches("p.qcow2", None);
}

#[test]
fn map_through_a_snapshot_matches_the_applied_snapshot() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "s.qcow2", "4M"]);
    w.qemu_io("s.qcow2", &["write -P 1 0 128k", "write -z 1M 64k"]);
    w.qemu_img(&["snapshot", "-c", "one", "s.qcow2"]);
    w.qemu_io(
        "s.qcow2",
        &["write -P 2 64k 128k", "discard 1M 64k", "write -P 3 3M 4k"],
    );
    w.qemu_img(&["snapshot", "-c", "two", "s.qcow2"]);
    w.qemu_io("s.qcow2", &["write -P 4 0 4k"]);
    // Both sides read files with the same holes: whether QEMU left the unwritten
    // tail of a new cluster as a hole or wrote its zeros can vary between runs,
    // and qemu-img map reports a data cluster's hole as zeros. `cp --sparse=always`
    // makes every run of zero blocks a hole, in this file and in each copy alike.
    w.run("cp", &["--sparse=always", "s.qcow2", "sparse.qcow2"]);
    w.run("mv", &["sparse.qcow2", "s.qcow2"]);
    for snap in ["one", "two"] {
        // The exact oracle: apply the snapshot to a copy and map the copy.
        let copy = format!("applied-{snap}.qcow2");
        w.run("cp", &["--sparse=always", "s.qcow2", &copy]);
        w.qemu_img(&["snapshot", "-a", snap, &copy]);
        let q = Work::json(&w.qemu_img(&["map", "--output=json", &copy]).stdout);
        let ours = Work::json(&w.qinspect_ok(&["map", "--json", "--snapshot", snap, "s.qcow2"]));
        assert_eq!(ours, q, "snapshot {snap}");
        w.assert_read_matches("s.qcow2", Some(snap));
    }
}

/// `map::decide`, the answer `trace` gives for one byte, is the answer of the extent
/// `map` puts that byte in: checked at the first, a middle and the last byte of every
/// extent of images with data, zeros, discards, compressed clusters, extended L2
/// over a raw backing file, a backing chain and a preallocated image with holes.
#[test]
fn decide_agrees_with_map_on_every_extent() {
    use qinspect::chain::{Chain, OpenOptions};
    use qinspect::image::Strictness;
    use qinspect::map::{MapEntry, decide, map};
    let w = Work::new();
    mixed_image(&w, "mixed.qcow2", "cluster_size=4k", "4M");
    w.qemu_img(&["create", "-f", "raw", "b.raw", "4M"]);
    w.qemu_io("b.raw", &["write -P 0xee 0 3M"]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=128k",
        "-b",
        "b.raw",
        "-F",
        "raw",
        "ext.qcow2",
    ]);
    w.qemu_io(
        "ext.qcow2",
        &["write -P 0x21 4k 2k", "write -z 64k 8k", "discard 1040k 8k"],
    );
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "ext.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "6M",
    ]);
    w.qemu_io("top.qcow2", &["write -P 0x31 1M 64k", "write -z 3M 4k"]);
    w.qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "b.raw",
        "c.qcow2",
    ]);
    w.qemu_io("c.qcow2", &["write -P 0x99 8k 4k"]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "p.qcow2",
        "8M",
    ]);
    w.qemu_io("p.qcow2", &["write -P 0x44 0 1M", "write -z 2M 64k"]);
    for name in [
        "mixed.qcow2",
        "ext.qcow2",
        "top.qcow2",
        "c.qcow2",
        "p.qcow2",
    ] {
        let opts = OpenOptions {
            strictness: Strictness::Qemu,
            ..Default::default()
        };
        let chain = Chain::open(&w.path(name), &opts).unwrap();
        let extents = map(&chain).unwrap();
        assert!(extents.len() >= 3, "{name}: {extents:?}");
        for e in &extents {
            for at in [0, e.length / 2, e.length - 1] {
                let guest = e.start.saturating_add(at);
                let want = MapEntry {
                    start: guest,
                    length: 1,
                    offset: e.offset.map(|o| o.saturating_add(at)),
                    ..*e
                };
                assert_eq!(decide(&chain, guest).unwrap(), want, "{name} at {guest}");
                let traced = qinspect::lookup::trace(&chain, guest);
                assert_eq!(traced.answer, Some(want), "{name}: trace at {guest}");
            }
        }
    }
}

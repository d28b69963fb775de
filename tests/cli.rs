//! The non-interactive commands on images made by qemu-img: the values they print
//! are checked against what qemu-img and qemu-io put there.

mod common;
use common::Work;
use serde_json::Value;

/// The reference's base image: `write -P 0xaa 0 128k`, `write -P 0xbb 1M 64k` on a
/// fresh 1 GiB image. L1 at 0x30000, L2 at 0x40000, data in clusters 5, 6 and 7.
fn base_image(w: &Work) {
    w.qemu_img(&["create", "-f", "qcow2", "a.qcow2", "1G"]);
    w.qemu_io("a.qcow2", &["write -P 0xaa 0 128k", "write -P 0xbb 1M 64k"]);
}

fn entries(v: &Value) -> &Vec<Value> {
    v["entries"].as_array().expect("entries")
}

#[test]
fn dump_tables_show_where_qemu_put_things() {
    let w = Work::new();
    base_image(&w);
    let l1 = Work::json(&w.qinspect_ok(&["dump", "l1", "a.qcow2", "--json"]));
    let e0 = &entries(&l1)[0];
    assert_eq!(e0["file_offset"], 0x30000);
    assert_eq!(e0["raw"], "0x8000000000040000");
    assert_eq!(e0["l2_offset"], 0x40000);
    assert_eq!(e0["copied"], true);

    let l2 = Work::json(&w.qinspect_ok(&["dump", "l2", "a.qcow2", "0", "--json"]));
    let l2e = entries(&l2);
    assert_eq!(l2e.len(), 8192);
    assert_eq!(l2e[0]["host_offset"], 0x50000);
    assert_eq!(l2e[1]["host_offset"], 0x60000);
    assert_eq!(l2e[16]["host_offset"], 0x70000);
    assert_eq!(l2e[16]["guest_offset"], 0x100000);
    assert_eq!(l2e[16]["file_offset"], 0x40000 + 16 * 8);
    assert_eq!(l2e[2]["type"], "unallocated");

    let rt = Work::json(&w.qinspect_ok(&["dump", "refcount-table", "a.qcow2", "--json"]));
    assert_eq!(entries(&rt)[0]["block_offset"], 0x20000);
    let rb = Work::json(&w.qinspect_ok(&["dump", "refcount-block", "a.qcow2", "0", "--json"]));
    let counts: Vec<(u64, u64)> = entries(&rb)
        .iter()
        .filter(|e| e["refcount"].as_u64() != Some(0))
        .map(|e| {
            (
                e["cluster"].as_u64().unwrap(),
                e["refcount"].as_u64().unwrap(),
            )
        })
        .collect();
    // header, refcount table, refcount block, L1, L2, three data clusters
    assert_eq!(counts, (0..8).map(|c| (c, 1)).collect::<Vec<_>>());

    let hdr = Work::json(&w.qinspect_ok(&["dump", "header", "a.qcow2", "--json"]));
    let size = entries(&hdr).iter().find(|e| e["field"] == "size").unwrap();
    assert_eq!(size["value"], 1u64 << 30);
    assert_eq!(size["file_offset"], 24);

    // Readable output leaves out zero entries and says what each entry means.
    let text = String::from_utf8(w.qinspect_ok(&["dump", "l2", "a.qcow2", "0"])).unwrap();
    assert!(text.contains("data at host offset 0x70000"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("data at host offset"))
            .count(),
        3
    );
}

#[test]
fn dump_snapshots_and_snapshot_l1() {
    let w = Work::new();
    base_image(&w);
    w.qemu_img(&["snapshot", "-c", "first", "a.qcow2"]);
    w.qemu_io("a.qcow2", &["write -P 0xcc 0 4k"]);
    let s = Work::json(&w.qinspect_ok(&["dump", "snapshots", "a.qcow2", "--json"]));
    let sn = &entries(&s)[0];
    assert_eq!(sn["name"], "first");
    assert_eq!(sn["id"], "1");
    assert_eq!(sn["l1_size"], 2);
    // After the write, the active L1 points at a copied L2 while the snapshot's
    // L1 still points at the original one. QEMU copied the active L1 with its
    // flags, so the snapshot's entry keeps a stale COPIED bit.
    let snap_l1 =
        Work::json(&w.qinspect_ok(&["dump", "l1", "a.qcow2", "--snapshot", "first", "--json"]));
    assert_eq!(entries(&snap_l1)[0]["raw"], "0x8000000000040000");
    assert_eq!(entries(&snap_l1)[0]["l2_offset"], 0x40000);
    let act = Work::json(&w.qinspect_ok(&["dump", "l1", "a.qcow2", "--json"]));
    assert_ne!(entries(&act)[0]["l2_offset"], 0x40000);
    assert_eq!(entries(&act)[0]["copied"], true);
    // Reads through the snapshot see the old data.
    let old = w.qinspect_ok(&["read", "a.qcow2", "--snapshot", "first", "--length", "4"]);
    assert_eq!(old, vec![0xaa; 4]);
    let new = w.qinspect_ok(&["read", "a.qcow2", "--length", "4"]);
    assert_eq!(new, vec![0xcc; 4]);
    // An unknown snapshot is a clear error that lists the real ones.
    let out = w.qinspect(&["read", "a.qcow2", "--snapshot", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no snapshot with ID or name 'nope'") && err.contains("1 (first)"),
        "{err}"
    );
}

#[test]
fn trace_explains_each_step() {
    let w = Work::new();
    base_image(&w);
    let t = Work::json(&w.qinspect_ok(&["trace", "a.qcow2", "1M", "--json"]));
    let steps = t["steps"].as_array().unwrap();
    let kinds: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["split", "l1_entry", "l2_entry", "data"]);
    assert_eq!(steps[0]["l2_index"], 16);
    assert_eq!(steps[1]["entry_offset"], 0x30000);
    assert_eq!(steps[2]["entry_offset"], 0x40000 + 16 * 8);
    assert_eq!(steps[2]["host_offset"], "0x70000");
    assert_eq!(steps[3]["host_offset"], "0x70000");
    assert!(
        steps
            .iter()
            .all(|s| s["explanation"].as_str().unwrap().len() > 20)
    );
    // Unallocated with no backing file: zeros.
    let t = Work::json(&w.qinspect_ok(&["trace", "a.qcow2", "0x200000", "--json"]));
    assert!(t["outcome"].as_str().unwrap().starts_with("zeros"));
    // Readable output.
    let text = String::from_utf8(w.qinspect_ok(&["trace", "a.qcow2", "64k"])).unwrap();
    assert!(
        text.contains("L2 index 1") && text.contains("0x60000"),
        "{text}"
    );
}

#[test]
fn hexdump_host_and_guest() {
    let w = Work::new();
    base_image(&w);
    let out =
        String::from_utf8(w.qinspect_ok(&["hexdump", "a.qcow2", "--host", "0", "--length", "16"]))
            .unwrap();
    assert!(out.contains("51 46 49 fb"), "{out}");
    assert!(out.contains("QFI"), "{out}");
    let out = String::from_utf8(
        w.qinspect_ok(&["hexdump", "a.qcow2", "--guest", "1M", "--length", "32"]),
    )
    .unwrap();
    assert!(out.contains("00100000"), "offsets are guest offsets: {out}");
    assert!(out.contains("bb bb bb bb"), "{out}");
    assert!(!out.contains("\x1b["), "no colour when not a terminal");
    let out = String::from_utf8(w.qinspect_ok(&[
        "hexdump", "a.qcow2", "--guest", "0", "--length", "16", "--color", "always",
    ]))
    .unwrap();
    assert!(out.contains("\x1b["), "colour on request");
}

#[test]
fn numbers_take_qemu_io_suffixes() {
    let w = Work::new();
    base_image(&w);
    for form in ["1048576", "0x100000", "1M", "1024k", "1024K"] {
        let t = Work::json(&w.qinspect_ok(&["trace", "a.qcow2", form, "--json"]));
        assert_eq!(t["guest_offset"], 1048576, "{form}");
    }
    let out = w.qinspect(&["trace", "a.qcow2", "12q"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown suffix"));
}

#[test]
fn broken_chains_are_clear_errors() {
    let w = Work::new();
    base_image(&w);
    // Missing backing file.
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "-u",
        "m.qcow2",
        "1G",
    ]);
    let out = w.qinspect(&["read", "m.qcow2", "--length", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("m.qcow2 -> gone.qcow2")
            && err.contains("Could not open backing file: Could not open 'gone.qcow2'"),
        "{err}"
    );
    // info (like qemu-img info) does not need the backing file.
    w.qinspect_ok(&["info", "--json", "m.qcow2"]);
    // A loop: b names c, c names b.
    w.qemu_img(&[
        "create", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", "-u", "b.qcow2", "1G",
    ]);
    w.qemu_img(&[
        "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "-u", "c.qcow2", "1G",
    ]);
    let out = w.qinspect(&["map", "b.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loop") && err.contains("b.qcow2 -> c.qcow2 -> b.qcow2"),
        "{err}"
    );
    // An image naming itself.
    // (qemu-img refuses to create one, so patch the backing name afterwards.)
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "xelf.qcow2",
        "-F",
        "qcow2",
        "-u",
        "self.qcow2",
        "1G",
    ]);
    let mut bytes = std::fs::read(w.path("self.qcow2")).unwrap();
    let at = bytes.windows(10).position(|x| x == b"xelf.qcow2").unwrap();
    bytes[at] = b's';
    std::fs::write(w.path("self.qcow2"), bytes).unwrap();
    let out = w.qinspect(&["trace", "self.qcow2", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loop"));
}

#[test]
fn bad_headers_get_qemu_messages() {
    let w = Work::new();
    base_image(&w);
    std::fs::copy(w.path("a.qcow2"), w.path("v9.qcow2")).unwrap();
    w.patch("v9.qcow2", 4, &9u32.to_be_bytes());
    let out = w.qinspect(&["info", "v9.qcow2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unsupported qcow2 version 9"));
    std::fs::copy(w.path("a.qcow2"), w.path("cb.qcow2")).unwrap();
    w.patch("cb.qcow2", 20, &8u32.to_be_bytes());
    let out = w.qinspect(&["trace", "cb.qcow2", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unsupported cluster size: 2^8"));
    std::fs::write(w.path("empty.qcow2"), b"").unwrap();
    let out = w.qinspect(&["dump", "header", "empty.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the end of the file"));
    // dump still shows a header that QEMU would refuse.
    std::fs::copy(w.path("a.qcow2"), w.path("ro.qcow2")).unwrap();
    w.patch("ro.qcow2", 96, &7u32.to_be_bytes());
    let text = String::from_utf8(w.qinspect_ok(&["dump", "header", "ro.qcow2"])).unwrap();
    assert!(
        text.contains("refcount_order") && text.contains("Reference count entry width too large"),
        "{text}"
    );
}

#[test]
fn nothing_is_written() {
    let w = Work::new();
    base_image(&w);
    w.qemu_img(&["snapshot", "-c", "s", "a.qcow2"]);
    let before = w.fingerprint("a.qcow2");
    let mtime = std::fs::metadata(w.path("a.qcow2"))
        .unwrap()
        .modified()
        .unwrap();
    for args in [
        vec!["info", "a.qcow2"],
        vec!["info", "--json", "a.qcow2"],
        vec!["map", "a.qcow2"],
        vec!["trace", "a.qcow2", "0"],
        vec!["read", "a.qcow2", "-o", "out.raw"],
        vec!["dump", "l2", "a.qcow2", "0"],
        vec!["hexdump", "a.qcow2", "--host", "0"],
    ] {
        w.qinspect_ok(&args);
    }
    assert_eq!(w.fingerprint("a.qcow2"), before);
    assert_eq!(
        std::fs::metadata(w.path("a.qcow2"))
            .unwrap()
            .modified()
            .unwrap(),
        mtime
    );
    // Refuses to overwrite a layer of the chain it reads.
    let out = w.qinspect(&["read", "a.qcow2", "-o", "a.qcow2"]);
    assert!(!out.status.success());
    assert_eq!(w.fingerprint("a.qcow2"), before);
}

/// Data in an external data file is in that file: the text map names it where
/// `qemu-img map` names it, and the JSON stays qemu-img's.
#[test]
fn map_names_the_data_file_as_qemu_img_does() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=df.raw",
        "df.qcow2",
        "4M",
    ]);
    w.qemu_io("df.qcow2", &["write 0 64k"]);
    w.assert_map_matches("df.qcow2");
    let q = w.qemu_img(&["map", "df.qcow2"]);
    let q = String::from_utf8(q.stdout).unwrap();
    let qrow: Vec<&str> = q.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(qrow, ["0", "0x10000", "0", "df.raw"], "{q}");
    let t = String::from_utf8(w.qinspect_ok(&["map", "df.qcow2"])).unwrap();
    let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[0], "0x0", "{t}");
    assert_eq!(row[4], "data", "{t}");
    assert_eq!(row.last().copied(), Some("df.raw"), "{t}");
    // Unallocated ranges are answered by the image's own L2 tables.
    let rest: Vec<&str> = t.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(rest.last().copied(), Some("df.qcow2"), "{t}");
}

/// A start at or past the end of the disk: qemu-img map prints no row, and its
/// JSON one empty extent.
#[test]
fn map_past_the_end_prints_no_rows() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    for start in ["4M", "5M"] {
        let q = w.qemu_img(&["map", "base.qcow2", "-s", start]);
        assert_eq!(String::from_utf8(q.stdout).unwrap().lines().count(), 1);
        let t = String::from_utf8(w.qinspect_ok(&["map", "base.qcow2", "--start-offset", start]))
            .unwrap();
        let rows: Vec<&str> = t
            .lines()
            .skip(1)
            .filter(|l| l.trim_start().starts_with("0x"))
            .collect();
        assert!(rows.is_empty(), "{start}: {t}");
        assert!(t.contains("\n0 extents:"), "{start}: {t}");
        let q = w.qemu_img(&["map", "--output=json", "base.qcow2", "-s", start]);
        let j = w.qinspect_ok(&["map", "--json", "base.qcow2", "--start-offset", start]);
        assert_eq!(
            String::from_utf8(j).unwrap(),
            String::from_utf8(q.stdout).unwrap()
        );
    }
}

/// No guest read reaches the L2 entries past the end of a 4 MiB disk: dump says
/// so, not that reads fall through to a backing file.
#[test]
fn dump_l2_says_entries_past_the_end_are_never_read() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    w.qemu_io("base.qcow2", &["write 1M 64k"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    w.qemu_io("top.qcow2", &["write 0 64k"]);
    let t = String::from_utf8(w.qinspect_ok(&["dump", "l2", "top.qcow2", "0", "--all"])).unwrap();
    let meaning = |guest: &str| {
        t.lines()
            .find(|l| l.contains(&format!("guest {guest}:")))
            .unwrap_or_else(|| panic!("{guest}: {t}"))
            .to_string()
    };
    assert!(meaning("0x3f0000").contains("fall through to the backing file"));
    for g in ["0x400000", "0x410000", "0x1fff0000"] {
        let m = meaning(g);
        assert!(m.contains("past disk end: never read"), "{m}");
        assert!(!m.contains("backing"), "{m}");
    }
    // Without a backing file, an unallocated entry inside the disk reads as zeros.
    let b = String::from_utf8(w.qinspect_ok(&["dump", "l2", "base.qcow2", "0", "--all"]));
    let b = b.unwrap();
    let last = b.lines().find(|l| l.contains("guest 0x3f0000:")).unwrap();
    assert!(last.contains("reads as zeros: no backing file"), "{b}");
    // The JSON is unchanged: the entries are still there and still unallocated.
    let j = Work::json(&w.qinspect_ok(&["dump", "l2", "top.qcow2", "0", "--json"]));
    let e = entries(&j);
    assert_eq!(e.len(), 8192);
    assert_eq!(e[64]["type"], "unallocated");
}

/// A trace's L2 step says an unallocated entry falls through to the backing
/// file only in a layer that has one; in the bottom layer it reads as zeros.
#[test]
fn trace_says_no_backing_file_in_the_bottom_layer() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    w.qemu_io("base.qcow2", &["write 0 64k"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    w.qemu_io("top.qcow2", &["write 0 64k"]);
    let j = Work::json(&w.qinspect_ok(&["trace", "--json", "top.qcow2", "1M"]));
    let l2_steps: Vec<(String, String)> = j["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["step"] == "l2_entry")
        .map(|s| {
            let layer = s["layer"].as_str().unwrap().to_string();
            (layer, s["explanation"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(l2_steps.len(), 2, "{j}");
    let (top, base) = (&l2_steps[0], &l2_steps[1]);
    assert!(top.0.ends_with("top.qcow2"), "{top:?}");
    assert!(
        top.1.contains("reads fall through to the backing file"),
        "{top:?}"
    );
    assert!(base.0.ends_with("base.qcow2"), "{base:?}");
    assert!(!base.1.contains("fall through"), "{base:?}");
    assert!(
        base.1.contains("reads as zeros: no backing file"),
        "{base:?}"
    );
}

/// A read whose length runs past the end of the disk is cut there, and says so;
/// one inside the disk says nothing.
#[test]
fn read_past_the_end_of_the_disk_is_cut_with_a_warning() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    w.qemu_io("a.qcow2", &["write -P 7 960k 64k"]);
    let long = w.qinspect(&["read", "a.qcow2", "--offset", "960k", "--length", "128k"]);
    assert!(long.status.success(), "{long:?}");
    assert_eq!(long.stdout, vec![7u8; 64 << 10]);
    let err = String::from_utf8_lossy(&long.stderr);
    assert!(
        err.contains("warning") && err.contains("65536 of the 131072 bytes"),
        "{err}"
    );
    let fits = w.qinspect(&["read", "a.qcow2", "--offset", "960k", "--length", "64k"]);
    assert!(fits.status.success(), "{fits:?}");
    assert_eq!(fits.stdout, vec![7u8; 64 << 10]);
    assert!(fits.stderr.is_empty(), "{fits:?}");
}

/// A hexdump cut at the end of the file or of the disk says so on stderr.
#[test]
fn hexdump_past_the_end_is_cut_with_a_warning() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    let file_len = std::fs::metadata(w.path("a.qcow2")).unwrap().len();
    let host = format!("{:#x}", file_len - 16);
    for args in [
        [
            "hexdump",
            "a.qcow2",
            "--host",
            host.as_str(),
            "--length",
            "64",
        ],
        ["hexdump", "a.qcow2", "--guest", "0xffff0", "--length", "64"],
    ] {
        let out = w.qinspect(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        // One row of 16 bytes, and the warning.
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().count(),
            3,
            "{out:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("warning: 16 of the 64 bytes"),
            "{args:?}: {err}"
        );
    }
    let fits = w.qinspect(&["hexdump", "a.qcow2", "--guest", "0xffff0", "--length", "16"]);
    assert!(fits.status.success() && fits.stderr.is_empty(), "{fits:?}");
}

/// `completions | head`: a closed pipe ends the command quietly, with exit 0.
#[test]
fn completions_into_a_closed_pipe_end_quietly() {
    for shell in ["bash", "fish", "zsh"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qinspect"))
            .args(["completions", shell])
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        assert!(
            out.stderr.is_empty(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Into an open pipe it is the whole script.
    let w = Work::new();
    let s = String::from_utf8(w.qinspect_ok(&["completions", "bash"])).unwrap();
    assert!(
        s.starts_with("_qinspect()") && s.contains("complete -F _qinspect"),
        "{s}"
    );
}

/// An active L1 table QEMU refuses: `dump l1` names the reason once, on its
/// "not read" line, and not again among the closing warnings; other tables still
/// list it as a warning.
#[test]
fn dump_l1_names_the_refusal_once() {
    let w = Work::new();
    base_image(&w);
    for (name, offset, bytes, reason) in [
        // l1_size over QEMU's limit.
        (
            "size.qcow2",
            0x24,
            0x7fff_ffffu32.to_be_bytes().to_vec(),
            "Active L1 table too large",
        ),
        // l1_table_offset 0x30008: not aligned to a cluster.
        (
            "align.qcow2",
            0x28,
            0x3_0008u64.to_be_bytes().to_vec(),
            "Active L1 table offset invalid",
        ),
    ] {
        std::fs::copy(w.path("a.qcow2"), w.path(name)).unwrap();
        w.patch(name, offset, &bytes);
        let q = std::process::Command::new("qemu-img")
            .args(["info", name])
            .current_dir(w.dir.path())
            .output()
            .unwrap();
        assert_eq!(q.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&q.stderr).contains(reason), "{q:?}");
        let out = String::from_utf8(w.qinspect_ok(&["dump", "l1", name])).unwrap();
        assert_eq!(out.matches(reason).count(), 1, "{out}");
        let line = out.lines().find(|l| l.contains(reason)).unwrap();
        assert!(line.contains("not read: L1 table"), "{out}");
        assert!(!out.contains("warning:"), "{out}");
        // Where nothing else says it, the reason is a warning.
        let out = String::from_utf8(w.qinspect_ok(&["dump", "refcount-table", name])).unwrap();
        let line = out.lines().find(|l| l.contains(reason)).unwrap();
        assert!(line.contains("warning:"), "{out}");
    }
}

/// A header QEMU refuses at its first checks (an unknown version, a cluster size
/// it does not support): `dump header` still lists every field as stored, each at
/// its offset, then the error naming the field; `--json` gives both. Exit code 1.
#[test]
fn dump_header_lists_the_fields_of_a_header_qemu_refuses() {
    let w = Work::new();
    base_image(&w);
    for (name, offset, value, field, qemu_says) in [
        (
            "v4.qcow2",
            4u64,
            4u32,
            "version",
            "Unsupported qcow2 version 4",
        ),
        (
            "c8.qcow2",
            20,
            8,
            "cluster_bits",
            "Unsupported cluster size: 2^8",
        ),
        (
            "c22.qcow2",
            20,
            22,
            "cluster_bits",
            "Unsupported cluster size: 2^22",
        ),
    ] {
        std::fs::copy(w.path("a.qcow2"), w.path(name)).unwrap();
        w.patch(name, offset, &value.to_be_bytes());
        let q = std::process::Command::new("qemu-img")
            .args(["info", name])
            .current_dir(w.dir.path())
            .output()
            .unwrap();
        assert_eq!(q.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&q.stderr).contains(qemu_says),
            "{q:?}"
        );

        let out = w.qinspect(&["dump", "header", name, "--json"]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let v = Work::json(&out.stdout);
        let e = entries(&v);
        let at = |f: &str| {
            e.iter()
                .find(|r| r["field"] == f)
                .unwrap_or_else(|| panic!("{f}: {v}"))
        };
        // The patched field, and the fields qemu-img wrote, where the spec puts them.
        assert_eq!(at(field)["value"], value, "{v}");
        assert_eq!(at(field)["file_offset"], offset, "{v}");
        assert_eq!(at("size")["value"], 1u64 << 30);
        assert_eq!(at("size")["file_offset"], 24);
        assert_eq!(at("l1_table_offset")["value"], 0x30000);
        assert_eq!(at("l1_table_offset")["file_offset"], 40);
        assert_eq!(at("refcount_table_offset")["value"], 0x10000);
        assert_eq!(at("header_length")["file_offset"], 100);
        assert_eq!(e.len(), 19, "{v}");
        assert_eq!(v["error"]["field"], field, "{v}");
        assert_eq!(v["error"]["offset"], offset, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(qemu_says),
            "{v}"
        );

        let out = w.qinspect(&["dump", "header", name]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let text = String::from_utf8(out.stdout).unwrap();
        let row = text
            .lines()
            .find(|l| l.contains(&format!("{field}:")))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(row.contains(&format!("{offset:#x}")), "{row}");
        let size = text
            .lines()
            .find(|l| l.contains("size: the guest"))
            .unwrap();
        assert!(
            size.contains("0x18") && size.contains("0x40000000"),
            "{text}"
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains(&format!("header {field} at {offset:#x}")) && err.contains(qemu_says),
            "{err}"
        );
    }
    // Without a cluster size QEMU supports, nothing is counted in clusters.
    let text = String::from_utf8(w.qinspect(&["dump", "header", "c22.qcow2"]).stdout).unwrap();
    assert!(text.contains("active L1 table at byte 0x30000"), "{text}");
    assert!(!text.contains("host cluster"), "{text}");
    assert!(!text.contains("each covering"), "{text}");
    // A header whose magic is wrong has no fields to show: only the error.
    std::fs::copy(w.path("a.qcow2"), w.path("m.qcow2")).unwrap();
    w.patch("m.qcow2", 0, b"QFI\0");
    let out = w.qinspect(&["dump", "header", "m.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("magic"));
}

/// `--help` at `COLUMNS` columns.
fn help_at(sub: &str, columns: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qinspect"))
        .args([sub, "--help"])
        .env("COLUMNS", columns)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The lines of `text` after the first one that contains `after`, up to the next
/// blank line.
fn section<'a>(text: &'a str, after: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| !l.contains(after))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

/// The tables in the help (simulate's operations, every command's examples) keep
/// their columns in an 80-column terminal: clap's wrapping would put the end of a
/// long line under the names, where it reads as a name of its own.
#[test]
fn help_tables_keep_their_columns_at_80_columns() {
    let narrow = help_at("simulate", "80");
    let ops = section(&narrow, "(the image is never written):");
    assert_eq!(
        ops,
        section(&help_at("simulate", "200"), "(the image is never written):"),
        "{narrow}"
    );
    assert!(ops.len() > 14, "{narrow}");
    for l in &ops {
        assert!(l.len() < 80, "{l}");
        let name = &l[2..].split(' ').next().unwrap_or("");
        // A line is an operation (its name has a ':' or is "overlay,") or a
        // continuation under the description column.
        assert!(
            name.contains(':') || name.starts_with("overlay") || l.starts_with(&" ".repeat(33)),
            "{l}"
        );
    }
    for sub in [
        "info", "map", "trace", "read", "check", "clusters", "simulate", "compare", "dump",
        "hexdump",
    ] {
        let narrow = help_at(sub, "80");
        let wide = help_at(sub, "200");
        assert_eq!(
            section(&narrow, "Examples:"),
            section(&wide, "Examples:"),
            "{sub}: {narrow}"
        );
    }
}

/// A table with no entries at all says what it lacks; "no non-zero entries" is
/// for the tables whose all-zero entries are left out.
#[test]
fn empty_tables_say_what_they_lack() {
    let w = Work::new();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "e.qcow2",
        "1M",
    ]);
    let snaps = w.qemu_img(&["snapshot", "-l", "e.qcow2"]);
    assert!(String::from_utf8_lossy(&snaps.stdout).trim().is_empty());
    let text = |args: &[&str]| String::from_utf8(w.qinspect_ok(args)).unwrap();
    let ext = text(&["dump", "extensions", "e.qcow2"]);
    assert!(
        ext.contains("(no header extensions)") && !ext.contains("non-zero"),
        "{ext}"
    );
    let sn = text(&["dump", "snapshots", "e.qcow2"]);
    assert!(
        sn.contains("(no snapshots)") && !sn.contains("non-zero"),
        "{sn}"
    );
    // The L1 table has an entry, all zero: left out, and said so; with --all it is shown.
    let l1 = text(&["dump", "l1", "e.qcow2"]);
    assert!(l1.contains("(no non-zero entries)"), "{l1}");
    let all = text(&["dump", "l1", "e.qcow2", "--all"]);
    assert!(
        all.contains("0x0000000000000000") && !all.contains("(no"),
        "{all}"
    );
}

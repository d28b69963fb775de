//! Agreement with QEMU on images made by real tools, and the read-only promise
//! under every name a file can have. Each case is built with qemu-img/qemu-io at
//! test time and compared with what qemu-img itself does.

mod common;
use common::Work;
use std::process::{Command, Stdio};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run a program in `dir` (not the work directory) and return its output.
fn run_in(dir: &std::path::Path, prog: &str, args: &[&str]) -> std::process::Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn qinspect_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    run_in(dir, env!("CARGO_BIN_EXE_qinspect"), args)
}

// ---- 1. read -o never writes to a file the chain reads ----

#[test]
fn read_refuses_every_file_of_the_chain_by_device_and_inode() {
    let w = Work::new();
    // The data loss from the issue: the output is the image's external data file.
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "data_file=data.raw",
        "img.qcow2",
        "1M",
    ]);
    w.qemu_io("img.qcow2", &["write -P 0xaa 0 64k"]);
    let before = w.fingerprint("data.raw");
    let out = w.qinspect(&["read", "img.qcow2", "-o", "data.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("the external data file of layer 0"),
        "{}",
        stderr(&out)
    );
    assert_eq!(w.fingerprint("data.raw"), before, "data.raw changed");
    w.assert_read_matches("img.qcow2", None);

    // A hard link to the backing file, under another directory.
    w.qemu_img(&["create", "-f", "qcow2", "base.qcow2", "1M"]);
    w.qemu_io("base.qcow2", &["write -P 0xbb 0 64k"]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    std::fs::create_dir(w.path("other")).unwrap();
    std::fs::hard_link(w.path("base.qcow2"), w.path("other/base.qcow2")).unwrap();
    std::os::unix::fs::symlink("../top.qcow2", w.path("other/top-link")).unwrap();
    let base = w.fingerprint("base.qcow2");
    let top = w.fingerprint("top.qcow2");
    for (target, role) in [
        ("other/base.qcow2", "layer 1 (qcow2)"),
        ("other/top-link", "layer 0 (qcow2)"),
        ("./other/../base.qcow2", "layer 1 (qcow2)"),
    ] {
        let out = w.qinspect(&["read", "top.qcow2", "-o", target]);
        assert_eq!(out.status.code(), Some(1), "{target}");
        let err = stderr(&out);
        assert!(
            err.contains(role) && err.contains("nothing was written"),
            "{target}: {err}"
        );
    }
    // Standard output appended to the backing file.
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(w.path("base.qcow2"))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_qinspect"))
        .args(["read", "top.qcow2"])
        .current_dir(w.dir.path())
        .stdout(Stdio::from(f))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("standard output"), "{}", stderr(&out));
    assert_eq!(w.fingerprint("base.qcow2"), base, "base.qcow2 changed");
    assert_eq!(w.fingerprint("top.qcow2"), top, "top.qcow2 changed");
    // A raw backing layer is a file of the chain too.
    w.qemu_img(&["create", "-f", "raw", "r.raw", "1M"]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "r.raw",
        "-F",
        "raw",
        "over.qcow2",
    ]);
    std::fs::hard_link(w.path("r.raw"), w.path("other/r.raw")).unwrap();
    let out = w.qinspect(&["read", "over.qcow2", "-o", "other/r.raw"]);
    assert!(stderr(&out).contains("layer 1 (raw)"), "{}", stderr(&out));
    // An ordinary output is still written.
    w.assert_read_matches("top.qcow2", None);
}

// ---- 2. read writes what qemu-img convert -O raw writes ----

fn blocks(w: &Work, name: &str) -> u64 {
    common::allocated_blocks(&w.path(name))
}

/// Bytes and allocated blocks of `read -o` equal `qemu-img convert -O raw`'s.
fn assert_same_output(w: &Work, image: &str, extra: &[&str]) {
    let mut q = vec!["convert", "-O", "raw"];
    q.extend(extra);
    q.extend([image, "q.raw"]);
    w.qemu_img(&q);
    // An existing output is replaced, as qemu-img replaces it.
    std::fs::write(w.path("m.raw"), vec![0x55u8; 1 << 20]).unwrap();
    read_matches_over_existing(w, image, extra);
}

/// `read -o m.raw` over whatever m.raw holds now gives q.raw: bytes, data
/// extents and allocated blocks.
fn read_matches_over_existing(w: &Work, image: &str, extra: &[&str]) {
    let mut m = vec!["read", image, "-o", "m.raw"];
    let sel;
    if let [_, s] = extra {
        sel = s.to_string();
        m.extend(["--snapshot", &sel]);
    }
    w.qinspect_ok(&m);
    let (a, b) = (
        std::fs::read(w.path("q.raw")).unwrap(),
        std::fs::read(w.path("m.raw")).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{image} {extra:?}: length");
    assert!(a == b, "{image} {extra:?}: bytes differ");
    assert_eq!(
        common::data_extents(&w.path("m.raw")),
        common::data_extents(&w.path("q.raw")),
        "{image} {extra:?}: data extents"
    );
    common::assert_blocks_match(
        &w.path("m.raw"),
        &w.path("q.raw"),
        &format!("{image} {extra:?}"),
    );
}

/// An existing output is written over in place, its page-cache pages reused,
/// and still comes out as the new file qemu-img writes: when it is longer and
/// fully allocated, holds a previous output with data where the new one has
/// holes (the last, partial block included), holds this same output, or is
/// preallocated with unwritten extents.
#[test]
fn read_over_an_existing_output_is_what_qemu_img_writes_anew() {
    let w = Work::new();
    // 16 MiB + 1.5 KiB: the last 4 KiB block of the output is partial.
    let size = "16778752";
    for img in ["a.qcow2", "b.qcow2"] {
        w.qemu_img(&["create", "-f", "qcow2", img, size]);
    }
    w.qemu_io(
        "a.qcow2",
        &[
            "write -P 0xaa 0 64k",
            "write -z 2M 64k",
            "write -P 0 4M 1M",
            "write -P 1 8M 5k",
            "write -P 3 16773120 5632",
        ],
    );
    w.qemu_io("b.qcow2", &["write -P 7 1M 3M", "write -P 0 8M 4k"]);
    let expect = |image: &str| w.qemu_img(&["convert", "-O", "raw", image, "q.raw"]);

    // Longer than the output and allocated throughout.
    std::fs::write(w.path("m.raw"), vec![0x55u8; 20 << 20]).unwrap();
    expect("a.qcow2");
    read_matches_over_existing(&w, "a.qcow2", &[]);
    // a's output, with data where b's has holes, the partial tail included.
    expect("b.qcow2");
    read_matches_over_existing(&w, "b.qcow2", &[]);
    // b's output again, over itself.
    read_matches_over_existing(&w, "b.qcow2", &[]);
    // Preallocated: unwritten extents count in st_blocks but read as holes.
    std::fs::remove_file(w.path("m.raw")).unwrap();
    w.qemu_img(&[
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=falloc",
        "m.raw",
        "24M",
    ]);
    expect("a.qcow2");
    read_matches_over_existing(&w, "a.qcow2", &[]);
    // Smaller than a block: emptied and written as new.
    w.qemu_img(&["create", "-f", "qcow2", "tiny.qcow2", "1536"]);
    w.qemu_io("tiny.qcow2", &["write -P 9 512 512"]);
    expect("tiny.qcow2");
    read_matches_over_existing(&w, "tiny.qcow2", &[]);
}

/// `read` to standard output gives qemu-img convert's bytes, whole and in an
/// unaligned range, both to a pipe (where data is spliced from the image file)
/// and to a file (where it is written): data of both layers, zero clusters, a
/// compressed cluster, and zeros past the end of a shorter raw backing file.
#[test]
fn read_to_a_pipe_or_a_file_on_stdout_gives_qemu_img_bytes() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "raw", "base.raw", "3000000"]);
    w.qemu_io("base.raw", &["write -P 0x11 0 2999808"]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "top.qcow2",
        "8M",
    ]);
    w.qemu_io(
        "top.qcow2",
        &[
            "write -P 0x22 1M 64k",
            "write -z 2M 64k",
            "write -c -P 0x33 4M 64k",
            "write -P 0x44 6M 1M",
        ],
    );
    w.qemu_img(&["convert", "-O", "raw", "top.qcow2", "q.raw"]);
    let q = std::fs::read(w.path("q.raw")).unwrap();
    assert_eq!(q.len(), 8 << 20);
    // Command::output reads standard output from a pipe.
    let piped = w.qinspect_ok(&["read", "top.qcow2"]);
    assert!(piped == q, "read into a pipe differs from qemu-img convert");
    let part = w.qinspect_ok(&[
        "read",
        "top.qcow2",
        "--offset",
        "1000",
        "--length",
        "5000000",
    ]);
    assert!(
        part == q[1000..5_001_000],
        "a range read into a pipe differs"
    );
    // A slow reader: the pipe fills, and qinspect waits for room without
    // losing or repeating a byte.
    let mut child = Command::new(env!("CARGO_BIN_EXE_qinspect"))
        .args(["read", "top.qcow2"])
        .current_dir(w.path("."))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut slow = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let n = std::io::Read::read(&mut out, &mut chunk).unwrap();
        if n == 0 {
            break;
        }
        slow.extend_from_slice(&chunk[..n]);
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    assert!(child.wait().unwrap().success());
    assert!(slow == q, "read into a slowly read pipe differs");
    let file = std::fs::File::create(w.path("s.raw")).unwrap();
    let st = Command::new(env!("CARGO_BIN_EXE_qinspect"))
        .args(["read", "top.qcow2"])
        .current_dir(w.path("."))
        .stdout(file)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        std::fs::read(w.path("s.raw")).unwrap() == q,
        "read with standard output on a file differs from qemu-img convert"
    );
}

#[test]
fn read_leaves_holes_where_qemu_img_does() {
    let w = Work::new();
    for prealloc in ["off", "metadata", "falloc", "full"] {
        let img = format!("{prealloc}.qcow2");
        let o = format!("preallocation={prealloc}");
        w.qemu_img(&["create", "-f", "qcow2", "-o", &o, &img, "64M"]);
        w.qemu_io(
            &img,
            &[
                "write -P 0xaa 1M 64k",
                "write -z 2M 64k",
                "write -P 0 4M 1M",
                "write -P 1 8M 5k",
            ],
        );
        assert_same_output(&w, &img, &[]);
    }
    // A big metadata-preallocated image: holes throughout, nothing to write.
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "big.qcow2",
        "64G",
    ]);
    w.qinspect_ok(&["read", "big.qcow2", "-o", "big.raw"]);
    assert_eq!(
        std::fs::metadata(w.path("big.raw")).unwrap().len(),
        64 << 30
    );
    assert!(blocks(&w, "big.raw") <= 8, "64G of zeros must stay a hole");
    // Compressed clusters and zero data in small clusters.
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "small.qcow2",
        "1M",
    ]);
    w.qemu_io(
        "small.qcow2",
        &[
            "write -P 3 0 3k",
            "write -P 0 8k 8k",
            "write -c -P 4 64k 512",
        ],
    );
    assert_same_output(&w, "small.qcow2", &[]);
}

#[test]
fn snapshot_reads_have_the_length_qemu_img_convert_l_gives() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "g.qcow2", "1M"]);
    w.qemu_io("g.qcow2", &["write -P 0x11 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "small", "g.qcow2"]);
    w.qemu_img(&["resize", "g.qcow2", "2M"]);
    w.qemu_io("g.qcow2", &["write -P 0x22 1536k 64k"]);
    w.qemu_img(&["snapshot", "-c", "big", "g.qcow2"]);
    // Grown since "small": padded to the active 2M.
    assert_same_output(&w, "g.qcow2", &["-l", "small"]);
    assert_eq!(std::fs::metadata(w.path("m.raw")).unwrap().len(), 2 << 20);
    w.qemu_img(&["resize", "--shrink", "g.qcow2", "1M"]);
    // Shrunk since "big": cut to the active 1M.
    assert_same_output(&w, "g.qcow2", &["-l", "big"]);
    assert_eq!(std::fs::metadata(w.path("m.raw")).unwrap().len(), 1 << 20);
    // With a backing file, the part past the snapshot's own disk falls through.
    w.qemu_img(&["create", "-f", "qcow2", "b.qcow2", "2M"]);
    w.qemu_io("b.qcow2", &["write -P 0x33 0 2M"]);
    w.qemu_img(&[
        "create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", "1M",
    ]);
    w.qemu_io("t.qcow2", &["write -P 0x44 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "one", "t.qcow2"]);
    w.qemu_img(&["resize", "t.qcow2", "2M"]);
    assert_same_output(&w, "t.qcow2", &["-l", "one"]);
}

#[test]
fn snapshot_selectors_work_as_in_qemu_img_convert_l() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "n.qcow2", "1M"]);
    w.qemu_io("n.qcow2", &["write -P 1 0 4k"]);
    w.qemu_img(&["snapshot", "-c", "x", "n.qcow2"]); // ID 1, name "x"
    w.qemu_io("n.qcow2", &["write -P 2 0 4k", "write -P 2 64k 64k"]);
    w.qemu_img(&["snapshot", "-c", "1", "n.qcow2"]); // ID 2, name "1"
    w.qemu_io("n.qcow2", &["write -P 3 0 4k"]);
    for sel in [
        "1",
        "x",
        "2",
        "snapshot.name=1",
        "snapshot.id=1",
        "snapshot.id=2,snapshot.name=1",
    ] {
        assert_same_output(&w, "n.qcow2", &["-l", sel]);
    }
    let first = |sel: &str| std::fs::read(w.path("m.raw")).map(|b| (sel.to_string(), b[0]));
    w.qinspect_ok(&["read", "n.qcow2", "-s", "snapshot.name=1", "-o", "m.raw"]);
    assert_eq!(first("name=1").unwrap().1, 2, "snapshot.name=1 is ID 2");
    w.qinspect_ok(&["read", "n.qcow2", "-s", "1", "-o", "m.raw"]);
    assert_eq!(first("1").unwrap().1, 1, "a bare 1 is ID 1");
    // Every command that takes --snapshot takes the selector.
    let by_name = w.qinspect_ok(&["map", "--json", "--snapshot", "snapshot.name=1", "n.qcow2"]);
    let by_id = w.qinspect_ok(&["map", "--json", "--snapshot", "2", "n.qcow2"]);
    assert_eq!(by_name, by_id);
    let t =
        Work::json(&w.qinspect_ok(&["trace", "--json", "-s", "snapshot.name=1", "n.qcow2", "64k"]));
    assert!(
        t["view"].as_str().unwrap().contains("snapshot 2 '1'"),
        "{t}"
    );
    let d = String::from_utf8(w.qinspect_ok(&["dump", "l1", "n.qcow2", "-s", "snapshot.name=1"]))
        .unwrap();
    assert!(d.contains("snapshot 2"), "{d}");
    let h = w.qinspect_ok(&[
        "hexdump",
        "n.qcow2",
        "--guest",
        "0",
        "--length",
        "16",
        "-s",
        "snapshot.name=x",
    ]);
    assert!(!h.is_empty());
    // Both parts must match, and unknown keys are refused, as in QEMU.
    let out = w.qinspect(&[
        "read",
        "n.qcow2",
        "-s",
        "snapshot.id=1,snapshot.name=1",
        "-o",
        "z.raw",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !w.path("z.raw").exists(),
        "no output when the snapshot is not found"
    );
    let out = w.qinspect(&["map", "--json", "-s", "snapshot.foo=1", "n.qcow2"]);
    assert!(
        stderr(&out).contains("Invalid parameter 'snapshot.foo'"),
        "{}",
        stderr(&out)
    );
}

// ---- 3. names resolve as QEMU resolves them ----

#[test]
fn json_and_file_backing_names_are_followed_as_qemu_follows_them() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "base.qcow2", "1M"]);
    w.qemu_io("base.qcow2", &["write -P 0xaa 0 64k"]);
    let names = [
        r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#,
        r#"json:{"driver":"qcow2","file.driver":"file","file.filename":"base.qcow2"}"#,
        "file:base.qcow2",
    ];
    std::fs::create_dir(w.path("sub")).unwrap();
    for (i, name) in names.iter().enumerate() {
        let top = format!("top{i}.qcow2");
        w.qemu_img(&["create", "-f", "qcow2", &top, "1M"]);
        w.qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", name, &top]);
        w.qemu_io(&top, &["write -P 0xbb 512k 64k"]);
        w.assert_map_matches(&top);
        w.assert_read_matches(&top, None);
        // These names are not relative to the image: from another directory both
        // fail to find base.qcow2.
        let sub = w.path("sub");
        let q = run_in(
            &sub,
            "qemu-img",
            &["map", "--output=json", &format!("../{top}")],
        );
        let m = qinspect_in(&sub, &["map", "--json", &format!("../{top}")]);
        assert_eq!(q.status.code(), Some(1), "{name}");
        assert_eq!(m.status.code(), Some(1), "{name}: {}", stderr(&m));
        assert!(
            stderr(&m).contains("Could not open 'base.qcow2'"),
            "{}",
            stderr(&m)
        );
    }
    // A bare protocol node: QEMU finds no format over it, and neither does qinspect.
    w.qemu_img(&["create", "-f", "qcow2", "bare.qcow2", "1M"]);
    w.qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        r#"json:{"driver":"file","filename":"base.qcow2"}"#,
        "bare.qcow2",
    ]);
    assert_eq!(
        exit_of(&w, "qemu-img", &["map", "--output=json", "bare.qcow2"]),
        Some(1)
    );
    let out = w.qinspect(&["map", "--json", "bare.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("A block device must be specified"),
        "{}",
        stderr(&out)
    );
    // A protocol qinspect cannot open is named.
    w.qemu_img(&["create", "-f", "qcow2", "nbd.qcow2", "1M"]);
    w.qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "raw",
        "-b",
        r#"json:{"driver":"nbd","host":"localhost"}"#,
        "nbd.qcow2",
    ]);
    let out = w.qinspect(&["read", "nbd.qcow2", "-o", "n.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("'nbd' driver"), "{}", stderr(&out));
    w.qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "raw",
        "-b",
        "nbd://localhost:10809/x",
        "nbd.qcow2",
    ]);
    let out = w.qinspect(&["map", "--json", "nbd.qcow2"]);
    assert!(stderr(&out).contains("'nbd' protocol"), "{}", stderr(&out));
}

#[test]
fn data_files_resolve_in_the_working_directory_as_in_qemu() {
    let w = Work::new();
    std::fs::create_dir(w.path("a")).unwrap();
    std::fs::create_dir(w.path("b")).unwrap();
    let a = w.path("a");
    let b = w.path("b");
    run_in(
        &a,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw",
            "img.qcow2",
            "1M",
        ],
    );
    run_in(&a, "qemu-io", &["-c", "write -P 0xaa 0 64k", "img.qcow2"]);
    // From b, with no data.raw there: QEMU fails; qinspect reads the one next to
    // the image but says so.
    let q = run_in(
        &b,
        "qemu-img",
        &["convert", "-O", "raw", "../a/img.qcow2", "q.raw"],
    );
    assert_eq!(q.status.code(), Some(1));
    let m = qinspect_in(&b, &["read", "../a/img.qcow2", "--length", "1"]);
    assert_eq!(m.status.code(), Some(0));
    assert_eq!(m.stdout, [0xaa]);
    let err = stderr(&m);
    assert!(
        err.contains("warning") && err.contains("working directory"),
        "{err}"
    );
    // With a different data.raw in b, both read b's.
    let mut other = std::fs::read(a.join("data.raw")).unwrap();
    other[0] = b'B';
    std::fs::write(b.join("data.raw"), &other).unwrap();
    let q = run_in(
        &b,
        "qemu-img",
        &["convert", "-O", "raw", "../a/img.qcow2", "q.raw"],
    );
    assert!(q.status.success());
    let m = qinspect_in(&b, &["read", "../a/img.qcow2", "-o", "m.raw"]);
    assert!(
        m.status.success() && stderr(&m).is_empty(),
        "{}",
        stderr(&m)
    );
    let (qb, mb) = (
        std::fs::read(b.join("q.raw")).unwrap(),
        std::fs::read(b.join("m.raw")).unwrap(),
    );
    assert_eq!(qb[0], b'B');
    assert!(qb == mb);
}

// ---- 4. check and info verdicts ----

fn exit_of(w: &Work, prog: &str, args: &[&str]) -> Option<i32> {
    Command::new(prog)
        .args(args)
        .current_dir(w.dir.path())
        .output()
        .unwrap()
        .status
        .code()
}

#[test]
fn check_and_info_exit_as_qemu_img_does_on_images_it_refuses() {
    let w = Work::new();
    let mk = |name: &str, opts: &str| {
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([name, "1M"]);
        w.qemu_img(&a);
    };
    mk("rt0.qcow2", "");
    w.patch("rt0.qcow2", 56, &0u32.to_be_bytes());
    mk("snoff.qcow2", "");
    w.patch("snoff.qcow2", 64, &0x30001u64.to_be_bytes());
    mk("dfn.qcow2", "data_file=x.raw");
    w.qemu_img(&["amend", "-o", "data_file=", "dfn.qcow2"]);
    mk("dfg.qcow2", "data_file=gone.raw");
    std::fs::remove_file(w.path("gone.raw")).unwrap();
    mk("b.qcow2", "");
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "nob.qcow2",
    ]);
    std::fs::remove_file(w.path("b.qcow2")).unwrap();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
        "enc.qcow2",
        "1M",
    ]);
    // An L1 table running past the end of the file, which QEMU opens and writes.
    mk("l1eof.qcow2", "cluster_size=512");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("l1eof.qcow2"))
        .unwrap();
    f.set_len(0x680).unwrap();
    println!(
        "{:<14} {:>12} {:>12} {:>12} {:>12}",
        "image", "check qemu", "qinspect", "info qemu", "qinspect"
    );
    for (img, check_code, info_code) in [
        ("rt0.qcow2", 2, 1),
        ("snoff.qcow2", 1, 1),
        ("dfn.qcow2", 1, 0),
        ("dfg.qcow2", 1, 0),
        ("nob.qcow2", 1, 0),
        ("enc.qcow2", 1, 0),
        ("l1eof.qcow2", 0, 0),
    ] {
        let qc = exit_of(&w, "qemu-img", &["check", img]);
        let mc = exit_of(&w, env!("CARGO_BIN_EXE_qinspect"), &["check", img]);
        let qi = exit_of(&w, "qemu-img", &["info", "--output=json", img]);
        let mi = exit_of(&w, env!("CARGO_BIN_EXE_qinspect"), &["info", "--json", img]);
        println!("{img:<14} {:>12?} {:>12?} {:>12?} {:>12?}", qc, mc, qi, mi);
        assert_eq!(qc, Some(check_code), "qemu-img check {img}");
        assert_eq!(mc, qc, "check {img}");
        assert_eq!(qi, Some(info_code), "qemu-img info {img}");
        assert_eq!(mi, qi, "info {img}");
    }
    // The counts on the image without a refcount table are qemu-img's.
    w.assert_check_matches("rt0.qcow2");
    // Where qemu-img check refuses, the message is QEMU's reason, not "No errors".
    for (img, why) in [
        ("snoff.qcow2", "snapshot table offset invalid"),
        ("dfn.qcow2", "'data-file' is required for this image"),
        (
            "dfg.qcow2",
            "Could not open 'gone.raw': No such file or directory",
        ),
        (
            "nob.qcow2",
            "Could not open backing file: Could not open 'b.qcow2'",
        ),
        (
            "enc.qcow2",
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
    ] {
        let out = w.qinspect(&["check", img]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(text.contains(why), "{img}: {text}");
        assert!(!text.contains("No errors were found"), "{img}: {text}");
        let out = w.qinspect(&["check", "--json", img]);
        assert!(stderr(&out).contains(why), "{img} --json: {}", stderr(&out));
    }
    // info opens the image whose data file is unnamed, as qemu-img info does.
    w.assert_info_matches("dfn.qcow2");
    w.assert_info_matches("l1eof.qcow2");
    // ...and so does simulate: QEMU writes to and snapshots that image.
    w.run("cp", &["l1eof.qcow2", "l1copy.qcow2"]);
    let out = w.qinspect(&[
        "simulate",
        "--json",
        "l1eof.qcow2",
        "write:0:4k",
        "snapshot-create:s",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    w.qemu_io("l1copy.qcow2", &["write 0 4k"]);
    w.qemu_img(&["snapshot", "-c", "s", "l1copy.qcow2"]);
}

/// One open-time check: name, byte patches, QEMU's words, and whether
/// `qemu-img check` opens the image anyway.
type OpenCase = (&'static str, Vec<(u64, Vec<u8>)>, &'static str, bool);

/// QEMU's open-time checks (`qcow2_do_open`, `qcow2_read_extensions`,
/// `qcow2_read_snapshots`), one image each, with the wording QEMU uses. Each row
/// says whether `qemu-img check` (BDRV_O_CHECK) opens the image anyway.
#[test]
fn qemu_open_time_checks_that_qinspect_reproduces() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    w.qemu_io("base.qcow2", &["write -P 1 0 64k"]);
    w.qemu_img(&["snapshot", "-c", "s", "base.qcow2"]);
    let base = std::fs::read(w.path("base.qcow2")).unwrap();
    let be = |o: usize| u64::from_be_bytes(base[o..o + 8].try_into().unwrap());
    let sn_off = be(64);
    let u32b = |v: u32| v.to_be_bytes().to_vec();
    let u64b = |v: u64| v.to_be_bytes().to_vec();
    // (name, patches, QEMU's words, qemu-img check opens it too)
    let cases: Vec<OpenCase> = vec![
        (
            "version",
            vec![(4, u32b(4))],
            "Unsupported qcow2 version 4",
            false,
        ),
        (
            "cluster bits",
            vec![(20, u32b(8))],
            "Unsupported cluster size: 2^8",
            false,
        ),
        (
            "header length",
            vec![(100, u32b(96))],
            "qcow2 header too short",
            false,
        ),
        (
            "header length > cluster",
            vec![(100, u32b(0x20000))],
            "qcow2 header exceeds cluster size",
            false,
        ),
        (
            "backing file offset",
            vec![(8, u64b(0x20000))],
            "Invalid backing file offset",
            false,
        ),
        (
            "compression bit",
            vec![(72, u64b(8))],
            "Compression type incompatible feature bit must not be set",
            false,
        ),
        (
            "unknown incompatible",
            vec![(72, u64b(1 << 20))],
            "Unsupported qcow2 feature(s)",
            false,
        ),
        (
            "refcount order",
            vec![(96, u32b(7))],
            "Reference count entry width too large",
            false,
        ),
        (
            "crypt method",
            vec![(32, u32b(3))],
            "Unsupported encryption method 3",
            false,
        ),
        (
            "no refcount table",
            vec![(56, u32b(0))],
            "Image does not contain a reference count table",
            true,
        ),
        (
            "refcount table too large",
            vec![(56, u32b(0x0100_0000))],
            "Reference count table too large",
            false,
        ),
        (
            "refcount table offset",
            vec![(48, u64b(0x10001))],
            "Reference count table offset invalid",
            false,
        ),
        (
            "snapshot table too large",
            vec![(60, u32b(70000))],
            "Snapshot table too large",
            true,
        ),
        (
            "snapshot table offset",
            vec![(64, u64b(sn_off + 1))],
            "Snapshot table offset invalid",
            true,
        ),
        (
            "L1 too large",
            vec![(36, u32b(0x0400_0001))],
            "Active L1 table too large",
            false,
        ),
        (
            "L1 offset",
            vec![(40, u64b(be(40) + 8))],
            "Active L1 table offset invalid",
            false,
        ),
        (
            "L1 too small",
            vec![(36, u32b(0))],
            "L1 table is too small",
            false,
        ),
        (
            "image too big",
            vec![(24, u64b(1 << 62))],
            "Image is too big",
            false,
        ),
        (
            "backing name too long",
            vec![(8, u64b(0x200)), (16, u32b(2000))],
            "Backing file name too long",
            false,
        ),
        (
            "extension too large",
            vec![(112, u32b(0x1234)), (116, u32b(0x10000))],
            "Header extension too large",
            false,
        ),
        (
            "data-file-raw alone",
            vec![(88, u64b(2))],
            "data-file-raw requires a data file",
            false,
        ),
    ];
    println!(
        "{:<28} {:<9} {:<9} QEMU's words",
        "check", "qemu-img", "qinspect"
    );
    for (name, patches, words, check_opens) in &cases {
        let img = format!("{}.qcow2", name.replace([' ', '>'], "_"));
        std::fs::write(w.path(&img), &base).unwrap();
        for (off, bytes) in patches {
            w.patch(&img, *off, bytes);
        }
        let q = Command::new("qemu-img")
            .args(["info", &img])
            .current_dir(w.dir.path())
            .output()
            .unwrap();
        let io_only = *name == "data-file-raw alone";
        if io_only {
            // qemu-img info does not open data files; I/O does, and fails.
            w.assert_info_matches(&img);
            let q = Command::new("qemu-img")
                .args(["map", "--output=json", &img])
                .current_dir(w.dir.path())
                .output()
                .unwrap();
            let m = w.qinspect(&["map", "--json", &img]);
            println!(
                "{name:<28} {:<9} {:<9} {words} (map; info opens it)",
                q.status.code().unwrap_or(-1),
                m.status.code().unwrap_or(-1)
            );
            assert_eq!(q.status.code(), Some(1), "{name}: qemu-img map");
            assert!(
                stderr(&q).contains(words),
                "{name}: QEMU says {}",
                stderr(&q)
            );
            assert_eq!(m.status.code(), Some(1), "{name}: qinspect map");
            assert!(
                stderr(&m).contains(words),
                "{name}: qinspect says {}",
                stderr(&m)
            );
            assert_eq!(
                exit_of(&w, env!("CARGO_BIN_EXE_qinspect"), &["check", &img]),
                exit_of(&w, "qemu-img", &["check", &img])
            );
            continue;
        }
        let m = w.qinspect(&["info", "--json", &img]);
        println!(
            "{name:<28} {:<9} {:<9} {words}",
            q.status.code().unwrap_or(-1),
            m.status.code().unwrap_or(-1)
        );
        assert_eq!(q.status.code(), Some(1), "{name}: qemu-img info opens it");
        assert!(
            stderr(&q).contains(words),
            "{name}: QEMU says {}",
            stderr(&q)
        );
        assert_eq!(m.status.code(), Some(1), "{name}: qinspect info opens it");
        assert!(
            stderr(&m).contains(words),
            "{name}: qinspect says {}",
            stderr(&m)
        );
        // qemu-img check: fails to open (exit 1) unless BDRV_O_CHECK skips the test.
        let qc = exit_of(&w, "qemu-img", &["check", &img]);
        let mc = exit_of(&w, env!("CARGO_BIN_EXE_qinspect"), &["check", &img]);
        assert_eq!(mc, qc, "{name}: check exit code");
        if !check_opens {
            assert_eq!(qc, Some(1), "{name}: qemu-img check opens it");
        }
    }
}

// ---- 5. trace and map from one decision ----

#[test]
fn trace_says_what_map_says_for_raw_tails_and_holes() {
    let w = Work::new();
    // A raw base of 1000 bytes: QEMU rounds it up to 1024, the last 24 read zeros.
    std::fs::write(w.path("short.raw"), vec![0x77u8; 1000]).unwrap();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "short.raw",
        "-F",
        "raw",
        "t.qcow2",
        "1M",
    ]);
    // A sparse raw base: a hole in the middle.
    w.qemu_img(&["create", "-f", "raw", "sparse.raw", "1M"]);
    w.qemu_io("sparse.raw", &["write -P 1 0 64k", "write -P 2 960k 64k"]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "sparse.raw",
        "-F",
        "raw",
        "s.qcow2",
        "1M",
    ]);
    for (img, offsets) in [
        ("t.qcow2", vec![0u64, 999, 1000, 1023, 1024]),
        ("s.qcow2", vec![0, 65535, 65536, 500_000, 983_040]),
    ] {
        w.assert_map_matches(img);
        let map = Work::json(&w.qinspect_ok(&["map", "--json", img]));
        for off in offsets {
            let t = Work::json(&w.qinspect_ok(&["trace", "--json", img, &off.to_string()]));
            let e = map
                .as_array()
                .unwrap()
                .iter()
                .find(|e| {
                    let s = e["start"].as_u64().unwrap();
                    off >= s && off < s + e["length"].as_u64().unwrap()
                })
                .unwrap();
            let a = &t["answer"];
            for k in ["depth", "present", "zero", "data", "compressed"] {
                assert_eq!(a[k], e[k], "{img} at {off}: {k} ({t})");
            }
            let last = t["steps"].as_array().unwrap().last().unwrap();
            let says_zero =
                last["step"] == "zero" || t["outcome"].as_str().unwrap().starts_with("zeros");
            assert_eq!(
                says_zero,
                e["zero"] == true && e["data"] == false,
                "{img} at {off}: {}",
                t["outcome"]
            );
        }
    }
}

#[test]
fn clusters_name_vm_state_as_vm_state() {
    let w = Work::new();
    if which("qemu-system-x86_64").is_none() {
        panic!("qemu-system-x86_64 is missing: run .ci/install-qemu-system.sh (tests need savevm)");
    }
    w.qemu_img(&["create", "-f", "qcow2", "v.qcow2", "64M"]);
    w.qemu_io("v.qcow2", &["write -P 5 0 64k"]);
    let mut vm = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "stdio",
        ])
        .args(["-drive", "if=none,id=d0,file=v.qcow2,format=qcow2"])
        .current_dir(w.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = vm.stdin.take().unwrap();
        stdin.write_all(b"savevm snap1\nquit\n").unwrap();
    }
    assert!(vm.wait().unwrap().success());
    let info = Work::json(&w.qemu_img(&["info", "--output=json", "v.qcow2"]).stdout);
    assert!(info["snapshots"][0]["vm-state-size"].as_u64().unwrap() > 0);
    let v = Work::json(&w.qinspect_ok(&["clusters", "--json", "v.qcow2"]));
    let vm_state: Vec<&serde_json::Value> = v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["roles"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "vm-state")
        })
        .collect();
    assert!(!vm_state.is_empty(), "no vm-state cluster: {v}");
    for c in vm_state {
        for r in c["referrers"].as_array().unwrap() {
            assert!(r["l1"].as_str().unwrap().starts_with("snapshot 1"), "{r}");
            assert!(r["guest_offset"].as_u64().unwrap() >= 64 << 20, "{r}");
        }
    }
    w.assert_check_matches("v.qcow2");
}

fn which(prog: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(prog))
        .find(|p| p.exists())
}

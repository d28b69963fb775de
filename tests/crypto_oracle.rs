//! Encrypted images, built at test time by qemu-img and written by qemu-io
//! through the secret: `qinspect read` must give exactly the bytes of
//! `qemu-img convert --object ... --image-opts ... -O raw`, for the active view
//! and a snapshot, for every cipher, mode, IV generator and hash qemu-img
//! accepts; the LUKS fields must equal qemu-img info's; a wrong passphrase and a
//! damaged key slot must fail before anything is written.

mod common;
use common::Work;
use serde_json::Value;

const PASS: &str = "correct horse";

/// A LUKS (or legacy AES) image `name` made with `opts`, with data written
/// before and after an internal snapshot `snap1`. Returns false when qemu-img
/// itself refuses the options.
fn make(w: &Work, name: &str, opts: &str) -> bool {
    std::fs::write(w.path("pass"), PASS).unwrap();
    let out = std::process::Command::new("qemu-img")
        .current_dir(w.dir.path())
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s,file=pass",
            "-o",
            &format!("encrypt.key-secret=s,{opts}"),
            name,
            "3M",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        return false;
    }
    let io = |cmds: &[&str]| {
        let spec = image_opts(name);
        let mut args = vec!["--object", "secret,id=s,file=pass", "--image-opts", &spec];
        for c in cmds {
            args.extend(["-c", c]);
        }
        w.run("qemu-io", &args);
    };
    // A partial sector, a run over a cluster boundary, data near the end.
    io(&[
        "write -P 0x5a 0 70k",
        "write -P 0x33 1000k 5k",
        "write -P 0x77 2900k 100k",
    ]);
    w.run(
        "qemu-img",
        &[
            "snapshot",
            "--object",
            "secret,id=s,file=pass",
            "--image-opts",
            &image_opts(name),
            "-c",
            "snap1",
        ],
    );
    // After the snapshot: copy-on-write moves these clusters elsewhere in the
    // file, so the active view and the snapshot decrypt different host sectors.
    io(&[
        "write -P 0xc4 32k 64k",
        "write -z 1000k 4k",
        "write -P 0x11 1536k 3k",
    ]);
    true
}

/// One default LUKS image made once (qemu-img spends seconds benchmarking
/// PBKDF2 for every create), copied into each test's own directory.
fn default_image(w: &Work, name: &str) {
    use std::sync::OnceLock;
    static SHARED: OnceLock<Work> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let s = Work::new();
        assert!(make(&s, "shared.qcow2", &luks_opts("")));
        s
    });
    std::fs::copy(shared.path("shared.qcow2"), w.path(name)).unwrap();
    std::fs::write(w.path("pass"), PASS).unwrap();
}

fn image_opts(name: &str) -> String {
    format!("driver=qcow2,file.filename={name},encrypt.key-secret=s")
}

/// qemu-img convert through the secret, and qinspect read, are the same bytes.
fn assert_reads_match(w: &Work, name: &str, snapshot: Option<&str>) {
    let tag = snapshot.unwrap_or("active");
    let theirs = format!("{name}.{tag}.qemu.raw");
    let ours = format!("{name}.{tag}.qinspect.raw");
    let spec = image_opts(name);
    let mut q = vec![
        "convert",
        "--object",
        "secret,id=s,file=pass",
        "--image-opts",
    ];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        q.extend(["-l", &l]);
    }
    q.extend([spec.as_str(), "-O", "raw", &theirs]);
    w.run("qemu-img", &q);
    let mut a = vec![
        "read",
        "--object",
        "secret,id=s,file=pass",
        "--image-opts",
        &spec,
        "-o",
        &ours,
    ];
    if let Some(s) = snapshot {
        a.extend(["--snapshot", s]);
    }
    w.qinspect_ok(&a);
    let x = std::fs::read(w.path(&theirs)).unwrap();
    let y = std::fs::read(w.path(&ours)).unwrap();
    assert_eq!(x.len(), y.len(), "{name} ({tag}): length");
    if x != y {
        let first = x.iter().zip(&y).position(|(a, b)| a != b).unwrap_or(0);
        panic!("{name} ({tag}): qinspect read differs from qemu-img convert at byte {first:#x}");
    }
    // The pattern really came through (not zeros on both sides).
    assert!(
        y.contains(&0x5a) || y.contains(&0xc4),
        "{name} ({tag}): no data decrypted"
    );
    // Streaming to a pipe gives the same bytes as the sparse file path.
    let piped = w.qinspect_ok(&{
        let mut v = vec![
            "read",
            "--object",
            "secret,id=s,file=pass",
            "--image-opts",
            &spec,
        ];
        if let Some(s) = snapshot {
            v.extend(["--snapshot", s]);
        }
        v
    });
    assert!(piped == x, "{name} ({tag}): piped read differs");
}

fn luks_opts(extra: &str) -> String {
    format!("encrypt.format=luks,encrypt.iter-time=10{extra}")
}

#[test]
fn luks_default_aes_xts_plain64_matches_qemu_for_active_view_and_snapshot() {
    let w = Work::new();
    assert!(make(&w, "d.qcow2", &luks_opts("")));
    assert_reads_match(&w, "d.qcow2", None);
    assert_reads_match(&w, "d.qcow2", Some("snap1"));
    // A read at an odd offset and length, across sector and cluster boundaries.
    let spec = image_opts("d.qcow2");
    let all = w.qinspect_ok(&[
        "read",
        "--object",
        "secret,id=s,file=pass",
        "--image-opts",
        &spec,
    ]);
    let part = w.qinspect_ok(&[
        "read",
        "--object",
        "secret,id=s,file=pass",
        "--image-opts",
        &spec,
        "--offset",
        "65531",
        "--length",
        "1037",
    ]);
    assert_eq!(part, all[65531..65531 + 1037]);
}

#[test]
fn every_cipher_mode_and_ivgen_qemu_img_accepts_matches_qemu() {
    let w = Work::new();
    let mut made = 0;
    // Every family, key size and mode at least once, and every IV generator.
    let cases = [
        ("aes-128", "cbc", "plain64"),
        ("aes-128", "ecb", "plain64"),
        ("aes-128", "ctr", "plain"),
        ("aes-192", "xts", "plain64"),
        ("aes-256", "cbc", "essiv"),
        ("aes-256", "ctr", "plain64"),
        ("serpent-128", "cbc", "plain"),
        ("serpent-192", "xts", "essiv"),
        ("serpent-256", "xts", "plain64"),
        ("twofish-128", "ecb", "plain64"),
        ("twofish-192", "xts", "plain"),
        ("twofish-256", "xts", "plain64"),
        ("cast5-128", "cbc", "essiv"),
        ("cast5-128", "ctr", "plain64"),
    ];
    for (alg, mode, ivgen) in cases {
        let ivhash = if alg == "cast5-128" { "md5" } else { "sha256" };
        let opts = luks_opts(&format!(
            ",encrypt.cipher-alg={alg},encrypt.cipher-mode={mode},encrypt.ivgen-alg={ivgen},encrypt.ivgen-hash-alg={ivhash}"
        ));
        let name = format!("{alg}-{mode}-{ivgen}.qcow2");
        assert!(make(&w, &name, &opts), "qemu-img refused {opts}");
        assert_reads_match(&w, &name, None);
        made += 1;
    }
    // What qemu-img itself refuses is not a case: CAST5 has no XTS mode.
    assert!(!make(
        &w,
        "no.qcow2",
        &luks_opts(",encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=xts")
    ));
    assert_eq!(made, cases.len());
}

#[test]
fn every_ivgen_and_pbkdf2_hash_matches_qemu() {
    let w = Work::new();
    let mut cases = vec![
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain".to_string(),
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64".to_string(),
        ",encrypt.ivgen-alg=essiv".to_string(),
        ",encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=md5,encrypt.cipher-alg=aes-128".to_string(),
    ];
    // sha256 is the default, used everywhere else.
    for h in [
        "md5",
        "sha1",
        "sha224",
        "sha384",
        "sha512",
        "ripemd160",
        "sm3",
    ] {
        cases.push(format!(",encrypt.hash-alg={h}"));
    }
    for (i, c) in cases.iter().enumerate() {
        let name = format!("h{i}.qcow2");
        assert!(make(&w, &name, &luks_opts(c)), "qemu-img refused {c}");
        assert_reads_match(&w, &name, None);
        if i % 3 == 0 {
            assert_reads_match(&w, &name, Some("snap1"));
        }
    }
}

#[test]
fn legacy_aes_matches_qemu_for_active_view_and_snapshot() {
    let w = Work::new();
    assert!(make(&w, "aes.qcow2", "encrypt.format=aes"));
    assert_reads_match(&w, "aes.qcow2", None);
    assert_reads_match(&w, "aes.qcow2", Some("snap1"));
    let info = Work::json(&w.qinspect_ok(&["info", "--json", "aes.qcow2"]));
    let q = Work::json(&w.qemu_img(&["info", "--output=json", "aes.qcow2"]).stdout);
    assert_eq!(
        info["format-specific"]["data"]["encrypt"],
        q["format-specific"]["data"]["encrypt"]
    );
    assert_eq!(info["format-specific"]["data"]["encrypt"]["format"], "aes");
    // A guest hexdump decrypts too.
    let hx = String::from_utf8(w.qinspect_ok(&[
        "hexdump",
        "--passphrase-file",
        "pass",
        "aes.qcow2",
        "--guest",
        "0",
        "--length",
        "16",
        "--color",
        "never",
    ]))
    .unwrap();
    assert!(hx.contains("5a 5a 5a 5a"), "{hx}");
}

#[test]
fn luks_fields_equal_qemu_img_info() {
    let w = Work::new();
    for (name, extra) in [
        ("i1.qcow2", ""),
        (
            "i2.qcow2",
            ",encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1",
        ),
        (
            "i3.qcow2",
            ",encrypt.cipher-alg=twofish-256,encrypt.cipher-mode=ctr,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512",
        ),
    ] {
        assert!(make(&w, name, &luks_opts(extra)));
        let q = Work::json(&w.qemu_img(&["info", "--output=json", name]).stdout);
        let ours = Work::json(&w.qinspect_ok(&["info", "--json", name]));
        let qe = &q["format-specific"]["data"]["encrypt"];
        assert!(qe["slots"].as_array().is_some_and(|s| s.len() == 8), "{qe}");
        assert_eq!(&ours["format-specific"]["data"]["encrypt"], qe, "{name}");
        // The readable output names every slot and the cipher.
        let text = String::from_utf8(w.qinspect_ok(&["info", name])).unwrap();
        let alg = qe["cipher-alg"].as_str().unwrap();
        assert!(text.contains(alg), "{text}");
        assert!(text.contains(qe["uuid"].as_str().unwrap()), "{text}");
        for i in 0..8 {
            assert!(text.contains(&format!("slot {i}")), "{text}");
        }
        // The header's clusters are referenced once each, as check counts them.
        let luks = &ours["luks"];
        let (off, len) = (
            luks["offset"].as_u64().unwrap(),
            luks["length"].as_u64().unwrap(),
        );
        let cl = Work::json(&w.qinspect_ok(&["clusters", "--json", name]));
        let cs = cl["cluster_size"].as_u64().unwrap();
        let header: Vec<&Value> = cl["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                c["roles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == "crypto-header")
            })
            .collect();
        assert_eq!(
            header.len() as u64,
            (off + len).div_ceil(cs) - off / cs,
            "{name}"
        );
        assert!(
            header
                .iter()
                .all(|c| c["reference"] == 1 && c["refcount"] == 1)
        );
        assert_eq!(header[0]["offset"].as_u64(), Some(off / cs * cs));
    }
}

#[test]
fn wrong_passphrase_fails_clearly_and_writes_nothing() {
    let w = Work::new();
    default_image(&w, "w.qcow2");
    std::fs::write(w.path("bad"), "correct horsf").unwrap();
    let spec = "driver=qcow2,file.filename=w.qcow2,encrypt.key-secret=b";
    let out = w.qinspect(&[
        "read",
        "--object",
        "secret,id=b,file=bad",
        "--image-opts",
        spec,
        "-o",
        "out.raw",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no key slot matches this passphrase"), "{err}");
    assert!(!w.path("out.raw").exists(), "an output file was created");
    let out = w.qinspect(&["read", "--passphrase-file", "bad", "w.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "bytes were written to stdout");
    // qemu-img fails the same way.
    let q = std::process::Command::new("qemu-img")
        .current_dir(w.dir.path())
        .args([
            "convert",
            "--object",
            "secret,id=b,file=bad",
            "--image-opts",
            spec,
            "-O",
            "raw",
            "q.raw",
        ])
        .output()
        .unwrap();
    assert!(!q.status.success());
    // The right passphrase in a file works without --image-opts.
    let a = w.qinspect_ok(&["read", "--passphrase-file", "pass", "w.qcow2"]);
    assert!(a.contains(&0x5a));
}

#[test]
fn passphrases_are_never_echoed_and_plain_arguments_warn() {
    let w = Work::new();
    default_image(&w, "p.qcow2");
    let spec = image_opts("p.qcow2");
    let secret = format!("secret,id=s,data={PASS}");
    for args in [
        vec![
            "read",
            "--object",
            &secret,
            "--image-opts",
            &spec,
            "--length",
            "512",
        ],
        vec!["trace", "--object", &secret, "--image-opts", &spec, "0"],
        vec!["check", "--object", &secret, "--image-opts", &spec],
    ] {
        let out = w.qinspect(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("warning") && err.contains("data="),
            "{args:?}: no warning: {err}"
        );
        assert!(!err.contains(PASS) && !String::from_utf8_lossy(&out.stdout).contains(PASS));
    }
    // A wrong one is not echoed in the error either.
    let out = w.qinspect(&[
        "read",
        "--object",
        "secret,id=s,data=hunter2",
        "--image-opts",
        &spec,
    ]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    // base64 secrets, as qemu's format=base64.
    std::fs::write(w.path("b64"), "Y29ycmVjdCBob3JzZQ==").unwrap();
    let out = w.qinspect_ok(&[
        "read",
        "--object",
        "secret,id=s,file=b64,format=base64",
        "--image-opts",
        &spec,
        "--length",
        "512",
    ]);
    assert_eq!(out, vec![0x5a; 512]);
}

#[test]
fn check_without_a_key_exits_as_qemu_img_check_and_with_one_matches_it() {
    let w = Work::new();
    default_image(&w, "c.qcow2");
    assert!(make(&w, "a.qcow2", "encrypt.format=aes"));
    for name in ["c.qcow2", "a.qcow2"] {
        let q = std::process::Command::new("qemu-img")
            .current_dir(w.dir.path())
            .args(["check", name])
            .output()
            .unwrap();
        let ours = w.qinspect(&["check", name]);
        assert_eq!(ours.status.code(), q.status.code(), "{name}");
        assert_eq!(ours.status.code(), Some(1));
        assert!(ours.stdout.is_empty());
        assert!(String::from_utf8_lossy(&ours.stderr).contains("encrypt.key-secret"));
        // With the key: qemu-img check's verdict and counts.
        let spec = image_opts(name);
        let q = std::process::Command::new("qemu-img")
            .current_dir(w.dir.path())
            .args([
                "check",
                "--output=json",
                "--object",
                "secret,id=s,file=pass",
                "--image-opts",
                &spec,
            ])
            .output()
            .unwrap();
        let ours = w.qinspect(&[
            "check",
            "--json",
            "--object",
            "secret,id=s,file=pass",
            "--image-opts",
            &spec,
        ]);
        assert_eq!(ours.status.code(), q.status.code());
        let (qj, oj) = (Work::json(&q.stdout), Work::json(&ours.stdout));
        // `filename` too: with --image-opts qemu-img names the option string.
        for k in [
            "filename",
            "allocated-clusters",
            "total-clusters",
            "image-end-offset",
            "check-errors",
        ] {
            assert_eq!(oj[k], qj[k], "{name}: {k}");
        }
    }
}

#[test]
fn trace_names_the_iv_sector_and_the_key_slot() {
    let w = Work::new();
    default_image(&w, "t.qcow2");
    // A second passphrase in key slot 3: the trace must name slot 3.
    std::fs::write(w.path("pass2"), "second").unwrap();
    w.run(
        "qemu-img",
        &[
            "amend",
            "--object",
            "secret,id=s,file=pass",
            "--object",
            "secret,id=n,file=pass2",
            "--image-opts",
            &image_opts("t.qcow2"),
            "-o",
            "encrypt.new-secret=n,encrypt.state=active,encrypt.keyslot=3,encrypt.iter-time=10",
        ],
    );
    let t = Work::json(&w.qinspect_ok(&[
        "trace",
        "--json",
        "--passphrase-file",
        "pass2",
        "t.qcow2",
        "0x10200",
    ]));
    let steps = t["steps"].as_array().unwrap();
    let data = steps
        .iter()
        .find(|s| s["step"] == "data")
        .expect("data step");
    let host = u64::from_str_radix(
        data["host_offset"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    let dec = steps
        .iter()
        .find(|s| s["step"] == "decrypt")
        .expect("decrypt step");
    assert_eq!(dec["iv_sector"], host / 512);
    assert_eq!(dec["key_slot"], 3);
    assert_eq!(dec["cipher"], "aes-256-xts-plain64");
    let text = String::from_utf8(w.qinspect_ok(&[
        "trace",
        "--passphrase-file",
        "pass2",
        "t.qcow2",
        "0x10200",
    ]))
    .unwrap();
    assert!(
        text.contains(&format!("sector {}", host / 512)) && text.contains("key slot 3"),
        "{text}"
    );
    // The other passphrase opens slot 0 and reads the same bytes.
    let a = w.qinspect_ok(&["read", "--passphrase-file", "pass", "t.qcow2"]);
    let b = w.qinspect_ok(&["read", "--passphrase-file", "pass2", "t.qcow2"]);
    assert!(a == b && a.contains(&0xc4));
    // Damage slot 0's key material: its passphrase no longer opens anything (and
    // the message allows for damage), while slot 3 still opens the same data.
    let info = Work::json(&w.qinspect_ok(&["info", "--json", "t.qcow2"]));
    let at = info["luks"]["offset"].as_u64().unwrap()
        + info["luks"]["slots"][0]["key_offset_sector"]
            .as_u64()
            .unwrap()
            * 512;
    w.patch("t.qcow2", at + 100, &[0xff; 64]);
    let out = w.qinspect(&["read", "--passphrase-file", "pass", "t.qcow2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("no key slot matches this passphrase (tried active key slots 0, 3; if the passphrase is right, their key material is damaged)"), "{err}");
    assert!(w.qinspect_ok(&["read", "--passphrase-file", "pass2", "t.qcow2"]) == a);
}

#[test]
fn damaged_key_slot_is_named_with_the_reason() {
    let w = Work::new();
    default_image(&w, "k.qcow2");
    let info = Work::json(&w.qinspect_ok(&["info", "--json", "k.qcow2"]));
    let luks = info["luks"]["offset"].as_u64().expect("LUKS header offset");
    assert_eq!(info["luks"]["slots"][0]["stripes"], 4000);
    // Slot 0's stripes (offset 208 + 44) set to 1.
    w.patch("k.qcow2", luks + 252, &1u32.to_be_bytes());
    let out = w.qinspect(&["read", "--passphrase-file", "pass", "k.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Keyslot 0 is corrupted (stripes 1 != 4000)"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    let q = std::process::Command::new("qemu-img")
        .current_dir(w.dir.path())
        .args([
            "convert",
            "--object",
            "secret,id=s,file=pass",
            "--image-opts",
            &image_opts("k.qcow2"),
            "-O",
            "raw",
            "q.raw",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&q.stderr).contains("Keyslot 0 is corrupted"),
        "{q:?}"
    );
}

#[test]
fn encrypted_backing_file_opens_with_backing_key_secret() {
    let w = Work::new();
    default_image(&w, "base.qcow2");
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "3M",
    ]);
    let spec = "driver=qcow2,file.filename=top.qcow2,backing.encrypt.key-secret=s";
    w.run(
        "qemu-io",
        &[
            "--object",
            "secret,id=s,file=pass",
            "--image-opts",
            spec,
            "-c",
            "write -P 0x11 0 4k",
        ],
    );
    w.run(
        "qemu-img",
        &[
            "convert",
            "--object",
            "secret,id=s,file=pass",
            "--image-opts",
            spec,
            "-O",
            "raw",
            "q.raw",
        ],
    );
    w.qinspect_ok(&[
        "read",
        "--object",
        "secret,id=s,file=pass",
        "--image-opts",
        spec,
        "-o",
        "o.raw",
    ]);
    let (q, o) = (
        std::fs::read(w.path("q.raw")).unwrap(),
        std::fs::read(w.path("o.raw")).unwrap(),
    );
    assert!(
        q == o,
        "read through an encrypted backing file differs from qemu-img convert"
    );
    assert_eq!(
        &o[0x1000..0x1010],
        &[0x5a; 16],
        "the backing file's bytes were decrypted"
    );
    // Without the backing key, reading the backing file's data fails and says why.
    let out = w.qinspect(&["read", "top.qcow2", "--offset", "64k", "--length", "16"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no passphrase was given for it"));
    assert!(out.stdout.is_empty());
    let out = w.qinspect(&["read", "top.qcow2", "-o", "none.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !w.path("none.raw").exists(),
        "an output file was created without a key"
    );
    // --passphrase-file opens every encrypted layer that has no secret of its own.
    let o2 = w.qinspect_ok(&["read", "--passphrase-file", "pass", "top.qcow2"]);
    assert!(o2 == q);
}

#[test]
fn legacy_aes_uses_the_first_16_bytes_of_a_longer_passphrase() {
    let w = Work::new();
    std::fs::write(w.path("long"), "0123456789abcdefXYZ").unwrap();
    std::fs::write(w.path("prefix"), "0123456789abcdef").unwrap();
    let sec = "secret,id=l,file=long";
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        sec,
        "-o",
        "encrypt.format=aes,encrypt.key-secret=l",
        "l.qcow2",
        "1M",
    ]);
    let spec = "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=l";
    w.run(
        "qemu-io",
        &[
            "--object",
            sec,
            "--image-opts",
            spec,
            "-c",
            "write -P 0x6c 512 3k",
        ],
    );
    w.run(
        "qemu-img",
        &[
            "convert",
            "--object",
            sec,
            "--image-opts",
            spec,
            "-O",
            "raw",
            "q.raw",
        ],
    );
    let q = std::fs::read(w.path("q.raw")).unwrap();
    assert_eq!(q[512], 0x6c);
    // The whole passphrase, and its first 16 bytes alone, give qemu-img's bytes.
    assert!(w.qinspect_ok(&["read", "--passphrase-file", "long", "l.qcow2"]) == q);
    assert!(w.qinspect_ok(&["read", "--passphrase-file", "prefix", "l.qcow2"]) == q);
    // A different one decrypts to other bytes: legacy AES cannot tell it is wrong.
    std::fs::write(w.path("other"), "0123456789abcdeX").unwrap();
    assert!(w.qinspect_ok(&["read", "--passphrase-file", "other", "l.qcow2"]) != q);
}

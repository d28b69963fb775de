//! Broken and hostile images: a corpus built from real qemu-img images plus byte
//! patches, and every command run on every one of them in a limited address space
//! (`ulimit -v 1048576`) and under a 10 s timeout. Each must either report or fail
//! with a message that says what is wrong — never panic, never die by a signal,
//! never hang — and no file may change. The per-image results are printed (run
//! with `--show-output` to see them).

mod common;
use common::Work;
use std::collections::BTreeMap;
use std::process::Command;

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}
fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

struct Corpus {
    w: Work,
    names: Vec<String>,
}

impl Corpus {
    fn variant(
        &mut self,
        name: &str,
        from: &str,
        patches: &[(u64, Vec<u8>)],
        truncate: Option<u64>,
    ) {
        let mut b = std::fs::read(self.w.path(from)).unwrap();
        for (off, bytes) in patches {
            let end = *off as usize + bytes.len();
            if b.len() < end {
                b.resize(end, 0);
            }
            b[*off as usize..end].copy_from_slice(bytes);
        }
        if let Some(t) = truncate {
            b.truncate(t as usize);
        }
        std::fs::write(self.w.path(name), b).unwrap();
        self.names.push(name.to_string());
    }
}

fn header_u64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

fn build() -> Corpus {
    let w = Work::new();
    // Base: 64 KiB clusters, data, a snapshot, 64 GiB so the L1 table has 128 entries.
    w.qemu_img(&["create", "-f", "qcow2", "base.qcow2", "64G"]);
    w.qemu_io(
        "base.qcow2",
        &["write -P 0xaa 0 128k", "write -P 0xbb 1M 64k"],
    );
    w.qemu_img(&["snapshot", "-c", "snap", "base.qcow2"]);
    w.qemu_io("base.qcow2", &["write -P 0xcc 0 4k"]);
    w.qemu_img(&["create", "-f", "raw", "src.raw", "1M"]);
    w.qemu_io("src.raw", &["write -P 0x61 0 256k"]);
    w.qemu_img(&["convert", "-c", "-O", "qcow2", "src.raw", "comp.qcow2"]);
    let base = std::fs::read(w.path("base.qcow2")).unwrap();
    let l1 = header_u64(&base, 40);
    let rt = header_u64(&base, 48);
    let st = header_u64(&base, 64);
    let l2 = header_u64(&base, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let len = base.len() as u64;
    let comp = std::fs::read(w.path("comp.qcow2")).unwrap();
    let cl2 = header_u64(&comp, header_u64(&comp, 40) as usize) & 0x00ff_ffff_ffff_fe00;
    let mut c = Corpus { w, names: vec![] };
    std::fs::write(c.w.path("empty.qcow2"), b"").unwrap();
    c.names.push("empty.qcow2".into());
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let random: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(c.w.path("random.bin"), random).unwrap();
    c.names.push("random.bin".into());
    c.variant("trunc-header.qcow2", "base.qcow2", &[], Some(50));
    c.variant("trunc-tables.qcow2", "base.qcow2", &[], Some(l2 + 100));
    c.variant("trunc-snaptable.qcow2", "base.qcow2", &[], Some(st + 20));
    c.variant(
        "bad-magic.qcow2",
        "base.qcow2",
        &[(0, b"QFI\0".to_vec())],
        None,
    );
    c.variant("version-9.qcow2", "base.qcow2", &[(4, be32(9))], None);
    c.variant("cluster-bits-8.qcow2", "base.qcow2", &[(20, be32(8))], None);
    c.variant(
        "cluster-bits-63.qcow2",
        "base.qcow2",
        &[(20, be32(63))],
        None,
    );
    c.variant(
        "l1-size-max.qcow2",
        "base.qcow2",
        &[(36, be32(u32::MAX))],
        None,
    );
    c.variant(
        "l1-past-eof.qcow2",
        "base.qcow2",
        &[(40, be64(len + (1 << 30)))],
        None,
    );
    c.variant(
        "l1-misaligned.qcow2",
        "base.qcow2",
        &[(40, be64(l1 + 8))],
        None,
    );
    c.variant(
        "reftable-past-eof.qcow2",
        "base.qcow2",
        &[(48, be64(len + (1 << 30)))],
        None,
    );
    c.variant(
        "reftable-misaligned.qcow2",
        "base.qcow2",
        &[(48, be64(rt + 24))],
        None,
    );
    c.variant(
        "snaptable-past-eof.qcow2",
        "base.qcow2",
        &[(64, be64(len + (1 << 30)))],
        None,
    );
    c.variant(
        "snaptable-misaligned.qcow2",
        "base.qcow2",
        &[(64, be64(st + 8))],
        None,
    );
    c.variant(
        "refcount-order-7.qcow2",
        "base.qcow2",
        &[(96, be32(7))],
        None,
    );
    c.variant(
        "header-length-big.qcow2",
        "base.qcow2",
        &[(100, be32(65536 + 8))],
        None,
    );
    c.variant(
        "unknown-incompat.qcow2",
        "base.qcow2",
        &[(72, be64(1 << 12))],
        None,
    );
    c.variant("crypt-9.qcow2", "base.qcow2", &[(32, be32(9))], None);
    c.variant(
        "snapshots-max.qcow2",
        "base.qcow2",
        &[(60, be32(u32::MAX))],
        None,
    );
    c.variant(
        "size-max.qcow2",
        "base.qcow2",
        &[(24, be64(u64::MAX))],
        None,
    );
    c.variant(
        "l1-to-header.qcow2",
        "base.qcow2",
        &[(l1, be64(0x8000_0000_0000_0000))],
        None,
    );
    c.variant(
        "l1-entry-past-eof.qcow2",
        "base.qcow2",
        &[(l1 + 8, be64(0x8000_0000_ffff_0000))],
        None,
    );
    let max_desc = 0x4000_0000_0000_0000u64 | (0xffu64 << 54) | (len - 100);
    c.variant(
        "compressed-max.qcow2",
        "comp.qcow2",
        &[(cl2, be64(max_desc))],
        None,
    );
    c.variant(
        "l2-reserved.qcow2",
        "base.qcow2",
        &[
            (l2, be64(0x8100_0000_0005_0001)),
            (l2 + 8, be64(0x3e00_0000_0000_01fe)),
        ],
        None,
    );
    let all_one: Vec<u8> = std::iter::repeat_n(be64(0x8000_0000_0000_0000 | l2), 128)
        .flatten()
        .collect();
    c.variant("l1-all-one-l2.qcow2", "base.qcow2", &[(l1, all_one)], None);
    c.variant("reftable-self.qcow2", "base.qcow2", &[(rt, be64(rt))], None);
    // Chains: a loop, an image naming itself, a missing layer, 300 layers.
    let w = &c.w;
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "loop-b.qcow2",
        "-F",
        "qcow2",
        "loop-a.qcow2",
        "1M",
    ]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "loop-a.qcow2",
        "-F",
        "qcow2",
        "loop-b.qcow2",
        "1M",
    ]);
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "xelf.qcow2",
        "-F",
        "qcow2",
        "self.qcow2",
        "1M",
    ]);
    let mut s = std::fs::read(w.path("self.qcow2")).unwrap();
    let at = s.windows(10).position(|x| x == b"xelf.qcow2").unwrap();
    s[at] = b's';
    std::fs::write(w.path("self.qcow2"), s).unwrap();
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "missing.qcow2",
        "1M",
    ]);
    w.qemu_img(&["create", "-f", "raw", "chain-0.raw", "1M"]);
    w.qemu_io("chain-0.raw", &["write -P 7 0 4k"]);
    // A 300-layer chain, made by copying one overlay and patching its backing name.
    w.qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "chain-000.qcow2",
        "-F",
        "qcow2",
        "tmpl.qcow2",
        "1M",
    ]);
    let tmpl = std::fs::read(w.path("tmpl.qcow2")).unwrap();
    let at = tmpl
        .windows(15)
        .position(|x| x == b"chain-000.qcow2")
        .unwrap();
    for i in 1..=300u32 {
        let mut t = tmpl.clone();
        let name = if i == 1 {
            "chain-0.raw\0\0\0\0".to_string()
        } else {
            format!("chain-{:03}.qcow2", i - 1)
        };
        t[at..at + 15].copy_from_slice(&name.as_bytes()[..15]);
        if i == 1 {
            // Shorter name: fix the length field and the format (raw).
            t[16..20].copy_from_slice(&11u32.to_be_bytes());
            let f = t.windows(5).position(|x| x == b"qcow2").unwrap();
            t[f..f + 5].copy_from_slice(b"raw\0\0");
            let len_at = f - 4;
            t[len_at..len_at + 4].copy_from_slice(&3u32.to_be_bytes());
        }
        std::fs::write(w.path(&format!("chain-{i:03}.qcow2")), t).unwrap();
    }
    for n in [
        "loop-a.qcow2",
        "self.qcow2",
        "missing.qcow2",
        "chain-300.qcow2",
    ] {
        c.names.push(n.into());
    }
    luks_variants(&mut c);
    c
}

/// An encrypted image (passphrase in the file `pass`) and hostile LUKS headers.
fn luks_variants(c: &mut Corpus) {
    let w = &c.w;
    std::fs::write(w.path("pass"), "abc").unwrap();
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s,file=pass",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
        "luks.qcow2",
        "1M",
    ]);
    w.run(
        "qemu-io",
        &[
            "--object",
            "secret,id=s,file=pass",
            "--image-opts",
            "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=s",
            "-c",
            "write -P 0x42 0 64k",
        ],
    );
    c.names.push("luks.qcow2".into());
    let b = std::fs::read(w.path("luks.qcow2")).unwrap();
    // The crypto header extension is the first one: type, length, offset, length.
    assert_eq!(&b[0x70..0x74], &0x0537_be77u32.to_be_bytes());
    let l = header_u64(&b, 0x78);
    let slot0 = l + 208;
    let big = be32(u32::MAX);
    type Patch = Vec<(u64, Vec<u8>)>;
    let luks: Vec<(&str, Patch, Option<u64>)> = vec![
        (
            "luks-slot-iters-max.qcow2",
            vec![(slot0 + 4, big.clone())],
            None,
        ),
        (
            "luks-mk-iters-max.qcow2",
            vec![(l + 164, big.clone())],
            None,
        ),
        ("luks-mk-iters-0.qcow2", vec![(l + 164, be32(0))], None),
        ("luks-stripes-0.qcow2", vec![(slot0 + 44, be32(0))], None),
        (
            "luks-stripes-max.qcow2",
            vec![(slot0 + 44, big.clone())],
            None,
        ),
        ("luks-slot-state.qcow2", vec![(slot0, be32(0x1234))], None),
        (
            "luks-keyoff-past-eof.qcow2",
            vec![(slot0 + 40, be32(0x0100_0000)), (l + 104, big.clone())],
            None,
        ),
        (
            "luks-keyoff-in-header.qcow2",
            vec![(slot0 + 40, be32(1))],
            None,
        ),
        (
            "luks-payload-past-eof.qcow2",
            vec![(l + 104, big.clone())],
            None,
        ),
        ("luks-payload-0.qcow2", vec![(l + 104, be32(0))], None),
        ("luks-bad-magic.qcow2", vec![(l, b"XUKS".to_vec())], None),
        ("luks-version-2.qcow2", vec![(l + 6, vec![0, 2])], None),
        (
            "luks-key-bytes-max.qcow2",
            vec![(l + 108, big.clone())],
            None,
        ),
        ("luks-key-bytes-0.qcow2", vec![(l + 108, be32(0))], None),
        (
            "luks-unterminated-name.qcow2",
            vec![(l + 8, vec![b'a'; 32])],
            None,
        ),
        (
            "luks-cipher-blowfish.qcow2",
            vec![(l + 8, b"blowfish\0".to_vec())],
            None,
        ),
        (
            "luks-mode-garbage.qcow2",
            vec![(l + 40, b"xts\0".to_vec())],
            None,
        ),
        (
            "luks-essiv-sha1.qcow2",
            vec![(l + 40, b"xts-essiv:sha1\0".to_vec())],
            None,
        ),
        (
            "luks-hash-unknown.qcow2",
            vec![(l + 72, b"whirlpool\0".to_vec())],
            None,
        ),
        (
            "luks-header-past-eof.qcow2",
            vec![(0x78, be64(1 << 40))],
            None,
        ),
        ("luks-length-short.qcow2", vec![(0x80, be64(4096))], None),
        ("luks-trunc-material.qcow2", vec![], Some(l + 0x3000)),
        ("luks-trunc-header.qcow2", vec![], Some(l + 100)),
        ("luks-method-aes.qcow2", vec![(32, be32(1))], None),
    ];
    for (name, patches, trunc) in luks {
        c.variant(name, "luks.qcow2", &patches, trunc);
    }
}

/// The outcome of one command: report (exit 0, 2, 3) or a refusal with a message.
fn run(w: &Work, args: &[&str]) -> (i32, String) {
    let bin = env!("CARGO_BIN_EXE_qinspect");
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "ulimit -v 1048576; exec timeout -s KILL 10 '{bin}' {} > out.bin 2> err.txt",
        quoted.join(" ")
    );
    let st = Command::new("bash")
        .args(["-c", &script])
        .current_dir(w.dir.path())
        .status()
        .unwrap();
    let err = std::fs::read_to_string(w.path("err.txt")).unwrap_or_default();
    let Some(code) = st.code() else {
        panic!("qinspect {args:?} was killed by a signal (timeout or crash): {err}");
    };
    assert_ne!(code, 137, "qinspect {args:?} was killed after 10 s: {err}");
    assert!(
        !err.contains("panicked"),
        "qinspect {args:?} panicked: {err}"
    );
    let out = std::fs::read_to_string(w.path("out.bin")).unwrap_or_default();
    let msg = if !err.trim().is_empty() {
        err.lines().next().unwrap_or("").to_string()
    } else {
        // check and simulate say why on standard output.
        out.lines()
            .find(|l| {
                l.contains("refuses")
                    || l.contains("Check failed")
                    || l.contains("fails")
                    || l.contains("cannot be opened")
            })
            .unwrap_or("")
            .to_string()
    };
    if code != 0 && code != 2 && code != 3 {
        assert!(
            !msg.trim().is_empty(),
            "qinspect {args:?} failed without a message (exit {code}): {out}"
        );
    }
    (code, msg)
}

#[test]
fn every_command_on_every_broken_image() {
    let c = build();
    let w = &c.w;
    let mut before = BTreeMap::new();
    for entry in std::fs::read_dir(w.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        before.insert(n.clone(), w.fingerprint(&n));
    }
    let commands: Vec<Vec<&str>> = vec![
        vec!["info"],
        vec!["info", "--json"],
        vec!["check"],
        vec!["check", "--json"],
        vec!["map", "--json"],
        vec!["trace", "IMG", "0x10000"],
        vec!["read", "-o", "/dev/null", "--length", "64M"],
        vec!["clusters", "--json"],
        vec!["dump", "header"],
        vec!["dump", "l1"],
        vec!["dump", "l2", "IMG", "0"],
        vec!["dump", "refcount-table"],
        vec!["dump", "refcount-block", "IMG", "0"],
        vec!["dump", "snapshots"],
        vec!["hexdump", "--host", "0"],
        vec!["hexdump", "--guest", "0x10000"],
        vec!["dump", "luks"],
        // As the read above: a bounded length, so that a 64 GiB disk of zeros
        // is not mistaken for a hang under the 10 s limit on a loaded machine.
        vec![
            "read",
            "--passphrase-file",
            "pass",
            "-o",
            "/dev/null",
            "--length",
            "64M",
        ],
        vec!["check", "--passphrase-file", "pass"],
        vec![
            "simulate",
            "IMG",
            "snapshot-create:x",
            "write:0:4096",
            "discard:65536:65536",
        ],
    ];
    println!(
        "exit code per command ({}), then the first message for the image",
        commands
            .iter()
            .map(|c| c.join(" ").replace("IMG ", ""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for name in &c.names {
        let mut codes = Vec::new();
        let mut first_msg = String::new();
        for cmd in &commands {
            let mut args: Vec<&str> = Vec::new();
            let mut placed = false;
            for a in cmd {
                if *a == "IMG" {
                    args.push(name);
                    placed = true;
                } else {
                    args.push(a);
                }
            }
            if !placed {
                // The image goes after the subcommand (and the table name for dump).
                let at = if cmd[0] == "dump" { 2 } else { 1 };
                args.insert(at, name);
            }
            let (code, msg) = run(w, &args);
            codes.push(code.to_string());
            if first_msg.is_empty() && code != 0 && !msg.is_empty() {
                first_msg = msg;
            }
        }
        println!(
            "{name:<26} {}  {}",
            codes.join(" "),
            first_msg.chars().take(110).collect::<String>()
        );
    }
    // Nothing was written: every file is as it was.
    for (n, fp) in &before {
        if n != "out.bin" && n != "err.txt" {
            assert_eq!(&w.fingerprint(n), fp, "{n} changed");
        }
    }
    // Spot checks that the messages name what is wrong.
    assert!(
        run(w, &["info", "version-9.qcow2"])
            .1
            .contains("Unsupported qcow2 version 9")
    );
    assert!(run(w, &["map", "loop-a.qcow2"]).1.contains("loop"));
    assert!(run(w, &["map", "self.qcow2"]).1.contains("loop"));
    assert!(run(w, &["map", "missing.qcow2"]).1.contains("gone.qcow2"));
    assert_eq!(
        run(w, &["read", "chain-300.qcow2", "-o", "/dev/null"]).0,
        0,
        "300 layers are followed"
    );
    // Hostile LUKS headers: refused in bounded time, naming the field.
    let with_key = |n: &str| {
        run(
            w,
            &["read", "--passphrase-file", "pass", n, "-o", "/dev/null"],
        )
    };
    assert_eq!(with_key("luks.qcow2").0, 0);
    assert_eq!(
        with_key("luks-payload-past-eof.qcow2").0,
        0,
        "QEMU ignores the payload offset inside qcow2 only in its checks"
    );
    for (n, want) in [
        (
            "luks-slot-iters-max.qcow2",
            "4294967295 PBKDF2 iterations, more than qinspect's limit of 134217728",
        ),
        (
            "luks-mk-iters-max.qcow2",
            "more than qinspect's limit of 134217728",
        ),
        ("luks-mk-iters-0.qcow2", "LUKS key iteration count is zero"),
        (
            "luks-stripes-0.qcow2",
            "Keyslot 0 is corrupted (stripes 0 != 4000)",
        ),
        (
            "luks-stripes-max.qcow2",
            "Keyslot 0 is corrupted (stripes -1 != 4000)",
        ),
        (
            "luks-slot-state.qcow2",
            "Keyslot 0 state (active/disable) is corrupted",
        ),
        ("luks-keyoff-past-eof.qcow2", "outside the"),
        (
            "luks-keyoff-in-header.qcow2",
            "Keyslot 0 is overlapping with the LUKS header",
        ),
        (
            "luks-payload-0.qcow2",
            "LUKS payload is overlapping with the header",
        ),
        ("luks-bad-magic.qcow2", "Volume is not in LUKS format"),
        ("luks-version-2.qcow2", "LUKS version 2 is not supported"),
        (
            "luks-unterminated-name.qcow2",
            "cipher name is not NUL terminated",
        ),
        (
            "luks-cipher-blowfish.qcow2",
            "Unsupported cipher 'blowfish'",
        ),
        (
            "luks-mode-garbage.qcow2",
            "Unexpected cipher mode string format 'xts'",
        ),
        (
            "luks-essiv-sha1.qcow2",
            "No AES cipher with key size 20 available",
        ),
        (
            "luks-hash-unknown.qcow2",
            "Unsupported hash algorithm 'whirlpool'",
        ),
        ("luks-trunc-material.qcow2", "key material"),
    ] {
        let (code, msg) = with_key(n);
        let err = std::fs::read_to_string(w.path("err.txt")).unwrap();
        assert_eq!(code, 1, "{n}: {msg}");
        assert!(err.contains(want), "{n}: wanted '{want}' in: {err}");
    }
    assert!(
        run(w, &["info", "cluster-bits-63.qcow2"])
            .1
            .contains("Unsupported cluster size: 2^63")
    );
}

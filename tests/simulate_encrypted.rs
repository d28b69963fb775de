//! Guest data written into an encrypted image, simulated with its key and
//! compared with qemu-io given the same key, each operation a separate
//! qemu-io on a copy: every byte of the file (the data encrypted, each
//! 512-byte sector with its IV) and the guest bytes (`qemu-img convert`
//! with the key). LUKS with the default aes-256-xts-plain64 and with
//! aes-256-cbc-essiv, and the legacy AES method (qemu-io still writes it):
//! pattern writes whole and inside a sector, copy-on-write from zeros and
//! from a backing file, write-zeroes (zeros written encrypted inside an
//! allocated cluster, a zero cluster over a whole one) and a compressed
//! write (stored unencrypted, as QEMU stores compressed clusters); copy-on-read
//! from a backing file; data QEMU wrote before, in place and shared by a
//! snapshot; and `qinspect simulate` given the key.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use qinspect::simulate::Sim;

const SECRET: &str = "secret,id=s0,data=pw";

/// `cmd` by qemu-io on the encrypted image `image`, opened with its key
/// (`-C` first: with copy-on-read; `snapshot -c NAME`: by qemu-img):
/// whether it succeeded, and its output.
fn enc_io(w: &Work, image: &str, cmd: &str) -> (bool, String) {
    let opts = format!("driver=qcow2,file.filename={image},encrypt.key-secret=s0");
    let mut args = vec!["--object", SECRET, "--image-opts", &opts];
    let prog = if let Some(name) = cmd.strip_prefix("snapshot -c ") {
        args.splice(0..0, ["snapshot", "-c", name]);
        "qemu-img"
    } else if let Some(c) = cmd.strip_prefix("-C ") {
        args.extend(["-C", "-c", c]);
        "qemu-io"
    } else {
        args.extend(["-c", cmd]);
        "qemu-io"
    };
    let out = std::process::Command::new(prog)
        .args(&args)
        .current_dir(w.dir.path())
        .output()
        .expect("run QEMU");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("failed"), text)
}

/// A 1M encrypted image made with `opts` (after the key's).
fn create(w: &Work, image: &str, opts: &str) {
    let o = format!("encrypt.key-secret=s0{opts}");
    let object = format!("--object={SECRET}");
    let out = w.qemu_img(&[
        "create", "-q", "-f", "qcow2", &object, "-o", &o, image, "1M",
    ]);
    assert!(out.status.success(), "{image}: {out:?}");
}

/// The guest disk of the encrypted image `image` as qemu-img reads it
/// with its key.
fn qemu_guest(w: &Work, image: &str) -> Vec<u8> {
    let opts = format!("driver=qcow2,file.filename={image},encrypt.key-secret=s0");
    let raw = format!("{image}.raw");
    let out = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "--object",
            SECRET,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            &raw,
        ])
        .current_dir(w.dir.path())
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "{image}: {out:?}");
    std::fs::read(w.path(&raw)).expect("read the raw copy")
}

/// `ops` (simulator words, qemu-io commands) on a copy of `name` by
/// qemu-io and in the simulator given the key: every one succeeds in both,
/// the file is the same every byte, and so is the guest disk.
fn same_encrypted(w: &Work, name: &str, ops: &[(&str, &str)]) {
    let copy = format!("{name}.qemu");
    std::fs::copy(w.path(name), w.path(&copy)).expect("copy the image");
    for (_, cmd) in ops {
        let (ok, text) = enc_io(w, &copy, cmd);
        assert!(ok, "{name}: qemu-io -c '{cmd}': {text}");
    }
    let img = sim_compare::open_path(&w.path(name)).expect("open the image");
    let key = qinspect::crypto::DataKey::unlock(&img, b"pw").expect("unlock");
    assert!(img.set_data_key(key));
    let mut sim = Sim::new(&img, &w.path(name)).expect("simulate");
    for (op, _) in ops {
        sim.apply(&sim_compare::parse_op(op));
    }
    for r in &sim.records {
        assert_eq!(r.error, None, "{name}: {}", r.description);
    }
    sim_bytes::same_file(w, name, &sim);
    let chain = sim.guest_chain().expect("the predicted guest disk");
    let pred = w.path(&format!("{name}.predicted.raw"));
    sim_compare::write_raw(&chain, &pred).expect("write the predicted disk");
    let ours = std::fs::read(&pred).expect("read the predicted disk");
    let theirs = qemu_guest(w, &copy);
    assert_eq!(ours.len(), theirs.len(), "{name}: guest size");
    let first = ours.iter().zip(&theirs).position(|(a, b)| a != b);
    assert_eq!(first, None, "{name}: first differing guest byte");
    assert!(theirs.contains(&0x11), "{name}: the pattern reads back");
}

/// Writes of every kind, no backing file.
const OPS: &[(&str, &str)] = &[
    ("write:0:65536:P=0xaa", "write -P 0xaa 0 64k"),
    ("write:100:200:P=0x11", "write -P 0x11 100 200"),
    ("write:70000:1000:P=0x22", "write -P 0x22 70000 1000"),
    ("write-zeroes:4096:512", "write -z 4096 512"),
    ("write-zeroes:131072:65536", "write -z 131072 64k"),
    (
        "write-compressed:196608:65536:P=0x33",
        "write -c -P 0x33 196608 64k",
    ),
    ("write:300000:513:P=0x44", "write -P 0x44 300000 513"),
];

#[test]
fn luks_xts_writes_are_encrypted_as_qemu_writes_them() {
    let w = Work::new();
    create(&w, "x.qcow2", ",encrypt.format=luks,encrypt.iter-time=10");
    same_encrypted(&w, "x.qcow2", OPS);
}

#[test]
fn luks_cbc_essiv_writes_are_encrypted_as_qemu_writes_them() {
    let w = Work::new();
    create(
        &w,
        "c.qcow2",
        ",encrypt.format=luks,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
    );
    same_encrypted(&w, "c.qcow2", OPS);
}

#[test]
fn legacy_aes_writes_are_encrypted_with_guest_sector_ivs() {
    let w = Work::new();
    create(&w, "a.qcow2", ",encrypt.format=aes");
    same_encrypted(&w, "a.qcow2", OPS);
}

#[test]
fn copy_on_write_from_a_backing_file_is_encrypted_at_its_new_place() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    w.qemu_io(
        "base.qcow2",
        &["write -P 0x5a 0 256k", "write -P 0x66 65536 4096"],
    );
    for (name, fmt) in [
        ("ol.qcow2", "luks,encrypt.iter-time=10"),
        ("oa.qcow2", "aes"),
    ] {
        create(
            &w,
            name,
            &format!(",encrypt.format={fmt},backing_file=base.qcow2,backing_fmt=qcow2"),
        );
        same_encrypted(
            &w,
            name,
            &[
                ("write:65636:100:P=0x11", "write -P 0x11 65636 100"),
                ("write:200000:7000:P=0x12", "write -P 0x12 200000 7000"),
                ("write-zeroes:0:512", "write -z 0 512"),
                ("read:262144:4096", "-C read 262144 4096"),
            ],
        );
    }
}

/// `qinspect simulate` given the key (an `--object secret` with
/// `--image-opts`, or `--passphrase-file`): the guest disk it predicts is
/// the one qemu-io leaves; a wrong passphrase fails before anything is
/// simulated, and no key at all refuses as qemu-io's open does.
#[test]
fn the_cli_simulates_an_encrypted_image_given_its_key() {
    let w = Work::new();
    create(&w, "k.qcow2", ",encrypt.format=luks,encrypt.iter-time=10");
    std::fs::write(w.path("pass"), "pw").expect("write the passphrase");
    std::fs::write(w.path("wrong"), "nope").expect("write a wrong passphrase");
    std::fs::copy(w.path("k.qcow2"), w.path("k.qemu")).expect("copy the image");
    let before = std::fs::read(w.path("k.qcow2")).expect("read the image");
    for cmd in ["write -P 0x11 4096 1000", "write -z 65536 512"] {
        let (ok, text) = enc_io(&w, "k.qemu", cmd);
        assert!(ok, "{cmd}: {text}");
    }
    let theirs = qemu_guest(&w, "k.qemu");
    let ops = ["write:4096:1000:P=0x11", "write-zeroes:65536:512"];
    let by_object = [
        "simulate",
        "--object",
        "secret,id=s0,file=pass",
        "--image-opts",
        "driver=qcow2,file.filename=k.qcow2,encrypt.key-secret=s0",
        "--guest-raw",
        "o.raw",
    ];
    let by_file = [
        "simulate",
        "--passphrase-file",
        "pass",
        "k.qcow2",
        "--guest-raw",
        "f.raw",
    ];
    for (args, raw) in [(&by_object[..], "o.raw"), (&by_file[..], "f.raw")] {
        let mut args = args.to_vec();
        args.extend(ops);
        let out = w.qinspect(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        let ours = std::fs::read(w.path(raw)).expect("read the predicted disk");
        assert!(
            ours == theirs,
            "{args:?}: the guest disk differs from qemu-io's"
        );
    }
    // A throw-away overlay over an encrypted image reads its data with its
    // key: its guest disk is the image's with the overlay's write.
    create(&w, "kb.qcow2", ",encrypt.format=luks,encrypt.iter-time=10");
    let (ok, text) = enc_io(&w, "kb.qcow2", "write -P 0x66 0 128k");
    assert!(ok, "{text}");
    std::fs::copy(w.path("kb.qcow2"), w.path("ov.qemu")).expect("copy the image");
    let (ok, text) = enc_io(&w, "ov.qemu", "write 512 512");
    assert!(ok, "{text}");
    let args = [
        "simulate",
        "--passphrase-file",
        "pass",
        "kb.qcow2",
        "overlay",
        "write:512:512",
        "--guest-raw",
        "ov.raw",
    ];
    let out = w.qinspect(&args);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let ours = std::fs::read(w.path("ov.raw")).expect("read the predicted disk");
    assert!(
        ours == qemu_guest(&w, "ov.qemu"),
        "the overlay's guest disk differs"
    );
    let mut args = vec!["simulate", "--passphrase-file", "wrong", "k.qcow2"];
    args.extend(ops);
    let out = w.qinspect(&args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let mut args = vec!["simulate", "k.qcow2"];
    args.extend(ops);
    let out = w.qinspect(&args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let after = std::fs::read(w.path("k.qcow2")).expect("read the image");
    assert!(before == after, "the image is never written");
    // Over an encrypted backing file (whose key the simulation does not
    // take): refused, before anything is shown.
    create(
        &w,
        "over.qcow2",
        ",encrypt.format=luks,encrypt.iter-time=10,backing_file=k.qcow2,backing_fmt=qcow2",
    );
    let mut args = vec!["simulate", "--passphrase-file", "pass", "over.qcow2"];
    args.extend(ops);
    let out = w.qinspect(&args);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Could not open backing file"), "{err}");
}

/// An encrypted backing file: QEMU opens every image of the chain with the
/// top one, and an encrypted one only with its own key, so qemu-img and
/// qemu-io given only the top image's key (or none, over a plain image) fail
/// at the open and write nothing. The simulation, which takes only the top
/// image's key, refuses the chain in the library (`Sim::new` and
/// `simulate_layers`), with qemu-img's words.
#[test]
fn a_chain_with_an_encrypted_backing_file_is_refused_by_the_library() {
    let w = Work::new();
    create(&w, "eb.qcow2", ",encrypt.format=luks,encrypt.iter-time=10");
    let backing = ",backing_file=eb.qcow2,backing_fmt=qcow2";
    create(
        &w,
        "eo.qcow2",
        &format!(",encrypt.format=luks,encrypt.iter-time=10{backing}"),
    );
    let out = w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &backing[1..],
        "po.qcow2",
        "1M",
    ]);
    assert!(out.status.success(), "{out:?}");
    const WORDS: &str =
        "Could not open backing file: Parameter 'encrypt.key-secret' is required for cipher";
    for (name, encrypted) in [("eo.qcow2", true), ("po.qcow2", false)] {
        let before = std::fs::read(w.path(name)).expect("read the image");
        let text = if encrypted {
            enc_io(&w, name, "snapshot -c s").1 + &enc_io(&w, name, "write 0 512").1
        } else {
            let out = std::process::Command::new("qemu-img")
                .args(["snapshot", "-c", "s", name])
                .current_dir(w.dir.path())
                .output()
                .expect("run qemu-img");
            assert!(!out.status.success(), "{name}: {out:?}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        assert_eq!(
            text.matches(WORDS).count(),
            if encrypted { 2 } else { 1 },
            "{name}: {text}"
        );
        assert!(
            before == std::fs::read(w.path(name)).expect("read"),
            "{name}: QEMU wrote"
        );
        let img = sim_compare::open_path(&w.path(name)).expect("open the image");
        if encrypted {
            let key = qinspect::crypto::DataKey::unlock(&img, b"pw").expect("unlock");
            assert!(img.set_data_key(key));
        }
        let e = Sim::new(&img, &w.path(name))
            .err()
            .expect("Sim::new refuses");
        let e = e.to_string();
        assert!(e.contains(&format!("qemu-img: {WORDS}")), "{name}: {e}");
        assert!(e.contains("eb.qcow2"), "{name}: {e}");
        let ops = [sim_compare::parse_op("write:0:512")];
        let e = qinspect::simulate::simulate_layers(&img, &w.path(name), &ops).err();
        assert!(e.is_some_and(|e| e.to_string().contains(WORDS)), "{name}");
    }
}

/// Data QEMU wrote before the simulation: a write inside one of its sectors
/// keeps the rest of the sector as it decrypts; in clusters a snapshot
/// shares, the copy-on-write decrypts them at their old host offset and
/// encrypts them again at the new one.
#[test]
fn data_already_in_the_file_is_decrypted_and_encrypted_again() {
    let w = Work::new();
    let luks = "luks,encrypt.iter-time=10";
    for (name, fmt, snapshot) in [
        ("px.qcow2", luks, true),
        ("pa.qcow2", "aes", true),
        ("ix.qcow2", luks, false),
    ] {
        create(&w, name, &format!(",encrypt.format={fmt}"));
        // The snapshot is QEMU's (its date is the clock's): its clusters are
        // shared when the simulation starts. Without it the writes go in place.
        let mut cmds = vec!["write -P 0x77 0 192k", "write -P 0x78 70000 3000"];
        if snapshot {
            cmds.push("snapshot -c s");
        }
        for cmd in cmds {
            let (ok, text) = enc_io(&w, name, cmd);
            assert!(ok, "{name}: {cmd}: {text}");
        }
        same_encrypted(
            &w,
            name,
            &[
                ("write:131172:100:P=0x11", "write -P 0x11 131172 100"),
                ("write:4196:600:P=0x12", "write -P 0x12 4196 600"),
                ("write-zeroes:70100:512", "write -z 70100 512"),
            ],
        );
    }
}

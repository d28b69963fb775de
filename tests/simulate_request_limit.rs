//! qemu-io's limit on a request's length (QEMU's `BDRV_REQUEST_MAX_BYTES`,
//! 2147483136 bytes): a longer `write` (plain, `-z`, `-z -u`, `-c`), `read`
//! (copy-on-read) or `discard` is refused as qemu-io parses it, after the
//! image was opened. What the open and the close write stays: persistent
//! bitmaps stored again, a dirty image's refcounts repaired. Each compared
//! with a real qemu-io on a copy, every byte of the file.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::same_bytes;

/// What qemu-io prints for a request of `given` bytes (`-n` named for writes).
fn refusal(write: bool, given: u64) -> String {
    let n = if write { " without -n" } else { "" };
    format!("length cannot exceed 2147483136{n}, given {given}")
}

/// The simulated errors start with qemu-io's words, one per operation.
fn assert_refused(errors: &[Option<String>], expected: &[Option<String>]) {
    assert_eq!(errors.len(), expected.len());
    for (e, x) in errors.iter().zip(expected) {
        match (e, x) {
            (Some(e), Some(x)) => assert!(e.starts_with(x.as_str()), "{e:?} against {x:?}"),
            (None, None) => {}
            _ => panic!("{e:?} against {x:?}"),
        }
    }
}

#[test]
fn qemu_io_prints_the_limit_and_fails() {
    // The harness compares the simulation's words with the line qemu-io
    // printed: check here that qemu-io prints that line (on stdout, no
    // "qemu-io:" prefix) and exits 1, leaving the file as it was.
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "a.qcow2", "4G"]);
    let before = std::fs::read(w.path("a.qcow2")).unwrap();
    for (cmd, write) in [
        ("write -z 0 2147483137", true),
        ("discard 0 2147483137", false),
    ] {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, "a.qcow2"])
            .current_dir(w.dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {text}");
        assert_eq!(text.trim_end(), refusal(write, 2147483137), "{cmd}");
    }
    assert_eq!(std::fs::read(w.path("a.qcow2")).unwrap(), before);
}

#[test]
fn every_request_kind_past_the_limit_is_refused() {
    let w = Work::new();
    let make = |w: &Work, n: &str| {
        w.qemu_img(&["create", "-q", "-f", "qcow2", n, "4G"]);
        w.qemu_io(n, &["write -P 7 0 1M", "write -P 8 3G 64k"]);
    };
    let ops = [
        "write:0:2147483137",
        "write-zeroes:0:3221225472",
        "write-zeroes:0:3221225472:unmap",
        "write-compressed:0:2147483648",
        "read:0:2147483137",
        "discard:0:3221225472",
        // At the limit the request is made.
        "write-zeroes:0:2147483136:unmap",
    ];
    let (errors, corrupt) = same_bytes(&w, "a.qcow2", make, &ops);
    assert!(!corrupt);
    let expected = [
        Some(refusal(true, 2147483137)),
        Some(refusal(true, 3221225472)),
        Some(refusal(true, 3221225472)),
        Some(refusal(true, 2147483648)),
        Some(refusal(false, 2147483137)),
        Some(refusal(false, 3221225472)),
        None,
    ];
    assert_refused(&errors, &expected);
}

#[test]
fn the_open_and_close_still_write_a_bitmap_and_a_repair() {
    let w = Work::new();
    // A persistent bitmap with bits set: qemu-io's close stores it again in
    // new clusters around the refused request (the bitmap directory, 32
    // bytes, last in the file). The request also ends past the 1G disk:
    // qemu-io's own check comes first. The metadata is compared after each
    // operation, and the file's length, not every byte: QEMU's open also
    // sets the in-use flag in the directory it then replaces, a write the
    // simulation does not make (as after any operation on such an image).
    w.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "1G"]);
    w.qemu_img(&["bitmap", "--add", "b.qcow2", "b0"]);
    w.qemu_io("b.qcow2", &["write 0 256k", "write 512M 64k"]);
    let ops = ["write:0:3221225472", "discard:0:2147483137"];
    let sim = sim_compare::compare(w.dir.path(), "b.qcow2", &ops).unwrap_or_else(|e| panic!("{e}"));
    let errors: Vec<Option<String>> = sim.records.iter().map(|r| r.error.clone()).collect();
    assert_refused(
        &errors,
        &[
            Some(refusal(true, 3221225472)),
            Some(refusal(false, 2147483137)),
        ],
    );
    let len = std::fs::metadata(w.path("b.qcow2.qemu")).unwrap().len();
    assert_eq!(sim.file_len(), len, "file length");
    assert_eq!(
        len % 65536,
        32,
        "QEMU's file ends after the 32-byte directory"
    );
    // A dirty lazy-refcounts image with a leak: the read-write open repairs
    // its refcounts before the request is refused.
    let dirty = |w: &Work, n: &str| {
        w.qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            n,
            "4G",
        ]);
        w.qemu_io(n, &["write 0 128k"]);
        w.patch(n, 79, &[1]);
        w.set_refcount(n, 5, 2);
    };
    let w2 = Work::new();
    let (errors, _) = same_bytes(&w2, "d.qcow2", dirty, &["read:0:2147483137"]);
    assert_refused(&errors, &[Some(refusal(false, 2147483137))]);
    let img = sim_compare::open_path(&w2.path("d.qcow2.qemu")).unwrap();
    assert!(!img.header.dirty(), "QEMU's open repaired the image");
}

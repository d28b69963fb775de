//! An image QEMU's open refuses: the corrupt bit (no read-write open), a
//! bitmap directory whose entries do not fit it or fall short of the count the
//! header extension gives, or an entry QEMU will not load (also one past the
//! end of the file, which QEMU reads as zeros), or a directory ending past the
//! largest offset QEMU reads. Every simulated
//! operation fails as the qemu-io or qemu-img command for it fails, in that
//! command's words (`can't open device IMAGE: ...` or `Could not open 'IMAGE':
//! ...`), and QEMU writes nothing.

mod common;
mod sim_compare;
use common::Work;
use qinspect::error::CorruptKind;
use qinspect::header::ExtensionKind;
use qinspect::simulate::{Sim, SimError};
use sim_compare::{open_path, parse_op, qemu_command};
use std::path::Path;
use std::process::Command;

/// Every operation that is a qemu-io or qemu-img command.
const OPS: [&str; 10] = [
    "write:0:4096",
    "write-compressed:0:65536",
    "write-zeroes:4096:4096",
    "read:0:4096",
    "discard:0:65536",
    "snapshot-create:s",
    "snapshot-delete:s",
    "snapshot-apply:s",
    "resize:2097152",
    "repair:all",
];

/// Run a QEMU command in `dir`: its exit code and its message without the
/// program's name.
fn qemu_fails(dir: &Path, cmd: &[String]) -> (Option<i32>, String) {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .current_dir(dir)
        .output()
        .expect("run QEMU");
    let err = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}: ", cmd[0]);
    let text = err.trim_end();
    let text = text.strip_prefix(&prefix).unwrap_or(text).to_string();
    (out.status.code(), text)
}

/// Run every operation of `ops` on `name` with QEMU (which must fail, exit
/// 1, and leave the file as it was) and with the simulator: the simulator's
/// error is QEMU's message, or QEMU's message followed by qinspect's
/// explanation in parentheses. Returns the simulator's causes.
fn fails_as_qemu_does(w: &Work, name: &str, ops: &[&str]) -> Vec<SimError> {
    fails_as_qemu_does_with(w, name, ops, false)
}

/// [`fails_as_qemu_does`]; with `located`, qinspect's words name where the
/// structure QEMU's reason is about sits before that reason: the command's
/// prefix, then `STRUCTURE at OFFSET: ` and QEMU's reason, then more in
/// parentheses.
fn fails_as_qemu_does_with(w: &Work, name: &str, ops: &[&str], located: bool) -> Vec<SimError> {
    let path = w.path(name);
    let shown = path.to_string_lossy().into_owned();
    let before = std::fs::read(&path).unwrap();
    let mut causes = Vec::new();
    for op in ops {
        let (code, words) = qemu_fails(w.dir.path(), &qemu_command(op, &shown));
        assert_eq!(code, Some(1), "{name} {op}: QEMU: {words}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{name} {op}: QEMU wrote"
        );
        let img = open_path(&path).unwrap();
        let mut sim = Sim::new(&img, &path).unwrap();
        sim.apply(&parse_op(op));
        let r = sim.records.last().unwrap();
        let e = r.error.as_deref().unwrap_or_default();
        let matches = if located {
            // QEMU's words are "PREFIX: REASON"; qinspect's "PREFIX: WHERE: REASON (...)".
            let (prefix, reason) = words.rsplit_once(": ").expect("a prefix");
            e.starts_with(&format!("{prefix}: ")) && e.contains(&format!(": {reason} ("))
        } else {
            e == words || e.starts_with(&format!("{words} ("))
        };
        assert!(matches, "{name} {op}: qinspect: {e}\nQEMU: {words}");
        assert!(r.steps.is_empty(), "{name} {op}: {:?}", r.steps);
        assert!(
            sim.allocated.is_empty() && sim.freed.is_empty(),
            "{name} {op}"
        );
        causes.push(r.cause.clone().expect("a cause"));
    }
    causes
}

#[test]
fn the_corrupt_bit_fails_each_command_in_its_own_words() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "c.qcow2", "1M"]);
    w.qemu_io("c.qcow2", &["write 0 64k"]);
    // incompatible_features bit 1 (corrupt), in byte 79 of the header.
    w.patch("c.qcow2", 79, &[2]);
    // qemu-img check -r opens a corrupt image (to repair it): not here.
    let ops = &OPS[..OPS.len() - 1];
    for cause in fails_as_qemu_does(&w, "c.qcow2", ops) {
        assert!(matches!(cause, SimError::Corrupt(_)), "{cause:?}");
    }
}

#[test]
fn a_snapshot_table_qemu_cannot_read_fails_each_command_but_a_check() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "s.qcow2", "1M"]);
    w.qemu_img(&["snapshot", "-c", "s", "s.qcow2"]);
    // snapshots_offset (header byte 64) off a cluster boundary.
    w.patch("s.qcow2", 64, &0x80200u64.to_be_bytes());
    // qemu-img check -r reads the table only in the check: not here.
    let ops = &OPS[..OPS.len() - 1];
    for cause in fails_as_qemu_does_with(&w, "s.qcow2", ops, true) {
        assert!(matches!(cause, SimError::Qemu(_)), "{cause:?}");
    }
}

/// A 1M image with one bitmap `b0`, and where its bitmaps extension's data
/// and its directory are.
fn with_bitmap(w: &Work, name: &str) -> (u64, u64, u64) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", name, "1M"]);
    w.qemu_io(name, &["write 0 64k"]);
    w.qemu_img(&["bitmap", "--add", name, "b0"]);
    let img = open_path(&w.path(name)).unwrap();
    let ext = img
        .extensions
        .iter()
        .find(|e| matches!(e.kind, ExtensionKind::Bitmaps { .. }))
        .expect("a bitmaps extension");
    let ExtensionKind::Bitmaps {
        directory_offset,
        directory_size,
        ..
    } = ext.kind
    else {
        unreachable!()
    };
    // The extension's data follows its 8-byte type and length.
    (ext.offset.get() + 8, directory_offset.get(), directory_size)
}

#[test]
fn a_broken_bitmap_directory_fails_every_command() {
    let w = Work::new();
    let (_, dir, size) = with_bitmap(&w, "b.qcow2");
    assert_eq!(size, 32, "one entry, name of 2 bytes");
    // extra_data_size 8 (at byte 20 of the entry): the entry no longer fits
    // the directory, which QEMU finds before it looks at the extra data.
    w.patch("b.qcow2", dir + 20, &8u32.to_be_bytes());
    for cause in fails_as_qemu_does(&w, "b.qcow2", &OPS) {
        let SimError::Qemu(m) = &cause else {
            panic!("{cause:?}")
        };
        assert!(m.contains(": Broken bitmap directory ("), "{m}");
    }
}

#[test]
fn fewer_bitmaps_than_the_extension_counts_fail_every_command() {
    let w = Work::new();
    let (ext, _, _) = with_bitmap(&w, "n.qcow2");
    // nb_bitmaps 2; the directory holds one entry, filling it.
    w.patch("n.qcow2", ext, &2u32.to_be_bytes());
    for cause in fails_as_qemu_does(&w, "n.qcow2", &OPS) {
        let SimError::Qemu(m) = &cause else {
            panic!("{cause:?}")
        };
        assert!(
            m.contains(": Less bitmaps found than specified in header extension ("),
            "{m}"
        );
    }
}

#[test]
fn bytes_after_the_counted_bitmaps_fail_every_command() {
    let w = Work::new();
    // directory_size (at byte 8 of the extension's data) 64: 32 bytes of
    // zeros after the one entry, an entry's fixed part and more; 40: 8 bytes,
    // too few for one.
    for (name, size, qemu) in [
        (
            "m.qcow2",
            64u64,
            "More bitmaps found than specified in header extension",
        ),
        ("p.qcow2", 40, "Broken bitmap directory"),
    ] {
        let (ext, _, _) = with_bitmap(&w, name);
        w.patch(name, ext + 8, &size.to_be_bytes());
        // The directory ends the file: zeros after it, inside the file.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(w.path(name))
            .unwrap();
        f.set_len(f.metadata().unwrap().len() + 65536).unwrap();
        for cause in fails_as_qemu_does(&w, name, &OPS) {
            let SimError::Qemu(m) = &cause else {
                panic!("{cause:?}")
            };
            assert!(m.contains(&format!(": {qemu} (")), "{name}: {m}");
        }
    }
}

#[test]
fn a_bitmap_entry_qemu_will_not_load_fails_every_command() {
    let w = Work::new();
    let (_, dir, _) = with_bitmap(&w, "f.qcow2");
    // A reserved flag (bit 3) in the entry's flags, at byte 12.
    let img = open_path(&w.path("f.qcow2")).unwrap();
    let flags = img.bitmaps.as_ref().unwrap().as_ref().unwrap()[0].flags;
    w.patch("f.qcow2", dir + 12, &(flags | 8).to_be_bytes());
    for cause in fails_as_qemu_does(&w, "f.qcow2", &OPS) {
        let SimError::Qemu(m) = &cause else {
            panic!("{cause:?}")
        };
        assert!(
            m.contains(": Bitmap 'b0' doesn't satisfy the constraints"),
            "{m}"
        );
    }
}

/// QEMU's `BDRV_MAX_LENGTH`, the largest offset its block layer reads.
const LIMIT: u64 = 0x7fff_ffff_c000_0000;

/// The images whose bitmap directory QEMU reads, in part or whole, past the
/// end of the file (as zeros), or cannot read at all, with the kind of
/// qinspect's refusal and the words QEMU's open fails with.
fn directories_past_the_end(w: &Work) -> Vec<(&'static str, CorruptKind, &'static str)> {
    let zeros = "Bitmap '' doesn't satisfy the constraints";
    let mut out = Vec::new();
    // directory_offset (byte 16 of the extension's data): 1 MiB past the end
    // of the file, in the last cluster below the limit, and at the limit.
    for (name, at, kind, words) in [
        ("far.qcow2", None, CorruptKind::BitmapDirectoryEntry, zeros),
        (
            "last.qcow2",
            Some(LIMIT - 0x10000),
            CorruptKind::BitmapDirectoryEntry,
            zeros,
        ),
        (
            "limit.qcow2",
            Some(LIMIT),
            CorruptKind::BitmapDirectoryUnreadable,
            "Failed to read bitmap directory: Input/output error",
        ),
    ] {
        let (ext, _, _) = with_bitmap(w, name);
        let len = std::fs::metadata(w.path(name)).unwrap().len();
        let at = at.unwrap_or(len.next_multiple_of(0x10000) + (1 << 20));
        w.patch(name, ext + 16, &at.to_be_bytes());
        out.push((name, kind, words));
    }
    // The file ends 16 bytes into the directory's one entry: its type,
    // granularity and name size read as zeros.
    let (_, dir, _) = with_bitmap(w, "cut.qcow2");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("cut.qcow2"))
        .unwrap();
    f.set_len(dir + 16).unwrap();
    out.push(("cut.qcow2", CorruptKind::BitmapDirectoryEntry, zeros));
    // An entry QEMU refuses (granularity bits 5, at byte 17) before a
    // directory end it would call broken (directory_size 40, 8 bytes after
    // the entry, inside the file): QEMU checks each entry as it meets it.
    let (ext, dir, _) = with_bitmap(w, "order.qcow2");
    w.patch("order.qcow2", dir + 17, &[5]);
    w.patch("order.qcow2", ext + 8, &40u64.to_be_bytes());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("order.qcow2"))
        .unwrap();
    f.set_len(f.metadata().unwrap().len() + 65536).unwrap();
    out.push((
        "order.qcow2",
        CorruptKind::BitmapDirectoryEntry,
        "Bitmap 'b0' doesn't satisfy the constraints",
    ));
    out
}

#[test]
fn a_bitmap_directory_past_the_end_of_the_file_fails_every_command() {
    let w = Work::new();
    for (name, kind, qemu) in directories_past_the_end(&w) {
        for cause in fails_as_qemu_does(&w, name, &OPS) {
            let SimError::Qemu(m) = &cause else {
                panic!("{name}: {cause:?}")
            };
            assert!(m.contains(&format!(": {qemu} (")), "{name}: {m}");
        }
        let img = open_path(&w.path(name)).unwrap();
        assert_eq!(
            img.check_refusal
                .as_ref()
                .and_then(qinspect::error::Error::corrupt_kind),
            Some(kind),
            "{name}"
        );
    }
}

/// What `qemu-img COMMAND IMAGE` says after "Could not open 'IMAGE': ", and its
/// exit code.
fn qemu_img_refusal(w: &Work, command: &str, image: &str) -> (Option<i32>, String) {
    let out = Command::new("qemu-img")
        .args([command, image])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let prefix = format!("qemu-img: Could not open '{image}': ");
    let words = err.strip_prefix(&prefix).unwrap_or(&err).to_string();
    (out.status.code(), words)
}

/// The directories QEMU cannot read or refuses: the open refuses them as QEMU's
/// does (`info` fails, `check` fails at the open, exit code 1, and
/// `simulate` says each command's words).
#[test]
fn check_info_and_simulate_refuse_an_unreadable_directory_as_qemu_does() {
    use qinspect::error::Error;
    use qinspect::image::{Qcow2, Strictness};
    let w = Work::new();
    let (_, dir, _) = with_bitmap(&w, "b.qcow2");
    w.patch("b.qcow2", dir + 20, &8u32.to_be_bytes());
    let (ext, _, _) = with_bitmap(&w, "n.qcow2");
    w.patch("n.qcow2", ext, &2u32.to_be_bytes());
    let mut images = vec![
        ("b.qcow2", CorruptKind::BitmapDirectoryBroken),
        ("n.qcow2", CorruptKind::BitmapDirectoryShort),
    ];
    images.extend(
        directories_past_the_end(&w)
            .into_iter()
            .map(|(name, kind, _)| (name, kind)),
    );
    for (image, kind) in images {
        let (code, words) = qemu_img_refusal(&w, "info", image);
        assert_eq!(code, Some(1), "{image}: {words}");
        let src = std::sync::Arc::new(qinspect::io::FileSource::open(&w.path(image)).unwrap());
        let Err(e) = Qcow2::open(src.clone(), Strictness::Qemu) else {
            panic!("{image}: opened")
        };
        assert_eq!(e.corrupt_kind(), Some(kind), "{image}: {e}");
        assert!(e.to_string().contains(&words), "{image}: {e} / {words}");
        let img = Qcow2::open(src, Strictness::Lenient).unwrap();
        assert_eq!(
            img.check_refusal.as_ref().and_then(Error::corrupt_kind),
            Some(kind),
            "{image}"
        );
        let info = w.qinspect(&["info", image]);
        assert!(!info.status.success(), "{image}: qinspect info opened it");
        assert!(
            String::from_utf8_lossy(&info.stderr).contains(&words),
            "{image}"
        );
        let (code, check_words) = qemu_img_refusal(&w, "check", image);
        assert_eq!(check_words, words, "{image}");
        let check = w.qinspect(&["check", image]);
        assert_eq!(check.status.code(), code, "{image}");
        let out = String::from_utf8_lossy(&check.stdout).into_owned();
        assert!(
            out.contains("qemu-img check fails: it cannot open this image") && out.contains(&words),
            "{image}: {out}"
        );
        let sim = w.qinspect(&["simulate", image, "write:0:4096"]);
        let out = String::from_utf8_lossy(&sim.stdout).into_owned();
        assert!(
            out.contains(&format!(
                "QEMU fails here: can't open device {image}: {words} ("
            )),
            "{image}: {out}"
        );
    }
}

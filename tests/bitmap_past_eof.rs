//! A persistent bitmap whose table lies past the end of the file, wholly or in
//! part, but ends below the largest offset QEMU reads (`BDRV_MAX_LENGTH`,
//! 2^63 - 1 GiB): QEMU reads the bytes there as zeros, so the table names no
//! data cluster, its own region is counted as a reference past the end of the
//! file (a corruption), and the check goes on. qinspect's check, its repairs
//! and the operations that store the bitmaps again on close are compared with
//! real qemu-img/qemu-io on copies. A table that would end past the limit
//! makes QEMU's read fail (EIO).

mod common;
mod sim_compare;
use common::Work;
use qinspect::check::{CheckOptions, check};
use qinspect::simulate::Sim;
use sim_compare::{meta, open_path, parse_op, qemu_check, qemu_command};
use std::process::Command;

/// QEMU's `BDRV_MAX_LENGTH`.
const LIMIT: u64 = 0x7fff_ffff_c000_0000;

/// `write 0 64k`, the bitmap `b0` (enabled), the bitmap `src` (disabled),
/// `write 64k 64k` (a data cluster for `b0`'s table): 64 MiB, 64 KiB
/// clusters, one table entry each. Returns the file offset of `b0`'s
/// directory entry and the file's length.
fn base(w: &Work, image: &str) -> (u64, u64) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "64M"]);
    w.qemu_io(image, &["write 0 64k"]);
    w.qemu_img(&["bitmap", "--add", image, "b0"]);
    w.qemu_img(&["bitmap", "--add", image, "src"]);
    w.qemu_img(&["bitmap", "--disable", image, "src"]);
    w.qemu_io(image, &["write 64k 64k"]);
    let img = open_path(&w.path(image)).unwrap();
    let list = img.bitmaps.as_ref().unwrap().as_ref().unwrap();
    assert_eq!(list[0].name, "b0");
    // b0's table names one data cluster (it saw the second write).
    let t = img.bitmap_tables.table(0).unwrap();
    assert!(t.entries().next().unwrap().data_offset().is_some());
    (list[0].entry_offset.get(), img.file_len())
}

/// `b0`'s table moved to `at` (the directory entry's first field).
fn moved(w: &Work, image: &str, at: u64) {
    let (entry, _) = base(w, image);
    w.patch(image, entry, &at.to_be_bytes());
}

/// The images: b0's table 1 MiB past the end of the file, at 2^40, and in
/// the last cluster below `BDRV_MAX_LENGTH`.
fn images(w: &Work) -> Vec<&'static str> {
    let (_, len) = base(w, "probe.qcow2");
    let near = len.next_multiple_of(0x10000) + (1 << 20);
    let all = [
        ("near.qcow2", near),
        ("huge.qcow2", 1 << 40),
        ("lim.qcow2", LIMIT - 0x10000),
    ];
    for (name, at) in all {
        moved(w, name, at);
    }
    all.iter().map(|(n, _)| *n).collect()
}

/// QEMU's words for the errors `qcow2_free_clusters` fails with here, and
/// the simulator's.
fn same_cause(qemu: &str, sim: &str) -> bool {
    let name = match qemu {
        "Invalid argument" => "EINVAL",
        "File too large" => "EFBIG",
        other => other,
    };
    sim.contains(qemu) || sim.contains(&format!("({name})"))
}

/// `op` done for real on a copy of `image` (`IMAGE.qemu`) and simulated:
/// both succeed, every `qcow2_free_clusters` failure QEMU prints (it goes
/// on after one) is one the simulation notes, with the same cause, and the
/// metadata and `qemu-img check` of the results are the same.
fn follows(w: &Work, image: &str, op: &str) -> Sim {
    let at = format!("{image} {op}");
    let copy = format!("{image}.qemu");
    std::fs::copy(w.path(image), w.path(&copy)).unwrap();
    let cmd = qemu_command(op, &copy);
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu-img check exits 2 or 3 when something is left: it still repaired.
    let ran = if op.starts_with("repair") {
        out.status.code() != Some(1)
    } else {
        out.status.success()
    };
    assert!(ran, "{at}: {text}");
    let img = open_path(&w.path(image)).unwrap();
    let mut sim = Sim::new(&img, &w.path(image)).unwrap();
    sim.apply(&parse_op(op));
    assert!(
        sim.records[0].error.is_none(),
        "{at}: {:?}",
        sim.records[0].error
    );
    let qemu_fails: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("qcow2_free_clusters failed: "))
        .collect();
    let sim_fails: Vec<&str> = sim.records[0]
        .steps
        .iter()
        .filter_map(|c| c.reason.strip_prefix("QEMU: qcow2_free_clusters failed: "))
        .collect();
    assert_eq!(
        qemu_fails.len(),
        sim_fails.len(),
        "{at}: {text} {sim_fails:?}"
    );
    for (q, s) in qemu_fails.iter().zip(&sim_fails) {
        assert!(same_cause(q, s), "{at}: QEMU '{q}', simulated '{s}'");
    }
    let simulated = sim.image().unwrap();
    let real = open_path(&w.path(&copy)).unwrap();
    let upto = simulated.file_len().max(real.file_len());
    let (a, b) = (meta(&simulated, upto).unwrap(), meta(&real, upto).unwrap());
    assert!(a.header == b.header, "{at}: header");
    let differ: Vec<_> = a
        .refcounts
        .iter()
        .filter(|x| !b.refcounts.contains(x))
        .chain(b.refcounts.iter().filter(|x| !a.refcounts.contains(x)))
        .take(8)
        .collect();
    assert!(
        differ.is_empty(),
        "{at}: refcounts (cluster, refcount) of one only: {differ:?}"
    );
    assert!(a.l1s == b.l1s && a.l2 == b.l2, "{at}: L1/L2 tables");
    assert!(a.snapshots == b.snapshots, "{at}: snapshots");
    assert!(a.bitmaps == b.bitmaps, "{at}: bitmaps");
    let r = check(&simulated, &CheckOptions::default());
    let q = qemu_check(w.dir.path(), &copy);
    assert!(
        (r.corruptions, r.leaks, r.check_errors) == q,
        "{at}: check of the simulation {:?}, qemu-img {q:?}: {:?}",
        (r.corruptions, r.leaks, r.check_errors),
        r.findings.iter().map(|f| &f.message).collect::<Vec<_>>()
    );
    sim
}

#[test]
fn check_reads_the_table_as_zeros_and_goes_on() {
    let w = Work::new();
    for name in images(&w) {
        let j = w.assert_check_matches(name);
        // The table's region is a reference past the end of the file, the
        // data cluster it named and its old table are leaks, and the check
        // finishes.
        assert!(j.get("aborted").is_none(), "{name}: {j:#}");
        assert_eq!(j["corruptions"], 1, "{name}");
        assert_eq!(j["leaks"], 2, "{name}");
        let findings = j["findings"].as_array().unwrap();
        assert!(
            findings.iter().any(|f| f["category"] == "past-eof"),
            "{name}: {findings:#?}"
        );
        w.assert_info_matches(name);
        // The table reads as zeros: no entry names a cluster.
        let img = open_path(&w.path(name)).unwrap();
        let t = img.bitmap_tables.table(0).unwrap();
        assert_eq!((t.len(), t.stored_len(), t.past_eof()), (1, 0, 1), "{name}");
        assert!(t.entries().all(|e| e.0 == 0), "{name}");
    }
}

/// A table of 128 entries (512-byte clusters and granularity, 256 MiB),
/// moved to a cluster appended to the file: its first 64 entries (the first
/// half of the old table, naming the data cluster) inside the file, the rest
/// past its end. The cluster inside the file is free (refcount 0): a write
/// stores the bitmap again into it, and the old table read again there
/// then names the new data cluster, which QEMU frees and discards.
#[test]
fn a_table_the_end_of_the_file_cuts() {
    let w = Work::new();
    let name = "cut.qcow2";
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        name,
        "256M",
    ]);
    w.qemu_img(&["bitmap", "--add", "-g", "512", name, "b0"]);
    w.qemu_io(name, &["write 0 4k"]);
    let img = open_path(&w.path(name)).unwrap();
    let list = img.bitmaps.as_ref().unwrap().as_ref().unwrap();
    let (entry, table) = (list[0].entry_offset.get(), list[0].table_offset.get());
    assert_eq!(list[0].table_size, 128);
    let bytes = std::fs::read(w.path(name)).unwrap();
    let at = (bytes.len() as u64).next_multiple_of(512);
    let first = bytes[table as usize..table as usize + 512].to_vec();
    assert_ne!(first, vec![0u8; 512]);
    w.patch(name, at, &first);
    w.patch(name, entry, &at.to_be_bytes());
    let j = w.assert_check_matches(name);
    assert!(j.get("aborted").is_none(), "{j:#}");
    let img = open_path(&w.path(name)).unwrap();
    let t = img.bitmap_tables.table(0).unwrap();
    assert_eq!((t.len(), t.stored_len(), t.past_eof()), (128, 64, 64));
    assert!(t.stored().any(|e| e.data_offset().is_some()));
    // The words for it: the hex pane's directory entry and dump's title.
    let s = qinspect::locate::Structures::of(&img);
    let x = s.decode(&img, qinspect::types::HostOffset(entry)).unwrap();
    assert_eq!(
        x.meaning,
        format!(
            "the bitmap table is at {at:#x}; its last 64 of 128 entries lie past the end of the file and read as zeros"
        )
    );
    let out = w.qinspect_ok(&["dump", "bitmaps", name, "0"]);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.lines().next().unwrap().ends_with(&format!(
            "entries 64 to 127 lie past the end of the file ({} bytes) and read as zeros, as QEMU reads them",
            at + 512
        )),
        "{text}"
    );
    for op in ["repair:leaks", "repair:all", "write:65536:512"] {
        follows(&w, name, op);
    }
}

/// `check -r leaks` and `-r all` free the leaks, then store the bitmaps
/// again on close: the new table of b0 is all zeros (what QEMU read), and
/// freeing the old one past the end of the file fails (QEMU prints
/// "qcow2_free_clusters failed" and goes on). A write and a snapshot store
/// them the same way.
#[test]
fn repairs_and_writes_follow_qemu() {
    let w = Work::new();
    for name in images(&w) {
        for op in [
            "repair:leaks",
            "repair:all",
            "write:0:4096",
            "snapshot-create:s",
        ] {
            follows(&w, name, op);
            // The real image afterwards: b0's table moved into the file,
            // naming no data cluster but the one for the write's own bit.
            let real = open_path(&w.path(&format!("{name}.qemu"))).unwrap();
            let list = real.bitmaps.as_ref().unwrap().as_ref().unwrap();
            assert!(list[0].table_offset.get() < real.file_len(), "{name} {op}");
            let t = real.bitmap_tables.table(0).unwrap();
            let named = t.entries().filter(|e| e.data_offset().is_some()).count();
            assert_eq!(named, usize::from(op.starts_with("write")), "{name} {op}");
        }
    }
}

/// A table that would end past `BDRV_MAX_LENGTH`: QEMU's read fails, so its
/// open of the image fails (the bitmap is not in use: the open loads it),
/// for `info`, `check`, a repair and a write alike, and nothing is written.
#[test]
fn a_table_ending_past_the_limit_is_not_read() {
    let w = Work::new();
    moved(&w, "over.qcow2", LIMIT);
    let img = open_path(&w.path("over.qcow2")).unwrap();
    assert!(img.bitmap_tables.table(0).is_err());
    let refusal = img.check_refusal.as_ref().map(|e| e.to_string());
    assert!(
        refusal.as_deref().is_some_and(|e| e.contains(
            "Could not read bitmap_table table from image for bitmap 'b0': Input/output error"
        )),
        "{refusal:?}"
    );
    w.assert_check_matches("over.qcow2");
    for cmd in ["info", "check"] {
        let q = Command::new("qemu-img")
            .args([cmd, "over.qcow2"])
            .current_dir(w.dir.path())
            .output()
            .unwrap();
        let ours = w.qinspect(&[cmd, "over.qcow2"]);
        assert_eq!(ours.status.code(), q.status.code(), "{cmd}");
        // check prints what it could count anyway, after QEMU's refusal.
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&ours.stderr)
        );
        assert!(
            said.contains(
                "Could not read bitmap_table table from image for bitmap 'b0': Input/output error"
            ),
            "{cmd}: {said}"
        );
    }
    // The simulation refuses the image as QEMU's open does.
    let e = Sim::new(&img, &w.path("over.qcow2"))
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|e| e.contains(
            "Could not read bitmap_table table from image for bitmap 'b0': Input/output error"
        )),
        "{e:?}"
    );
    for op in ["repair:leaks", "repair:all", "write:0:4096"] {
        std::fs::copy(w.path("over.qcow2"), w.path("over.qcow2.qemu")).unwrap();
        let (ok, line) = sim_compare::run_qemu(w.dir.path(), &qemu_command(op, "over.qcow2.qemu"));
        assert!(
            !ok && line.ends_with(
                "Could not read bitmap_table table from image for bitmap 'b0': Input/output error"
            ),
            "{op}: {line}"
        );
        assert_eq!(
            std::fs::read(w.path("over.qcow2")).unwrap(),
            std::fs::read(w.path("over.qcow2.qemu")).unwrap(),
            "{op}: QEMU wrote nothing"
        );
    }
}

/// `dump bitmaps IMAGE 0`, the directory entry's table offset as the viewer's
/// Hex pane decodes it (`locate`), and `clusters --host` say where the table
/// is and that it reads as zeros there; none of them fails.
#[test]
fn the_table_past_the_end_is_named_in_true_words() {
    let w = Work::new();
    let _ = images(&w);
    let (entry, len) = base(&w, "plain.qcow2");
    let near = len.next_multiple_of(0x10000) + (1 << 20);
    let out = w.qinspect_ok(&["dump", "bitmaps", "near.qcow2", "0", "--all"]);
    let text = String::from_utf8(out).unwrap();
    let title = text.lines().next().unwrap();
    assert_eq!(
        title,
        format!(
            "bitmap 'b0' table at {near:#x} — entry 0 lies past the end of the file ({len} bytes) and reads as zeros, as QEMU reads them"
        )
    );
    assert!(
        text.contains("past the end of the file: reads as zeros (every bit clear)"),
        "{text}"
    );
    // A table inside the file says nothing of the kind.
    let out = w.qinspect_ok(&["dump", "bitmaps", "plain.qcow2", "0", "--all"]);
    assert!(!String::from_utf8(out).unwrap().contains("past the end"));
    let img = open_path(&w.path("near.qcow2")).unwrap();
    let s = qinspect::locate::Structures::of(&img);
    let x = s.decode(&img, qinspect::types::HostOffset(entry)).unwrap();
    assert_eq!(x.item, "bitmap_table_offset");
    assert_eq!(
        x.meaning,
        format!(
            "the bitmap table is at {near:#x}, past the end of the file: QEMU reads the whole table as zeros"
        )
    );
    let plain = open_path(&w.path("plain.qcow2")).unwrap();
    let s = qinspect::locate::Structures::of(&plain);
    let x = s
        .decode(&plain, qinspect::types::HostOffset(entry))
        .unwrap();
    assert!(!x.meaning.contains("past"), "{x:?}");
    let out = w.qinspect_ok(&["clusters", "near.qcow2", "--host", &format!("{near:#x}")]);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("past the end of the file: bitmap-table") && text.contains("bitmap 'b0'"),
        "{text}"
    );
}

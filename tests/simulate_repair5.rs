//! `repair:all` and `repair:leaks` on images whose check has findings beyond
//! qemu-img's (cross-links, refcounts past the end of the file): QEMU's
//! repair does not see them, so they must not keep the repair from being
//! predicted. Each compared with a real `qemu-img check -r` on a copy (see
//! `sim_compare`); and reads that fail, QEMU's made to fail by blkdebug,
//! the simulation's by a wrapper of the file.

mod common;
mod sim_compare;
use common::Work;
use qinspect::check::{CheckOptions, FindingDetail, FindingKind, check};
use qinspect::simulate::{Sim, Target};
use sim_compare::{compare, open_path};

/// Overwrite the 8 bytes at `at` of `image` with `value`.
fn poke(w: &Work, image: &str, at: u64, value: u64) {
    w.patch(image, at, &value.to_be_bytes());
}

fn ok(w: &Work, image: &str, ops: &[&str]) -> Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{image}: {e}"))
}

/// A 4M image with two clusters written (L1 at 0x30000, its L2 table at
/// 0x40000, data at 0x50000 and 0x60000; the file ends at 0x70000).
fn written(w: &Work, image: &str) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", image, "4M"]);
    w.qemu_io(image, &["write -P 1 0 64k", "write -P 2 1M 64k"]);
}

/// The details of the findings of `image`'s check that count in no
/// qemu-img total.
fn notes(w: &Work, image: &str) -> Vec<FindingDetail> {
    let img = open_path(&w.path(image)).expect("the image opens");
    check(&img, &CheckOptions::default())
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Note)
        .map(|f| f.detail)
        .collect()
}

/// The refcount changes of record `i`: (cluster, before, after).
fn refcounts(sim: &Sim, i: usize) -> Vec<(u64, u64, u64)> {
    sim.records[i]
        .steps
        .iter()
        .filter_map(|c| match c.target {
            Target::Refcount { cluster } => Some((cluster, c.before, c.after)),
            _ => None,
        })
        .collect()
}

#[test]
fn two_guest_offsets_sharing_a_cluster_are_repaired_as_qemu_repairs_them() {
    let w = Work::new();
    for name in ["a.qcow2", "l.qcow2"] {
        written(&w, name);
        // Guest 1M maps to the cluster of guest 0: cluster 5 has two
        // references and refcount 1, cluster 6 none.
        poke(&w, name, 0x40000 + 16 * 8, 0x8000_0000_0005_0000);
    }
    assert_eq!(notes(&w, "a.qcow2"), [FindingDetail::CrossLink]);
    // -r all raises cluster 5 to 2, frees cluster 6 and clears both COPIED
    // flags; the second check finds nothing.
    let sim = ok(&w, "a.qcow2", &["repair:all", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert_eq!(refcounts(&sim, 0), [(5, 1, 2), (6, 1, 0)]);
    let l2_writes = sim.records[0]
        .steps
        .iter()
        .filter(|c| matches!(c.target, Target::L2Entry { .. }))
        .count();
    assert_eq!(l2_writes, 2, "{:?}", sim.records[0].steps);
    assert!(refcounts(&sim, 1).is_empty(), "{:?}", sim.records[1].steps);
    // -r leaks frees cluster 6 only: cluster 5 stays too low, and with an
    // error left the COPIED flags stay.
    let sim = ok(&w, "l.qcow2", &["repair:leaks", "repair:all"]);
    assert_eq!(sim.records[0].error, None);
    assert_eq!(refcounts(&sim, 0), [(6, 1, 0)]);
    assert_eq!(refcounts(&sim, 1), [(5, 1, 2)]);
}

#[test]
fn refcounts_past_the_end_of_the_file_are_left_by_the_repair() {
    let w = Work::new();
    for name in ["a.qcow2", "l.qcow2"] {
        written(&w, name);
        // Cluster 20 lies past the end of the file (0x70000, 7 clusters);
        // cluster 6 is leaked once.
        w.set_refcount(name, 20, 1);
        w.set_refcount(name, 6, 2);
    }
    assert_eq!(notes(&w, "a.qcow2"), [FindingDetail::RefcountPastEof]);
    for (name, op) in [("a.qcow2", "repair:all"), ("l.qcow2", "repair:leaks")] {
        let sim = ok(&w, name, &[op, op]);
        assert_eq!(sim.records[0].error, None, "{op}");
        // QEMU compares the refcounts of the clusters in the file only.
        assert_eq!(refcounts(&sim, 0), [(6, 2, 1)], "{op}");
        assert!(refcounts(&sim, 1).is_empty(), "{op}");
    }
}

/// A file whose reads of one range fail as a failing disk's do (EIO).
#[derive(Debug)]
struct Failing {
    inner: qinspect::io::MemSource,
    bad: std::ops::Range<u64>,
}

impl qinspect::io::Source for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let end = offset + buf.len() as u64;
        if offset < self.bad.end && end > self.bad.start {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        self.inner.read_at(buf, offset)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn name(&self) -> &std::path::Path {
        self.inner.name()
    }
}

/// `qemu-img check ARGS` on `image` in `dir` read through blkdebug: the
/// first read that touches host offset `at` after blkdebug's `event` fails
/// with EIO (`reftable_load`: the refcount table's load, at the open;
/// `refblock_load`: the first refcount block's, when the check compares the
/// refcounts). Its exit code and stderr.
fn qemu_check_failing(
    dir: &std::path::Path,
    image: &str,
    args: &[&str],
    event: &str,
    at: u64,
) -> (i32, String) {
    let json = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"blkdebug","inject-error":[{{"event":"{event}","errno":5,"once":true,"sector":{}}}],"image":{{"driver":"file","filename":"{image}"}}}}}}"#,
        at / 512
    );
    let out = std::process::Command::new("qemu-img")
        .arg("check")
        .args(args)
        .arg(json)
        .current_dir(dir)
        .output()
        .expect("qemu-img check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The bytes of the simulated file; a cluster the wrapped file cannot read
/// (and the simulation did not write) is `original`'s.
fn sim_bytes(sim: &Sim, original: &[u8]) -> Vec<u8> {
    let src = sim.source();
    let cs = sim.cluster_size() as usize;
    let mut out = vec![0u8; sim.file_len() as usize];
    for (i, chunk) in out.chunks_mut(cs).enumerate() {
        let at = (i * cs) as u64;
        if qinspect::io::Source::read_at(src.as_ref(), chunk, at).is_err() {
            chunk.copy_from_slice(&original[i * cs..i * cs + chunk.len()]);
        }
    }
    out
}

/// A read of the second of three L2 tables fails (blkdebug makes QEMU's
/// fail; a wrapper of the file the simulation's). QEMU's check walks the
/// first table (with `-r all` turning its unaligned zero cluster into a
/// plain one), fails at the second, and never reads the third, whose
/// unaligned zero cluster stays. The simulation writes the same bytes and
/// fails as qemu-img does.
#[test]
fn a_failing_l2_read_after_an_unaligned_zero_cluster_fails_as_qemu_fails() {
    use qinspect::image::{Qcow2, Strictness};
    use qinspect::simulate::{Op, SimError};
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "three.qcow2", "2G"]);
    // L1 at 0x30000 names L2 tables at 0x40000 (guest 0), 0x60000 (guest
    // 512M) and 0x80000 (guest 1G).
    w.qemu_io(
        "three.qcow2",
        &[
            "write -P 1 0 64k",
            "write -P 2 512M 64k",
            "write -P 3 1G 64k",
        ],
    );
    // L2[1] of the first and of the third table: zero clusters
    // preallocated at unaligned offsets.
    poke(&w, "three.qcow2", 0x40008, 0xa_0201);
    poke(&w, "three.qcow2", 0x80008, 0xb_0201);
    let bytes = std::fs::read(w.path("three.qcow2")).expect("read the image");
    let open = |bad: std::ops::Range<u64>| {
        let inner = qinspect::io::MemSource::new(w.path("three.qcow2"), bytes.clone());
        let src = std::sync::Arc::new(Failing { inner, bad });
        Qcow2::open(src, Strictness::Lenient).expect("the image opens")
    };
    let img = open(0x6_0000..0x7_0000);
    for (all, arg) in [(true, "all"), (false, "leaks")] {
        let copy = format!("{arg}.qcow2");
        std::fs::write(w.path(&copy), &bytes).expect("copy");
        let (code, err) =
            qemu_check_failing(w.dir.path(), &copy, &["-r", arg], "reftable_load", 0x6_0000);
        assert_eq!(code, 1, "-r {arg}: {err}");
        assert!(
            err.contains("ERROR: I/O error in check_refcounts_l2\n")
                && err.ends_with("qemu-img: Check failed: Input/output error\n"),
            "-r {arg}: {err}"
        );
        let mut sim = Sim::new(&img, &w.path("three.qcow2")).expect("the simulation starts");
        sim.apply(&Op::Repair { all });
        let rec = &sim.records[0];
        assert!(
            matches!(&rec.cause, Some(SimError::Qemu(m))
                if m.starts_with("ERROR: I/O error in check_refcounts_l2; Check failed: Input/output error (")
                    && m.contains("at 0x60000")),
            "-r {arg}: {:?}",
            rec.cause
        );
        // QEMU's "Repairing offset=..." lines are the simulation's reasons.
        let repairing: Vec<&str> = err.lines().filter(|l| l.starts_with("Repairing")).collect();
        let reasons: Vec<&str> = rec
            .steps
            .iter()
            .filter(|c| matches!(c.target, Target::L2Entry { .. }))
            .map(|c| c.reason.as_str())
            .collect();
        assert_eq!(reasons, repairing, "-r {arg}");
        assert_eq!(repairing.len(), usize::from(all), "-r {arg}: {err}");
        let real = std::fs::read(w.path(&copy)).expect("read the copy");
        assert_eq!(sim_bytes(&sim, &bytes), real, "-r {arg}: the files differ");
        let entry = |at: usize| u64::from_be_bytes(real[at..at + 8].try_into().unwrap());
        assert_eq!(entry(0x40008), if all { 1 } else { 0xa_0201 }, "-r {arg}");
        assert_eq!(entry(0x80008), 0xb_0201, "-r {arg}");
    }
}

/// The COPIED check's read of the second active L2 table fails (blkdebug
/// armed by the refcount comparison; [`Sim::fail_copied_read`] in the
/// simulation), after the leak was repaired and the COPIED flags of the first
/// table and of both L1 entries: those stay written, the second table's flag
/// stays wrong, and the check fails, as qemu-img's does.
#[test]
fn a_failing_read_in_the_copied_check_fails_after_the_repairs_before_it() {
    use qinspect::simulate::{Op, SimError};
    use qinspect::types::HostOffset;
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "two.qcow2", "1G"]);
    // L1 at 0x30000 names L2 tables at 0x40000 (guest 0, data at 0x50000)
    // and 0x60000 (guest 512M, data at 0x70000).
    w.qemu_io("two.qcow2", &["write -P 1 0 64k", "write -P 2 512M 64k"]);
    // Every COPIED flag cleared, and cluster 7 leaked once.
    poke(&w, "two.qcow2", 0x30000, 0x4_0000);
    poke(&w, "two.qcow2", 0x30008, 0x6_0000);
    poke(&w, "two.qcow2", 0x40000, 0x5_0000);
    poke(&w, "two.qcow2", 0x60000, 0x7_0000);
    w.set_refcount("two.qcow2", 7, 2);
    let bytes = std::fs::read(w.path("two.qcow2")).expect("read the image");
    for (all, arg) in [(true, "all"), (false, "leaks")] {
        let copy = format!("{arg}.qcow2");
        std::fs::write(w.path(&copy), &bytes).expect("copy");
        let (code, err) =
            qemu_check_failing(w.dir.path(), &copy, &["-r", arg], "refblock_load", 0x6_0000);
        assert_eq!(code, 1, "-r {arg}: {err}");
        assert!(
            err.contains("Repairing cluster 7 refcount=2 reference=1\n")
                && err.ends_with(
                    "ERROR: Could not read L2 table: Input/output error\nqemu-img: Check failed: Input/output error\n"
                ),
            "-r {arg}: {err}"
        );
        let img = open_path(&w.path("two.qcow2")).expect("the image opens");
        let mut sim = Sim::new(&img, &w.path("two.qcow2")).expect("the simulation starts");
        sim.fail_copied_read(HostOffset(0x6_0000));
        sim.apply(&Op::Repair { all });
        let rec = &sim.records[0];
        assert!(
            matches!(&rec.cause, Some(SimError::Qemu(m))
                if m.starts_with("ERROR: Could not read L2 table: Input/output error; Check failed: Input/output error (")
                    && m.contains("at 0x60000")),
            "-r {arg}: {:?}",
            rec.cause
        );
        assert_eq!(refcounts(&sim, 0), [(7, 2, 1)], "-r {arg}");
        let real = std::fs::read(w.path(&copy)).expect("read the copy");
        assert_eq!(sim_bytes(&sim, &bytes), real, "-r {arg}: the files differ");
        let entry = |at: usize| u64::from_be_bytes(real[at..at + 8].try_into().unwrap());
        let copied = 1u64 << 63;
        assert_eq!(
            [0x30000, 0x30008, 0x40000, 0x60000].map(entry),
            [
                copied | 0x4_0000,
                copied | 0x6_0000,
                copied | 0x5_0000,
                0x7_0000
            ],
            "-r {arg}"
        );
        // The failure lasts one check: the next one repairs the last flag.
        sim.apply(&Op::Repair { all });
        assert_eq!(sim.records[1].error, None, "-r {arg}");
    }
}

/// The COPIED repair stopped by the overlap check (L1[0] names the L1
/// table itself as its L2 table) after the refcount repair freed three
/// leaks: QEMU's refcount block cache, which held those repairs, is never
/// written, but each freed cluster was discarded in the file at once (it
/// reads as zeros). The simulated file is QEMU's, byte for byte; also where
/// a refcount rebuild (written to the file at once) came before.
#[test]
fn what_the_refcount_cache_leaves_when_the_copied_repair_is_stopped() {
    let w = Work::new();
    written(&w, "c.qcow2");
    poke(&w, "c.qcow2", 0x30000, 0x8000_0000_0003_0000);
    let (sim, real) = stopped_copied_repair(&w, "c.qcow2");
    assert!(refcounts(&sim, 0).is_empty(), "{:?}", sim.records[0].steps);
    // The freed clusters (the L2 table and both data clusters) read as
    // zeros; their refcounts stay 1.
    assert!(real[0x40000..0x70000].iter().all(|&b| b == 0));
    assert_eq!(&real[0x20008..0x2000e], &[0, 1, 0, 1, 0, 1]);

    // With a cluster in use whose refcount is 0, QEMU first rebuilds the
    // refcount structure (written to the file at once), then frees the
    // leaks, the old table and block among them, in its cache: the rebuilt
    // structure stays, the leaks' refcounts do not, their clusters punched.
    written(&w, "r.qcow2");
    poke(&w, "r.qcow2", 0x30000, 0x8000_0000_0003_0000);
    w.set_refcount("r.qcow2", 0, 0);
    let (sim, _) = stopped_copied_repair(&w, "r.qcow2");
    assert!(
        reasons(&sim)
            .iter()
            .any(|r| r.contains("Rebuilding refcount structure")),
        "{:?}",
        reasons(&sim)
    );
}

/// `qemu-img check -r all` on a copy of `image`, whose COPIED repair the
/// overlap check stops, and the simulation of it, whose file must be
/// QEMU's byte for byte: the simulation and QEMU's file.
fn stopped_copied_repair(w: &Work, image: &str) -> (Sim, Vec<u8>) {
    use qinspect::simulate::Op;
    let bytes = std::fs::read(w.path(image)).expect("read the image");
    let copy = format!("{image}.qemu");
    std::fs::write(w.path(&copy), &bytes).expect("copy");
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-r", "all", &copy])
        .current_dir(w.dir.path())
        .output()
        .expect("qemu-img check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{image}: {err}");
    assert!(
        err.contains("Preventing invalid write on metadata (overlaps with active L2 table)")
            && err.ends_with("qemu-img: Check failed: Input/output error\n"),
        "{image}: {err}"
    );
    let img = open_path(&w.path(image)).expect("the image opens");
    let mut sim = Sim::new(&img, &w.path(image)).expect("the simulation starts");
    sim.apply(&Op::Repair { all: true });
    let e = sim.records[0].error.as_deref().unwrap_or_default();
    assert!(e.contains("overlaps with active L2 table"), "{image}: {e}");
    let real = std::fs::read(w.path(&copy)).expect("read the copy");
    let simulated = sim_bytes(&sim, &bytes);
    let first = simulated.iter().zip(&real).position(|(a, b)| a != b);
    assert!(
        first.is_none() && simulated.len() == real.len(),
        "{image}: the files differ from {first:x?} ({} and {} bytes)\n{err}\n{:?}",
        simulated.len(),
        real.len(),
        sim.records[0].steps
    );
    (sim, real)
}

fn reasons(sim: &Sim) -> Vec<String> {
    sim.records[0]
        .steps
        .iter()
        .map(|c| c.reason.clone())
        .collect()
}

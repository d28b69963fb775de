//! The simulator against QEMU on images whose internal snapshots hold VM state
//! (`savevm` in a running qemu-system-x86_64): the VM state sits in the
//! snapshot's L1 range past the end of the guest disk, so deleting such a
//! snapshot frees clusters only its L1 reaches, applying it brings a longer
//! L1 table, and the active image never sees them. Each scenario is compared
//! operation by operation with real qemu-img/qemu-io on a copy (`sim_compare`).

mod common;
mod sim_compare;
use common::Work;
use std::process::{Command, Stdio};

/// Make `name` (`qemu-img create -o OPTS name SIZE`), then run
/// qemu-system-x86_64 on it with `machine` and feed each of `hmp` to its
/// monitor as an HMP command line (through QMP's human-monitor-command),
/// or as QMP itself when it starts with `{`;
/// the VM then quits (unless the last command kills it with `sigraise`).
/// Every snapshot it made must hold VM state.
fn savevm_image(w: &Work, name: &str, opts: &str, size: &str, machine: &str, hmp: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, size]);
    w.qemu_img(&args);
    savevm_on(w, name, machine, hmp);
}

/// Run qemu-system-x86_64 on the existing image `name`, as [`savevm_image`].
fn savevm_on(w: &Work, name: &str, machine: &str, hmp: &[&str]) {
    let mut qmp = vec![serde_json::json!({"execute": "qmp_capabilities"})];
    for c in hmp {
        qmp.push(if c.starts_with('{') {
            serde_json::from_str(c).expect("QMP JSON")
        } else {
            serde_json::json!({
                "execute": "human-monitor-command",
                "arguments": {"command-line": c}
            })
        });
    }
    let killed = hmp.last().is_some_and(|c| c.contains("sigraise"));
    if !killed {
        qmp.push(serde_json::json!({"execute": "quit"}));
    }
    let script: String = qmp.iter().map(|v| format!("{v}\n")).collect();
    let mut args: Vec<String> = machine.split_whitespace().map(String::from).collect();
    args.extend(
        [
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            "stdio",
            "-drive",
            &format!("if=none,id=d0,file={name},format=qcow2"),
        ]
        .map(String::from),
    );
    let child = Command::new("timeout")
        .arg("60")
        .arg("qemu-system-x86_64")
        .args(&args)
        .current_dir(w.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run qemu-system-x86_64 ({e}): install it with .ci/install-qemu-system.sh (these tests need savevm)"
        ),
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(script.as_bytes()).expect("QMP script");
    }
    let out = child.wait_with_output().expect("qemu-system-x86_64");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        killed || out.status.success(),
        "qemu-system-x86_64 on {name} failed (is it installed? .ci/install-qemu-system.sh): {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines() {
        assert!(
            !line.contains("\"error\"") && !line.contains("Error") && !line.contains("failed"),
            "qemu-system-x86_64 on {name}: {line}"
        );
    }
    let info = w.qemu_img(&["info", "--output=json", name]);
    let info = Work::json(&info.stdout);
    let list = info["snapshots"].as_array().expect("snapshots");
    assert!(!list.is_empty(), "{name}: savevm made no snapshot");
    for s in list {
        assert!(
            s["vm-state-size"].as_u64().unwrap_or(0) > 0,
            "{name}: snapshot {} has no VM state",
            s["name"]
        );
    }
}

const PC: &str = "-machine pc -accel tcg -m 8M -S";
const NONE: &str = "-machine none";

/// A 4M disk with data, two savevm snapshots of a PC (more than a cluster
/// of VM state each) and writes between them.
fn two_savevms(w: &Work, name: &str, opts: &str) {
    savevm_image(
        w,
        name,
        opts,
        "4M",
        PC,
        &[
            r#"qemu-io d0 "write -P 0x11 0 1M""#,
            "savevm first",
            r#"qemu-io d0 "write -P 0x22 512k 1M""#,
            "savevm second",
            r#"qemu-io d0 "write -P 0x33 3M 64k""#,
        ],
    );
}

fn ok(w: &Work, image: &str, ops: &[&str]) -> qinspect::simulate::Sim {
    sim_compare::compare(w.dir.path(), image, ops)
        .unwrap_or_else(|e| panic!("{image} {ops:?}: {e}"))
}

/// The clusters the VM state of snapshot `name` takes: those its L1 reaches
/// past the guest disk (`qemu-img map` of the snapshot cannot show them).
fn vm_state_clusters(w: &Work, image: &str, name: &str) -> Vec<u64> {
    let img = sim_compare::open_path(&w.path(image)).unwrap();
    let s = img
        .snapshots
        .snapshots
        .iter()
        .find(|s| s.name == name)
        .expect("snapshot");
    let l1 = img.snapshot_l1(s).unwrap();
    let cs = img.geometry().cluster_size();
    let per_l2 = img.geometry().l2_entries();
    let first = img.header.size.div_ceil(cs);
    let mut out = Vec::new();
    for (i, e) in l1.iter().enumerate() {
        let off = e.0 & qinspect::tables::L1E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        let entries = img.l2_table(qinspect::types::HostOffset(off)).unwrap();
        for (j, l2e) in entries.iter().enumerate() {
            let guest_cluster = i as u64 * per_l2 + j as u64;
            let host = l2e.raw & qinspect::tables::L2E_OFFSET_MASK;
            if guest_cluster >= first && host != 0 {
                out.push(host / cs);
            }
        }
    }
    out
}

#[test]
fn deleting_a_savevm_snapshot_frees_its_vm_state() {
    let w = Work::new();
    two_savevms(&w, "d.qcow2", "");
    let vm = vm_state_clusters(&w, "d.qcow2", "first");
    assert!(
        vm.len() > 1,
        "the PC's VM state takes more than one cluster: {vm:?}"
    );
    let sim = ok(&w, "d.qcow2", &["snapshot-delete:first"]);
    // Every VM-state cluster of the deleted snapshot is freed (nothing else
    // references it), and nothing of the other snapshot's.
    let freed: Vec<u64> = sim.freed.iter().map(|f| f.0).collect();
    for c in &vm {
        let why = sim.freed.iter().find(|f| f.0 == *c);
        assert!(
            why.is_some_and(|f| f.1.contains("(VM state, past the disk)")),
            "VM-state cluster {c} not freed as VM state: {:?}",
            sim.freed
        );
    }
    // The disk's own clusters are not called VM state.
    assert!(
        sim.freed
            .iter()
            .any(|f| f.1.starts_with("-1: data cluster") && !f.1.contains("VM state"))
    );
    for c in vm_state_clusters(&w, "d.qcow2", "second") {
        assert!(!freed.contains(&c), "cluster {c} of 'second' freed");
    }
    // The second, then a qemu-img snapshot (no VM state) made and deleted
    // among them, and a delete by an ID (qemu-img matches names only).
    ok(
        &w,
        "d.qcow2",
        &[
            "snapshot-create:plain",
            "snapshot-delete:second",
            "snapshot-delete:1",
            "snapshot-delete:first",
            "snapshot-delete:plain",
        ],
    );
}

#[test]
fn savevm_snapshots_on_other_geometries() {
    let w = Work::new();
    // Small clusters: the VM state needs more L2 tables than the disk.
    // savevm writes it through the active L1, which QEMU grows for it and
    // never shrinks, so the active and snapshot L1 tables both reach past
    // the disk's two entries.
    two_savevms(&w, "s.qcow2", "cluster_size=4096");
    let img = sim_compare::open_path(&w.path("s.qcow2")).unwrap();
    let disk_entries = img
        .header
        .size
        .div_ceil(img.geometry().cluster_size() * img.geometry().l2_entries());
    assert!(u64::from(img.header.l1_size) > disk_entries);
    for s in &img.snapshots.snapshots {
        assert!(u64::from(s.l1_size) > disk_entries, "snapshot {}", s.name);
    }
    assert!(!vm_state_clusters(&w, "s.qcow2", "first").is_empty());
    ok(
        &w,
        "s.qcow2",
        &[
            "snapshot-delete:second",
            "write:0:8192",
            "snapshot-apply:first",
            "snapshot-create:c",
            "snapshot-delete:first",
        ],
    );
    // compat 0.10, extended L2 with 4-bit refcounts; and a machine with almost
    // no state (VM state smaller than one cluster).
    two_savevms(&w, "v2.qcow2", "compat=0.10");
    ok(
        &w,
        "v2.qcow2",
        &["snapshot-apply:second", "snapshot-delete:first"],
    );
    two_savevms(&w, "x.qcow2", "extended_l2=on,refcount_bits=4");
    ok(
        &w,
        "x.qcow2",
        &[
            "write:1024:2048",
            "snapshot-delete:second",
            "snapshot-apply:first",
        ],
    );
    savevm_image(&w, "n.qcow2", "", "4M", NONE, &["savevm s1"]);
    ok(
        &w,
        "n.qcow2",
        &[
            "snapshot-apply:s1",
            "snapshot-create:s2",
            "snapshot-delete:s1",
        ],
    );
}

#[test]
fn applying_a_savevm_snapshot() {
    let w = Work::new();
    two_savevms(&w, "a.qcow2", "");
    // Applying leaves the VM state where it is: the active L1 gets the
    // snapshot's guest-disk part (qemu-img snapshot -a), and the VM state
    // stays reachable only from the snapshot.
    ok(
        &w,
        "a.qcow2",
        &[
            "snapshot-apply:first",
            "write:65536:4096",
            "snapshot-apply:second",
            "snapshot-delete:first",
            "snapshot-apply:nosuch",
        ],
    );
}

#[test]
fn guest_writes_after_a_savevm() {
    let w = Work::new();
    two_savevms(&w, "w.qcow2", "");
    ok(
        &w,
        "w.qcow2",
        &[
            "write:0:65536",
            "write:600000:70000",
            "discard:524288:524288",
            "write-zeroes:1048576:131072",
            "write-zeroes:0:65536:unmap",
            "write-compressed:2097152:65536",
            "discard:4194304:65536",
            "write:4194304:512",
            "snapshot-delete:second",
            "write:3145728:65536",
        ],
    );
}

#[test]
fn repair_and_resize_of_savevm_images() {
    let w = Work::new();
    two_savevms(&w, "r.qcow2", "");
    // Nothing to repair on a clean image.
    ok(&w, "r.qcow2", &["repair:leaks", "repair:all"]);
    let img = sim_compare::open_path(&w.path("r.qcow2")).unwrap();
    let end = img.file_len();
    let (rt, cs) = (
        img.header.refcount_table_offset.get(),
        img.geometry().cluster_size(),
    );
    drop(img);
    // One more cluster at the end of the file, with a refcount and no
    // user: a leak each repair drops.
    let f = std::fs::read(w.path("r.qcow2")).unwrap();
    let block = u64::from_be_bytes(f[rt as usize..rt as usize + 8].try_into().unwrap());
    let last = end / cs;
    for repair in ["repair:leaks", "repair:all"] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(w.path("r.qcow2"))
            .unwrap();
        f.set_len(end + cs).unwrap();
        drop(f);
        w.patch("r.qcow2", block + last * 2, &[0, 1]);
        assert_eq!(sim_compare::qemu_check(w.dir.path(), "r.qcow2"), (0, 1, 0));
        let sim = ok(&w, "r.qcow2", &[repair]);
        assert!(!sim.records[0].steps.is_empty(), "{repair} changed nothing");
    }
    // QEMU resizes an image with internal snapshots: the active L1 only
    // (the VM state stays where the snapshot's L1 has it); applying a
    // snapshot of another disk size resizes back first.
    let sim = ok(
        &w,
        "r.qcow2",
        &[
            "resize:8388608",
            "write:6291456:65536",
            "snapshot-apply:first",
            "resize:2097152:shrink",
            "snapshot-apply:second",
            "snapshot-delete:first",
            "resize:16777216",
        ],
    );
    for r in &sim.records {
        assert!(r.error.is_none(), "{:?}: {:?}", r.op, r.error);
    }
    // With 4k clusters growing needs a longer L1 table than the one the VM
    // state already took.
    two_savevms(&w, "r4.qcow2", "cluster_size=4096");
    ok(
        &w,
        "r4.qcow2",
        &[
            "resize:16777216",
            "write:14680064:8192",
            "snapshot-apply:second",
            "resize:1048576:shrink",
            "snapshot-delete:second",
        ],
    );
}

#[test]
fn savevm_on_a_dirty_lazy_refcount_image_and_an_empty_disk() {
    let w = Work::new();
    // Killed after a savevm and a write with lazy refcounts: QEMU rebuilds
    // the refcounts on the next read-write open, VM-state clusters included
    // (reached only through the snapshot's L1).
    savevm_image(
        &w,
        "k.qcow2",
        "lazy_refcounts=on",
        "4M",
        PC,
        &[
            r#"qemu-io d0 "write -P 0x11 0 256k""#,
            "savevm s1",
            r#"qemu-io d0 "write -P 0x88 0 64k""#,
            r#"qemu-io d0 "write -P 0x89 2M 64k""#,
            r#"qemu-io d0 "sigraise 9""#,
        ],
    );
    let dirty = |name: &str| {
        let img = sim_compare::open_path(&w.path(name)).unwrap();
        img.header.incompatible_features & 1 == 1
    };
    assert!(dirty("k.qcow2"), "the kill left the dirty bit");
    ok(
        &w,
        "k.qcow2",
        &["write:1048576:4096", "snapshot-delete:s1", "write:0:65536"],
    );
    savevm_image(
        &w,
        "k2.qcow2",
        "lazy_refcounts=on",
        "4M",
        PC,
        &[
            "savevm s1",
            r#"qemu-io d0 "write -P 0x88 0 64k""#,
            r#"qemu-io d0 "sigraise 9""#,
        ],
    );
    assert!(dirty("k2.qcow2"), "the kill left the dirty bit");
    ok(&w, "k2.qcow2", &["snapshot-apply:s1", "repair:all"]);
    // A disk of 0 bytes: all of the L1 is VM state.
    savevm_image(&w, "z.qcow2", "", "0", PC, &["savevm s1"]);
    ok(
        &w,
        "z.qcow2",
        &[
            "snapshot-create:c",
            "snapshot-apply:s1",
            "snapshot-delete:s1",
            "resize:1048576",
            "write:0:65536",
            "snapshot-apply:c",
        ],
    );
    // 512-byte clusters: the VM state takes many L2 tables and refcount
    // blocks; deleting it frees them all.
    savevm_image(
        &w,
        "t.qcow2",
        "cluster_size=512",
        "1M",
        PC,
        &[r#"qemu-io d0 "write -P 0x66 0 8k""#, "savevm s1"],
    );
    ok(
        &w,
        "t.qcow2",
        &[
            "write:4096:8192",
            "snapshot-delete:s1",
            "write:524288:65536",
        ],
    );
    // Over a backing file: the VM state is the overlay's own; writes after
    // deleting it copy-on-write from the backing file.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    w.qemu_io("base.qcow2", &["write -P 0x42 0 2M"]);
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
    savevm_on(
        &w,
        "top.qcow2",
        PC,
        &[r#"qemu-io d0 "write -P 0x43 4k 4k""#, "savevm s1"],
    );
    ok(
        &w,
        "top.qcow2",
        &[
            "write:8192:4096",
            "snapshot-delete:s1",
            "write:1048576:4096",
            "snapshot-create:c",
            "write:65536:512",
        ],
    );
    // loadvm, then writes over what the snapshot shares.
    savevm_image(
        &w,
        "l.qcow2",
        "",
        "4M",
        PC,
        &[
            r#"qemu-io d0 "write -P 0x55 0 128k""#,
            "savevm s1",
            r#"qemu-io d0 "write -P 0x56 0 64k""#,
            "loadvm s1",
            r#"qemu-io d0 "write -P 0x57 1M 64k""#,
        ],
    );
    ok(
        &w,
        "l.qcow2",
        &["write:65536:4096", "snapshot-delete:s1", "write:0:4096"],
    );
}

#[test]
fn overlays_on_savevm_snapshots() {
    let w = Work::new();
    two_savevms(&w, "o.qcow2", "");
    let ops = [
        "write:0:4096",
        "write:1000000:70000",
        "discard:65536:65536",
        "write-zeroes:2097152:65536",
        "read:458752:196608",
        "write:3145728:4096",
    ];
    for snapshot in [None, Some("first"), Some("second")] {
        let before = w.fingerprint("o.qcow2");
        let base = match snapshot {
            Some(s) => {
                let b = format!("o.{s}.base");
                w.qemu_img(&["convert", "-O", "qcow2", "-l", s, "o.qcow2", &b]);
                b
            }
            None => "o.qcow2".to_string(),
        };
        let ov = format!("o.{}.ov", snapshot.unwrap_or("active"));
        w.qemu_img(&[
            "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &ov,
        ]);
        let img = sim_compare::open_path(&w.path("o.qcow2")).unwrap();
        let sim = qinspect::simulate::Sim::overlay(&img, &w.path("o.qcow2"), snapshot).unwrap();
        let sim = sim_compare::compare_sim(w.dir.path(), sim, &ov, &ops, &ops)
            .unwrap_or_else(|e| panic!("overlay on {snapshot:?}: {e}"));
        assert!(sim.overlay_of().is_some());
        assert_eq!(w.fingerprint("o.qcow2"), before, "the base image changed");
    }
}

#[test]
fn deleting_a_savevm_snapshot_by_id_as_a_running_vm_does() {
    // `snapshot-delete-id:ID` against QMP's blockdev-snapshot-delete-internal-sync
    // with only an ID, in a running VM.
    let w = Work::new();
    two_savevms(&w, "i.qcow2", "");
    std::fs::copy(w.path("i.qcow2"), w.path("i.real.qcow2")).unwrap();
    // HMP's delvm matches names only: `delvm 1` deletes nothing, and says nothing.
    savevm_on(&w, "i.real.qcow2", NONE, &["delvm 1"]);
    assert_eq!(w.fingerprint("i.real.qcow2"), w.fingerprint("i.qcow2"));
    savevm_on(
        &w,
        "i.real.qcow2",
        NONE,
        &[
            r#"{"execute":"blockdev-snapshot-delete-internal-sync","arguments":{"device":"d0","id":"1"}}"#,
        ],
    );
    let img = sim_compare::open_path(&w.path("i.qcow2")).unwrap();
    let mut sim = qinspect::simulate::Sim::new(&img, &w.path("i.qcow2")).unwrap();
    sim.apply(&sim_compare::parse_op("snapshot-delete-id:1"));
    assert_eq!(sim.records[0].error, None);
    let simulated = sim.image().unwrap();
    let real = sim_compare::open_path(&w.path("i.real.qcow2")).unwrap();
    assert_eq!(real.snapshots.snapshots.len(), 1, "delvm deleted one");
    let upto = sim.file_len().max(real.file_len());
    assert_eq!(
        sim_compare::meta(&simulated, upto).unwrap(),
        sim_compare::meta(&real, upto).unwrap()
    );
    let r = qinspect::check::check(&simulated, &qinspect::check::CheckOptions::default());
    assert_eq!(
        (r.corruptions, r.leaks, r.check_errors),
        sim_compare::qemu_check(w.dir.path(), "i.real.qcow2")
    );
    sim_compare::guest_matches(w.dir.path(), &mut sim, "i.real.qcow2").unwrap();
    // An ID no snapshot has: QEMU's error, and nothing changes.
    let before = w.fingerprint("i.real.qcow2");
    let out = savevm_qmp_error(
        &w,
        "i.real.qcow2",
        r#"{"execute":"blockdev-snapshot-delete-internal-sync","arguments":{"device":"d0","id":"9"}}"#,
    );
    assert_eq!(w.fingerprint("i.real.qcow2"), before);
    let n = sim.records.len();
    sim.apply(&sim_compare::parse_op("snapshot-delete-id:9"));
    assert_eq!(sim.records.len(), n + 1);
    let e = sim.records[n]
        .error
        .clone()
        .expect("the simulation fails too");
    assert!(out.starts_with(&e), "QEMU: {out}, simulated: {e}");
    assert!(sim.records[n].steps.is_empty());
}

/// Run one QMP command on `name` in a VM that should fail, and return
/// QEMU's error description.
fn savevm_qmp_error(w: &Work, name: &str, cmd: &str) -> String {
    let script = format!("{{\"execute\":\"qmp_capabilities\"}}\n{cmd}\n{{\"execute\":\"quit\"}}\n");
    let mut child = Command::new("timeout")
        .args([
            "60",
            "qemu-system-x86_64",
            "-machine",
            "none",
            "-nodefaults",
        ])
        .args(["-display", "none", "-qmp", "stdio", "-drive"])
        .arg(format!("if=none,id=d0,file={name},format=qcow2"))
        .current_dir(w.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (.ci/install-qemu-system.sh)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(script.as_bytes()).expect("QMP script");
    }
    let out = child.wait_with_output().expect("qemu-system-x86_64");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["error"]["desc"].as_str().map(String::from))
        .unwrap_or_else(|| panic!("no QMP error: {text}"))
}

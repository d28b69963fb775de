//! Images "from the wild": a corpus built at test time the way QEMU's own
//! tests/qemu-iotests build theirs (060, 061, 080, 108, 112, 244, 261, 271, 290, ...):
//! byte patches at the offsets those tests use, odd headers, damaged snapshot tables,
//! `qemu-img amend` (downgrades, refcount widths), `resize` (grow and `--shrink`),
//! `check -r leaks|all` results, `commit` and `rebase` results, external data files,
//! bitmaps, lazy-refcount images left dirty by a killed qemu-io, extended L2,
//! compressed clusters, and VM state written by `savevm` in a running
//! qemu-system-x86_64.
//!
//! Every image is run through `info --json`, `check --json`, `map --json` and `read -o`
//! and compared with `qemu-img info`, `qemu-img check`, `qemu-img map` and `qemu-img
//! convert -O raw` (exit codes, JSON, bytes, holes), `simulate snapshot-create` is
//! compared with `qemu-img snapshot -c` on a copy, and no input file may change. A
//! second test checks, for every extent `map` prints, that `trace` at the
//! extent's first and last byte names the same layer, status and host offset.
//!
//! Where qinspect and qemu-img disagree today, the case is listed in [`KNOWN`] with a
//! one-line reason; the test fails on any other disagreement, and also when a listed
//! case starts to agree (so the list only shrinks). `--show-output` prints the table.

mod common;
use common::Work;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

/// Disagreements with qemu-img known today: (image, commands, why). The commands (one
/// or more, separated by spaces) are info, check, map, read, sparse, simulate,
/// unchanged (the corpus test) and trace (the property test). Remove a command or an entry when it is
/// fixed; the test says when one is.
const KNOWN: &[(&str, &str, &str)] = &[];

/// One image of the corpus.
struct Case {
    /// The image, relative to the work directory.
    image: String,
    /// Read through this internal snapshot (only `read` is compared).
    snapshot: Option<String>,
    /// Every file the image's chain reads (for the "unchanged" check).
    files: Vec<String>,
}

impl Case {
    fn label(&self) -> String {
        match &self.snapshot {
            Some(s) => format!("{}@{s}", self.image),
            None => self.image.clone(),
        }
    }
}

struct Corpus {
    w: Work,
    cases: Vec<Case>,
    /// Cases that could not be built because qemu-system-x86_64 is missing.
    missing_vm: Vec<String>,
}

/// Shell helpers for the build scripts, after the iotests' own (with `cache=unsafe` where
/// a tool takes it, as nothing here needs to survive a host crash): `mk` creates a qcow2
/// image, `qio` runs qemu-io and fails on an I/O error, `poke FILE OFFSET BYTES` writes
/// bytes (printf escapes) at an offset, `poke64`/`poke32`/`poke16 FILE OFFSET VALUE`
/// write a big-endian number, `peek FILE OFFSET LEN` prints a big-endian number.
const PRELUDE: &str = r#"
set -euo pipefail
ulimit -c 0
qemu-img() {
    local sub=$1
    shift
    case $sub in
    amend | commit | rebase) command qemu-img "$sub" -t unsafe "$@" ;;
    check) command qemu-img check -T unsafe "$@" ;;
    *) command qemu-img "$sub" "$@" ;;
    esac
}
mk() { qemu-img create -q -f qcow2 "$@"; }
qio() {
    local out
    out=$(qemu-io -t unsafe "$@" 2>&1) || { echo "qemu-io $*: $out" >&2; return 1; }
    if grep -qiE 'failed|error' <<<"$out"; then echo "qemu-io $*: $out" >&2; return 1; fi
}
poke() { printf "$3" | dd of="$1" bs=1 seek=$(($2)) conv=notrunc status=none; }
hexbytes() { printf "%0$(($2 * 2))x" "$1" | sed 's/../\\x&/g'; }
poke64() { poke "$1" "$2" "$(hexbytes $(($3)) 8)"; }
poke32() { poke "$1" "$2" "$(hexbytes $(($3)) 4)"; }
poke16() { poke "$1" "$2" "$(hexbytes $(($3)) 2)"; }
peek() { echo $((16#$(od -An -tx1 -v -j $(($2)) -N $3 "$1" | tr -d ' \n'))); }
l1_of() { peek "$1" 40 8; }
l2_of() { echo $(( $(peek "$1" $(( $(l1_of "$1") + 8 * ${2:-0} )) 8) & 0x00fffffffffffe00 )); }
snap_of() { peek "$1" 64 8; }
"#;

impl Corpus {
    /// Run a build script in the work directory; panic with its output on failure.
    fn sh(&self, script: &str) {
        let out = Command::new("bash")
            .args(["-c", &format!("{PRELUDE}\n{script}")])
            .current_dir(self.w.dir.path())
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "build script failed:\n{script}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Add an image (and the other files its chain reads).
    fn add(&mut self, image: &str, others: &[&str]) {
        let mut files = vec![image.to_string()];
        files.extend(others.iter().map(|s| s.to_string()));
        self.cases.push(Case {
            image: image.into(),
            snapshot: None,
            files,
        });
    }

    /// Build with a script, then add the image.
    fn img(&mut self, image: &str, others: &[&str], script: &str) {
        self.sh(&format!("I={image}\n{script}"));
        self.add(image, others);
    }

    /// Also compare `read` through snapshot `snap` of an image already added.
    fn snap(&mut self, image: &str, snap: &str) {
        let files = self
            .cases
            .iter()
            .find(|c| c.image == image)
            .expect("image added first")
            .files
            .clone();
        self.cases.push(Case {
            image: image.into(),
            snapshot: Some(snap.into()),
            files,
        });
    }

    /// Run qemu-system-x86_64 on `drive` (a -drive spec's file options) and feed its
    /// QMP monitor: each entry of `hmp` is an HMP command line (`savevm s1`,
    /// `qemu-io d0 "write 0 64k"`), each entry starting with `{` is QMP JSON. Unless
    /// the last command kills the process, the VM quits cleanly.
    fn vm(&mut self, image: &str, machine: &str, drive: &str, cmds: &[&str]) -> bool {
        if !has_qemu_system() {
            self.missing_vm.push(image.into());
            return false;
        }
        let mut script = String::from("{\"execute\":\"qmp_capabilities\"}\n");
        for c in cmds {
            if c.starts_with('{') {
                script.push_str(c);
            } else {
                let line = serde_json::json!({
                    "execute": "human-monitor-command",
                    "arguments": {"command-line": c}
                });
                script.push_str(&line.to_string());
            }
            script.push('\n');
        }
        script.push_str("{\"execute\":\"quit\"}\n");
        let mut args: Vec<String> = machine.split_whitespace().map(String::from).collect();
        args.extend(
            [
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
                "stdio",
                "-drive",
                &format!("if=none,id=d0,{drive}"),
            ]
            .map(String::from),
        );
        let mut child = Command::new("timeout")
            .arg("60")
            .arg("qemu-system-x86_64")
            .args(&args)
            .current_dir(self.w.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(script.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let killed = cmds.last().is_some_and(|c| c.contains("sigraise"));
        assert!(
            killed || out.status.success(),
            "qemu-system-x86_64 on {image} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines() {
            assert!(
                !line.contains("\"error\"") && !line.contains("failed") && !line.contains("Error"),
                "qemu-system-x86_64 on {image}: {line}"
            );
        }
        true
    }
}

fn has_qemu_system() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The corpus, built once and shared by both tests.
fn corpus() -> &'static Corpus {
    static C: OnceLock<Corpus> = OnceLock::new();
    C.get_or_init(|| {
        let t = std::time::Instant::now();
        let c = build();
        println!("corpus built in {:.1} s", t.elapsed().as_secs_f64());
        c
    })
}

/// The tests that still use the corpus; the last one removes its directory.
fn done_with_corpus() {
    static LEFT: Mutex<u32> = Mutex::new(2);
    let mut left = LEFT.lock().unwrap();
    *left -= 1;
    if *left == 0 {
        let _ = std::fs::remove_dir_all(corpus().w.dir.path());
    }
}

fn build() -> Corpus {
    let mut c = Corpus {
        w: Work::new(),
        cases: Vec::new(),
        missing_vm: Vec::new(),
    };
    corruption(&mut c);
    headers(&mut c);
    snapshot_tables(&mut c);
    refcount_widths(&mut c);
    amended(&mut c);
    resized(&mut c);
    commit_rebase(&mut c);
    data_files(&mut c);
    bitmaps_and_dirty(&mut c);
    extended_l2(&mut c);
    compressed_and_discards(&mut c);
    chains_and_options(&mut c);
    vmstate(&mut c);
    // On disk before anything is compared: ext4 can still add an extent-tree block at
    // writeback, which would change `actual-size` between two tools' answers.
    sync_tree(c.w.dir.path());
    c
}

fn sync_tree(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sync_tree(&p);
        } else {
            std::fs::File::open(&p).and_then(|f| f.sync_all()).unwrap();
        }
    }
}

/// iotests 060 and 108 and the patches of tests/check_oracle.rs. In an image fresh from
/// `qemu-img create` with 64 KiB clusters the refcount table is at 0x10000, the first
/// refcount block at 0x20000, the L1 table at 0x30000, the first L2 table at 0x40000
/// and the first data cluster at 0x50000.
fn corruption(c: &mut Corpus) {
    // 060: the first L1 entry points at the L1 table itself.
    c.img(
        "c060-l2-is-l1.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -P 0x11 0 64k' $I; poke64 $I 0x30000 0x8000000000030000",
    );
    // 060: a data cluster inside the refcount block.
    c.img(
        "c060-data-in-refblock.qcow2",
        &[],
        "mk $I 4M; truncate -s $((0x50000)) $I; poke64 $I 0x30000 0x8000000000040000
         poke16 $I $((0x20000 + 8)) 1; poke64 $I 0x40000 0x8000000000020000",
    );
    c.img(
        "c060-data-in-refblock-repaired.qcow2",
        &[],
        "cp c060-data-in-refblock.qcow2 $I; qemu-img check -q -r all $I || true",
    );
    // 060: the active L2 table maps a data cluster onto the snapshot's L2 table.
    c.img(
        "c060-data-in-inactive-l2.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -P 1 0 512' $I; qemu-img snapshot -c foo $I
         qio -c 'write -P 2 0 512' $I; poke64 $I $(l2_of $I) 0x8000000000040000",
    );
    c.snap("c060-data-in-inactive-l2.qcow2", "foo");
    // 108: no refcount table at all (offset 0, 0 clusters).
    c.img(
        "c108-no-reftable.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -P 42 0 64k' $I; poke64 $I 0x30 0; poke32 $I 0x38 0",
    );
    c.img(
        "c108-no-reftable-repaired.qcow2",
        &[],
        "cp c108-no-reftable.qcow2 $I; qemu-img check -q -r all $I || true",
    );
    // 108: a refcount block beyond the end of the file, marked used.
    c.img(
        "c108-refblock-past-eof.qcow2",
        &[],
        "mk $I 4M; poke64 $I 0x10008 0x100000; poke16 $I 0x20020 1",
    );
    c.img(
        "c108-refblock-past-eof-repaired.qcow2",
        &[],
        "cp c108-refblock-past-eof.qcow2 $I; qemu-img check -q -r all $I || true",
    );
    c.img(
        "c108-refblock-unallocated.qcow2",
        &[],
        "mk $I 4M; poke64 $I 0x10008 0x100000",
    );
    c.img(
        "c108-refblock-signed-overflow.qcow2",
        &[],
        "mk $I 4M; poke64 $I 0x10008 0x7fffffffffff0000",
    );
    c.img(
        "c108-refblock-unsigned-overflow.qcow2",
        &[],
        "mk $I 4M; poke64 $I 0x10008 0xffffffffffff0000",
    );
    // 108: 512-byte clusters, a data cluster entered by hand just past the first
    // refcount block's reach.
    c.img(
        "c108-unreferenced-512.qcow2",
        &[],
        "mk -o cluster_size=512 $I 64M; qio -c 'write 0 0x1b200' $I
         poke64 $I 0x1ccc8 0x8000000000020000; truncate -s $((0x20200)) $I
         qio -f raw -c 'write -P 42 128k 512' $I",
    );
    c.img(
        "c108-unreferenced-512-repaired.qcow2",
        &[],
        "cp c108-unreferenced-512.qcow2 $I; qemu-img check -q -r all $I || true",
    );
    // Leaks and refcount errors (data in clusters 5-7: guest 0..128k and 1M).
    let base = "mk $I 4M; qio -c 'write -P 0xaa 0 128k' -c 'write -P 0xbb 1M 64k' $I";
    c.img(
        "c-leak.qcow2",
        &[],
        &format!("{base}; poke64 $I $((0x40000 + 16 * 8)) 0"),
    );
    c.img(
        "c-leak-repaired.qcow2",
        &[],
        "cp c-leak.qcow2 $I; qemu-img check -q -r leaks $I || true",
    );
    c.img(
        "c-refcount-zero.qcow2",
        &[],
        &format!("{base}; poke16 $I $((0x20000 + 5 * 2)) 0"),
    );
    c.img(
        "c-refcount-zero-repaired.qcow2",
        &[],
        "cp c-refcount-zero.qcow2 $I; qemu-img check -q -r all $I || true",
    );
    c.img(
        "c-refcount-two.qcow2",
        &[],
        &format!("{base}; poke16 $I $((0x20000 + 6 * 2)) 2"),
    );
    c.img(
        "c-copied-missing.qcow2",
        &[],
        &format!("{base}; poke64 $I 0x40000 0x50000"),
    );
    c.img(
        "c-l2-unaligned.qcow2",
        &[],
        &format!("{base}; poke64 $I $((0x40000 + 16 * 8)) 0x8000000000070200"),
    );
    c.img(
        "c-l2-past-eof.qcow2",
        &[],
        &format!("{base}; poke64 $I $((0x40000 + 16 * 8)) 0x8000000010000000"),
    );
    c.img(
        "c-cross-link.qcow2",
        &[],
        &format!("{base}; poke64 $I $((0x40000 + 16 * 8)) 0x8000000000050000"),
    );
    // 080: an L2 entry with a huge host offset, plain and compressed.
    c.img(
        "c080-l2-huge-offset.qcow2",
        &[],
        "mk $I 4M; qio -c 'write 0 512' $I; poke64 $I 0x40000 0x800000ffffff0000",
    );
    c.img(
        "c080-l2-huge-compressed.qcow2",
        &[],
        "mk $I 4M; qio -c 'write 0 512' $I; poke64 $I 0x40000 0xbfffffffffff0000",
    );
}

/// iotests 080 and 061: header fields QEMU checks at open time.
fn headers(c: &mut Corpus) {
    let cases: &[(&str, &str)] = &[
        ("h080-header-size-ffffffff", "poke32 $I 100 0xffffffff"),
        ("h080-header-size-7fffffff", "poke32 $I 100 0x7fffffff"),
        (
            "h080-ext-huge",
            "poke64 $I 8 0xffffffffffffffff; h=$(peek $I 100 4)
             poke32 $I $h 0x12345678; poke32 $I $((h + 4)) 0x7fffffff",
        ),
        (
            "h080-ext-huge-backing-inside",
            "h=$(peek $I 100 4); poke32 $I $h 0x12345678; poke32 $I $((h + 4)) 0x7fffffff
             poke64 $I 8 $((h + 4))",
        ),
        ("h080-reftable-clusters-ffffffff", "poke32 $I 56 0xffffffff"),
        ("h080-reftable-clusters-20001", "poke32 $I 56 0x00020001"),
        (
            "h080-reftable-misaligned",
            "poke64 $I 48 0x1234567890abcdef",
        ),
        (
            "h080-reftable-huge-offset",
            "poke64 $I 48 0xffffffffffff0000; poke32 $I 56 0x7f",
        ),
        ("h080-l1-size-ffffffff", "poke32 $I 36 0xffffffff"),
        ("h080-l1-size-7fffffff", "poke32 $I 36 0x7fffffff"),
        (
            "h080-l1-huge-offset",
            "poke64 $I 40 0x7fffffffffff0000; poke32 $I 36 0xffff",
        ),
        (
            "h080-l1-misaligned",
            "poke64 $I 40 0x1234567890abcdef; poke32 $I 36 1",
        ),
        (
            "h080-l1-size-0-with-snapshot",
            "qemu-img snapshot -c foo $I; poke32 $I 36 0",
        ),
        (
            "h080-backing-size-ffffffff",
            "poke64 $I 8 0x1000; poke32 $I 16 0xffffffff",
        ),
        // 061: unknown compatible and autoclear bits (bit 42 of each).
        (
            "h061-unknown-compat-autoclear",
            "poke64 $I 80 $((1 << 42)); poke64 $I 88 $((1 << 42))",
        ),
        ("h-corrupt-bit", "poke64 $I 72 2"),
        ("h-dirty-bit-eager-refcounts", "poke64 $I 72 1"),
        (
            "h-unknown-extension",
            // The feature name table's type becomes one QEMU does not know.
            "h=$(peek $I 100 4)
             while [ $(peek $I $h 4) != $((0x6803f857)) ]; do
                 h=$(( h + 8 + ($(peek $I $((h + 4)) 4) + 7) / 8 * 8 ))
             done
             poke32 $I $h 0x12345678",
        ),
        ("h-no-extensions", "h=$(peek $I 100 4); poke64 $I $h 0"),
        ("h-version-2-forced", "poke32 $I 4 2"),
    ];
    for (name, patch) in cases {
        c.img(
            &format!("{name}.qcow2"),
            &[],
            &format!("mk $I 4M; qio -c 'write -P 0x5c 64k 64k' $I\n{patch}"),
        );
    }
    c.img(
        "h061-unknown-bits-downgraded.qcow2",
        &[],
        "cp h061-unknown-compat-autoclear.qcow2 $I; qemu-img amend -o compat=0.10 $I",
    );
    // An L1 table that runs past the end of the file (512-byte clusters): QEMU opens it.
    c.img(
        "h-l1-past-eof-512.qcow2",
        &[],
        "mk -o cluster_size=512 $I 64M; qio -c 'write -P 7 0 4k' $I
         truncate -s $(( $(l1_of $I) + 512 )) $I",
    );
    // The file cut short after the header and tables of a fresh image.
    c.img(
        "h-cut-after-l2.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -P 3 0 256k' $I; truncate -s $((0x50000 + 100000)) $I",
    );
}

/// iotests 080 and 261: the snapshot table and its entries.
fn snapshot_tables(c: &mut Corpus) {
    let with_snap = "mk $I 4M; qio -c 'write 0 512' $I; qemu-img snapshot -c test $I";
    let cases: &[(&str, &str, &str)] = &[
        ("s080-nb-ffffffff", "mk $I 4M", "poke32 $I 60 0xffffffff"),
        ("s080-nb-7fffffff", "mk $I 4M", "poke32 $I 60 0x7fffffff"),
        (
            "s080-table-huge-offset",
            "mk $I 4M",
            "poke64 $I 64 0xffffffffffff0000; poke32 $I 60 0xffff",
        ),
        (
            "s080-table-misaligned-empty",
            "mk $I 4M",
            "poke64 $I 64 0x1234567890abcdef; poke32 $I 60 0",
        ),
        (
            "s080-table-size-limit",
            "mk $I 4M",
            "poke64 $I 64 0x1000000; poke32 $I 60 0x10000",
        ),
        (
            "s080-snap-l1-misaligned",
            with_snap,
            "poke64 $I $(snap_of $I) 0x400200",
        ),
        (
            "s080-snap-l1-size-huge",
            with_snap,
            "poke32 $I $(( $(snap_of $I) + 8 )) 0x10000000",
        ),
        (
            "s-snap-l1-past-eof",
            with_snap,
            "poke64 $I $(snap_of $I) 0x10000000",
        ),
        (
            "s-table-truncated",
            with_snap,
            "truncate -s $(( $(snap_of $I) + 20 )) $I",
        ),
        (
            "s-id-size-ffff",
            with_snap,
            "poke16 $I $(( $(snap_of $I) + 12 )) 0xffff",
        ),
        (
            "s-duplicate-ids",
            "mk $I 4M; qio -c 'write 0 512' $I; qemu-img snapshot -c a $I
             qio -c 'write -P 9 0 512' $I; qemu-img snapshot -c b $I",
            // Both entries have 1-byte IDs; the second's ("2") becomes "1".
            "s=$(snap_of $I); e=$(( 40 + $(peek $I $((s + 36)) 4) + 2 ))
             e=$(( (e + 7) / 8 * 8 )); x=$(peek $I $((s + e + 36)) 4)
             poke $I $((s + e + 40 + x)) '1'",
        ),
    ];
    for (name, make, patch) in cases {
        c.img(&format!("{name}.qcow2"), &[], &format!("{make}\n{patch}"));
    }
    // Snapshot ID 1 named "x" and ID 2 named "1": a bare "1" is the ID, a name
    // selector the name.
    c.img(
        "s-name-is-id.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -P 1 0 64k' $I; qemu-img snapshot -c x $I
         qio -c 'write -P 2 0 64k' $I; qemu-img snapshot -c 1 $I; qio -c 'write -P 3 0 64k' $I",
    );
    for s in ["1", "snapshot.name=1", "snapshot.id=2", "x"] {
        c.snap("s-name-is-id.qcow2", s);
    }
    // 261: a v2 image whose three snapshot entries carry 0, 42 and 8 bytes of extra
    // data (the second with data QEMU does not know), then upgraded and botched.
    c.sh("mk -o compat=0.10 s261-v2-extra.qcow2 4M
         qio -c 'write -P 0x61 0 64k' s261-v2-extra.qcow2
         for s in sn0 sn1 sn2; do qemu-img snapshot -c $s s261-v2-extra.qcow2; done");
    rewrite_snapshot_extra(&c.w, "s261-v2-extra.qcow2");
    c.add("s261-v2-extra.qcow2", &[]);
    c.snap("s261-v2-extra.qcow2", "sn1");
    c.img(
        "s261-v3-upgraded.qcow2",
        &[],
        "cp s261-v2-extra.qcow2 $I; qemu-img amend -o compat=1.1 $I",
    );
    c.img(
        "s261-v3-botched.qcow2",
        &[],
        "cp s261-v2-extra.qcow2 $I; poke32 $I 4 3; poke32 $I 100 0x68; poke32 $I 96 4",
    );
    c.img(
        "s261-v3-botched-repaired.qcow2",
        &[],
        "cp s261-v3-botched.qcow2 $I; qemu-img check -q -r all $I || true",
    );
    c.img(
        "s261-extra-64k.qcow2",
        &[],
        "cp s261-v3-upgraded.qcow2 $I; qemu-img snapshot -c sn3 $I
         o=$(snap_of $I)
         for i in 0 1 2; do
             n=$(( 40 + $(peek $I $((o + 36)) 4) + $(peek $I $((o + 12)) 2) + $(peek $I $((o + 14)) 2) ))
             o=$(( o + (n + 7) / 8 * 8 ))
         done
         poke32 $I $((o + 36)) 0x10000",
    );
    // 261: more than 65536 snapshots (all-zero v2 entries).
    c.img(
        "s261-too-many.qcow2",
        &[],
        "mk -o compat=0.10 $I 4M; poke64 $I 64 0x100000; poke32 $I 60 0x20000
         truncate -s $((0x100000 + 40 * 131072)) $I",
    );
}

/// Rewrite the three snapshot entries of an image so that their extra data is 0, 42
/// and 8 bytes long (iotest 261's template).
fn rewrite_snapshot_extra(w: &Work, name: &str) {
    let mut b = std::fs::read(w.path(name)).unwrap();
    let be = |b: &[u8], o: usize, n: usize| {
        b[o..o + n]
            .iter()
            .fold(0usize, |a, x| (a << 8) | usize::from(*x))
    };
    let table = be(&b, 64, 8);
    let mut at = table;
    let mut out = Vec::new();
    for (i, new_extra) in [0usize, 42, 8].into_iter().enumerate() {
        let id = be(&b, at + 12, 2);
        let nm = be(&b, at + 14, 2);
        let extra = be(&b, at + 36, 4);
        let mut e = b[at..at + 40].to_vec();
        e[36..40].copy_from_slice(&(new_extra as u32).to_be_bytes());
        let mut x = b[at + 40..at + 40 + extra].to_vec();
        x.resize(new_extra, 0);
        if i == 1 {
            x[16..35].copy_from_slice(b"very important data");
        }
        e.extend(x);
        e.extend_from_slice(&b[at + 40 + extra..at + 40 + extra + id + nm]);
        e.resize(e.len().div_ceil(8) * 8, 0);
        out.extend(e);
        at += (40 + extra + id + nm).div_ceil(8) * 8;
    }
    b[table..table + out.len()].copy_from_slice(&out);
    std::fs::write(w.path(name), b).unwrap();
}

/// iotest 112: refcount widths, their limits, and amend between them.
fn refcount_widths(c: &mut Corpus) {
    c.img(
        "r112-rc1-snapshot-refused.qcow2",
        &[],
        "mk -o refcount_bits=1 $I 4M; qio -c 'write 0 512' $I
         qemu-img snapshot -c foo $I 2>/dev/null && exit 1 || true",
    );
    c.img(
        "r112-rc2-third-snapshot-refused.qcow2",
        &[],
        "mk -o refcount_bits=2 $I 4M; qio -c 'write 0 512' $I
         qemu-img snapshot -c foo $I; qemu-img snapshot -c bar $I
         qemu-img snapshot -c baz $I 2>/dev/null && exit 1 || true",
    );
    c.img(
        "r112-rc1-compressed.qcow2",
        &[],
        "mk -o refcount_bits=1 $I 4M
         qio -c 'write -P 0 -c 0 64k' -c 'write -P 1 -c 64k 64k' $I",
    );
    c.img(
        "r112-rc64-msb.qcow2",
        &[],
        "mk -o refcount_bits=64 $I 4M; qio -c 'write 0 512' $I
         poke64 $I 0x20028 0x8000000000000000; poke64 $I 0x40000 0x50000",
    );
    c.img(
        "r112-rc64-max.qcow2",
        &[],
        "mk -o refcount_bits=64 $I 4M; qio -c 'write 0 512' $I
         poke64 $I 0x20028 0xffffffffffffffff; poke64 $I 0x40000 0x50000
         qemu-img snapshot -c foo $I 2>/dev/null && exit 1 || true",
    );
    // (Amending away from refcount_bits=1 takes QEMU 10.0 half a minute even on an
    // empty image, so the widths go 16 -> 1 and 16 -> 64 -> 16.)
    c.img(
        "r112-amend-16-to-1.qcow2",
        &[],
        "mk $I 4M; qio -c 'write 1M 1M' $I; qemu-img amend -o refcount_bits=1 $I",
    );
    c.img(
        "r112-amend-16-to-64.qcow2",
        &[],
        "mk $I 4M; qio -c 'write 1M 2M' $I; qemu-img amend -o refcount_bits=64 $I",
    );
    c.img(
        "r112-amend-to-v2.qcow2",
        &[],
        "cp r112-amend-16-to-64.qcow2 $I; qemu-img amend -o compat=0.10,refcount_bits=16 $I",
    );
    c.img(
        "r112-amend-with-snapshot.qcow2",
        &[],
        "cp r112-amend-to-v2.qcow2 $I; qemu-img amend -o compat=1.1 $I
         qemu-img snapshot -c foo $I; qio -c 'write 0 1M' $I
         qemu-img amend -o refcount_bits=1 $I 2>/dev/null && exit 1
         qemu-img amend -o refcount_bits=2 $I",
    );
    c.snap("r112-amend-with-snapshot.qcow2", "foo");
    c.img(
        "r112-too-many-refs.qcow2",
        &[],
        "mk -o refcount_bits=1 $I 4M; qio -c 'write 0 64k' $I
         poke64 $I 0x40008 0x8000000000050000",
    );
    // check -r all cannot fix it with 1-bit refcounts ("please use amend").
    c.img(
        "r112-too-many-refs-r-all.qcow2",
        &[],
        "cp r112-too-many-refs.qcow2 $I; qemu-img check -q -r all $I 2>/dev/null || true",
    );
    c.img(
        "r112-multiple-walks.qcow2",
        &[],
        "mk -o refcount_bits=16,cluster_size=512 $I 64k; qio -c \"write 0 $((58 * 512))\" $I
         qemu-img amend -o refcount_bits=64 $I",
    );
}

/// iotests 061 and 290: amend, downgrades and zero expansion, discards in v2.
fn amended(c: &mut Corpus) {
    let lazy = "-o compat=1.1,lazy_refcounts=on";
    c.img(
        "a061-downgrade-zeros.qcow2",
        &[],
        &format!("mk {lazy} $I 4M; qio -c 'write -z 0 128k' $I; qemu-img amend -o compat=0.10 $I"),
    );
    // qemu-io's `abort` leaves the image dirty (lazy refcounts not written back).
    c.img(
        "a061-dirty.qcow2",
        &[],
        &format!(
            "mk {lazy} $I 4M
             qemu-io -c 'write -P 0x2a 0 128k' -c flush -c abort $I >/dev/null 2>&1 && exit 1
             [ $(( $(peek $I 72 8) & 1 )) = 1 ]"
        ),
    );
    c.img(
        "a061-dirty-downgraded.qcow2",
        &[],
        "cp a061-dirty.qcow2 $I; qemu-img amend -o compat=0.10 $I",
    );
    c.img(
        "a061-dirty-lazy-off.qcow2",
        &[],
        "cp a061-dirty.qcow2 $I; qemu-img amend -o lazy_refcounts=off $I",
    );
    c.img(
        "a061-upgrade-resize.qcow2",
        &[],
        "mk -o compat=0.10 $I 4M; qio -c 'write -P 0x2a 2M 64k' $I
         qemu-img amend -o compat=1.1,lazy_refcounts=on,size=8M $I",
    );
    c.img(
        "a061-backing-added.qcow2",
        &["a061-base.qcow2"],
        "mk a061-base.qcow2 4M; qio -c 'write -P 0x2a 0 128k' a061-base.qcow2
         mk $I 4M; qemu-img rebase -u -b a061-base.qcow2 -F qcow2 $I",
    );
    c.img(
        "a061-zeros-inactive.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -z 0 128k' $I; qemu-img snapshot -c foo $I
         qio -c 'write -P 0x2a 0 128k' $I; qemu-img amend -o compat=0.10 $I",
    );
    c.snap("a061-zeros-inactive.qcow2", "foo");
    c.img(
        "a061-zeros-shared-l2.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -z 0 128k' $I; qemu-img snapshot -c foo $I
         qemu-img amend -o compat=0.10 $I",
    );
    c.img(
        "a061-zeros-backed.qcow2",
        &["a061-zb-base.qcow2"],
        "mk a061-zb-base.qcow2 4M; qio -c 'write -P 0x2a 0 128k' a061-zb-base.qcow2
         mk -b a061-zb-base.qcow2 -F qcow2 $I 4M; qio -c 'write -z 0 64k' $I
         qemu-img amend -o compat=0.10 $I",
    );
    c.img(
        "a061-zeros-backed-inactive.qcow2",
        &["a061-zbi-base.qcow2"],
        "mk a061-zbi-base.qcow2 4M; qio -c 'write -P 0x2a 0 128k' a061-zbi-base.qcow2
         mk -b a061-zbi-base.qcow2 -F qcow2 $I 4M; qio -c 'write -z 0 64k' $I
         qemu-img snapshot -c foo $I; qio -c 'write -P 0x42 0 128k' $I
         qemu-img amend -o compat=0.10 $I",
    );
    c.snap("a061-zeros-backed-inactive.qcow2", "foo");
    c.img(
        "a061-zeros-full.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -P 0x2a 0 4M' -c 'write -z 0 4M' $I
         qemu-img amend -o compat=0.10 $I",
    );
    // 290: discard in v2 without a backing file unmaps; with one it does nothing.
    c.img(
        "a290-v2-discard.qcow2",
        &[],
        "mk -o compat=0.10 $I 128k; qio -c 'write -P 1 0 128k' $I; qio -c 'discard 0 128k' $I",
    );
    c.img(
        "a290-v2-discard-backed.qcow2",
        &["a290-base.qcow2"],
        "mk a290-base.qcow2 128k; qio -c 'write -P 0xff 0 128k' a290-base.qcow2
         mk -o compat=0.10 -b a290-base.qcow2 -F qcow2 $I
         qio -c 'write -P 1 0 128k' $I; qio -c 'discard 0 128k' $I",
    );
    c.img(
        "a290-v3-discard-backed.qcow2",
        &["a290-base.qcow2"],
        "mk -o compat=1.1 -b a290-base.qcow2 -F qcow2 $I
         qio -c 'write -P 1 0 128k' $I; qio -c 'discard 0 128k' $I",
    );
}

/// `qemu-img resize`: grow, shrink, preallocated growth, with snapshots (iotest 271's
/// resizes with extended L2 and a backing file).
fn resized(c: &mut Corpus) {
    let data = "mk $I 4M; qio -c 'write -P 0x71 0 64k' -c 'write -P 0x72 3M 512k' $I";
    c.img(
        "z-grown.qcow2",
        &[],
        &format!("{data}; qemu-img resize -q $I +4M"),
    );
    c.img(
        "z-shrunk.qcow2",
        &[],
        &format!("{data}; qemu-img resize -q --shrink $I 3200k"),
    );
    c.img(
        "z-shrunk-unaligned.qcow2",
        &[],
        &format!("{data}; qemu-img resize -q --shrink $I 977k"),
    );
    for p in ["metadata", "falloc", "full"] {
        c.img(
            &format!("z-grown-{p}.qcow2"),
            &[],
            &format!("{data}; qemu-img resize -q --preallocation={p} $I 6M"),
        );
    }
    c.img(
        "z-prealloc-falloc.qcow2",
        &[],
        "mk -o preallocation=falloc $I 2M; qio -c 'write -P 3 64k 4k' $I",
    );
    c.img(
        "z-zero-data.qcow2",
        &[],
        "mk $I 2M; qio -c 'write -P 0 0 1M' -c 'write -P 1 100k 1' $I",
    );
    c.img(
        "z-grown-after-snapshot.qcow2",
        &[],
        &format!(
            "{data}; qemu-img snapshot -c small $I; qemu-img resize -q $I 8M
             qio -c 'write -P 0x73 6M 64k' $I"
        ),
    );
    c.snap("z-grown-after-snapshot.qcow2", "small");
    c.img(
        "z-shrunk-after-snapshot.qcow2",
        &[],
        &format!("{data}; qemu-img snapshot -c big $I; qemu-img resize -q --shrink $I 1M"),
    );
    c.snap("z-shrunk-after-snapshot.qcow2", "big");
    c.img(
        "z271-ext-l2-prealloc-backing.qcow2",
        &["z271-base.raw"],
        "qemu-img create -q -f raw z271-base.raw 1M; qio -f raw -c 'write -P 0xff 0 1M' z271-base.raw
         mk -o extended_l2=on,preallocation=metadata -F raw -b z271-base.raw $I 512k
         qemu-img resize -q $I 1M",
    );
    c.img(
        "z271-ext-l2-resize-metadata.qcow2",
        &[],
        "mk -o extended_l2=on $I 503k; qio -c 'write -P 0xff 0 503k' $I
         qemu-img resize -q --preallocation=metadata $I 1013k",
    );
    c.img(
        "z271-ext-l2-backed-resize-falloc.qcow2",
        &["z271-base.raw"],
        "mk -o extended_l2=on -F raw -b z271-base.raw $I 503k
         qemu-img resize -q --preallocation=falloc $I 1013k",
    );
}

/// `qemu-img commit` and `rebase` results, also iotest 271's rebase with subclusters.
fn commit_rebase(c: &mut Corpus) {
    c.sh(
        "mk k-base.qcow2 4M; qio -c 'write -P 1 0 1M' k-base.qcow2
         mk -b k-base.qcow2 -F qcow2 k-mid.qcow2; qio -c 'write -P 2 512k 1M' k-mid.qcow2
         mk -b k-mid.qcow2 -F qcow2 k-top.qcow2; qio -c 'write -P 3 1M 64k' -c 'write -z 0 64k' k-top.qcow2
         for f in base mid top; do cp k-$f.qcow2 kc-$f.qcow2; cp k-$f.qcow2 kd-$f.qcow2; done
         qemu-img rebase -u -b kc-base.qcow2 -F qcow2 kc-mid.qcow2
         qemu-img rebase -u -b kc-mid.qcow2 -F qcow2 kc-top.qcow2
         qemu-img rebase -u -b kd-base.qcow2 -F qcow2 kd-mid.qcow2
         qemu-img rebase -u -b kd-mid.qcow2 -F qcow2 kd-top.qcow2
         qemu-img commit -q kc-top.qcow2
         qemu-img commit -q -b kd-base.qcow2 kd-top.qcow2",
    );
    c.add("kc-top.qcow2", &["kc-mid.qcow2", "kc-base.qcow2"]);
    c.add("kc-mid.qcow2", &["kc-base.qcow2"]);
    c.add("kd-top.qcow2", &["kd-mid.qcow2", "kd-base.qcow2"]);
    c.add("kd-base.qcow2", &[]);
    c.img(
        "k-rebased-safe.qcow2",
        &["k-base.qcow2", "k-other.qcow2"],
        "mk k-other.qcow2 4M; qio -c 'write -P 9 256k 2M' k-other.qcow2
         cp k-top.qcow2 $I; qemu-img rebase -u -b k-mid.qcow2 -F qcow2 $I
         qemu-img rebase -b k-other.qcow2 -F qcow2 $I",
    );
    c.img(
        "k-rebased-unsafe.qcow2",
        &["k-other.qcow2"],
        "cp k-top.qcow2 $I; qemu-img rebase -u -b k-other.qcow2 -F qcow2 $I",
    );
    c.img(
        "k-rebased-flat.qcow2",
        &["k-mid.qcow2", "k-base.qcow2"],
        "cp k-top.qcow2 $I; qemu-img rebase -u -b k-mid.qcow2 -F qcow2 $I
         qemu-img rebase -b '' $I",
    );
    c.img(
        "k-rebased-json.qcow2",
        &["k-mid.qcow2", "k-base.qcow2"],
        r#"cp k-top.qcow2 $I
           qemu-img rebase -u -F qcow2 -b 'json:{"driver":"qcow2","file":{"driver":"file","filename":"k-mid.qcow2"}}' $I"#,
    );
    c.img(
        "k-rebased-file-prefix.qcow2",
        &["k-mid.qcow2", "k-base.qcow2"],
        "cp k-top.qcow2 $I; qemu-img rebase -u -F qcow2 -b file:k-mid.qcow2 $I",
    );
    c.img(
        "k-converted-chain.qcow2",
        &[],
        "qemu-img convert -O qcow2 k-top.qcow2 $I",
    );
    c.add("k-top.qcow2", &["k-mid.qcow2", "k-base.qcow2"]);
    // 271: holes between allocated subclusters survive a rebase.
    c.img(
        "k271-rebase-subclusters.qcow2",
        &["k271-base.qcow2", "k271-mid.qcow2"],
        "mk -o cluster_size=1M,extended_l2=on k271-base.qcow2 3M
         mk -o cluster_size=1M,extended_l2=on -b k271-base.qcow2 -F qcow2 k271-mid.qcow2 3M
         mk -o cluster_size=1M,extended_l2=on -b k271-mid.qcow2 -F qcow2 $I 3M
         qio -c 'write -P 0x11 1M 1M' k271-base.qcow2
         qio -c \"write -P 0x22 $((31 * 32))k 32k\" -c \"write -P 0x33 $((64 * 32))k 32k\" k271-mid.qcow2
         cp $I k271-top-c.qcow2
         qemu-img rebase -b k271-base.qcow2 -F qcow2 $I",
    );
    c.img(
        "k271-rebase-compressed.qcow2",
        &["k271-base.qcow2"],
        "mv k271-top-c.qcow2 $I; qemu-img rebase -c -b k271-base.qcow2 -F qcow2 $I",
    );
}

/// iotest 244: external data files, raw and not, named and not, and a name that
/// resolves against the working directory.
fn data_files(c: &mut Corpus) {
    let layout = "qio -c 'write -P 0x11 1M 4M' -c 'discard 2M 2M' -c 'write -z 3M 3M' $I";
    c.img(
        "d244-data-file.qcow2",
        &["d244-data-file.data"],
        &format!("mk -o data_file=d244-data-file.data $I 8M; {layout}"),
    );
    c.img(
        "d244-data-file-raw.qcow2",
        &["d244-data-file-raw.data"],
        &format!("mk -o data_file=d244-data-file-raw.data,data_file_raw=on $I 8M; {layout}"),
    );
    c.img(
        "d244-unnamed.qcow2",
        &["d244-unnamed.data"],
        "mk -o data_file=d244-unnamed.data $I 4M; qio -c 'write -P 0x12 0 64k' $I
         qemu-img amend -o data_file= $I",
    );
    c.img(
        "d244-raw-grown.qcow2",
        &["d244-raw-grown.data"],
        "mk -o data_file=d244-raw-grown.data,data_file_raw=on $I 1M
         qio -c 'write -P 42 0 1M' $I
         truncate -s 2M d244-raw-grown.data; qio -f raw -c 'write -P 84 1M 1M' d244-raw-grown.data
         qemu-img resize -q $I 2M",
    );
    c.img(
        "d-prealloc-metadata.qcow2",
        &["d-prealloc-metadata.data"],
        "mk -o data_file=d-prealloc-metadata.data,preallocation=metadata $I 2M
         qio -c 'write -P 5 512k 64k' $I",
    );
    // Created inside sub/, opened from the work directory: QEMU opens the data file
    // name against the working directory, where a different file of that name sits.
    c.img(
        "sub/d-elsewhere.qcow2",
        &["sub/d-elsewhere.data", "d-elsewhere.data"],
        "mkdir -p sub; (cd sub; mk -o data_file=d-elsewhere.data d-elsewhere.qcow2 1M
            qio -c 'write -P 0xaa 0 64k' d-elsewhere.qcow2)
         qemu-img create -q -f raw d-elsewhere.data 1M
         qio -f raw -c 'write -P 0xbb 0 1M' d-elsewhere.data",
    );
    c.img(
        "sub/d-nowhere.qcow2",
        &["sub/d-nowhere.data"],
        "(cd sub; mk -o data_file=d-nowhere.data d-nowhere.qcow2 1M
            qio -c 'write -P 0xaa 0 64k' d-nowhere.qcow2)",
    );
}

/// Bitmaps (qemu-img bitmap and a running VM) and lazy-refcount images left dirty by a
/// killed qemu-io (iotest 039).
fn bitmaps_and_dirty(c: &mut Corpus) {
    c.img(
        "b-bitmaps.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -P 1 0 1M' $I
         qemu-img bitmap --add $I b0; qemu-img bitmap --add --granularity 512k $I b1
         qemu-img bitmap --add --disable $I b2; qemu-img bitmap --merge b0 $I b1",
    );
    c.img(
        "l039-killed.qcow2",
        &[],
        "mk -o compat=1.1,lazy_refcounts=on $I 4M
         qemu-io -c 'write -P 0x5a 0 512' -c 'sigraise 9' $I >/dev/null 2>&1 && exit 1
         [ $(( $(peek $I 72 8) & 1 )) = 1 ]",
    );
    c.img(
        "l039-killed-many.qcow2",
        &[],
        "mk -o compat=1.1,lazy_refcounts=on,cluster_size=4k $I 4M
         qio -c 'write -P 1 0 1M' $I; qemu-img snapshot -c s $I
         qemu-io -c 'write -P 2 64k 300k' -c 'discard 512k 64k' -c 'write -P 3 2M 8k' \
             -c 'sigraise 9' $I >/dev/null 2>&1 && exit 1
         [ $(( $(peek $I 72 8) & 1 )) = 1 ]",
    );
    c.snap("l039-killed-many.qcow2", "s");
    c.img(
        "l039-killed-repaired.qcow2",
        &[],
        "cp l039-killed-many.qcow2 $I; qemu-img check -q -r all $I || true",
    );
    c.sh("mk b-vm-bitmap.qcow2 4M; mk -o lazy_refcounts=on b-vm-killed.qcow2 4M");
    let add = r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"d0","name":"dirty","persistent":true}}"#;
    let add2 = r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"d0","name":"fine","persistent":true,"granularity":4096}}"#;
    if c.vm(
        "b-vm-bitmap.qcow2",
        "-machine none",
        "file=b-vm-bitmap.qcow2,format=qcow2",
        &[
            add,
            add2,
            r#"qemu-io d0 "write -P 0x33 64k 128k""#,
            r#"qemu-io d0 "write -P 0x34 3M 4k""#,
        ],
    ) {
        c.add("b-vm-bitmap.qcow2", &[]);
    }
    // A stored bitmap, then a VM that loads it (marking it in use), writes and is
    // killed: the bitmap stays "in use" and the lazy refcounts dirty.
    let killed = "file=b-vm-killed.qcow2,format=qcow2";
    if c.vm("b-vm-killed.qcow2", "-machine none", killed, &[add])
        && c.vm(
            "b-vm-killed.qcow2",
            "-machine none",
            killed,
            &[
                r#"qemu-io d0 "write -P 0x35 0 192k""#,
                r#"qemu-io d0 "sigraise 9""#,
            ],
        )
    {
        let info =
            c.w.qemu_img(&["info", "--output=json", "-U", "b-vm-killed.qcow2"]);
        let info = Work::json(&info.stdout);
        let spec = &info["format-specific"]["data"];
        assert_eq!(spec["bitmaps"][0]["flags"][0], "in-use", "{spec}");
        assert_eq!(info["dirty-flag"], true, "{info}");
        c.add("b-vm-killed.qcow2", &[]);
    }
}

/// iotest 271: extended L2 entries, their subcluster bitmaps, and corrupted ones. The
/// first L2 table is at 0x40000 and each entry is 16 bytes (descriptor, bitmap).
fn extended_l2(c: &mut Corpus) {
    let ext = "mk -o extended_l2=on";
    c.img(
        "e271-writes.qcow2",
        &[],
        &format!(
            "{ext} $I 1M; qio -c 'write -P 1 0 1k' -c 'write -P 2 3k 512' -c 'write -P 3 5k 1k' \
             -c 'write -P 4 6k 2k' -c 'write -P 5 8k 6k' -c 'write -P 6 15k 4k' \
             -c 'write -P 7 32k 1k' -c 'write -P 8 63k 4k' -c 'write -z 2k 2k' \
             -c 'write -z -u 128k 32k' -c 'write -c -P 9 192k 64k' -c 'write -P 10 195k 512' $I"
        ),
    );
    c.img(
        "e271-writes-backed.qcow2",
        &["e271-base.raw"],
        &format!(
            "qemu-img create -q -f raw e271-base.raw 2083k
             qio -f raw -c 'write -P 0xff 0 2083k' e271-base.raw
             {ext} -F raw -b e271-base.raw $I 2083k
             qio -c 'write -z 0 192k' -c 'write -z 208k 128k' -c 'write -z 399k 128k' \
                 -c 'write -P 1 576k 576k' -c 'write -z 768k 128k' -c 'write -z -u 975k 128k' \
                 -c 'write -z 2048k 35k' $I"
        ),
    );
    c.img(
        "e271-zero-and-alloc-bits.qcow2",
        &[],
        &format!("{ext} $I 1M; qio -c 'write 32k 128k' $I; poke32 $I $((0x40000 + 24)) 1"),
    );
    c.img(
        "e271-zero-flag-on-descriptor.qcow2",
        &[],
        &format!("{ext} $I 1M; qio -c 'write 256k 1k' $I; poke $I $((0x40000 + 7)) '\\x01'"),
    );
    c.img(
        "e271-alloc-bit-unallocated.qcow2",
        &[],
        &format!("{ext} $I 1M; qio -c 'write 256k 1k' $I; poke $I $((0x40000 + 15)) '\\x01'"),
    );
    c.img(
        "e271-both-bits-unallocated.qcow2",
        &[],
        &format!(
            "{ext} $I 1M; qio -c 'write 256k 1k' $I; poke64 $I $((0x40000 + 24)) $(((1 << 32) | 1))"
        ),
    );
    c.img(
        "e271-compressed-with-bitmap.qcow2",
        &[],
        &format!(
            "{ext} $I 1M; qio -c 'write -q -P 11 -c 0 64k' $I; poke $I $((0x40000 + 11)) '\\x01\\x80'"
        ),
    );
    c.sh("qemu-img create -q -f raw e271-ubase.raw 128k
         qio -f raw -c 'write -P 0xff 0 128k' e271-ubase.raw");
    c.img(
        "e271-unaligned-alloc.qcow2",
        &["e271-ubase.raw"],
        &format!(
            "{ext} -F raw -b e271-ubase.raw $I; qio -c 'write -P 1 4k 2k' $I
             poke $I $((0x40000 + 6)) '\\x02'"
        ),
    );
    c.img(
        "e271-unaligned-zero.qcow2",
        &["e271-ubase.raw"],
        &format!(
            "{ext} -F raw -b e271-ubase.raw $I; qio -c 'write -P 1 4k 2k' $I
             qio -c 'write -z 4k 2k' $I; poke $I $((0x40000 + 6)) '\\x02'"
        ),
    );
    c.img(
        "e271-unaligned-zero-repaired.qcow2",
        &["e271-ubase.raw"],
        "cp e271-unaligned-zero.qcow2 $I; qemu-img check -q -r all $I || true",
    );
    let mut cow = format!("{ext} $I 1M\n");
    for i in 0..10u32 {
        cow.push_str(&format!(
            "qio -c 'write -z {}k 2k' -c 'write -P {} {}k 2k' -c 'write -P {} {}k 2k' $I\n",
            64 * i + 14,
            0xd0 + i,
            64 * i + 26,
            0xe0 + i,
            64 * i + 36
        ));
    }
    cow.push_str(
        "qemu-img snapshot -c snap1 $I
         qio -c 'write -P 0xf0 30k 1k' -c 'write -P 0xf1 84k 1k' -c 'write -P 0xf2 168k 1k' \
             -c 'write -P 0xf3 218k 1k' -c 'write -P 0xf4 270k 1k' -c 'write -P 0xf5 321k 1k' \
             -c 'write -z 414k 3k' -c 'write -z 474k 2k' -c 'write -z 538k 1k' \
             -c 'write -z 588k 1k' $I",
    );
    c.img("e271-snapshot-cow.qcow2", &[], &cow);
    c.snap("e271-snapshot-cow.qcow2", "snap1");
}

/// Compressed clusters of every kind, and 512-byte and 2 MiB clusters.
fn compressed_and_discards(c: &mut Corpus) {
    c.sh(
        "qemu-img create -q -f raw x-src.raw 4M
         qio -f raw -c 'write -P 0x61 0 300k' -c 'write -P 0x62 1M 100k' -c 'write -P 0x63 3M 1M' x-src.raw",
    );
    for (name, opts) in [
        ("x-deflate", "cluster_size=64k"),
        ("x-zstd", "compression_type=zstd"),
        ("x-deflate-512", "cluster_size=512"),
        ("x-zstd-2m", "cluster_size=2M,compression_type=zstd"),
        ("x-deflate-ext-l2", "extended_l2=on,cluster_size=128k"),
    ] {
        c.img(
            &format!("{name}.qcow2"),
            &[],
            &format!("qemu-img convert -c -O qcow2 -o {opts} x-src.raw $I"),
        );
    }
    c.img(
        "x-partly-overwritten.qcow2",
        &[],
        "cp x-deflate.qcow2 $I; qio -c 'write -P 0x99 4k 4k' -c 'discard 1M 64k' -c 'write -z 3M 64k' $I",
    );
    c.img(
        "x-compressed-over-backing.qcow2",
        &["x-src.raw"],
        "mk -b x-src.raw -F raw $I; qio -c 'write -c -P 0x44 64k 64k' -c 'write -c -P 0x45 2M 128k' $I",
    );
    c.img(
        "x-512-mixed.qcow2",
        &[],
        "mk -o cluster_size=512 $I 1M; qio -c 'write -P 1 0 3k' -c 'write -z 1k 1k' \
             -c 'discard 2k 512' -c 'write -P 2 700k 100k' $I",
    );
}

/// Backing chains as they turn up in practice, encryption, and option mixes.
fn chains_and_options(c: &mut Corpus) {
    // Old images name no backing format: QEMU probes it. (The backing format
    // extension's type is overwritten with one QEMU does not know.)
    let no_format = "h=$(peek $I 100 4)
         while [ $(peek $I $h 4) != $((0xe2792aca)) ]; do
             h=$(( h + 8 + ($(peek $I $((h + 4)) 4) + 7) / 8 * 8 ))
         done
         poke32 $I $h 0x12345678";
    c.img(
        "n-no-backing-format-qcow2.qcow2",
        &["n-base.qcow2"],
        &format!(
            "mk n-base.qcow2 4M; qio -c 'write -P 0x21 0 2M' n-base.qcow2
             mk -b n-base.qcow2 -F qcow2 $I; qio -c 'write -P 0x22 1M 64k' $I
             {no_format}"
        ),
    );
    c.img(
        "n-no-backing-format-raw.qcow2",
        &["n-base.raw"],
        &format!(
            "qemu-img create -q -f raw n-base.raw 3M; qio -f raw -c 'write -P 0x23 0 3M' n-base.raw
             mk -b n-base.raw -F raw $I 4M; qio -c 'write -P 0x24 64k 64k' $I
             {no_format}"
        ),
    );
    // A chain in a directory, opened from elsewhere: backing names are relative to
    // the image that names them.
    c.img(
        "chain/n-top.qcow2",
        &["chain/n-mid.qcow2", "chain/lower/n-bottom.qcow2"],
        "mkdir -p chain/lower; cd chain
         mk -o cluster_size=4k lower/n-bottom.qcow2 8M; qio -c 'write -P 1 0 8M' lower/n-bottom.qcow2
         mk -o cluster_size=2M,compat=0.10 -b lower/n-bottom.qcow2 -F qcow2 n-mid.qcow2 2M
         qio -c 'write -P 2 1M 1M' n-mid.qcow2
         mk -o cluster_size=512 -b n-mid.qcow2 -F qcow2 n-top.qcow2 10M
         qio -c 'write -P 3 1536k 1k' -c 'write -z 0 4k' -c 'write -P 4 9M 512' n-top.qcow2",
    );
    c.img(
        "n-absolute-backing.qcow2",
        &["n-base.qcow2"],
        "mk -b \"$PWD/n-base.qcow2\" -F qcow2 $I; qio -c 'write -P 0x25 3M 64k' $I",
    );
    // LUKS inside qcow2: info needs no key, everything that reads data does.
    c.img(
        "n-luks.qcow2",
        &[],
        "qemu-img create -q -f qcow2 --object secret,id=s0,data=123456 \
             -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 $I 4M
         qio --object secret,id=s0,data=123456 --image-opts -c 'write -P 9 0 64k' \
             driver=qcow2,file.filename=$I,encrypt.key-secret=s0",
    );
    c.img(
        "n-prealloc-full.qcow2",
        &[],
        "mk -o preallocation=full $I 2M; qio -c 'write -P 5 1M 4k' $I",
    );
    c.img(
        "n-v2-prealloc-metadata.qcow2",
        &[],
        "mk -o compat=0.10,preallocation=metadata $I 2M; qio -c 'write -P 6 4k 4k' $I",
    );
    c.img(
        "n-snapshot-applied.qcow2",
        &[],
        "mk $I 4M; qio -c 'write -P 1 0 1M' $I; qemu-img snapshot -c one $I
         qio -c 'write -P 2 512k 1M' -c 'discard 0 64k' $I; qemu-img snapshot -c two $I
         qemu-img snapshot -a one $I; qio -c 'write -P 3 3M 64k' $I",
    );
    c.snap("n-snapshot-applied.qcow2", "two");
    c.img(
        "n-ext-l2-data-file.qcow2",
        &["n-ext-l2-data-file.data"],
        "mk -o extended_l2=on,data_file=n-ext-l2-data-file.data $I 2M
         qio -c 'write -P 7 2k 2k' -c 'write -z 64k 8k' -c 'write -P 8 1M 100k' $I",
    );
    c.img(
        "n-data-file-bitmap.qcow2",
        &["n-data-file-bitmap.data"],
        "mk -o data_file=n-data-file-bitmap.data,data_file_raw=on $I 2M
         qio -c 'write -P 9 0 512k' $I; qemu-img bitmap --add $I b0",
    );
    c.img(
        "n-2m-snapshots-committed.qcow2",
        &[],
        "mk -o cluster_size=2M n-2m-base.qcow2 8M; qio -c 'write -P 1 0 3M' n-2m-base.qcow2
         qemu-img snapshot -c s n-2m-base.qcow2
         mk -b n-2m-base.qcow2 -F qcow2 n-2m-top.qcow2; qio -c 'write -P 2 1M 3M' n-2m-top.qcow2
         qemu-img commit -q n-2m-top.qcow2; mv n-2m-base.qcow2 $I",
    );
    c.snap("n-2m-snapshots-committed.qcow2", "s");
}

/// VM state from `savevm` in a running qemu-system-x86_64 (`-machine none` saves about
/// 1 KiB; a stopped PC with 8 MiB of RAM saves a few hundred KiB).
fn vmstate(c: &mut Corpus) {
    let pc = "-machine pc -accel tcg -m 8M -S";
    let none = "-machine none";
    // (image, creation options, machine, monitor commands, snapshots to read)
    type Vm<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], &'a [&'a str]);
    let vms: &[Vm] = &[
        ("v-none", "", none, &["savevm s1"], &["s1"]),
        (
            "v-pc-two",
            "",
            pc,
            &[
                r#"qemu-io d0 "write -P 0x11 0 1M""#,
                "savevm first",
                r#"qemu-io d0 "write -P 0x22 512k 1M""#,
                "savevm second",
                r#"qemu-io d0 "write -P 0x33 3M 64k""#,
            ],
            &["first", "second"],
        ),
        (
            "v-deleted",
            "",
            pc,
            &[
                "savevm a",
                r#"qemu-io d0 "write -P 0x44 64k 64k""#,
                "savevm b",
                "delvm a",
            ],
            &["b"],
        ),
        (
            "v-loaded",
            "",
            pc,
            &[
                r#"qemu-io d0 "write -P 0x55 0 128k""#,
                "savevm s1",
                r#"qemu-io d0 "write -P 0x56 0 64k""#,
                "loadvm s1",
                r#"qemu-io d0 "write -P 0x57 1M 64k""#,
            ],
            &["s1"],
        ),
        ("v-v2", "compat=0.10", pc, &["savevm s1"], &["s1"]),
        (
            "v-512",
            "cluster_size=512",
            pc,
            &[r#"qemu-io d0 "write -P 0x66 0 8k""#, "savevm s1"],
            &["s1"],
        ),
        (
            "v-ext-l2",
            "extended_l2=on",
            pc,
            &[r#"qemu-io d0 "write -P 0x77 1k 2k""#, "savevm s1"],
            &["s1"],
        ),
        (
            "v-killed",
            "lazy_refcounts=on",
            pc,
            &[
                "savevm s1",
                r#"qemu-io d0 "write -P 0x88 0 64k""#,
                r#"qemu-io d0 "sigraise 9""#,
            ],
            &["s1"],
        ),
    ];
    for (name, opts, machine, cmds, snaps) in vms {
        let image = format!("{name}.qcow2");
        let o = if opts.is_empty() {
            String::new()
        } else {
            format!("-o {opts}")
        };
        c.sh(&format!(
            "mk {o} {image} 4M; qio -c 'write -P 0x10 2M 64k' {image}"
        ));
        if c.vm(&image, machine, &format!("file={image},format=qcow2"), cmds) {
            // Every snapshot carries VM state (more than a cluster of it on the PC).
            let info = c.w.qemu_img(&["info", "--output=json", &image]);
            let info = Work::json(&info.stdout);
            let list = info["snapshots"].as_array().expect("snapshots");
            assert!(!list.is_empty(), "{image}: no snapshot");
            for s in list {
                let size = s["vm-state-size"].as_u64().unwrap_or(0);
                let least = if *machine == pc { 65536 } else { 1 };
                assert!(
                    size >= least,
                    "{image}: snapshot {} has {size} bytes of VM state",
                    s["name"]
                );
            }
            c.add(&image, &[]);
            for s in *snaps {
                c.snap(&image, s);
            }
        }
    }
}

/// The outcome of comparing one command: agreement, or what differs. (qemu-img reads
/// with `-U`: the images are compared two at a time, and `qemu-img snapshot` on a copy
/// opens the backing and data files the original shares.)
type Verdict = Result<(), String>;

fn run_in(w: &Work, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(w.dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn qinspect(w: &Work, args: &[&str]) -> Output {
    run_in(w, env!("CARGO_BIN_EXE_qinspect"), args)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(160).collect()
}

/// QEMU's reason when it cannot open an image: the text after `Could not open 'X': `.
fn open_refusal(o: &Output) -> Option<String> {
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err.lines().find(|l| l.contains("Could not open"))?;
    let at = line.find("': ")?;
    Some(line[at + 3..].trim().to_string())
}

/// Same exit code; where QEMU refused to open the image, qinspect says QEMU's reason.
/// One difference is allowed (issue 9): where QEMU cannot open a file the image names
/// (an external data file relative to the working directory) and qinspect reads the
/// file of that name next to the image instead, it succeeds with a warning naming it.
fn same_exit(what: &str, q: &Output, ours: &Output) -> Verdict {
    if let Some(reason) = open_refusal(q)
        && let Some(inner) = reason.strip_prefix("Could not open '")
        && let Some(name) = inner.split('\'').next()
        && ours.status.success()
    {
        let err = String::from_utf8_lossy(&ours.stderr);
        return if err
            .lines()
            .any(|l| l.contains("warning") && l.contains(&format!("'{name}'")))
        {
            Ok(())
        } else {
            Err(format!(
                "{what}: exit 0 without a warning about '{name}', which qemu-img cannot open"
            ))
        };
    }
    if q.status.code() != ours.status.code() {
        return Err(format!(
            "{what}: exit {:?}, qemu-img {:?} ({})",
            ours.status.code(),
            q.status.code(),
            first_line(&text(q))
        ));
    }
    if let Some(reason) = open_refusal(q)
        && !text(ours).contains(&reason)
    {
        return Err(format!(
            "{what}: refused without QEMU's reason '{reason}': {}",
            first_line(&text(ours))
        ));
    }
    Ok(())
}

fn json(o: &Output) -> Result<Value, String> {
    serde_json::from_slice(&o.stdout)
        .map_err(|e| format!("not JSON ({e}): {}", first_line(&text(o))))
}

fn compare_info(w: &Work, img: &str) -> Verdict {
    let q = run_in(w, "qemu-img", &["info", "-U", "--output=json", img]);
    let ours = qinspect(w, &["info", "--json", img]);
    same_exit("info", &q, &ours)?;
    if !q.status.success() {
        return Ok(());
    }
    let (Value::Object(qm), Value::Object(om)) = (json(&q)?, json(&ours)?) else {
        return Err("info: not a JSON object".into());
    };
    for (k, v) in &qm {
        if k == "children" {
            continue;
        }
        if om.get(k) != Some(v) {
            return Err(format!(
                "info key '{k}': {} vs qemu-img {}",
                om.get(k).map_or("missing".into(), |x| x.to_string()),
                v
            ));
        }
    }
    Ok(())
}

fn compare_check(w: &Work, img: &str) -> Verdict {
    let q = run_in(w, "qemu-img", &["check", "-U", "--output=json", img]);
    let ours = qinspect(w, &["check", "--json", img]);
    same_exit("check", &q, &ours)?;
    if q.stdout.is_empty() || q.status.code() == Some(63) {
        return Ok(());
    }
    let qj = json(&q)?;
    let oj = json(&ours)?;
    same_check_keys("check", &qj, &oj, &[])?;
    // qemu-img names each bad cluster only in its human output.
    if qj["corruptions"].as_u64().unwrap_or(0) == 0 && qj["leaks"].as_u64().unwrap_or(0) == 0 {
        return Ok(());
    }
    let human = run_in(w, "qemu-img", &["check", "-U", img]);
    let findings = oj["findings"].as_array().cloned().unwrap_or_default();
    for line in String::from_utf8_lossy(&human.stderr).lines() {
        let Some(rest) = line
            .strip_prefix("ERROR cluster ")
            .or_else(|| line.strip_prefix("Leaked cluster "))
        else {
            continue;
        };
        let nums: Vec<u64> = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect();
        let [cl, r, refs, ..] = nums[..] else {
            continue;
        };
        if !findings
            .iter()
            .any(|f| f["cluster"] == cl && f["refcount"] == r && f["reference"] == refs)
        {
            return Err(format!("check: no finding for qemu-img's '{line}'"));
        }
    }
    Ok(())
}

/// Every key of qemu-img's check JSON has the same value in ours (but `skip`), and
/// the counts qemu-img leaves out (zeros) are 0 in ours.
fn same_check_keys(what: &str, qj: &Value, oj: &Value, skip: &[&str]) -> Verdict {
    let Value::Object(qm) = qj else {
        return Err(format!("{what}: qemu-img JSON is not an object"));
    };
    for (k, v) in qm {
        if !skip.contains(&k.as_str()) && oj.get(k) != Some(v) {
            return Err(format!(
                "{what} key '{k}': {} vs qemu-img {v}",
                oj.get(k).map_or("missing".into(), |x| x.to_string())
            ));
        }
    }
    for k in [
        "check-errors",
        "corruptions",
        "leaks",
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
    ] {
        if !qm.contains_key(k) && oj[k] != 0 {
            return Err(format!("{what} key '{k}': {} where qemu-img has 0", oj[k]));
        }
    }
    Ok(())
}

/// `simulate IMAGE snapshot-create:wild` against `qemu-img snapshot -c wild` on a copy:
/// both succeed or both fail, and after a success `qemu-img check` of the copy has the
/// counts of the simulated image's check.
fn compare_simulate(w: &Work, img: &str, n: usize) -> Verdict {
    let copy = format!("{img}.wild-{n}.copy");
    let cp = run_in(w, "cp", &["--sparse=always", img, &copy]);
    if !cp.status.success() {
        return Err(format!("simulate: cannot copy: {}", first_line(&text(&cp))));
    }
    let q = run_in(w, "qemu-img", &["snapshot", "-c", "wild", &copy]);
    let qc = run_in(w, "qemu-img", &["check", "-U", "--output=json", &copy]);
    let _ = std::fs::remove_file(w.path(&copy));
    let o = qinspect(w, &["simulate", img, "snapshot-create:wild", "--json"]);
    let ours = if o.status.success() {
        let j = json(&o)?;
        match j["operations"][0]["error"].as_str() {
            Some(e) => Err(e.to_string()),
            None => Ok(j),
        }
    } else {
        Err(first_line(&text(&o)))
    };
    match (q.status.success(), ours) {
        (true, Ok(j)) => {
            if qc.stdout.is_empty() {
                return Ok(());
            }
            same_check_keys("simulate: check", &json(&qc)?, &j["check"], &["filename"])
        }
        (false, Err(_)) => Ok(()),
        (true, Err(e)) => Err(format!(
            "simulate: QEMU creates the snapshot, simulate says it fails: {e}"
        )),
        (false, Ok(_)) => Err(format!(
            "simulate: succeeds, qemu-img snapshot -c fails: {}",
            first_line(&text(&q))
        )),
    }
}

fn compare_map(w: &Work, img: &str) -> Verdict {
    let q = run_in(w, "qemu-img", &["map", "-U", "--output=json", img]);
    let ours = qinspect(w, &["map", "--json", img]);
    same_exit("map", &q, &ours)?;
    if !q.status.success() || q.stdout == ours.stdout {
        return Ok(());
    }
    let (a, b) = (
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&q.stdout),
    );
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let n = (0..a.len().max(b.len()))
        .find(|&i| a.get(i) != b.get(i))
        .unwrap_or(0);
    Err(format!(
        "map line {}: {} vs qemu-img {}",
        n + 1,
        a.get(n).map_or("(end)", |x| x.trim()),
        b.get(n).map_or("(end)", |x| x.trim())
    ))
}

/// `read -o` against `qemu-img convert -O raw`: exit code and bytes, then (as "sparse")
/// the blocks each output file has allocated.
fn compare_read(w: &Work, case: &Case, n: usize) -> (Verdict, Verdict) {
    let theirs = format!("wild-{n}.qemu.raw");
    let ours = format!("wild-{n}.qinspect.raw");
    let mut qargs = vec!["convert", "-U", "-O", "raw"];
    let mut oargs = vec!["read", case.image.as_str(), "-o", ours.as_str()];
    if let Some(s) = &case.snapshot {
        qargs.extend(["-l", s.as_str()]);
        oargs.extend(["--snapshot", s.as_str()]);
    }
    qargs.extend([case.image.as_str(), theirs.as_str()]);
    let q = run_in(w, "qemu-img", &qargs);
    let o = qinspect(w, &oargs);
    let result = (|| {
        same_exit("read", &q, &o)?;
        if !q.status.success() {
            return Ok((Ok(()), Ok(())));
        }
        let a = std::fs::read(w.path(&theirs)).map_err(|e| format!("qemu output: {e}"))?;
        let b = std::fs::read(w.path(&ours)).map_err(|e| format!("read output: {e}"))?;
        if a.len() != b.len() {
            return Err(format!(
                "read: {} bytes, qemu-img convert {}",
                b.len(),
                a.len()
            ));
        }
        if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
            return Err(format!(
                "read: bytes differ from qemu-img convert at {at:#x}"
            ));
        }
        // Holes where qemu-img leaves holes: the same data extents (SEEK_DATA and
        // SEEK_HOLE), and st_blocks equal up to one ext4 extent-tree block.
        let (pa, pb) = (w.path(&theirs), w.path(&ours));
        let (qe, oe) = (common::data_extents(&pa), common::data_extents(&pb));
        let (qb, ob) = (common::allocated_blocks(&pa), common::allocated_blocks(&pb));
        let sparse = if qe != oe {
            let n = (0..qe.len().max(oe.len()))
                .find(|&i| qe.get(i) != oe.get(i))
                .unwrap_or(0);
            Err(format!(
                "sparse: {} data extents, qemu-img convert {}; #{n} is {:x?}, qemu-img's {:x?}",
                oe.len(),
                qe.len(),
                oe.get(n),
                qe.get(n)
            ))
        } else if qb.abs_diff(ob) > 8 {
            Err(format!(
                "sparse: {ob} allocated 512-byte blocks, qemu-img convert {qb}"
            ))
        } else {
            Ok(())
        };
        Ok((Ok(()), sparse))
    })();
    let _ = std::fs::remove_file(w.path(&theirs));
    let _ = std::fs::remove_file(w.path(&ours));
    match result {
        Ok(v) => v,
        Err(e) => (Err(e), Err("-".into())),
    }
}

/// Every comparison for one image (only `read` through a snapshot), and whether its
/// files stayed as they were.
fn compare_case<'a>(w: &Work, case: &Case, n: usize) -> BTreeMap<&'a str, Verdict> {
    let before = fingerprints(w, &case.files);
    let mut verdicts: BTreeMap<&str, Verdict> = BTreeMap::new();
    if case.snapshot.is_none() {
        verdicts.insert("info", compare_info(w, &case.image));
        verdicts.insert("check", compare_check(w, &case.image));
        verdicts.insert("map", compare_map(w, &case.image));
        verdicts.insert("simulate", compare_simulate(w, &case.image, n));
    }
    let (read, sparse) = compare_read(w, case, n);
    verdicts.insert("read", read);
    verdicts.insert("sparse", sparse);
    let after = fingerprints(w, &case.files);
    verdicts.insert(
        "unchanged",
        match before.iter().zip(&after).find(|(a, b)| a != b) {
            None => Ok(()),
            Some((a, _)) => Err(format!("{} changed", a.0)),
        },
    );
    verdicts
}

/// Content hash, length and modification time of every input file.
fn fingerprints(w: &Work, files: &[String]) -> Vec<(String, u64, u64, i64, i64)> {
    files
        .iter()
        .map(|f| {
            let (len, hash) = w.fingerprint(f);
            let m = std::fs::metadata(w.path(f)).unwrap();
            (f.clone(), len, hash, m.mtime(), m.mtime_nsec())
        })
        .collect()
}

const COMMANDS: [&str; 7] = [
    "info",
    "check",
    "map",
    "read",
    "sparse",
    "simulate",
    "unchanged",
];

/// Compare, for the known list: failures that are listed pass as "known"; the test
/// fails on unlisted ones and on listed ones that now agree.
struct Tally {
    unexpected: Vec<String>,
}

impl Tally {
    fn record(&mut self, image: &str, command: &str, v: &Verdict) -> &'static str {
        let known = KNOWN
            .iter()
            .any(|(i, c, _)| *i == image && c.split(' ').any(|c| c == command));
        match (v, known) {
            (Ok(()), false) => "ok",
            (Ok(()), true) => {
                self.unexpected.push(format!(
                    "{image} {command}: agrees now; remove it from KNOWN"
                ));
                "FIXED"
            }
            (Err(_), true) => "known",
            (Err(e), false) => {
                self.unexpected.push(format!("{image} {command}: {e}"));
                "FAIL"
            }
        }
    }

    fn finish(self, commands: &[&str], cases: &[String]) {
        let mut problems = self.unexpected;
        for (i, c, _) in KNOWN {
            if !c.split(' ').any(|c| commands.contains(&c)) {
                continue;
            }
            if !cases.iter().any(|x| x == i) {
                problems.push(format!("KNOWN names {i}, which is not in the corpus"));
            }
        }
        assert!(
            problems.is_empty(),
            "{} disagreement(s) with qemu-img:\n{}",
            problems.len(),
            problems.join("\n")
        );
    }
}

#[test]
fn wild_images_agree_with_qemu_img() {
    let c = corpus();
    let w = &c.w;
    let mut tally = Tally {
        unexpected: Vec::new(),
    };
    println!(
        "{} images ({} with a snapshot read); per command: ok, known (listed in KNOWN), FAIL, - (not compared)",
        c.cases.iter().filter(|x| x.snapshot.is_none()).count(),
        c.cases.iter().filter(|x| x.snapshot.is_some()).count()
    );
    println!(
        "{:<44} {}",
        "image",
        COMMANDS.map(|c| format!("{c:<9}")).join(" ")
    );
    let mut labels = Vec::new();
    let mut details = Vec::new();
    // Two workers, each taking every other image; the table keeps corpus order.
    let mut results: Vec<(usize, BTreeMap<&str, Verdict>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|t| {
                s.spawn(move || {
                    c.cases
                        .iter()
                        .enumerate()
                        .filter(|(n, _)| n % 2 == t)
                        .map(|(n, case)| (n, compare_case(w, case, n)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    results.sort_by_key(|r| r.0);
    for (n, verdicts) in results {
        let label = c.cases[n].label();
        labels.push(label.clone());
        let mut cells = Vec::new();
        for cmd in COMMANDS {
            let cell = match verdicts.get(cmd) {
                None => "-",
                Some(Err(e)) if e == "-" => "-",
                Some(v) => {
                    if let Err(e) = v {
                        details.push(format!("  {label} {cmd}: {e}"));
                    }
                    tally.record(&label, cmd, v)
                }
            };
            cells.push(format!("{cell:<9}"));
        }
        println!("{label:<44} {}", cells.join(" "));
    }
    if !details.is_empty() {
        println!("\ndisagreements:\n{}", details.join("\n"));
    }
    done_with_corpus();
    assert!(
        c.missing_vm.is_empty(),
        "qemu-system-x86_64 is not installed, so the images made by a running VM were not built: {}. \
         Install it with .ci/install-qemu-system.sh (bookworm-backports, keeps qemu-utils 10.0.2).",
        c.missing_vm.join(", ")
    );
    assert!(
        c.cases.iter().filter(|x| x.snapshot.is_none()).count() >= 60,
        "the corpus has fewer than 60 images"
    );
    tally.finish(&COMMANDS, &labels);
}

/// How a map extent or a trace ends: which layer, what kind, which host offset.
#[derive(Debug, PartialEq)]
struct Resolved {
    depth: u64,
    status: &'static str,
    host: Option<u64>,
}

fn from_map(e: &Value, byte: u64) -> Resolved {
    let start = e["start"].as_u64().unwrap();
    let status = if e["present"] != true {
        "unallocated"
    } else if e["compressed"] == true {
        "compressed"
    } else if e["data"] == true {
        "data"
    } else {
        "zero"
    };
    Resolved {
        depth: e["depth"].as_u64().unwrap(),
        status,
        host: e["offset"].as_u64().map(|o| o + (byte - start)),
    }
}

fn from_trace(t: &Value) -> Result<Resolved, String> {
    let steps = t["steps"].as_array().ok_or("trace: no steps")?;
    let mut last = steps.last().ok_or("trace: no steps")?;
    // Past the end of a shorter backing layer the answer belongs to the layer
    // above, whose lookup fell through (QEMU's map reports that layer's depth).
    if last["step"] == "past_end" && last["depth"].as_u64() > Some(0) && steps.len() > 1 {
        last = &steps[steps.len() - 2];
    }
    let depth = last["depth"].as_u64().ok_or("trace: no depth")?;
    let hex = |v: &Value| {
        v.as_str()
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
    };
    // Where the outcome step carries no host offset of its own (zeros, an unallocated
    // subcluster), the host offset the trace reports is that of the layer's L2 entry
    // plus the offset in the cluster.
    let layer = || steps.iter().filter(|s| s["depth"] == depth);
    let from_l2 = || {
        let l2 = layer().rfind(|s| s["step"] == "l2_entry")?;
        let base = hex(&l2["host_offset"])?;
        let split = layer().find(|s| s["step"] == "split")?;
        Some(base + split["in_cluster"].as_u64()?)
    };
    let (status, host) = match last["step"].as_str().unwrap_or("") {
        "data" => ("data", hex(&last["host_offset"])),
        "compressed" => ("compressed", None),
        "zero" => ("zero", hex(&last["host_offset"]).or_else(from_l2)),
        "fall_through" | "past_end" | "beyond_l1" => {
            ("unallocated", hex(&last["host_offset"]).or_else(from_l2))
        }
        "error" => return Err(format!("trace: error: {}", last["message"])),
        other => return Err(format!("trace ends with step '{other}'")),
    };
    Ok(Resolved {
        depth,
        status,
        host,
    })
}

/// For every extent of `map --json`, `trace --json` at its first and last byte
/// resolves to the extent's layer, status and host offset.
fn trace_matches_map(w: &Work, case: &Case) -> Result<usize, String> {
    let mut margs = vec!["map", "--json", case.image.as_str()];
    if let Some(s) = &case.snapshot {
        margs.extend(["--snapshot", s.as_str()]);
    }
    let map = qinspect(w, &margs);
    if !map.status.success() {
        return Ok(0);
    }
    let extents = json(&map)?;
    let mut probes = 0;
    for e in extents.as_array().ok_or("map: not an array")? {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if len == 0 {
            continue;
        }
        let last = start + len - 1;
        let bytes = if last == start {
            vec![start]
        } else {
            vec![start, last]
        };
        for byte in bytes {
            let off = byte.to_string();
            let mut targs = vec!["trace", case.image.as_str(), off.as_str(), "--json"];
            if let Some(s) = &case.snapshot {
                targs.extend(["--snapshot", s.as_str()]);
            }
            let t = qinspect(w, &targs);
            if !t.status.success() {
                return Err(format!("trace {byte:#x} failed: {}", first_line(&text(&t))));
            }
            let got = from_trace(&json(&t)?).map_err(|e| format!("at {byte:#x}: {e}"))?;
            let want = from_map(e, byte);
            if got != want {
                return Err(format!(
                    "at {byte:#x}: trace {got:?}, map extent {start:#x}+{len:#x} {want:?}"
                ));
            }
            probes += 1;
        }
    }
    Ok(probes)
}

#[test]
fn trace_agrees_with_every_map_extent() {
    let c = corpus();
    let mut tally = Tally {
        unexpected: Vec::new(),
    };
    let mut labels = Vec::new();
    let mut probes = 0;
    for case in &c.cases {
        let label = case.label();
        labels.push(label.clone());
        let v = trace_matches_map(&c.w, case).map(|n| probes += n);
        let cell = tally.record(&label, "trace", &v);
        if let Err(e) = &v {
            println!("{label:<44} {cell:<6} {e}");
        }
    }
    println!(
        "trace against map: {probes} probes on {} images",
        labels.len()
    );
    done_with_corpus();
    tally.finish(&["trace"], &labels);
}

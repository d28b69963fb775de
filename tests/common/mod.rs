//! Shared helpers for integration tests: build images with qemu-img/qemu-io in a
//! temporary directory, run qinspect and qemu-img, and compare their answers.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory with helpers to make images in it.
pub struct Work {
    pub dir: tempfile::TempDir,
}

impl Work {
    pub fn new() -> Work {
        Work {
            dir: tempfile::Builder::new()
                .prefix("qinspect-test-")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run a command in the work directory; panic with its stderr on failure.
    pub fn run(&self, prog: &str, args: &[&str]) -> Output {
        let out = Command::new(prog)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
        assert!(
            out.status.success(),
            "{prog} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn qemu_img(&self, args: &[&str]) -> Output {
        self.run("qemu-img", args)
    }

    /// `qemu-io -c CMD ... IMAGE` (opened with its format probed from the name).
    pub fn qemu_io(&self, image: &str, cmds: &[&str]) {
        let mut args: Vec<&str> = Vec::new();
        if image.ends_with(".raw") {
            args.extend(["-f", "raw"]);
        } else {
            args.extend(["-f", "qcow2"]);
        }
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(image);
        let out = self.run("qemu-io", &args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("error") && !text.contains("failed"),
            "qemu-io {cmds:?} on {image}: {text}"
        );
    }

    /// Run qinspect in the work directory.
    pub fn qinspect(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_qinspect"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run qinspect")
    }

    /// Run qinspect and require success; return stdout.
    pub fn qinspect_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.qinspect(args);
        assert!(
            out.status.success(),
            "qinspect {args:?} failed ({:?}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
    }

    /// `qemu-img map --output=json` equals `qinspect map --json`.
    pub fn assert_map_matches(&self, image: &str) {
        let q_text = self.qemu_img(&["map", "--output=json", image]).stdout;
        let ours_text = self.qinspect_ok(&["map", "--json", image]);
        let (q, ours) = (Self::json(&q_text), Self::json(&ours_text));
        assert_eq!(ours, q, "map of {image} differs from qemu-img map");
        // Not just the same JSON: the same text.
        assert_eq!(
            String::from_utf8_lossy(&ours_text),
            String::from_utf8_lossy(&q_text),
            "map text of {image}"
        );
    }

    /// Every key of `qemu-img info --output=json` (but `children`) is in
    /// `qinspect info --json` with the same value.
    pub fn assert_info_matches(&self, image: &str) {
        let q = Self::json(&self.qemu_img(&["info", "--output=json", image]).stdout);
        let ours = Self::json(&self.qinspect_ok(&["info", "--json", image]));
        let (Value::Object(q), Value::Object(ours)) = (q, ours) else {
            panic!("info output is not an object")
        };
        assert!(q.len() > 3, "qemu-img info printed too little: {q:?}");
        for (k, v) in &q {
            if k == "children" {
                continue;
            }
            assert_eq!(ours.get(k), Some(v), "info key '{k}' of {image} differs");
        }
    }

    /// `qinspect read` is byte-identical to `qemu-img convert -O raw`
    /// (through `snapshot` when given).
    pub fn assert_read_matches(&self, image: &str, snapshot: Option<&str>) {
        let tag = snapshot.unwrap_or("active").replace('/', "_");
        let theirs = format!("{image}.{tag}.qemu.raw");
        let ours = format!("{image}.{tag}.qinspect.raw");
        let mut qargs = vec!["convert", "-O", "raw"];
        let l;
        if let Some(s) = snapshot {
            // The ID_OR_NAME form: an ID match first, then a name, like qinspect.
            l = s.to_string();
            qargs.extend(["-l", &l]);
        }
        qargs.extend([image, &theirs]);
        self.qemu_img(&qargs);
        let mut args = vec!["read", image, "-o", &ours];
        if let Some(s) = snapshot {
            args.extend(["--snapshot", s]);
        }
        self.qinspect_ok(&args);
        let a = std::fs::read(self.path(&theirs)).expect("qemu output");
        let b = std::fs::read(self.path(&ours)).expect("qinspect output");
        assert_eq!(a.len(), b.len(), "read of {image} ({tag}): length differs");
        if a != b {
            let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
            panic!("read of {image} ({tag}) differs from qemu-img convert at byte {first:#x}");
        }
        // The same holes: qemu-img's sparse output, extent for extent.
        assert_eq!(
            data_extents(&self.path(&ours)),
            data_extents(&self.path(&theirs)),
            "read of {image} ({tag}): data extents (SEEK_DATA/SEEK_HOLE) differ from qemu-img convert's"
        );
        assert_blocks_match(
            &self.path(&ours),
            &self.path(&theirs),
            &format!("read of {image} ({tag})"),
        );
        let _ = std::fs::remove_file(self.path(&theirs));
        let _ = std::fs::remove_file(self.path(&ours));
    }

    /// All four comparisons: info, map, read and check.
    pub fn assert_all_match(&self, image: &str) {
        self.assert_info_matches(image);
        self.assert_check_matches(image);
        if std::env::var_os("QI_SKIP_MAP").is_none() {
            self.assert_map_matches(image);
        }
        self.assert_read_matches(image, None);
    }

    /// Overwrite bytes of a file at an offset (for corruption tests).
    pub fn patch(&self, image: &str, offset: u64, bytes: &[u8]) {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(image))
            .expect("open for patch");
        f.seek(SeekFrom::Start(offset)).expect("seek");
        f.write_all(bytes).expect("patch");
    }

    /// SHA-like fingerprint of a file's bytes (for "unchanged" checks).
    pub fn fingerprint(&self, name: &str) -> (u64, u64) {
        let b = std::fs::read(self.path(name)).expect("read");
        let mut h: u64 = 0xcbf29ce484222325;
        for x in &b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x100000001b3);
        }
        (b.len() as u64, h)
    }
}

/// The file's data extents, as `lseek(SEEK_DATA/SEEK_HOLE)` reports them.
pub fn data_extents(p: &Path) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom, seek};
    let f = std::fs::File::open(p).expect("open");
    let end = f.metadata().expect("stat").len();
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < end {
        let Ok(d) = seek(&f, SeekFrom::Data(off)) else {
            break;
        };
        let h = seek(&f, SeekFrom::Hole(d)).expect("SEEK_HOLE");
        out.push((d, h));
        off = h;
    }
    out
}

/// `st_blocks` of two files with the same data extents agree, up to one file
/// system block: ext4 adds an extent-tree block when a file's extents do not fit
/// in its inode, which depends on where the blocks landed on disk, not on what
/// was written.
pub fn assert_blocks_match(ours: &Path, theirs: &Path, what: &str) {
    let (a, b) = (allocated_blocks(ours), allocated_blocks(theirs));
    assert!(
        a.abs_diff(b) <= 8,
        "{what}: {a} allocated 512-byte blocks, qemu-img convert's output has {b}"
    );
}

/// `st_blocks` once the file's data is on disk (delayed allocation would make a
/// freshly written file count differently).
pub fn allocated_blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::open(p).expect("open");
    f.sync_all().expect("fsync");
    f.metadata().expect("stat").blocks()
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

impl Work {
    /// `qemu-img check` and `qinspect check` agree: exit code, every JSON key
    /// (qemu-img leaves out zero counts; qinspect prints them as 0), and every
    /// "cluster N refcount=A reference=B" line has a finding with those numbers.
    /// Returns qinspect's JSON.
    pub fn assert_check_matches(&self, image: &str) -> Value {
        let q = Command::new("qemu-img")
            .args(["check", "--output=json", image])
            .current_dir(self.dir.path())
            .output()
            .expect("qemu-img check");
        let human = Command::new("qemu-img")
            .args(["check", image])
            .current_dir(self.dir.path())
            .output()
            .expect("qemu-img check");
        let ours = self.qinspect(&["check", "--json", image]);
        assert_eq!(
            ours.status.code(),
            q.status.code(),
            "exit code of check on {image}; qemu-img said: {}{}",
            String::from_utf8_lossy(&human.stdout),
            String::from_utf8_lossy(&human.stderr)
        );
        if q.status.code() == Some(63) {
            // A format without checks (raw): both say so and stop.
            return Value::Null;
        }
        let ours_json = Self::json(&ours.stdout);
        if !q.stdout.is_empty() {
            let Value::Object(qm) = Self::json(&q.stdout) else {
                panic!("qemu-img check JSON")
            };
            for (k, v) in &qm {
                assert_eq!(ours_json.get(k), Some(v), "check key '{k}' of {image}");
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
                if !qm.contains_key(k) {
                    assert_eq!(
                        ours_json[k], 0,
                        "qemu-img left out '{k}' (zero) for {image}"
                    );
                }
            }
        }
        let findings = ours_json["findings"].as_array().expect("findings").clone();
        let stderr = String::from_utf8_lossy(&human.stderr);
        for line in stderr.lines() {
            let Some(rest) = line
                .strip_prefix("ERROR cluster ")
                .or_else(|| line.strip_prefix("Leaked cluster "))
            else {
                continue;
            };
            let nums: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect();
            let (c, r, refs) = (nums[0], nums[1], nums[2]);
            assert!(
                findings
                    .iter()
                    .any(|f| f["cluster"] == c && f["refcount"] == r && f["reference"] == refs),
                "no finding for qemu-img's line '{line}' in {image}: {findings:#?}"
            );
        }
        ours_json
    }

    /// Set the stored refcount of host cluster `c` by patching its refcount block.
    pub fn set_refcount(&self, image: &str, c: u64, value: u64) {
        use qinspect::image::{Qcow2, Strictness};
        let src = std::sync::Arc::new(qinspect::io::FileSource::open(&self.path(image)).unwrap());
        let img = Qcow2::open(src, Strictness::Lenient).unwrap();
        let rg = img.refcount_geometry();
        let table = img.refcount_table().unwrap();
        let block = table[rg.table_index(qinspect::types::HostCluster(c)) as usize]
            .block_offset()
            .expect("refcount block")
            .0;
        let idx = rg.block_index(qinspect::types::HostCluster(c));
        let bits = u64::from(rg.bits());
        let byte = block + idx * bits / 8;
        let width = (bits / 8).max(1);
        let mut buf = vec![0u8; width as usize];
        let f = std::fs::File::open(self.path(image)).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, byte).unwrap();
        if bits < 8 {
            let shift = (idx * bits) % 8;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            buf[0] = (buf[0] & !mask) | (((value as u8) << shift) & mask);
        } else {
            buf.copy_from_slice(&value.to_be_bytes()[(8 - width as usize)..]);
        }
        self.patch(image, byte, &buf);
    }
}

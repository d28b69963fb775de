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
        let _ = std::fs::remove_file(self.path(&theirs));
        let _ = std::fs::remove_file(self.path(&ours));
    }

    /// All three comparisons.
    pub fn assert_all_match(&self, image: &str) {
        self.assert_info_matches(image);
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

pub fn exists(p: &Path) -> bool {
    p.exists()
}

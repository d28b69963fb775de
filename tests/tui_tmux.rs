//! The real binary in a real terminal: tmux runs `qinspect IMAGE`, keys are sent
//! with send-keys and the screen is read with capture-pane.

use std::process::Command;
use std::time::{Duration, Instant};

struct Tmux {
    name: String,
}

impl Tmux {
    fn start(cwd: &std::path::Path, which: &str, size: (u16, u16)) -> Tmux {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "qinspect-test-{}-{which}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &name,
                "-x",
                &size.0.to_string(),
                "-y",
                &size.1.to_string(),
                "-c",
            ])
            .arg(cwd)
            .args(["bash", "--norc", "--noprofile"])
            .status()
            .expect("tmux is installed (.ci/run installs it)");
        assert!(ok.success());
        Tmux { name }
    }

    fn keys(&self, keys: &[&str]) {
        let mut c = Command::new("tmux");
        c.args(["send-keys", "-t", &self.name]);
        c.args(keys);
        assert!(c.status().unwrap().success());
    }

    /// Type text literally (tmux would read "0x18000" as a key code).
    fn text(&self, text: &str) {
        assert!(
            Command::new("tmux")
                .args(["send-keys", "-l", "-t", &self.name, text])
                .status()
                .unwrap()
                .success()
        );
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alternate_screen(&self) -> bool {
        let out = Command::new("tmux")
            .args(["display-message", "-p", "-t", &self.name, "#{alternate_on}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// Wait until the screen satisfies `f` (up to 60 s), returning it.
    fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "waited for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

#[test]
fn open_switch_panes_trace_help_and_quit_restores_the_terminal() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let t = Tmux::start(&root.join("assets"), "demo", (100, 30));
    let bin = env!("CARGO_BIN_EXE_qinspect");
    t.text(&format!("{bin} demo-top.qcow2; echo EXITED=$?"));
    t.keys(&["Enter"]);
    t.wait_for("the first frame", |s| {
        s.contains("1 Overview") && s.contains("qcow2 v3")
    });
    assert!(t.alternate_screen());
    t.keys(&["3"]);
    t.wait_for("the Tables pane", |s| s.contains("active L1 at 0xc000"));
    t.keys(&["7"]);
    t.wait_for("the check result", |s| {
        s.contains("No errors were found on the image.")
    });
    t.keys(&["6", "g"]);
    t.wait_for("the offset prompt", |s| s.contains("Go to guest offset"));
    t.text("0x18000");
    t.keys(&["Enter"]);
    t.wait_for("the first trace step", |s| s.contains("step 1/4"));
    t.keys(&["n", "n", "n"]);
    let s = t.wait_for("the last trace step", |s| s.contains("step 4/4"));
    assert!(
        s.contains("result: data in demo-top.qcow2 at host offset 0x18000"),
        "{s}"
    );
    t.keys(&["?"]);
    t.wait_for("the help", |s| {
        s.contains("Keys (this table is also what the footer shows)")
    });
    t.keys(&["Escape"]);
    t.wait_for("help closed", |s| !s.contains("Keys (this table"));
    t.keys(&["q"]);
    let s = t.wait_for("the shell again", |s| s.contains("EXITED=0"));
    assert!(!t.alternate_screen(), "left the alternate screen");
    assert!(
        !s.contains("1 Overview"),
        "the TUI is gone from the screen:\n{s}"
    );
}

fn qemu_img(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img is installed");
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// Start the viewer on `image` in `dir`, at 80x24, and wait for its first frame.
fn viewer(dir: &std::path::Path, which: &str, image: &str) -> Tmux {
    let t = Tmux::start(dir, which, (80, 24));
    let bin = env!("CARGO_BIN_EXE_qinspect");
    t.text(&format!("{bin} {image}; echo EXITED=$?"));
    t.keys(&["Enter"]);
    t.wait_for("the first frame", |s| {
        s.contains("1 Info") && s.contains("q quit")
    });
    t
}

#[test]
fn snapshots_hex_and_help_scroll_to_their_ends() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"],
    );
    for i in 1..=100 {
        qemu_img(
            dir.path(),
            &["snapshot", "-c", &format!("snap{i}"), "s.qcow2"],
        );
    }
    let t = viewer(dir.path(), "snaps", "s.qcow2");
    // The last of 100 snapshots, selected and on screen.
    t.keys(&["5", "End"]);
    t.wait_for("the last snapshot", |s| {
        s.contains("snap100") && s.contains("100/100")
    });
    t.keys(&["PageUp"]);
    t.wait_for("a page up", |s| {
        !s.contains("snap100 ") && s.contains("snap99")
    });
    // Help scrolled to its end.
    t.keys(&["?"]);
    t.wait_for("the help", |s| s.contains("Keys (this table"));
    t.keys(&["End"]);
    t.wait_for("the end of the help", |s| {
        s.contains("Mouse: click") && !s.contains("Keys (this table")
    });
    t.keys(&["Escape"]);
    t.wait_for("help closed", |s| !s.contains("Mouse: click"));
    t.keys(&["q"]);
    t.wait_for("the shell again", |s| s.contains("EXITED=0"));

    // Hex reaches the L2 entry of guest 0x3000000, 8 KiB into its cluster.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let t = viewer(&root.join("assets"), "hex", "demo-top.qcow2");
    t.keys(&["6", "g"]);
    t.wait_for("the offset prompt", |s| s.contains("Go to guest offset"));
    t.text("0x3000000");
    t.keys(&["Enter"]);
    t.wait_for("the trace", |s| s.contains("step 1/"));
    t.keys(&["n", "n", "Enter"]);
    // The rows and the panel under them may come in separate frames: wait
    // for both.
    let s = t.wait_for("the entry in Hex", |s| {
        s.contains("00046000") && s.contains("at 0x46000")
    });
    assert!(s.contains("at 0x46000"), "{s}");
    // The cursor moves two rows, and the panel decodes the entry it lands on.
    t.keys(&["Down", "Down"]);
    t.wait_for("the cursor two rows down", |s| {
        s.contains("entry 1028 (guest 0x3010000)") && s.contains("in 0x46020–0x46027")
    });
    t.keys(&["C-c"]);
    t.wait_for("the shell again", |s| s.contains("EXITED=0"));
    assert!(!t.alternate_screen(), "left the alternate screen");
}

#[test]
fn a_simulation_on_a_large_image_leaves_the_panes_usable() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "big.qcow2",
            "300G",
        ],
    );
    let t = viewer(dir.path(), "sim", "big.qcow2");
    t.keys(&["7"]);
    t.wait_for("the check result", |s| s.contains("No errors were found"));
    t.keys(&["8", "Enter"]);
    t.wait_for("the operation prompt", |s| {
        s.contains("Operation(s) to simulate")
    });
    t.keys(&["Enter"]);
    // While it runs, other panes answer.
    t.keys(&["3"]);
    let s = t.wait_for("Tables during the simulation", |s| {
        s.contains("active L1 at")
    });
    t.keys(&["2"]);
    t.wait_for("Layout during the simulation", |s| s.contains("Layout of"));
    t.keys(&["8"]);
    let done = t.wait_for("the simulation's result", |s| {
        s.contains("check of the simulated image")
    });
    assert!(done.contains("no errors"), "{done}");
    assert!(
        s.contains("simulating:"),
        "the simulation was still running while Tables was drawn:\n{s}"
    );
    t.keys(&["q"]);
    t.wait_for("the shell again", |s| s.contains("EXITED=0"));
    assert!(!t.alternate_screen());
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let bin = env!("CARGO_BIN_EXE_qinspect");
    let out = Command::new(bin)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && s.contains("qinspect") && s.contains("simulate"),
        "{s}"
    );
    let out = Command::new(bin).arg("man").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && s.contains(".TH") && s.contains("qinspect"),
        "{s}"
    );
}

/// With no key given and a terminal on standard input, qinspect asks for the
/// passphrase without echoing it, for `read` (output to a pipe) and for the viewer.
#[test]
fn passphrase_prompt_does_not_echo() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pass"), "s3cret-pw").unwrap();
    let ok =
        |c: &mut Command| assert!(c.current_dir(dir.path()).output().unwrap().status.success());
    ok(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s,file=pass",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
        "e.qcow2",
        "1M",
    ]));
    ok(Command::new("qemu-io").args([
        "--object",
        "secret,id=s,file=pass",
        "--image-opts",
        "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s",
        "-c",
        "write -P 0x42 0 4k",
    ]));
    let t = Tmux::start(dir.path(), "passphrase", (100, 30));
    let bin = env!("CARGO_BIN_EXE_qinspect");
    t.text(&format!(
        "{bin} read e.qcow2 --length 8 | od -An -tx1; echo EXITED=$?"
    ));
    t.keys(&["Enter"]);
    t.wait_for("the prompt", |s| s.contains("Passphrase for e.qcow2:"));
    t.text("s3cret-pw");
    t.keys(&["Enter"]);
    let s = t.wait_for("the bytes", |s| s.contains("EXITED=0"));
    assert!(s.contains("42 42 42 42 42 42 42 42"), "{s}");
    assert!(!s.contains("s3cret-pw"), "the passphrase was echoed:\n{s}");
    t.text("clear");
    t.keys(&["Enter"]);
    t.text(&format!("{bin} e.qcow2; echo EXITED=$?"));
    t.keys(&["Enter"]);
    t.wait_for("the viewer's prompt", |s| {
        s.contains("Passphrase for e.qcow2:")
    });
    t.text("s3cret-pw");
    t.keys(&["Enter"]);
    let s = t.wait_for("the Overview", |s| s.contains("1 Overview"));
    assert!(!s.contains("s3cret-pw"), "{s}");
    // The encryption section is below the header fields: scroll down to it.
    t.keys(&["G"]);
    for _ in 0..60 {
        if t.screen().contains("key: unlocked with key slot 0") {
            break;
        }
        t.keys(&["PageDown"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        t.screen().contains("key: unlocked with key slot 0"),
        "{}",
        t.screen()
    );
    t.keys(&["q"]);
    t.wait_for("the shell again", |s| s.contains("EXITED=0"));
}

#[test]
fn watch_shows_what_qemu_img_snapshot_changed() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "copy.qcow2", "4M"],
    );
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 128k", "copy.qcow2"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let t = Tmux::start(dir.path(), "watch", (100, 30));
    let bin = env!("CARGO_BIN_EXE_qinspect");
    t.text(&format!("{bin} --watch copy.qcow2; echo EXITED=$?"));
    t.keys(&["Enter"]);
    t.wait_for("the first frame", |s| s.contains("1 Overview"));
    t.keys(&["7"]);
    t.wait_for("the check", |s| s.contains("No errors were found"));
    // Another terminal takes a snapshot; the viewer reloads by itself.
    qemu_img(dir.path(), &["snapshot", "-c", "x", "copy.qcow2"]);
    t.wait_for("the reload", |s| {
        s.contains("changed on disk — c: what changed")
    });
    t.keys(&["c"]);
    let s = t.wait_for("the Changes view", |s| {
        s.contains("Changes since the previous load")
    });
    assert_eq!(s.matches("(data): 1→2").count(), 2, "{s}");
    assert!(s.contains("(l2-table): 1→2"), "{s}");
    assert!(s.contains("snapshot 1 created: 'x'"), "{s}");
    t.keys(&["Escape"]);
    t.wait_for("the view closed", |s| {
        !s.contains("Changes since the previous load")
    });
    t.keys(&["q"]);
    t.wait_for("the shell again", |s| s.contains("EXITED=0"));
}

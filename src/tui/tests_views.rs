//! Headless tests of the simulated view and of Compare: images built at test time
//! with qemu-img, keys into the app, frames drawn into ratatui's TestBackend, and
//! the answers compared with `qinspect simulate --json` and `qemu-img map`.

use super::app::{App, Options, Popup};
use super::ctx::Pane;
use super::keymap::Action;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn open(p: PathBuf) -> App {
    let mut a = App::new(p, Options::default());
    a.wait_background();
    a
}

fn screen(app: &mut App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| super::view::draw(f, app)).unwrap();
    let b = t.backend().buffer().clone();
    let mut s = String::new();
    for y in 0..b.area.height {
        for x in 0..b.area.width {
            s.push_str(b[(x, y)].symbol());
        }
        s.push('\n');
    }
    s
}

fn key(app: &mut App, c: KeyCode) {
    super::handle_event(app, Event::Key(KeyEvent::new(c, KeyModifiers::NONE)));
}

fn typed(app: &mut App, s: &str) {
    for c in s.chars() {
        key(app, KeyCode::Char(c));
    }
}

fn run(dir: &Path, prog: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the program is installed");
    assert!(out.status.success(), "{prog} {args:?}: {out:?}");
    out.stdout
}

/// The qinspect binary cargo builds next to the test binary (target/PROFILE/).
pub fn qinspect_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("qinspect");
    assert!(
        bin.exists(),
        "{} is not built: run the tests with cargo test, which builds it for the integration tests",
        bin.display()
    );
    bin
}

/// An image with data shared with a snapshot and data that is not.
fn image(dir: &Path) -> PathBuf {
    run(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    run(
        dir,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 128k", "a.qcow2"],
    );
    run(dir, "qemu-img", &["snapshot", "-c", "s1", "a.qcow2"]);
    run(
        dir,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 2 64k 64k", "a.qcow2"],
    );
    run(
        dir,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 3 1M 64k", "a.qcow2"],
    );
    dir.join("a.qcow2")
}

/// `qinspect simulate --json IMAGE OPS`: its refcounts_after, cluster → refcount.
fn simulate_json(img: &Path, ops: &[&str]) -> BTreeMap<u64, u64> {
    let mut args = vec!["simulate".to_string(), "--json".into()];
    args.push(img.to_string_lossy().into_owned());
    args.extend(ops.iter().map(|s| s.to_string()));
    let out = Command::new(qinspect_bin()).args(&args).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["refcounts_after"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["cluster"].as_u64().unwrap(),
                e["refcount"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Rows of the Refcounts block on screen: cluster → (before, after) as shown.
fn refcount_rows(s: &str) -> Vec<(u64, Option<u64>, u64)> {
    s.lines()
        .filter_map(|l| {
            let rest = l.split("cluster ").nth(1)?;
            let mut w = rest.split_whitespace();
            let c: u64 = w.next()?.parse().ok()?;
            (w.next()? == "stored").then_some(())?;
            let v = w.next()?;
            match v.split_once('→') {
                Some((a, b)) => Some((c, Some(a.parse().ok()?), b.parse().ok()?)),
                None => Some((c, None, v.parse().ok()?)),
            }
        })
        .collect()
}

const OPS: [&str; 2] = ["snapshot-create:x", "write:64k:4k"];

fn simulated(dir: &Path) -> (App, PathBuf) {
    let img = image(dir);
    let mut a = open(img.clone());
    a.start_simulation(OPS.join(" "));
    a.wait_background();
    assert!(matches!(a.panes.simulate.outcome, Some(Ok(_))));
    (a, img)
}

#[test]
fn simulated_view_refcounts_equal_simulate_json() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, img) = simulated(dir.path());
    let on_disk = std::fs::read(&img).unwrap();
    let want = simulate_json(&img, &OPS);
    let before: Vec<u64> = (0..64)
        .map(|c| a.ctx.stored_refcount(c).unwrap_or(0))
        .collect();
    typed(&mut a, "v");
    assert!(a.ctx.simulated_view());
    typed(&mut a, "4");
    let s = screen(&mut a, 120, 40);
    assert!(
        s.contains("view: simulated (snapshot-create:x write:64k:4k)"),
        "{s}"
    );
    // Every cluster the panes read, against the simulator's JSON.
    let n = a.ctx.file_len().div_ceil(a.ctx.cluster_size());
    assert!(n > 4 && n == want.keys().max().unwrap() + 1, "{n}");
    for c in 0..n {
        assert_eq!(
            a.ctx.stored_refcount(c),
            Some(want.get(&c).copied().unwrap_or(0)),
            "cluster {c}"
        );
    }
    // The rows on screen: the after value is the JSON's, the before value the
    // file's, and a changed row says both.
    key(&mut a, KeyCode::Enter);
    let s = screen(&mut a, 120, 60);
    assert!(
        s.contains("refcount block 0") && s.contains("view: simulated"),
        "{s}"
    );
    let rows = refcount_rows(&s);
    assert!(rows.len() as u64 >= n, "{s}");
    let mut changed = 0;
    for (c, was, now) in rows {
        assert_eq!(now, want.get(&c).copied().unwrap_or(0), "cluster {c}: {s}");
        let b = before.get(c as usize).copied().unwrap_or(0);
        match was {
            Some(w) => {
                assert_eq!(w, b, "cluster {c}");
                assert_ne!(w, now);
                changed += 1;
            }
            None => assert_eq!(b, now, "cluster {c} changed but shows no before→after"),
        }
    }
    assert!(changed >= 3, "{s}");
    assert!(s.contains("1→2"), "{s}");
    // The Changes view: the simulated deltas, in the reload's words.
    typed(&mut a, "c");
    assert!(matches!(a.popup, Some(Popup::Changes(_))));
    let s = screen(&mut a, 120, 40);
    assert!(s.contains("Changes the simulation makes"), "{s}");
    let list = &a.ctx.simulated.as_ref().unwrap().changes;
    let rc: Vec<_> = list.iter().filter_map(|c| c.cluster).collect();
    let expected: Vec<u64> = (0..n)
        .filter(|c| {
            before.get(*c as usize).copied().unwrap_or(0) != want.get(c).copied().unwrap_or(0)
        })
        .collect();
    assert_eq!(rc, expected);
    assert!(
        list.iter()
            .any(|c| c.text.starts_with("cluster ") && c.text.ends_with(": 1→2")),
        "{list:?}"
    );
    assert!(
        list.iter()
            .any(|c| c.text.starts_with("active L1[0] → L2[1] (guest 0x10000)")),
        "{list:?}"
    );
    typed(&mut a, "c");
    // Layout and Check say which state they show; Check is the simulated image's.
    typed(&mut a, "2");
    let s = screen(&mut a, 140, 40);
    assert!(
        s.contains("Layout of ") && s.contains("bytes · view: simulated"),
        "{s}"
    );
    typed(&mut a, "7");
    let s = screen(&mut a, 140, 40);
    assert!(
        s.contains(" Check · view: simulated (snapshot-create:x write:64k:4k) "),
        "{s}"
    );
    let sim_report = a.ctx.report.clone().unwrap();
    assert_eq!(sim_report.corruptions + sim_report.leaks, 0);
    let sim = a.ctx.simulated.clone().unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&sim.report, &sim_report),
        "Check reads the simulated image's check"
    );
    typed(&mut a, "4");
    // Back to the file: its own refcounts again.
    typed(&mut a, "v");
    assert!(!a.ctx.simulated_view());
    for c in 0..before.len() as u64 {
        assert_eq!(a.ctx.stored_refcount(c).unwrap_or(0), before[c as usize]);
    }
    let s = screen(&mut a, 120, 40);
    assert!(!s.contains("view: simulated"), "{s}");
    assert_eq!(std::fs::read(&img).unwrap(), on_disk, "nothing is written");
}

#[test]
fn a_simulated_change_leads_to_what_it_changed_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, _img) = simulated(dir.path());
    assert_eq!(a.pane, Pane::Simulate);
    // The write's new L2 entry, in the simulation log.
    let o = a.panes.simulate.outcome.clone().unwrap().unwrap();
    let all = super::panes::simulate::flat(&o);
    let row = (0..all.len())
        .rfind(|i| {
            matches!(
                super::panes::simulate::change_at(&o, *i).map(|c| &c.target),
                Some(qinspect::simulate::Target::L2Entry { index: 1, .. })
            )
        })
        .expect("the write changes L2 entry 1");
    for _ in 0..row {
        typed(&mut a, "n");
    }
    let from = a.panes.simulate.steps.sel;
    assert_eq!(from, row);
    let c = super::panes::simulate::change_at(&o, row).unwrap();
    let host = |e: u64| e & 0x00ff_ffff_ffff_fe00;
    assert_ne!(
        host(c.before),
        host(c.after),
        "the write's new data cluster: {c:?}"
    );
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    assert!(a.ctx.simulated_view());
    assert_eq!(
        a.panes.tables.level,
        super::panes::tables::Level::L2(0),
        "the active L1[0]'s table"
    );
    assert_eq!(a.panes.tables.l2.sel, 1);
    let s = screen(&mut a, 140, 40);
    assert!(s.contains("view: simulated"), "{s}");
    let line = s.lines().find(|l| l.contains("0x10000 0x")).unwrap();
    assert!(line.contains("was 0x"), "{line}");
    a.update(Action::Back);
    assert_eq!(a.pane, Pane::Simulate);
    assert_eq!(a.panes.simulate.steps.sel, from);
    // A refcount row of the Changes list: its refcount entry, in the simulated view.
    typed(&mut a, "c");
    let list = a.ctx.simulated.as_ref().unwrap().changes.clone();
    let (i, ch) = list
        .iter()
        .enumerate()
        .find(|(_, c)| c.cluster.is_some())
        .unwrap();
    for _ in 0..i {
        key(&mut a, KeyCode::Down);
    }
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Refcounts);
    let c = ch.cluster.unwrap();
    let s = screen(&mut a, 120, 40);
    let row = refcount_rows(&s)
        .into_iter()
        .find(|r| r.0 == c)
        .unwrap_or_else(|| panic!("{s}"));
    assert!(row.1.is_some(), "{s}");
    // An L2 row of the Changes list: that entry in Tables.
    typed(&mut a, "c");
    let (i, _) = list
        .iter()
        .enumerate()
        .find(|(_, c)| c.entry == Some((0, Some(1))))
        .unwrap();
    for _ in 0..i {
        key(&mut a, KeyCode::Down);
    }
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    assert_eq!(a.panes.tables.l2.sel, 1);
    a.update(Action::Back);
    assert_eq!(a.pane, Pane::Refcounts);
}

#[test]
fn a_change_to_a_snapshot_table_opens_it_in_that_snapshot_view() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, _img) = simulated(dir.path());
    let o = a.panes.simulate.outcome.clone().unwrap().unwrap();
    let n = super::panes::simulate::flat(&o).len();
    // snapshot-create clears COPIED in the table the write then copies: after the
    // write that table belongs to snapshot x only.
    let row = (0..n)
        .find(|i| {
            matches!(
                super::panes::simulate::change_at(&o, *i).map(|c| &c.target),
                Some(qinspect::simulate::Target::L2Entry { index: 1, .. })
            )
        })
        .unwrap();
    for _ in 0..row {
        typed(&mut a, "n");
    }
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    assert!(a.ctx.simulated_view());
    let x = a
        .ctx
        .img
        .as_ref()
        .unwrap()
        .snapshots
        .snapshots
        .iter()
        .position(|s| s.name == "x");
    assert_eq!(a.ctx.view_snapshot, x);
    let x = a.ctx.viewed().unwrap().id.clone();
    assert_eq!(a.panes.tables.l2.sel, 1);
    let s = screen(&mut a, 140, 40);
    assert!(
        s.contains(&format!("snapshot {x}")) && s.contains("view: simulated"),
        "{s}"
    );
}

// ---- Compare ------------------------------------------------------------------------

const CS: u64 = 65536;

/// Per guest cluster: (present, zero, data, offset) from `qemu-img map --output=json`.
fn map_clusters(dir: &Path, image: &str) -> Vec<(bool, bool, bool, Option<u64>)> {
    let v: serde_json::Value =
        serde_json::from_slice(&run(dir, "qemu-img", &["map", "--output=json", image])).unwrap();
    let mut out = Vec::new();
    for e in v.as_array().unwrap() {
        let len = e["length"].as_u64().unwrap();
        for k in 0..len.div_ceil(CS) {
            out.push((
                e["present"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
                e["offset"].as_u64().map(|o| o + k * CS),
            ));
        }
    }
    out
}

/// s1, more writes, s2, more writes, s3, then back to s1 with one cluster written:
/// the active state is closest to s1 by construction.
fn snapshots_image(dir: &Path) -> PathBuf {
    let io = |cmd: &str| run(dir, "qemu-io", &["-f", "qcow2", "-c", cmd, "b.qcow2"]);
    run(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "b.qcow2", "8M"],
    );
    io("write -P 1 0 1M");
    run(dir, "qemu-img", &["snapshot", "-c", "s1", "b.qcow2"]);
    io("write -P 2 128k 256k");
    io("write -P 3 3M 64k");
    run(dir, "qemu-img", &["snapshot", "-c", "s2", "b.qcow2"]);
    io("write -P 4 0 2M");
    run(dir, "qemu-img", &["snapshot", "-c", "s3", "b.qcow2"]);
    run(dir, "qemu-img", &["snapshot", "-a", "s1", "b.qcow2"]);
    io("write -P 5 6M 64k");
    dir.join("b.qcow2")
}

#[test]
fn compare_view_counts_what_qemu_img_map_of_both_states_says() {
    let dir = tempfile::tempdir().unwrap();
    let img = snapshots_image(dir.path());
    let mut a = open(img);
    typed(&mut a, "C");
    assert!(matches!(a.popup, Some(Popup::Compare)));
    // B: snapshot 2 (→ once more from snapshot 1).
    key(&mut a, KeyCode::Right);
    let s = screen(&mut a, 140, 40);
    assert!(
        s.contains("A: the active state") && s.contains("B: snapshot 2 's2'"),
        "{s}"
    );
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    let s = screen(&mut a, 140, 40);
    // What qemu-img map says: the active state, and snapshot s2 applied to a copy.
    std::fs::copy(dir.path().join("b.qcow2"), dir.path().join("c.qcow2")).unwrap();
    run(dir.path(), "qemu-img", &["snapshot", "-a", "s2", "c.qcow2"]);
    let m1 = map_clusters(dir.path(), "b.qcow2");
    let m2 = map_clusters(dir.path(), "c.qcow2");
    let want: Vec<u64> = (0..m1.len().max(m2.len()))
        .filter(|&k| m1.get(k) != m2.get(k))
        .map(|k| k as u64 * CS)
        .collect();
    assert_eq!(
        want.len(),
        6,
        "the construction: 4 clusters at 128k, 3M, 6M"
    );
    assert!(
        s.contains(&format!("{} of 128 guest clusters differ", want.len())),
        "{s}"
    );
    for g in &want {
        assert!(
            s.contains(&format!("{g:>#12x}  ")),
            "{g:#x} not listed:\n{s}"
        );
    }
    assert!(s.contains("data at 0x"), "{s}");
    assert!(s.contains("in this file vs unallocated (zeros)"), "{s}");
    assert!(s.contains("shared host cluster: same data:"), "{s}");
    // Rows scroll; Enter on one traces it.
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Trace);
    assert!(a.popup.is_none());
}

#[test]
fn compare_view_finds_the_closest_snapshot_and_compares_the_simulated_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = snapshots_image(dir.path());
    let mut a = open(img);
    typed(&mut a, "C");
    // It runs on a worker: Esc cancels it and keeps the view open.
    typed(&mut a, " ");
    assert!(a.compare.running.is_some());
    let s = screen(&mut a, 140, 40);
    assert!(
        s.contains(
            "comparing the active state with every snapshot — on a worker thread, Esc cancels"
        ),
        "{s}"
    );
    key(&mut a, KeyCode::Esc);
    assert!(a.compare.running.is_none() && matches!(a.popup, Some(Popup::Compare)));
    assert_eq!(a.status, "comparison cancelled");
    a.wait_background();
    assert!(matches!(a.compare.shown, super::compare::Shown::Nothing));
    typed(&mut a, " ");
    a.wait_background();
    let s = screen(&mut a, 140, 40);
    assert!(
        s.contains(
            "the active state is closest to snapshot 1 's1': 1 guest cluster(s) mapped differently"
        ),
        "{s}"
    );
    // Enter on the ranking compares that snapshot with the active state.
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    let s = screen(&mut a, 140, 40);
    assert!(s.contains("1 of 128 guest clusters differ"), "{s}");
    assert!(s.contains("0x600000  "), "{s}");
    key(&mut a, KeyCode::Esc);
    assert!(a.popup.is_none());
    // A write over a cluster shared with s1: the simulated image moves it.
    a.start_simulation("write:0:4k".into());
    a.wait_background();
    typed(&mut a, "C");
    let n = super::compare::choices(&a.ctx).len();
    assert_eq!(
        super::compare::choices(&a.ctx).last(),
        Some(&super::compare::Choice::Simulated)
    );
    // From snapshot 1, ← goes to the active state, then wraps to the last choice.
    assert_eq!(a.compare.b, 1);
    key(&mut a, KeyCode::Left);
    key(&mut a, KeyCode::Left);
    assert_eq!(a.compare.b, n - 1);
    let s = screen(&mut a, 140, 40);
    assert!(s.contains("B: the simulated image (write:0:4k)"), "{s}");
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    let s = screen(&mut a, 140, 40);
    assert!(s.contains("1 of 128 guest clusters differ"), "{s}");
    let line = s
        .lines()
        .find(|l| l.contains("         0x0  "))
        .unwrap_or_else(|| panic!("{s}"));
    assert!(line.contains("different host clusters"), "{line}");
}

//! Headless tests of a snapshot table in which two records share an ID (a table
//! QEMU's writers never make, built here by rewriting one byte of a copy made at
//! test time): the record chosen in Snapshots is the one every pane shows.

use super::app::{App, Options};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, SharedSource};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

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

fn run(dir: &Path, prog: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("QEMU's tools are installed");
    assert!(out.status.success(), "{prog} {args:?}: {out:?}");
    out.stdout
}

fn opened(p: &Path) -> Qcow2 {
    let src: SharedSource = Arc::new(FileSource::open(p).unwrap());
    Qcow2::open(src, Strictness::Lenient).unwrap()
}

/// Snapshots "a" (ID 1) and "b" (ID 2, with data at 128 KiB that "a" lacks),
/// then a copy in which "b"'s ID is "1" too.
fn duplicate_ids(dir: &Path) -> std::path::PathBuf {
    run(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"],
    );
    run(
        dir,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 64k", "t.qcow2"],
    );
    run(dir, "qemu-img", &["snapshot", "-c", "a", "t.qcow2"]);
    run(
        dir,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 2 128k 64k", "t.qcow2"],
    );
    run(dir, "qemu-img", &["snapshot", "-c", "b", "t.qcow2"]);
    let dup = dir.join("dup.qcow2");
    std::fs::copy(dir.join("t.qcow2"), &dup).unwrap();
    let img = opened(&dup);
    let b = &img.snapshots.snapshots[1];
    assert_eq!((b.id.as_str(), b.name.as_str()), ("2", "b"));
    // The ID follows the 40 fixed bytes and the extra data.
    let at = b.entry_offset.get() + 40 + u64::from(b.extra_data_size);
    let f = std::fs::File::options().write(true).open(&dup).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"1", at).unwrap();
    dup
}

#[test]
fn the_second_of_two_records_with_one_id_is_the_one_every_pane_shows() {
    let dir = tempfile::tempdir().unwrap();
    let dup = duplicate_ids(dir.path());
    let img = opened(&dup);
    let snaps = &img.snapshots.snapshots;
    let ids: Vec<(&str, &str)> = snaps
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str()))
        .collect();
    assert_eq!(ids, [("1", "a"), ("1", "b")]);
    let (a_l1, b_l1) = (snaps[0].l1_table_offset, snaps[1].l1_table_offset);
    assert_ne!(a_l1, b_l1);
    let want = img.snapshot_l1(&snaps[1]).unwrap();
    assert_ne!(want, img.snapshot_l1(&snaps[0]).unwrap());
    // QEMU's `-l 1` reads the first record: no data at 128 KiB there.
    let out = dir.path().join("first.raw");
    run(
        dir.path(),
        "qemu-img",
        &["convert", "-l", "1", "-O", "raw", "dup.qcow2", "first.raw"],
    );
    assert_eq!(std::fs::read(&out).unwrap()[128 * 1024], 0);

    let before = std::fs::read(&dup).unwrap();
    let mut a = App::new(dup.clone(), Options::default());
    a.wait_background();
    key(&mut a, KeyCode::Char('5'));
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.ctx.view_snapshot, Some(1));
    let v = a.ctx.view().unwrap();
    assert_eq!((v.l1_offset, &*v.l1), (b_l1, &want));
    // The chain Trace and Map read through uses it too.
    match &a.ctx.chain.as_ref().unwrap().top().kind {
        qinspect::chain::LayerKind::Qcow2 { view, .. } => {
            assert_eq!((view.l1_offset, &*view.l1), (b_l1, &want))
        }
        qinspect::chain::LayerKind::Raw => panic!("the top layer is qcow2"),
    }

    // Snapshots: the second row alone is marked, and the note says which record
    // is shown and which one QEMU would read.
    let s = screen(&mut a, 160, 40);
    let marked: Vec<&str> = s.lines().filter(|l| l.contains('▶')).collect();
    assert_eq!(marked.len(), 1, "{s}");
    assert!(marked[0].contains(" b "), "{s}");
    assert!(
        s.contains("viewing snapshot 1 'b' (record 2 of the table)"),
        "{s}"
    );
    assert!(
        s.contains("ID 1 is not unique in this table: the view is record 2"),
        "{s}"
    );
    assert!(s.contains("reads the first with this ID, record 1"), "{s}");
    assert!(
        s.contains("view: snapshot 1 'b' (record 2 of the table)"),
        "{s}"
    );

    // Tables: the second record's L1 table, where it is.
    key(&mut a, KeyCode::Char('3'));
    let s = screen(&mut a, 160, 40);
    assert!(
        s.contains(&format!("snapshot 1 'b' L1 at {b_l1:#x}")),
        "{s}"
    );

    // Map: the second record's data, at 128 KiB.
    key(&mut a, KeyCode::Char('0'));
    a.wait_background();
    let s = screen(&mut a, 160, 40);
    assert!(s.contains("snapshot 1 'b' (record 2 of the table)"), "{s}");
    assert!(
        s.lines()
            .any(|l| l.contains(" 0x20000  0x30000 ") && l.contains("data in dup.qcow2")),
        "{s}"
    );

    // Enter on the first record views it, and only it is marked.
    key(&mut a, KeyCode::Char('5'));
    key(&mut a, KeyCode::Up);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.ctx.view_snapshot, Some(0));
    assert_eq!(a.ctx.view().unwrap().l1_offset, a_l1);
    let s = screen(&mut a, 160, 40);
    let marked: Vec<&str> = s.lines().filter(|l| l.contains('▶')).collect();
    assert_eq!(marked.len(), 1, "{s}");
    assert!(marked[0].contains(" a "), "{s}");
    assert!(s.contains("the one `qemu-img convert -l 1` reads"), "{s}");
    assert_eq!(std::fs::read(&dup).unwrap(), before);
}

/// Two snapshots both named "a" (IDs 1 and 2: the first taken while the active
/// L1's entry had COPIED set, which its copy keeps; the second after the first
/// shared the L2 table, so its copy has COPIED clear), then a copy in which the
/// second record's ID is "1" too: two records one label names alike
/// ("snapshot 1 'a' L1"). The active L1 and both records share one L2 table.
fn same_label(dir: &Path) -> std::path::PathBuf {
    run(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"],
    );
    run(
        dir,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 64k", "s.qcow2"],
    );
    run(dir, "qemu-img", &["snapshot", "-c", "a", "s.qcow2"]);
    run(dir, "qemu-img", &["snapshot", "-c", "a", "s.qcow2"]);
    let dup = dir.join("same.qcow2");
    std::fs::copy(dir.join("s.qcow2"), &dup).unwrap();
    let img = opened(&dup);
    let b = &img.snapshots.snapshots[1];
    assert_eq!((b.id.as_str(), b.name.as_str()), ("2", "a"));
    let at = b.entry_offset.get() + 40 + u64::from(b.extra_data_size);
    let f = std::fs::File::options().write(true).open(&dup).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"1", at).unwrap();
    let img = opened(&dup);
    let labels: Vec<(&str, &str)> = img
        .snapshots
        .snapshots
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str()))
        .collect();
    assert_eq!(labels, [("1", "a"), ("1", "a")]);
    dup
}

#[test]
fn a_check_referrer_leads_to_the_snapshot_record_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let dup = same_label(dir.path());
    // A reserved bit (bit 1) in entry 0 of the second record's L1 table.
    let img = opened(&dup);
    let snaps = &img.snapshots.snapshots;
    let (a_l1, b_l1) = (snaps[0].l1_table_offset, snaps[1].l1_table_offset);
    assert_ne!(a_l1, b_l1);
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&dup)
        .unwrap();
    let mut e = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut e, b_l1.get()).unwrap();
    let e = u64::from_be_bytes(e) | 2;
    std::os::unix::fs::FileExt::write_all_at(&f, &e.to_be_bytes(), b_l1.get()).unwrap();
    drop(f);
    let before = std::fs::read(&dup).unwrap();

    let mut a = App::new(dup.clone(), Options::default());
    a.wait_background();
    let r = a.ctx.report.as_ref().expect("checked");
    let at = r
        .findings
        .iter()
        .position(|f| {
            f.message
                .starts_with("ERROR found L1 entry with reserved bits set")
        })
        .unwrap_or_else(|| panic!("{:?}", r.findings));
    let refs = &r.findings[at].referrers;
    assert_eq!(refs.len(), 1, "{refs:?}");
    assert_eq!(refs[0].l1.as_deref(), Some("snapshot 1 'a' L1"));
    assert_eq!(
        refs[0].l1_table,
        Some(qinspect::check::L1Id::Snapshot { index: 1 })
    );
    // The JSON output names the table in words only.
    let json = serde_json::to_value(&refs[0]).unwrap();
    assert_eq!(json["l1"], "snapshot 1 'a' L1");
    assert!(json.get("l1_table").is_none(), "{json}");
    key(&mut a, KeyCode::Char('7'));
    key(&mut a, KeyCode::Home);
    for _ in 0..at {
        key(&mut a, KeyCode::Down);
    }
    key(&mut a, KeyCode::Enter);
    // The second record's L1 table, entry 0: not the first record's, which the
    // label names first.
    assert_eq!(a.pane, super::ctx::Pane::Tables);
    assert_eq!(a.ctx.view_snapshot, Some(1));
    assert_eq!(a.ctx.view().unwrap().l1_offset, b_l1);
    assert_eq!(a.panes.tables.l1.sel, 0);
    let s = screen(&mut a, 160, 40);
    assert!(
        s.contains(&format!("snapshot 1 'a' L1 at {b_l1:#x}")),
        "{s}"
    );
    assert_eq!(std::fs::read(&dup).unwrap(), before);
}

#[test]
fn a_simulated_l1_change_leads_to_its_snapshot_record_or_says_it_is_gone() {
    use qinspect::simulate::Target;
    let dir = tempfile::tempdir().unwrap();
    let dup = same_label(dir.path());
    let img = opened(&dup);
    let (a_l1, b_l1) = (
        img.snapshots.snapshots[0].l1_table_offset,
        img.snapshots.snapshots[1].l1_table_offset,
    );
    let before = std::fs::read(&dup).unwrap();
    let l1_change = |a: &App| {
        let o = a.panes.simulate.outcome.clone().unwrap().unwrap();
        let all = super::panes::simulate::flat(&o);
        (0..all.len())
            .find_map(|i| match super::panes::simulate::change_at(&o, i) {
                Some(c) if matches!(c.target, Target::L1Entry { .. }) => {
                    Some((i, c.target.clone()))
                }
                _ => None,
            })
            .expect("an L1 entry changes")
    };
    let step_to = |a: &mut App, row: usize| {
        for _ in 0..row {
            key(a, KeyCode::Char('n'));
        }
        assert_eq!(a.panes.simulate.steps.sel, row);
    };

    // The refcount walk +1 over the first record (the one "a" names): its
    // L1[0] loses COPIED, and Enter shows that entry in the first record.
    let mut a = App::new(dup.clone(), Options::default());
    a.wait_background();
    a.start_simulation("refcount-update:a:1".into());
    a.wait_background();
    let (row, target) = l1_change(&a);
    assert_eq!(
        target,
        Target::L1Entry {
            table: "snapshot 1 'a' L1".into(),
            table_offset: a_l1,
            index: 0,
            snapshot: Some(0),
        }
    );
    // The JSON output names the table in words only.
    let json = serde_json::to_value(&target).unwrap();
    assert_eq!(json["table"], "snapshot 1 'a' L1");
    assert!(json.get("snapshot").is_none(), "{json}");
    step_to(&mut a, row);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, super::ctx::Pane::Tables);
    assert!(a.ctx.simulated_view());
    assert_eq!(a.ctx.view_snapshot, Some(0));
    assert_eq!(a.ctx.view().unwrap().l1_offset, a_l1);
    assert_eq!(a.panes.tables.l1.sel, 0);

    // Deleting "a" deletes the first record, and the walk -1 over its L1
    // clears COPIED there. That table is gone from the simulated image, whose
    // only record is the second one, under the same label: Enter says so and
    // does not show the second record's L1 in its place.
    let mut a = App::new(dup.clone(), Options::default());
    a.wait_background();
    a.start_simulation("snapshot-delete:a".into());
    a.wait_background();
    let (row, target) = l1_change(&a);
    match &target {
        Target::L1Entry {
            table,
            table_offset,
            snapshot,
            ..
        } => {
            assert_eq!(table, "snapshot 1 'a' L1");
            assert_eq!(*table_offset, a_l1);
            assert_ne!(*snapshot, Some(0), "{target:?}");
        }
        t => panic!("{t:?}"),
    }
    let sim = a.ctx.simulated.as_ref().unwrap().img.clone();
    let left: Vec<_> = sim
        .snapshots
        .snapshots
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str(), s.l1_table_offset))
        .collect();
    assert_eq!(left, [("1", "a", b_l1)]);
    step_to(&mut a, row);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, super::ctx::Pane::Simulate);
    assert_eq!(a.ctx.view_snapshot, None);
    assert!(
        a.status
            .contains("snapshot 1 'a' L1 is not in the simulated image"),
        "{}",
        a.status
    );
    assert_eq!(std::fs::read(&dup).unwrap(), before);
}

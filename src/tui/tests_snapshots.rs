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

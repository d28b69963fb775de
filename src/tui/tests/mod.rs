//! Headless tests: keys into the app, frames drawn into ratatui's TestBackend,
//! screens compared with insta snapshots, colours checked where they carry meaning.

use super::app::{App, Options, Popup};
use super::ctx::Pane;
use super::keymap::Action;
use super::panes::color;
use super::view;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Relative to the package root (cargo runs tests there), so screens do not
/// depend on where the checkout is.
fn asset(name: &str) -> PathBuf {
    PathBuf::from("assets").join(name)
}

fn app(name: &str) -> App {
    open(asset(name))
}

fn open(p: PathBuf) -> App {
    let mut a = App::new(p, Options::default());
    a.wait_background();
    a
}

fn draw(app: &mut App, w: u16, h: u16) -> Buffer {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| view::draw(f, app)).unwrap();
    t.backend().buffer().clone()
}

fn text(b: &Buffer) -> String {
    let mut s = String::new();
    for y in 0..b.area.height {
        for x in 0..b.area.width {
            s.push_str(b[(x, y)].symbol());
        }
        s.push('\n');
    }
    s
}

fn screen(app: &mut App, w: u16, h: u16) -> String {
    text(&draw(app, w, h))
}

/// Where `needle` starts on screen (x, y), counting one cell per character.
fn find(b: &Buffer, needle: &str) -> Option<(u16, u16)> {
    text(b).lines().enumerate().find_map(|(y, l)| {
        let i = l.find(needle)?;
        Some((l[..i].chars().count() as u16, y as u16))
    })
}

fn press(app: &mut App, c: KeyCode, m: KeyModifiers) {
    super::handle_event(app, Event::Key(KeyEvent::new(c, m)));
}

fn key(app: &mut App, c: KeyCode) {
    press(app, c, KeyModifiers::NONE);
}

/// Type keys as a person would: characters one by one.
fn typed(app: &mut App, s: &str) {
    for c in s.chars() {
        key(app, KeyCode::Char(c));
    }
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img is installed");
    assert!(out.status.success(), "{args:?}: {out:?}");
}

fn qemu_io(dir: &Path, image: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd, image])
        .current_dir(dir)
        .output()
        .expect("qemu-io is installed");
    assert!(out.status.success(), "{cmd}: {out:?}");
}

/// Snapshot text with what varies between machines taken out: dates, the space
/// the file takes on disk (it depends on the file system), and the padding those
/// change (runs of spaces become one).
fn stable(s: String) -> String {
    s.lines()
        .map(|l| {
            let mut l = l.to_string();
            if let Some(i) = l.find("2026-") {
                l.replace_range(i..(i + 19).min(l.len()), "YYYY-MM-DD HH:MM:SS");
            }
            if let Some(end) = l.find(" on disk)")
                && let Some(start) = l[..end].rfind('(')
            {
                l.replace_range(start..end + " on disk)".len(), "(… on disk)");
            }
            let mut out = String::new();
            let mut prev_space = false;
            for c in l.chars() {
                if c == ' ' && prev_space {
                    continue;
                }
                prev_space = c == ' ';
                out.push(c);
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_pane_draws_at_80x24_and_120x40() {
    let mut a = app("demo-top.qcow2");
    for (w, h) in [(80, 24), (120, 40)] {
        for p in Pane::ALL {
            a.update(Action::Pane(p));
            let s = screen(&mut a, w, h);
            let tab = if w >= 100 { p.name() } else { p.short() };
            assert!(s.contains(&format!("{} {tab}", p.number())), "{p:?}:\n{s}");
            assert!(s.contains("? help") && s.contains("q quit"), "{s}");
            insta::assert_snapshot!(
                format!("pane_{}_{}_{w}x{h}", p.number(), p.name().to_lowercase()),
                stable(s)
            );
        }
    }
}

#[test]
fn tables_drill_into_l2_and_back() {
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("L2 table at 0x40000"), "{s}");
    assert!(s.contains("data at host offset 0x50000"), "{s}");
    key(&mut a, KeyCode::Backspace);
    assert!(screen(&mut a, 100, 30).contains("active L1 at 0x30000"));
}

#[test]
fn trace_steps_forward_and_back() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "6g0x18000");
    key(&mut a, KeyCode::Enter);
    let t = a.panes.trace.trace.as_ref().expect("a trace");
    assert_eq!(t.guest_offset.get(), 0x18000);
    let n = t.steps.len();
    for _ in 0..n {
        typed(&mut a, "n");
    }
    assert_eq!(a.panes.trace.step, n - 1);
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("result:"), "{s}");
    typed(&mut a, "p");
    assert_eq!(a.panes.trace.step, n - 2);
    insta::assert_snapshot!("trace_0x18000", stable(screen(&mut a, 100, 30)));
}

#[test]
fn a_leaked_cluster_is_coloured_in_layout_and_refcounts() {
    let mut a = app("demo-corrupt.qcow2");
    typed(&mut a, "2");
    let b = draw(&mut a, 100, 30);
    // Row 0 of the grid starts after the legend line and the 10-column label.
    assert_eq!(
        b[(1 + 10 + 5, 3)].fg,
        color::LEAK,
        "cluster 5:\n{}",
        text(&b)
    );
    assert_eq!(b[(1 + 10 + 6, 3)].fg, color::DATA);
    typed(&mut a, "4");
    key(&mut a, KeyCode::Enter);
    let b = draw(&mut a, 100, 30);
    let s = text(&b);
    let row = s
        .lines()
        .position(|l| l.contains("cluster          5"))
        .expect("row of cluster 5");
    let x = s.lines().nth(row).unwrap().find("stored").unwrap() as u16;
    assert_eq!(b[(x, row as u16)].fg, color::LEAK, "{s}");
}

#[test]
fn check_pane_lists_findings_and_jumps_to_the_cluster() {
    let mut a = app("demo-corrupt.qcow2");
    typed(&mut a, "7");
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("2 corruptions, 1 leaks"), "{s}");
    assert!(s.contains("Leaked cluster 5 refcount=2 reference=1"), "{s}");
    key(&mut a, KeyCode::Enter);
    // Enter goes to the entry at fault: the refcount of cluster 5.
    assert_eq!(a.pane, Pane::Refcounts);
    assert_eq!(a.panes.refcounts.block.sel, 5);
    // Backspace returns to where the jump came from.
    key(&mut a, KeyCode::Backspace);
    assert_eq!(a.pane, Pane::Check);
}

#[test]
fn simulate_runs_and_steps_without_writing() {
    let before = std::fs::read(asset("demo-mid.qcow2")).unwrap();
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "8");
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    let o = a.panes.simulate.outcome.clone().expect("ran").expect("ok");
    assert_eq!(o.records.len(), 1);
    assert!(o.summary.contains("no errors") && o.clean, "{}", o.summary);
    typed(&mut a, "nn");
    assert_eq!(a.panes.simulate.steps.sel, 2);
    let b = draw(&mut a, 100, 30);
    let s = text(&b);
    assert!(s.contains("change 3/"), "{s}");
    let (x, y) = find(&b, "check of the simulated image: no errors").unwrap();
    assert_eq!(b[(x, y)].fg, color::DATA);
    assert_eq!(std::fs::read(asset("demo-mid.qcow2")).unwrap(), before);
}

#[test]
fn snapshots_become_the_view_and_two_marked_are_compared() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "5");
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.ctx.view_snapshot, Some(0));
    typed(&mut a, "m");
    key(&mut a, KeyCode::Down);
    typed(&mut a, "m");
    assert!(
        a.panes.snapshots.diff_running,
        "the comparison runs on a worker"
    );
    assert!(screen(&mut a, 100, 30).contains("comparing the two snapshots"));
    a.wait_background();
    let diff = a
        .panes
        .snapshots
        .diff
        .clone()
        .expect("compared")
        .expect("ok");
    assert!(!diff.is_empty(), "the two demo snapshots differ");
    let s = screen(&mut a, 100, 30);
    assert!(
        s.contains("guest cluster(s) map differently") && s.contains("view: snapshot 1"),
        "{s}"
    );
    // The "comparing…" line is gone once the result is there.
    assert!(!s.contains("comparing the two snapshots"), "{s}");
}

#[test]
fn mouse_clicks_tabs_and_the_tour_moves_panes() {
    let mut a = app("demo-top.qcow2");
    draw(&mut a, 100, 30);
    let (r, p) = a.areas.tabs[6];
    super::handle_event(
        &mut a,
        Event::Mouse(ratatui::crossterm::event::MouseEvent {
            kind: ratatui::crossterm::event::MouseEventKind::Down(
                ratatui::crossterm::event::MouseButton::Left,
            ),
            column: r.x + 1,
            row: r.y,
            modifiers: KeyModifiers::NONE,
        }),
    );
    assert_eq!(a.pane, p);
    typed(&mut a, "t");
    let mut seen = vec![a.pane];
    for _ in 0..6 {
        typed(&mut a, "n");
        seen.push(a.pane);
    }
    assert_eq!(
        seen,
        vec![
            Pane::Overview,
            Pane::Tables,
            Pane::Tables,
            Pane::Hex,
            Pane::Refcounts,
            Pane::Snapshots,
            Pane::Simulate
        ]
    );
    a.wait_background();
    assert!(
        matches!(a.panes.simulate.outcome, Some(Ok(_))),
        "the tour's last step simulates a write after a snapshot"
    );
}

#[test]
fn watch_reloads_when_the_file_changes_and_shows_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.qcow2");
    std::fs::copy(asset("demo-mid.qcow2"), &p).unwrap();
    let mut a = App::new(
        p.clone(),
        Options {
            mouse: false,
            watch: true,
            ..Default::default()
        },
    );
    a.wait_background();
    assert_eq!(a.ctx.report.as_ref().unwrap().leaks, 0);
    std::fs::copy(asset("demo-corrupt.qcow2"), &p).unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    a.check_watch();
    a.wait_background();
    assert_eq!(a.ctx.previous, Some((0, 0, 0)));
    assert_eq!(a.ctx.report.as_ref().unwrap().leaks, 1);
    typed(&mut a, "7");
    let s = screen(&mut a, 100, 30);
    assert!(
        s.contains("since the previous load: corruptions 0 → 2, leaks 0 → 1"),
        "{s}"
    );
}

#[test]
fn enter_on_a_trace_data_step_shows_the_backing_file_bytes() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "6g0x1c000");
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::End);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Hex);
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("Hex — assets/demo-mid.qcow2: "), "{s}");
    assert!(s.contains("data of guest 0x1c000 at 0x5c000"), "{s}");
}

#[test]
fn layout_enter_on_an_l2_table_opens_it_in_tables() {
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "2");
    a.panes.layout.sel = 4;
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    assert_eq!(a.panes.tables.level, super::panes::tables::Level::L2(0));
}

/// The selected row of a list: the text of the first reversed cell's row.
fn selected_row(b: &Buffer, from_y: u16) -> String {
    (from_y..b.area.height)
        .find(|y| {
            (0..b.area.width).any(|x| {
                b[(x, *y)]
                    .modifier
                    .contains(ratatui::style::Modifier::REVERSED)
            })
        })
        .map(|y| {
            (0..b.area.width)
                .map(|x| b[(x, y)].symbol().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn be(b: &[u8], at: u64, n: u64) -> u64 {
    b[at as usize..(at + n) as usize]
        .iter()
        .fold(0, |v, x| (v << 8) | u64::from(*x))
}

/// `/`, the text, Enter, and the search run to its end.
fn search(a: &mut App, q: &str) {
    typed(a, "/");
    assert!(
        matches!(
            a.popup,
            Some(Popup::Input(crate::tui::app::InputFor::FindInList, _))
        ),
        "/ opens the prompt in {:?}",
        a.pane
    );
    press(a, KeyCode::Char('u'), KeyModifiers::CONTROL);
    typed(a, q);
    key(a, KeyCode::Enter);
    settle(a);
}

/// Let a search finish, as the main loop does between frames.
fn settle(a: &mut App) {
    for _ in 0..100_000 {
        if !crate::tui::find::running(a) {
            return;
        }
        a.poll_background();
    }
    panic!("the search did not finish");
}

mod broken;
mod busy;
mod columns;
mod defects;
mod find;
mod hex;
mod inputs;
mod layers;
mod links;
mod map_changes;
mod truth;

//! Headless tests of `u` (hide the rows that hold nothing): the rows are looked
//! at again only when something happened, not on every frame.

use super::app::{App, Options};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use std::path::PathBuf;

/// One turn of the viewer's loop: take in the workers' news, then draw.
fn frame(app: &mut App) -> String {
    app.poll_background();
    let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
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

fn builds(a: &App) -> u64 {
    a.panes.tables.l1.hidden.as_ref().unwrap().builds
}

#[test]
fn hidden_rows_are_worked_out_once_while_nothing_changes() {
    let mut a = App::new(PathBuf::from("assets/demo-top.qcow2"), Options::default());
    a.wait_background();
    key(&mut a, KeyCode::Char('3'));
    let all = frame(&mut a);
    key(&mut a, KeyCode::Char('u'));
    let first = frame(&mut a);
    assert!(first.contains("hiding"), "{first}");
    assert_ne!(first, all);
    assert_eq!(builds(&a), 1);
    let shown = a.panes.tables.l1.hidden.as_ref().unwrap().shown.clone();
    for _ in 0..5 {
        assert_eq!(frame(&mut a), first);
    }
    assert_eq!(builds(&a), 1, "five frames with nothing new build nothing");
    // A key: the rows are looked at once more, and they are the same rows.
    key(&mut a, KeyCode::Down);
    let moved = frame(&mut a);
    assert_eq!(builds(&a), 2);
    for _ in 0..3 {
        assert_eq!(frame(&mut a), moved);
    }
    assert_eq!(builds(&a), 2);
    assert_eq!(a.panes.tables.l1.hidden.as_ref().unwrap().shown, shown);
}

//! Headless tests of `u` (hide the rows that hold nothing): the rows are looked
//! at again only when something happened, not on every frame.

use super::app::{App, Options, Popup};
use super::ctx::Pane;
use super::keymap::Action;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{
    Event, KeyCode, KeyEvent, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use std::path::PathBuf;
use std::sync::Arc;

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

fn click(app: &mut App, column: u16, row: u16, kind: MouseEventKind) {
    super::handle_event(
        app,
        Event::Mouse(MouseEvent {
            kind,
            column,
            row,
            modifiers: KeyModifiers::NONE,
        }),
    );
}

#[test]
fn a_key_or_a_click_is_one_event_whatever_it_sets_off() {
    let mut a = App::new(PathBuf::from("assets/demo-top.qcow2"), Options::default());
    a.wait_background();
    frame(&mut a);
    let counted = |a: &mut App, what: &str, act: &dyn Fn(&mut App)| {
        let before = a.events;
        act(a);
        assert_eq!(a.events, before.wrapping_add(1), "{what}");
    };
    // An action alone, an action with effects (Enter opens the L2 table: a
    // jump), and an action that reloads the image.
    counted(&mut a, "3", &|a| key(a, KeyCode::Char('3')));
    counted(&mut a, "Down", &|a| key(a, KeyCode::Down));
    counted(&mut a, "Up", &|a| key(a, KeyCode::Up));
    counted(&mut a, "Enter (L1)", &|a| key(a, KeyCode::Enter));
    counted(&mut a, "Enter (L2)", &|a| key(a, KeyCode::Enter));
    assert_eq!(
        a.pane,
        Pane::Trace,
        "the L2 entry's Enter is a Trace effect"
    );
    counted(&mut a, "r", &|a| key(a, KeyCode::Char('r')));
    a.wait_background();
    frame(&mut a);
    // The mouse: a scroll, a click on a tab (an action), a click in the pane.
    counted(&mut a, "scroll", &|a| {
        click(a, 5, 10, MouseEventKind::ScrollDown)
    });
    let tab = a.areas.tabs.first().map(|(r, _)| (r.x, r.y)).unwrap();
    counted(&mut a, "tab", &|a| {
        click(a, tab.0, tab.1, MouseEventKind::Down(MouseButton::Left))
    });
    let pane = (a.areas.pane.x + 2, a.areas.pane.y + 2);
    counted(&mut a, "pane", &|a| {
        click(a, pane.0, pane.1, MouseEventKind::Down(MouseButton::Left))
    });
    // Called on its own (as the tests do), an action is one event too.
    counted(&mut a, "update", &|a| a.update(Action::Down));
}

#[test]
fn hidden_rows_grow_in_place_and_stay_out_of_the_changes_list() {
    let mut a = App::new(PathBuf::from("assets/demo-top.qcow2"), Options::default());
    a.wait_background();
    key(&mut a, KeyCode::Char('3'));
    key(&mut a, KeyCode::Char('u'));
    frame(&mut a);
    let full = a.panes.tables.l1.hidden.as_ref().unwrap().shown.clone();
    assert!(!full.is_empty());
    // As if only the first row had been looked at, and the list then grew.
    let h = a.panes.tables.l1.hidden.as_mut().unwrap();
    h.shown = Arc::new(full.iter().copied().filter(|r| *r < 1).collect());
    h.of = 1;
    h.seen = None;
    let at = Arc::as_ptr(&h.shown);
    let builds = h.builds;
    frame(&mut a);
    let h = a.panes.tables.l1.hidden.as_ref().unwrap();
    assert_eq!(h.shown, full, "the rows after the first are added");
    assert_eq!(Arc::as_ptr(&h.shown), at, "to the same list");
    assert_eq!(h.builds, builds.wrapping_add(1));
    // The Changes popup (after a reload) lists changes, not the pane's rows: the
    // pane's hidden rows are not put on it, and stay the pane's.
    key(&mut a, KeyCode::Char('r'));
    a.wait_background();
    frame(&mut a);
    key(&mut a, KeyCode::Char('u'));
    frame(&mut a);
    assert!(a.panes.tables.l1.hidden.is_some());
    key(&mut a, KeyCode::Char('c'));
    assert!(matches!(a.popup, Some(Popup::Changes(_))), "{}", a.status);
    key(&mut a, KeyCode::Down);
    frame(&mut a);
    key(&mut a, KeyCode::Char('u'));
    frame(&mut a);
    assert!(
        matches!(&a.popup, Some(Popup::Changes(v)) if v.hidden.is_none()),
        "the Changes list hides nothing"
    );
    let h = a.panes.tables.l1.hidden.as_ref();
    assert!(h.is_some_and(|h| h.seen.is_some_and(|(e, _)| e == a.events)));
}

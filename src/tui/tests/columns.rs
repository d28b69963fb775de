//! The Snapshots table scrolls sideways: Left/Right move the columns right of
//! NAME, which stays, and the footer and help name the keys.

use super::*;

/// The heading and rows of the Snapshots table, as drawn.
fn table(s: &str) -> Vec<&str> {
    s.lines()
        .filter(|l| l.contains(" ID ") || l.contains("snap1") || l.contains("snap3"))
        .collect()
}

#[test]
fn left_and_right_scroll_the_snapshot_columns_at_80x24() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "5");
    let s = screen(&mut a, 80, 24);
    let t = table(&s);
    assert!(
        t[0].contains("VM STATE") && t[0].contains("DISK SIZE"),
        "{s}"
    );
    assert!(!t[0].contains("ICOUNT") && !t[0].contains("DATE"), "{s}");
    // The bottom line says what is off screen and how to get there.
    assert!(s.contains("←/→: 3 columns to the right "), "{s}");
    assert!(s.contains("←/→ columns"), "the footer names the keys: {s}");
    insta::assert_snapshot!("snapshot_columns_80x24_first", stable(s));

    // Right until the last columns are on screen; further Right keeps them there.
    for _ in 0..10 {
        key(&mut a, KeyCode::Right);
    }
    let s = screen(&mut a, 80, 24);
    let t = table(&s);
    for want in ["ID", "NAME", "VM CLOCK", "ICOUNT", "DATE"] {
        assert!(t[0].contains(want), "{want}: {s}");
    }
    assert!(
        !t[0].contains("VM STATE") && !t[0].contains("DISK SIZE"),
        "{s}"
    );
    // ID and name stay; the values of the last columns come into view.
    assert!(t[1].contains(" 1 ") && t[1].contains("snap1"), "{s}");
    assert!(t[1].contains("0.000s"), "{s}");
    assert!(t[2].contains(" 3 ") && t[2].contains("snap3"), "{s}");
    assert!(
        !t[1].contains("0x24000"),
        "the L1 offset scrolled away: {s}"
    );
    assert!(s.contains("←/→: 4 columns to the left "), "{s}");
    // The date is whole: the row ends with it.
    let date =
        crate::cli::info::format_date(a.ctx.img.as_ref().unwrap().snapshots.snapshots[0].date_sec);
    assert!(t[1].contains(&date), "{date}: {s}");
    insta::assert_snapshot!("snapshot_columns_80x24_last", stable(s));

    // Left scrolls back, one column a key, to the first.
    key(&mut a, KeyCode::Left);
    let t1 = screen(&mut a, 80, 24);
    assert!(table(&t1)[0].contains("DISK SIZE"), "{t1}");
    assert!(!table(&t1)[0].contains("L1 SZ"), "{t1}");
    assert!(
        t1.contains("←/→: 3 columns to the left, 1 column to the right "),
        "{t1}"
    );
    for _ in 0..10 {
        key(&mut a, KeyCode::Left);
    }
    let back = screen(&mut a, 80, 24);
    let mut fresh = app("demo-top.qcow2");
    typed(&mut fresh, "5");
    let first = screen(&mut fresh, 80, 24);
    assert_eq!(table(&back), table(&first), "{back}");
    assert!(table(&back)[0].contains("VM STATE"), "{back}");
    // Up/Down still choose a snapshot, with the columns scrolled.
    key(&mut a, KeyCode::Right);
    key(&mut a, KeyCode::Down);
    assert_eq!(a.panes.snapshots.list.sel, 1);
    assert_eq!(a.panes.snapshots.first_column, 1);
}

#[test]
fn every_snapshot_column_fits_at_200x60_and_the_arrows_leave_it() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "5");
    let before = screen(&mut a, 200, 60);
    let t = table(&before);
    for want in [
        "ID",
        "NAME",
        "VM STATE",
        "L1 OFFSET",
        "L1 SZ",
        "DISK SIZE",
        "VM CLOCK",
        "ICOUNT",
        "DATE",
    ] {
        assert!(t[0].contains(want), "{want}: {before}");
    }
    assert!(!before.contains("←/→: "), "nothing is off screen: {before}");
    key(&mut a, KeyCode::Right);
    assert_eq!(a.panes.snapshots.first_column, 0);
    assert_eq!(screen(&mut a, 200, 60), before);
    insta::assert_snapshot!("snapshot_columns_200x60", stable(before));
}

#[test]
fn the_help_and_the_keymap_say_what_left_and_right_do_in_snapshots() {
    use crate::tui::keymap::{Action, action_for, footer};
    use ratatui::crossterm::event::KeyEvent;
    let ev = |c| KeyEvent::new(c, KeyModifiers::NONE);
    assert_eq!(
        action_for(&ev(KeyCode::Right), Pane::Snapshots),
        Some(Action::Right)
    );
    assert_eq!(
        action_for(&ev(KeyCode::Left), Pane::Snapshots),
        Some(Action::Left)
    );
    assert!(footer(Pane::Snapshots).contains(&("←/→", "columns")));
    assert!(!footer(Pane::Tables).iter().any(|(_, s)| *s == "columns"));
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "5?");
    let s = screen(&mut a, 200, 90);
    assert!(s.contains("Scroll the table's columns sideways"), "{s}");
}

//! A long job on a worker (a simulation of hundreds of snapshot operations on a
//! 64 GiB image whose every cluster is allocated): every key of the key map, in
//! every pane, still answers while it runs; the progress moves; Esc cancels it
//! and q quits without waiting for it.

use super::*;
use crate::tui::keymap::KEYMAP;
use std::time::{Duration, Instant};

/// Ops that keep the worker busy for tens of seconds, in steps of a fraction of
/// a second (each walks the million allocated clusters).
fn long_ops() -> String {
    vec!["snapshot-create:a snapshot-delete:a"; 200].join(" ")
}

/// Start the long simulation through the Simulate pane, as a person would.
fn start_long_simulation(a: &mut App) {
    typed(a, "8");
    key(a, KeyCode::Enter);
    assert!(matches!(a.popup, Some(Popup::Input(..))));
    press(a, KeyCode::Char('u'), KeyModifiers::CONTROL);
    typed(a, &long_ops());
    key(a, KeyCode::Enter);
    assert!(a.panes.simulate.running.is_some(), "{}", a.status);
}

/// Wait (polling the workers as the run loop does) until the simulation has
/// done `n` steps; false if it did not within `limit`.
fn wait_for_steps(a: &mut App, n: u64, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        a.poll_background();
        if a.panes
            .simulate
            .running
            .as_ref()
            .is_some_and(|r| r.done >= n)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn every_key_answers_while_a_long_simulation_runs() {
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
            "64G",
        ],
    );
    let mut a = open(dir.path().join("big.qcow2"));
    start_long_simulation(&mut a);
    // The progress is on screen and moves.
    assert!(wait_for_steps(&mut a, 2, Duration::from_secs(60)));
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("Esc cancels"), "{s}");
    assert!(s.contains("operation "), "{s}");
    let total = a.panes.simulate.running.as_ref().map(|r| r.total);
    assert_eq!(total, Some(401), "400 operations, then the check");

    // Every key of the table, in every pane where it applies, but the two that
    // end the run (Esc, q and Ctrl-C: below).
    let mut pressed = 0;
    let mut slowest = Duration::ZERO;
    for p in Pane::ALL {
        for b in KEYMAP.iter().filter(|b| b.scope.covers(p)) {
            for ((code, mods), action) in b.codes {
                if matches!(action, Action::Escape | Action::Quit) {
                    continue;
                }
                a.update(Action::Pane(p));
                let t = Instant::now();
                press(&mut a, *code, *mods);
                a.poll_background();
                draw(&mut a, 80, 24);
                slowest = slowest.max(t.elapsed());
                pressed += 1;
                assert!(
                    a.panes.simulate.running.is_some(),
                    "{} ({code:?}) in {p:?} ended the simulation: {}",
                    b.keys,
                    a.status
                );
                assert!(!a.quit, "{} in {p:?} quit", b.keys);
                // A prompt or popup the key opened is closed again, so that the
                // next key reaches the pane.
                a.popup = None;
            }
        }
    }
    assert!(pressed > 200, "{pressed} keys");
    // A key that waited for the worker would wait for the whole run.
    assert!(slowest < Duration::from_secs(2), "slowest key: {slowest:?}");
    // Still running, and still moving.
    let done = a.panes.simulate.running.as_ref().map_or(0, |r| r.done);
    assert!(done < 401, "the run ended during the keys: make it longer");
    assert!(wait_for_steps(&mut a, done + 1, Duration::from_secs(60)));

    // Esc cancels it, at once, in any pane.
    typed(&mut a, "3");
    key(&mut a, KeyCode::Esc);
    assert!(a.panes.simulate.running.is_none());
    assert_eq!(a.status, "simulation cancelled");
    a.wait_background();
    assert!(
        a.panes.simulate.outcome.is_none(),
        "a cancelled run has no result"
    );
    typed(&mut a, "8");
    assert!(!screen(&mut a, 80, 24).contains("Esc cancels"));

    // q quits while one runs, without waiting for it.
    start_long_simulation(&mut a);
    let t = Instant::now();
    key(&mut a, KeyCode::Char('q'));
    assert!(a.quit);
    assert!(t.elapsed() < Duration::from_secs(2));
    // (The worker stops at its next step once cancelled.)
    a.quit = false;
    key(&mut a, KeyCode::Esc);
    assert!(a.panes.simulate.running.is_none());
}

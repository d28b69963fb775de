//! The key map's own tests: every key reaches its action, and the footer and
//! help agree with the keys.
use super::*;

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

#[test]
fn every_key_in_the_table_triggers_its_action() {
    for b in KEYMAP {
        assert!(!b.codes.is_empty(), "{}", b.keys);
        let p = match b.scope {
            Scope::Global | Scope::GlobalListedIn(_) => Pane::Overview,
            Scope::Panes(p) => p[0],
        };
        for ((c, m), a) in b.codes {
            let ev = KeyEvent::new(*c, *m);
            assert_eq!(action_for(&ev, p), Some(*a), "{c:?} {m:?}");
        }
    }
}

#[test]
fn digits_ctrl_c_and_scoped_keys() {
    assert_eq!(
        action_for(&key(Char('3')), Pane::Overview),
        Some(Action::Pane(Pane::Tables))
    );
    let cc = KeyEvent::new(Char('c'), KeyModifiers::CONTROL);
    assert_eq!(action_for(&cc, Pane::Hex), Some(Action::Quit));
    // Ctrl-U is no key of the table: it must not turn into 'u' or anything else.
    let cu = KeyEvent::new(Char('u'), KeyModifiers::CONTROL);
    assert_eq!(action_for(&cu, Pane::Hex), None);
    assert_eq!(
        action_for(&key(Char('m')), Pane::Snapshots),
        Some(Action::Mark)
    );
    assert_eq!(action_for(&key(Char('m')), Pane::Overview), None);
    assert_eq!(
        action_for(&key(Char('i')), Pane::Layout),
        Some(Action::Lookup)
    );
    assert!(footer(Pane::Snapshots).iter().any(|(k, _)| *k == "m"));
    assert!(!footer(Pane::Overview).iter().any(|(k, _)| *k == "m"));
    assert_eq!(footer(Pane::Layout).first().map(|x| x.0), Some("i"));
    assert_eq!(footer(Pane::Hex).last(), Some(&("q", "quit")));
}

/// The footer lists n/p only where the pane itself has steps; in every pane
/// the keys still reach the tour and a search, and `g`'s help names every
/// pane that takes an offset.
#[test]
fn the_footer_lists_step_keys_only_where_they_step_and_goto_names_its_panes() {
    for p in Pane::ALL {
        let listed = footer(p).iter().any(|(k, _)| *k == "n/p");
        assert_eq!(listed, STEP_PANES.contains(&p), "{p:?}");
        assert_eq!(
            action_for(&key(Char('n')), p),
            Some(Action::NextStep),
            "{p:?}"
        );
    }
    let g = KEYMAP.iter().find(|b| b.keys == "g").map(|b| b.help);
    for p in [
        Pane::Trace,
        Pane::Tables,
        Pane::Map,
        Pane::Layout,
        Pane::Refcounts,
        Pane::Hex,
    ] {
        assert!(g.is_some_and(|h| h.contains(p.name())), "{p:?}: {g:?}");
    }
}

#[test]
fn no_key_is_bound_twice_in_one_pane() {
    for p in Pane::ALL {
        let keys: Vec<&Key> = KEYMAP
            .iter()
            .filter(|b| b.scope.covers(p))
            .flat_map(|b| b.codes.iter().map(|(k, _)| k))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(!keys[i + 1..].contains(k), "{k:?} twice in {p:?}");
        }
    }
}

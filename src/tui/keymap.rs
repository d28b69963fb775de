//! One table of key bindings: it turns key presses into actions, and it is what the
//! footer hints and the `?` help show, so they can never disagree with the keys.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// Everything a key (or a click) can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Leave.
    Quit,
    /// Show pane N (0-based).
    Pane(usize),
    /// Next pane.
    NextPane,
    /// Previous pane.
    PrevPane,
    /// Move the selection up.
    Up,
    /// Down.
    Down,
    /// Left (Layout grid, Hex).
    Left,
    /// Right.
    Right,
    /// A page up.
    PageUp,
    /// A page down.
    PageDown,
    /// To the first row.
    Home,
    /// To the last row.
    End,
    /// Drill in / use the selection.
    Enter,
    /// Back out one level.
    Back,
    /// Ask for an offset to jump to.
    Goto,
    /// Toggle the explanation panel.
    Explain,
    /// Toggle help.
    Help,
    /// Close a popup.
    Escape,
    /// Reload the image from disk.
    Reload,
    /// Start or advance the guided tour.
    Tour,
    /// Next step (Trace, Simulate, tour).
    NextStep,
    /// Previous step.
    PrevStep,
    /// Mark a snapshot for comparison (Snapshots).
    Mark,
    /// Run (Check: run again; Simulate: run the chosen operation).
    Run,
}

/// Where a binding applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everywhere.
    Global,
    /// Only in the named panes.
    Panes(&'static [usize]),
}

/// One binding.
#[derive(Clone, Copy, Debug)]
pub struct Binding {
    /// Keys, as shown to people.
    pub keys: &'static str,
    /// What it does, short (footer).
    pub short: &'static str,
    /// What it does, in a sentence (help).
    pub help: &'static str,
    /// The action.
    pub action: Action,
    /// The key codes that trigger it.
    pub codes: &'static [KeyCode],
    /// Where it applies.
    pub scope: Scope,
    /// Shown in the footer.
    pub footer: bool,
}

/// Pane numbers, for scopes.
pub mod pane {
    /// Overview.
    pub const OVERVIEW: usize = 0;
    /// Layout.
    pub const LAYOUT: usize = 1;
    /// Tables.
    pub const TABLES: usize = 2;
    /// Refcounts.
    pub const REFCOUNTS: usize = 3;
    /// Snapshots.
    pub const SNAPSHOTS: usize = 4;
    /// Trace.
    pub const TRACE: usize = 5;
    /// Check.
    pub const CHECK: usize = 6;
    /// Simulate.
    pub const SIMULATE: usize = 7;
    /// Hex.
    pub const HEX: usize = 8;
}

/// Pane names, in number-key order.
pub const PANES: [&str; 9] = [
    "Overview",
    "Layout",
    "Tables",
    "Refcounts",
    "Snapshots",
    "Trace",
    "Check",
    "Simulate",
    "Hex",
];

use KeyCode::*;

/// The key map.
pub const KEYMAP: &[Binding] = &[
    Binding {
        keys: "1-9",
        short: "panes",
        help: "Show pane 1 (Overview) to 9 (Hex)",
        action: Action::Pane(0),
        codes: &[],
        scope: Scope::Global,
        footer: true,
    },
    Binding {
        keys: "Tab/S-Tab",
        short: "next/prev",
        help: "Cycle through the panes",
        action: Action::NextPane,
        codes: &[Tab],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "S-Tab",
        short: "prev pane",
        help: "Previous pane",
        action: Action::PrevPane,
        codes: &[BackTab],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "↑/k",
        short: "up",
        help: "Move up",
        action: Action::Up,
        codes: &[KeyCode::Up, Char('k')],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "↓/j",
        short: "down",
        help: "Move down",
        action: Action::Down,
        codes: &[KeyCode::Down, Char('j')],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "←/h",
        short: "left",
        help: "Move left (Layout grid, Hex)",
        action: Action::Left,
        codes: &[KeyCode::Left, Char('h')],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "→/l",
        short: "right",
        help: "Move right (Layout grid, Hex)",
        action: Action::Right,
        codes: &[KeyCode::Right, Char('l')],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "PgUp/PgDn",
        short: "page",
        help: "Move a page up or down",
        action: Action::PageUp,
        codes: &[KeyCode::PageUp],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "PgDn",
        short: "page down",
        help: "Move a page down",
        action: Action::PageDown,
        codes: &[KeyCode::PageDown],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "Home/End",
        short: "first/last",
        help: "Go to the first or last row",
        action: Action::Home,
        codes: &[KeyCode::Home],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "End",
        short: "last",
        help: "Go to the last row",
        action: Action::End,
        codes: &[KeyCode::End],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "Enter",
        short: "open",
        help: "Drill in: an L1 entry's L2 table, a cluster in Hex, a snapshot as the view, a finding's cluster",
        action: Action::Enter,
        codes: &[KeyCode::Enter],
        scope: Scope::Global,
        footer: true,
    },
    Binding {
        keys: "Bksp",
        short: "back",
        help: "Back out one level (L2 table to L1 table, block to refcount table)",
        action: Action::Back,
        codes: &[Backspace],
        scope: Scope::Global,
        footer: true,
    },
    Binding {
        keys: "g",
        short: "go to",
        help: "Jump to an offset: a guest offset in Trace, Tables and Hex (--guest), a host offset in Layout, Refcounts and Hex",
        action: Action::Goto,
        codes: &[Char('g')],
        scope: Scope::Global,
        footer: true,
    },
    Binding {
        keys: "n/p",
        short: "step",
        help: "Next/previous step of a trace, a simulation or the tour",
        action: Action::NextStep,
        codes: &[Char('n')],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "p",
        short: "prev step",
        help: "Previous step",
        action: Action::PrevStep,
        codes: &[Char('p')],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "m",
        short: "mark",
        help: "Mark a snapshot; with two marked, show which guest clusters differ",
        action: Action::Mark,
        codes: &[Char('m')],
        scope: Scope::Panes(&[pane::SNAPSHOTS]),
        footer: true,
    },
    Binding {
        keys: "Space",
        short: "run",
        help: "Check: run again. Simulate: run the chosen operation",
        action: Action::Run,
        codes: &[Char(' ')],
        scope: Scope::Panes(&[pane::CHECK, pane::SIMULATE]),
        footer: true,
    },
    Binding {
        keys: "e",
        short: "explain",
        help: "Toggle the panel that explains what is selected",
        action: Action::Explain,
        codes: &[Char('e')],
        scope: Scope::Global,
        footer: true,
    },
    Binding {
        keys: "t",
        short: "tour",
        help: "Guided tour: header, L1, L2, a data cluster, its refcount, a snapshot sharing it, what a write would copy (n/p to step)",
        action: Action::Tour,
        codes: &[Char('t')],
        scope: Scope::Global,
        footer: true,
    },
    Binding {
        keys: "r",
        short: "reload",
        help: "Reload the image from disk (Check and Refcounts then show what changed)",
        action: Action::Reload,
        codes: &[Char('r')],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "?",
        short: "help",
        help: "Show or hide this help",
        action: Action::Help,
        codes: &[Char('?')],
        scope: Scope::Global,
        footer: true,
    },
    Binding {
        keys: "Esc",
        short: "close",
        help: "Close a popup or the explanation",
        action: Action::Escape,
        codes: &[Esc],
        scope: Scope::Global,
        footer: false,
    },
    Binding {
        keys: "q",
        short: "quit",
        help: "Quit (the terminal is restored)",
        action: Action::Quit,
        codes: &[Char('q')],
        scope: Scope::Global,
        footer: true,
    },
];

/// The action for a key press in `pane`, if any.
pub fn action_for(key: &KeyEvent, current: usize) -> Option<Action> {
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == Char('c') {
        return Some(Action::Quit);
    }
    if let Char(c @ '1'..='9') = key.code {
        return Some(Action::Pane(c as usize - '1' as usize));
    }
    KEYMAP
        .iter()
        .filter(|b| match b.scope {
            Scope::Global => true,
            Scope::Panes(p) => p.contains(&current),
        })
        .find(|b| b.codes.contains(&key.code))
        .map(|b| b.action)
}

/// The footer line for a pane.
pub fn footer(current: usize) -> Vec<(&'static str, &'static str)> {
    KEYMAP
        .iter()
        .filter(|b| b.footer)
        .filter(|b| match b.scope {
            Scope::Global => true,
            Scope::Panes(p) => p.contains(&current),
        })
        .map(|b| (b.keys, b.short))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    #[test]
    fn every_action_in_the_table_has_a_key() {
        for b in KEYMAP {
            assert!(!b.codes.is_empty() || b.keys == "1-9", "{}", b.keys);
            for c in b.codes {
                let scope_pane = match b.scope {
                    Scope::Global => 0,
                    Scope::Panes(p) => p[0],
                };
                assert_eq!(action_for(&key(*c), scope_pane), Some(b.action), "{:?}", c);
            }
        }
    }

    #[test]
    fn digits_pick_panes_and_scoped_keys_stay_in_their_panes() {
        assert_eq!(action_for(&key(Char('3')), 0), Some(Action::Pane(2)));
        assert_eq!(
            action_for(&key(Char('m')), pane::SNAPSHOTS),
            Some(Action::Mark)
        );
        assert_eq!(action_for(&key(Char('m')), pane::OVERVIEW), None);
        assert!(footer(pane::SNAPSHOTS).iter().any(|(k, _)| *k == "m"));
        assert!(!footer(pane::OVERVIEW).iter().any(|(k, _)| *k == "m"));
    }
}

//! One table of key bindings: it turns key presses into actions, and it is what the
//! footer hints and the `?` help show, so they can never disagree with the keys.
//! Digits and Ctrl-C are rows of it like every other key.

use super::ctx::Pane;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// Everything a key (or a click) can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Leave the viewer, restoring the terminal.
    Quit,
    /// Show a pane.
    Pane(Pane),
    /// Next pane.
    NextPane,
    /// Previous pane.
    PrevPane,
    /// Move the selection up.
    Up,
    /// Move the selection down.
    Down,
    /// Left (Layout grid; a byte back in Hex; the columns in Snapshots).
    Left,
    /// Right (Layout grid; a byte forward in Hex; the columns in Snapshots).
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
    /// Forward to the place gone back from.
    HistoryForward,
    /// Ask for an offset to jump to.
    Goto,
    /// Toggle the explanation panel.
    Explain,
    /// Scroll the explanation panel up.
    ExplainUp,
    /// Scroll the explanation panel down.
    ExplainDown,
    /// Toggle help.
    Help,
    /// Close a popup, cancel a running simulation.
    Escape,
    /// Reload the image from disk.
    Reload,
    /// Start the guided tour.
    Tour,
    /// Next step (Trace, Simulate, tour).
    NextStep,
    /// Previous step.
    PrevStep,
    /// Mark a snapshot for comparison (Snapshots).
    Mark,
    /// Run (Check: run again; Simulate: run the chosen operation).
    Run,
    /// Who references the selected cluster (Layout).
    Lookup,
    /// Move the keys to the other box of the pane (Snapshots, Layout, Check).
    Focus,
    /// The bytes of what is selected, in Hex.
    Hex,
    /// What changed on disk since the previous load.
    Changes,
    /// Find in the list (`/`).
    FindInList,
    /// The previous match of the search.
    PrevMatch,
    /// The next row that matters (an allocated entry, a mismatch, a finding).
    NextMatters,
    /// The previous row that matters.
    PrevMatters,
    /// Hide the rows that hold nothing, or show them again.
    HideEmpty,
    /// A whole cluster back (Hex).
    ClusterPrev,
    /// A whole cluster forward (Hex).
    ClusterNext,
    /// Find bytes or text (Hex).
    Find,
    /// The previous match of the last search (Hex).
    FindPrev,
    /// The inflated guest cluster of a compressed entry, in Hex (Tables).
    Inflate,
    /// The next layer of the backing chain.
    Layer,
    /// Show the simulated image in place of the file, or the file again.
    SimView,
    /// Open the Compare view.
    Compare,
}

/// The panes whose list `/` searches.
pub const LIST_PANES: &[Pane] = &[
    Pane::Tables,
    Pane::Refcounts,
    Pane::Snapshots,
    Pane::Check,
    Pane::Simulate,
    Pane::Map,
];

/// The panes where `/` finds: every list, and Hex (bytes in the file).
pub const FIND_PANES: &[Pane] = &[
    Pane::Tables,
    Pane::Refcounts,
    Pane::Snapshots,
    Pane::Check,
    Pane::Simulate,
    Pane::Map,
    Pane::Hex,
];

/// The panes with steps of their own, which n/p walk: the footer lists n/p there
/// only (elsewhere they step the tour or a search, while one is on).
pub const STEP_PANES: &[Pane] = &[Pane::Trace, Pane::Simulate];

/// Where a binding applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// In every pane.
    Global,
    /// Only in the named panes.
    Panes(&'static [Pane]),
    /// In every pane, but in the footer of the named panes only: the key does
    /// something of its own there, elsewhere only while a mode (the tour, a
    /// search) is on that says so itself.
    GlobalListedIn(&'static [Pane]),
}

impl Scope {
    /// Whether the binding applies in every pane.
    pub fn is_global(self) -> bool {
        matches!(self, Scope::Global | Scope::GlobalListedIn(_))
    }

    /// Whether the binding applies in `p`.
    pub fn covers(self, p: Pane) -> bool {
        match self {
            Scope::Global | Scope::GlobalListedIn(_) => true,
            Scope::Panes(ps) => ps.contains(&p),
        }
    }
}

/// A key: its code and whether Ctrl or Shift is held.
pub type Key = (KeyCode, KeyModifiers);

/// One binding: the keys people see, what they do and where.
#[derive(Clone, Copy, Debug)]
pub struct Binding {
    /// Keys, as shown to people.
    pub keys: &'static str,
    /// What it does, in a word or two (footer); None keeps it out of the footer.
    pub short: Option<&'static str>,
    /// What it does, in a sentence (help).
    pub help: &'static str,
    /// The keys and the action each one triggers.
    pub codes: &'static [(Key, Action)],
    /// Where it applies.
    pub scope: Scope,
}

use KeyCode::*;
const NO: KeyModifiers = KeyModifiers::NONE;
const CTRL: KeyModifiers = KeyModifiers::CONTROL;
const SHIFT: KeyModifiers = KeyModifiers::SHIFT;

/// The key map.
pub const KEYMAP: &[Binding] = &[
    Binding {
        keys: "0-9",
        short: Some("panes"),
        help: "Show pane 1 (Overview) to 9 (Hex), 0 (Map)",
        codes: &[
            ((Char('1'), NO), Action::Pane(Pane::Overview)),
            ((Char('2'), NO), Action::Pane(Pane::Layout)),
            ((Char('3'), NO), Action::Pane(Pane::Tables)),
            ((Char('4'), NO), Action::Pane(Pane::Refcounts)),
            ((Char('5'), NO), Action::Pane(Pane::Snapshots)),
            ((Char('6'), NO), Action::Pane(Pane::Trace)),
            ((Char('7'), NO), Action::Pane(Pane::Check)),
            ((Char('8'), NO), Action::Pane(Pane::Simulate)),
            ((Char('9'), NO), Action::Pane(Pane::Hex)),
            ((Char('0'), NO), Action::Pane(Pane::Map)),
        ],
        scope: Scope::Global,
    },
    Binding {
        keys: "Tab/S-Tab",
        short: None,
        help: "Next or previous pane",
        codes: &[
            ((Tab, NO), Action::NextPane),
            ((BackTab, SHIFT), Action::PrevPane),
            ((BackTab, NO), Action::PrevPane),
        ],
        scope: Scope::Global,
    },
    Binding {
        keys: "↑↓/jk",
        short: None,
        help: "Move the selection up or down (Hex: the cursor a row; Overview: scroll a row)",
        codes: &[
            ((KeyCode::Up, NO), Action::Up),
            ((Char('k'), NO), Action::Up),
            ((KeyCode::Down, NO), Action::Down),
            ((Char('j'), NO), Action::Down),
        ],
        scope: Scope::Global,
    },
    Binding {
        keys: "←→/hl",
        short: None,
        help: "Layout: the previous or next cluster. Hex: the cursor a byte back or forward",
        codes: &[
            ((KeyCode::Left, NO), Action::Left),
            ((Char('h'), NO), Action::Left),
            ((KeyCode::Right, NO), Action::Right),
            ((Char('l'), NO), Action::Right),
        ],
        scope: Scope::Panes(&[Pane::Layout, Pane::Hex]),
    },
    Binding {
        keys: "←/→",
        short: Some("columns"),
        help: "Scroll the table's columns sideways when the screen is too narrow for them all (ID and NAME stay)",
        codes: &[
            ((KeyCode::Left, NO), Action::Left),
            ((KeyCode::Right, NO), Action::Right),
        ],
        scope: Scope::Panes(&[Pane::Snapshots]),
    },
    Binding {
        keys: "[/]",
        short: Some("cluster"),
        help: "A whole cluster back or forward",
        codes: &[
            ((Char('['), NO), Action::ClusterPrev),
            ((Char(']'), NO), Action::ClusterNext),
        ],
        scope: Scope::Panes(&[Pane::Hex]),
    },
    Binding {
        keys: "n/N",
        short: Some("next match"),
        help: "The next or previous match of the last search (p is previous too)",
        codes: &[((Char('N'), NO), Action::FindPrev)],
        scope: Scope::Panes(&[Pane::Hex]),
    },
    Binding {
        keys: "G",
        short: None,
        help: "The cursor to the last byte of the file (Home: the first)",
        codes: &[((Char('G'), NO), Action::End)],
        scope: Scope::Panes(&[Pane::Hex]),
    },
    Binding {
        keys: "PgUp/PgDn",
        short: None,
        help: "A page up or down (a page is what the box shows)",
        codes: &[
            ((KeyCode::PageUp, NO), Action::PageUp),
            ((KeyCode::PageDown, NO), Action::PageDown),
        ],
        scope: Scope::Global,
    },
    Binding {
        keys: "Home/End",
        short: None,
        help: "The first or the last row",
        codes: &[
            ((KeyCode::Home, NO), Action::Home),
            ((KeyCode::End, NO), Action::End),
        ],
        scope: Scope::Global,
    },
    Binding {
        keys: "Enter",
        short: Some("open"),
        help: "Drill in: an L1 entry's L2 table, a cluster in Hex, a snapshot as the view, a finding's cluster",
        codes: &[((KeyCode::Enter, NO), Action::Enter)],
        scope: Scope::Global,
    },
    Binding {
        keys: "Bksp",
        short: Some("back"),
        help: "Back one step to the place before the last jump or drill-in (Enter, g), with its selection and scroll (also Ctrl-O and Alt-←); with no history, out one level (L2 table to L1, block to refcount table)",
        codes: &[
            ((Backspace, NO), Action::Back),
            ((Char('o'), CTRL), Action::Back),
            ((KeyCode::Left, KeyModifiers::ALT), Action::Back),
        ],
        scope: Scope::Global,
    },
    Binding {
        keys: "Ctrl-I",
        short: None,
        help: "Forward again to the place Backspace left (also Alt-→, for terminals that send Ctrl-I as Tab)",
        codes: &[
            ((Char('i'), CTRL), Action::HistoryForward),
            ((KeyCode::Right, KeyModifiers::ALT), Action::HistoryForward),
        ],
        scope: Scope::Global,
    },
    Binding {
        keys: "g",
        short: Some("go to"),
        help: "Jump to an offset: a guest offset in Trace, Tables and Map, a host offset in Layout, Refcounts and Hex",
        codes: &[((Char('g'), NO), Action::Goto)],
        scope: Scope::Global,
    },
    Binding {
        keys: "i",
        short: Some("who refers"),
        help: "List everything that references the selected cluster",
        codes: &[((Char('i'), NO), Action::Lookup)],
        scope: Scope::Panes(&[Pane::Layout]),
    },
    Binding {
        keys: "f",
        short: Some("other box"),
        help: "Snapshots: the arrows scroll the Difference box. Layout and Check: the arrows choose a referrer, Enter opens its entry in Tables",
        codes: &[((Char('f'), NO), Action::Focus)],
        scope: Scope::Panes(&[Pane::Snapshots, Pane::Layout, Pane::Check]),
    },
    Binding {
        keys: "x",
        short: Some("hex"),
        help: "The bytes of the selected cluster or entry in Hex (a compressed entry: its compressed bytes)",
        codes: &[((Char('x'), NO), Action::Hex)],
        scope: Scope::Panes(&[Pane::Layout, Pane::Tables]),
    },
    Binding {
        keys: "/",
        short: Some("find"),
        help: "Find in a list (and in the Changes list, c): words (a name, a kind), an offset or a raw value (0x50000 or decimal: a row that names it or covers it); Enter selects the first match at or after the selection; then n/N the next/previous match (n/p too while a search is on); Esc forgets it. Find hex bytes (de ad be ef, 0xdeadbeef) or \"text\" in the file, in Hex, from the cursor on; it runs in the background and Esc cancels it",
        codes: &[((Char('/'), NO), Action::FindInList)],
        scope: Scope::Panes(FIND_PANES),
    },
    Binding {
        keys: "N",
        short: None,
        help: "The previous match of the search (n: the next one)",
        codes: &[((Char('N'), NO), Action::PrevMatch)],
        scope: Scope::Panes(LIST_PANES),
    },
    Binding {
        keys: "}/{",
        short: None,
        help: "The next/previous row that matters. Tables: an allocated entry. Refcounts: in a block, a stored refcount that differs from the references the check counted; in the table, a block. Check: a corruption or check error. Map: guest data. Layout: a cluster with a finding",
        codes: &[
            ((Char('}'), NO), Action::NextMatters),
            ((Char('{'), NO), Action::PrevMatters),
        ],
        scope: Scope::Panes(&[
            Pane::Tables,
            Pane::Refcounts,
            Pane::Check,
            Pane::Map,
            Pane::Layout,
        ]),
    },
    Binding {
        keys: "u",
        short: None,
        help: "Hide the rows that hold nothing, or show them again: unallocated entries (Tables), refcount 0 and absent blocks (Refcounts), unallocated extents (Map)",
        codes: &[((Char('u'), NO), Action::HideEmpty)],
        scope: Scope::Panes(&[Pane::Tables, Pane::Refcounts, Pane::Map]),
    },
    Binding {
        keys: "z",
        short: Some("inflate"),
        help: "A compressed L2 entry: its guest cluster inflated (deflate or zstd, as the header says), in Hex",
        codes: &[((Char('z'), NO), Action::Inflate)],
        scope: Scope::Panes(&[Pane::Tables]),
    },
    Binding {
        keys: "L",
        short: Some("layer"),
        help: "The next layer of the backing chain (layer 0 is the top image, then its backing files): Tables, Layout, Hex and the other panes read that file; every title names the layer",
        codes: &[((Char('L'), NO), Action::Layer)],
        scope: Scope::Panes(&[Pane::Overview, Pane::Layout, Pane::Tables, Pane::Hex]),
    },
    Binding {
        keys: "m",
        short: Some("mark"),
        help: "Mark a snapshot; with two marked, list the guest clusters that differ",
        codes: &[((Char('m'), NO), Action::Mark)],
        scope: Scope::Panes(&[Pane::Snapshots]),
    },
    Binding {
        keys: "Space",
        short: Some("run"),
        help: "Check: run it again. Simulate: edit and run the chosen operation",
        codes: &[((Char(' '), NO), Action::Run)],
        scope: Scope::Panes(&[Pane::Check, Pane::Simulate]),
    },
    Binding {
        keys: "n/p",
        short: Some("step"),
        help: "Next or previous step of a trace or a simulation; in any pane, the next or previous stop of the tour or match of a search (/) while one is on, and in Hex the byte search again",
        codes: &[
            ((Char('n'), NO), Action::NextStep),
            ((Char('p'), NO), Action::PrevStep),
        ],
        scope: Scope::GlobalListedIn(STEP_PANES),
    },
    Binding {
        keys: "e",
        short: Some("explain"),
        help: "Show or hide the panel that explains what is selected",
        codes: &[((Char('e'), NO), Action::Explain)],
        scope: Scope::Global,
    },
    Binding {
        keys: "J/K",
        short: None,
        help: "Scroll the explanation or tour panel (also Shift-↓/Shift-↑)",
        codes: &[
            ((Char('J'), NO), Action::ExplainDown),
            ((Char('K'), NO), Action::ExplainUp),
            ((KeyCode::Down, SHIFT), Action::ExplainDown),
            ((KeyCode::Up, SHIFT), Action::ExplainUp),
        ],
        scope: Scope::Global,
    },
    Binding {
        keys: "t",
        short: Some("tour"),
        help: "Guided tour: header, L1, L2, a data cluster, its refcount, the snapshots, what a write would copy (n/p to step)",
        codes: &[((Char('t'), NO), Action::Tour)],
        scope: Scope::Global,
    },
    Binding {
        keys: "r",
        short: None,
        help: "Reload the image from disk (Check and Refcounts then show what changed)",
        codes: &[((Char('r'), NO), Action::Reload)],
        scope: Scope::Global,
    },
    Binding {
        keys: "c",
        short: None,
        help: "What changed on disk between the last two loads (r, --watch): every refcount, L1/L2 entry and snapshot (in the simulated view: what the simulation changes); Enter opens that refcount or table entry",
        codes: &[((Char('c'), NO), Action::Changes)],
        scope: Scope::Global,
    },
    Binding {
        keys: "v",
        short: None,
        help: "After a simulation: Layout, Tables, Refcounts, Check and Hex show the simulated image (view: simulated, before→after on changed rows), or the file again; c then lists the simulated changes",
        codes: &[((Char('v'), NO), Action::SimView)],
        scope: Scope::Global,
    },
    Binding {
        keys: "C",
        short: None,
        help: "Compare two states guest cluster by guest cluster (active, any snapshot, the simulated image), or find the snapshot the active state is closest to",
        codes: &[((Char('C'), NO), Action::Compare)],
        scope: Scope::Global,
    },
    Binding {
        keys: "?",
        short: Some("help"),
        help: "Show or hide this help (↑/↓, PgUp/PgDn, Home/End scroll it)",
        codes: &[((Char('?'), NO), Action::Help)],
        scope: Scope::Global,
    },
    Binding {
        keys: "Esc",
        short: None,
        help: "Close a popup, the explanation or the tour; cancel a running simulation",
        codes: &[((Esc, NO), Action::Escape)],
        scope: Scope::Global,
    },
    Binding {
        keys: "q/Ctrl-C",
        short: Some("quit"),
        help: "Quit (the terminal is restored)",
        codes: &[
            ((Char('q'), NO), Action::Quit),
            ((Char('c'), CTRL), Action::Quit),
        ],
        scope: Scope::Global,
    },
];

/// Whether a key event is the key `k` of the table. Shift is part of a letter's
/// character, so it only counts for keys that are not characters.
fn matches(ev: &KeyEvent, k: &Key) -> bool {
    if ev.code != k.0 {
        return false;
    }
    let ctrl = |m: KeyModifiers| m.contains(KeyModifiers::CONTROL) || m.contains(KeyModifiers::ALT);
    if ctrl(ev.modifiers) != ctrl(k.1) {
        return false;
    }
    match ev.code {
        Char(_) | BackTab => true,
        _ => ev.modifiers.contains(SHIFT) == k.1.contains(SHIFT),
    }
}

/// The action for a key press in `pane`, if any.
pub fn action_for(key: &KeyEvent, current: Pane) -> Option<Action> {
    KEYMAP
        .iter()
        .filter(|b| b.scope.covers(current))
        .flat_map(|b| b.codes.iter())
        .find(|(k, _)| matches(key, k))
        .map(|(_, a)| *a)
}

/// The action of a key that works in every list (`/`, `N`), for lists that are
/// popups (Changes) and so belong to no pane.
pub fn list_action(key: &KeyEvent) -> Option<Action> {
    KEYMAP
        .iter()
        .filter(|b| matches!(b.scope, Scope::Panes(p) if p == LIST_PANES || p == FIND_PANES))
        .flat_map(|b| b.codes.iter())
        .find(|(k, _)| matches(key, k))
        .map(|(_, a)| *a)
}

/// The footer for a pane: the pane's own keys first, then the global ones. `q`
/// and `?` are last so that they can be kept when the line is too narrow.
pub fn footer(current: Pane) -> Vec<(&'static str, &'static str)> {
    let own = KEYMAP
        .iter()
        .filter(|b| matches!(b.scope, Scope::Panes(_)) && b.scope.covers(current));
    let global = KEYMAP
        .iter()
        .filter(|b| match b.scope {
            Scope::Global => true,
            Scope::GlobalListedIn(ps) => ps.contains(&current),
            Scope::Panes(_) => false,
        })
        .filter(|b| !matches!(b.keys, "?" | "q/Ctrl-C"));
    let last = KEYMAP.iter().filter(|b| matches!(b.keys, "?" | "q/Ctrl-C"));
    own.chain(global)
        .chain(last)
        .filter_map(|b| Some((b.keys, b.short?)))
        .map(|(k, s)| (if k == "q/Ctrl-C" { "q" } else { k }, s))
        .collect()
}

/// Where a binding applies, as the help says it.
pub fn scope_text(s: Scope) -> String {
    match s {
        Scope::Global | Scope::GlobalListedIn(_) => String::new(),
        Scope::Panes(ps) => ps.iter().map(|p| p.name()).collect::<Vec<_>>().join(", "),
    }
}

#[cfg(test)]
mod tests;

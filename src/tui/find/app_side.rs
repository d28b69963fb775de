//! The app's side of a search: which list a key searches, and the functions the
//! keymap's actions call (`/`, Enter, `n`/`N`, `}`/`{`, `u`). The search itself is
//! in the parent module and knows nothing of the app.

use super::{BUDGET, Find, Hidden, MATTERS_BUDGET, Progress, Row, Rows};
use crate::tui::app::{App, Input, InputFor, Popup};
use crate::tui::keymap::LIST_PANES;
use crate::tui::widgets::ListView;
use std::sync::Arc;
use std::time::Instant;

/// The list a search works in: the Changes popup's when it is open (or waits
/// for the prompt), else the current pane's.
fn list(app: &mut App) -> Option<&mut ListView> {
    if let Some(Popup::Changes(v)) = &mut app.popup {
        return Some(v);
    }
    if app.parked.is_some() {
        return app.parked.as_mut();
    }
    app.panes.get_mut(app.pane).list()
}

/// [`list`], to read.
fn list_ref(app: &App) -> Option<&ListView> {
    if let Some(Popup::Changes(v)) = &app.popup {
        return Some(v);
    }
    if app.parked.is_some() {
        return app.parked.as_ref();
    }
    app.panes.get(app.pane).list_ref()
}

/// Whether the search is in the Changes list.
fn in_changes(app: &App) -> bool {
    matches!(app.popup, Some(Popup::Changes(_))) || app.parked.is_some()
}

/// The rows of [`list`].
fn rows(app: &App) -> Option<Box<dyn Rows + '_>> {
    if in_changes(app) {
        // The list shown: the simulation's deltas in the simulated view, else what
        // changed on disk since the previous load.
        let (ch, _) = app.changes_shown()?;
        return Some(Box::new(ChangeRows(ch)));
    }
    app.panes.get(app.pane).rows(&app.ctx)
}

/// What changed on disk: each change's words and numbers, and its cluster.
struct ChangeRows<'a>(&'a [crate::tui::changes::Change]);

impl Rows for ChangeRows<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn row(&self, i: usize, text: bool, out: &mut Row) {
        let Some(c) = self.0.get(i) else { return };
        if let Some(n) = c.cluster {
            out.value(n);
        }
        crate::tui::panes::rows::numbers_in(&c.text, out);
        if text {
            out.words(&c.text);
        }
    }
}

/// Whether the current pane has a list that a search can run in.
pub fn searchable(app: &App) -> bool {
    rows(app).is_some()
}

/// Whether the current list has a search (finished or not).
pub fn active(app: &App) -> bool {
    list_ref(app).is_some_and(|l| l.find.is_some())
}

/// Whether a search is still scanning (the main loop then does not wait for keys).
pub fn running(app: &App) -> bool {
    list_ref(app)
        .and_then(|l| l.find.as_ref())
        .is_some_and(|f| !f.done() || f.jump)
}

/// The Changes popup comes back after its prompt.
fn unpark(app: &mut App) {
    if let Some(v) = app.parked.take() {
        app.popup = Some(Popup::Changes(v));
    }
}

/// `/`: ask for what to find.
pub fn prompt(app: &mut App) {
    if !searchable(app) {
        app.status = format!(
            "/ searches lists (Tables, Refcounts, Snapshots, Check, Simulate, Map); {} shows none now{}",
            app.pane.name(),
            match app.pane {
                crate::tui::ctx::Pane::Check if app.ctx.img.is_some() =>
                    " (the check is still running)",
                crate::tui::ctx::Pane::Simulate => " (run an operation first)",
                _ => "",
            }
        );
        return;
    }
    if let Some(Popup::Changes(v)) = app.popup.take() {
        app.parked = Some(v);
    }
    app.popup = Some(Popup::Input(InputFor::FindInList, Input::default()));
}

/// The prompt's text changed: search for it from the selection (nothing is
/// selected until Enter).
pub fn typed(app: &mut App) {
    let Some(Popup::Input(InputFor::FindInList, input)) = &app.popup else {
        return;
    };
    let text = input.text.clone();
    if let Some(l) = list(app) {
        l.find = Find::new(&text, l.sel);
    }
    step(app);
}

/// Enter in the prompt: select the first match at or after the selection.
pub fn submit(app: &mut App) {
    unpark(app);
    if let Some(l) = list(app)
        && let Some(f) = &mut l.find
    {
        f.jump = true;
    }
    step(app);
    if !running(app)
        && let Some(l) = list(app)
        && let Some(f) = &l.find
        && f.matches().is_empty()
    {
        app.status = f.status(l.sel);
    }
}

/// Esc: forget the search.
pub fn clear(app: &mut App) {
    unpark(app);
    if let Some(l) = list(app) {
        l.find = None;
    }
}

/// Forget every pane's search and hidden rows: after a reload or a switch to
/// or from the simulated view they describe another state of the image.
pub fn forget_all(app: &mut App) {
    unpark(app);
    for &p in LIST_PANES {
        if let Some(l) = app.panes.get_mut(p).list() {
            l.find = None;
            l.hidden = None;
        }
    }
}

/// Go on with the current list's search for one frame's time, and keep the
/// hidden rows up to date with a list that grew.
pub fn step(app: &mut App) {
    let t0 = Instant::now();
    let pane = app.pane;
    refresh_hidden(app);
    loop {
        // A finished search needs no rows: building them (every line of the
        // simulation log, say) each frame would cost for nothing.
        if list(app).is_none_or(|l| l.find.as_ref().is_none_or(|f| f.done && !f.jump)) {
            return;
        }
        let Some(mut f) = list(app).and_then(|l| l.find.take()) else {
            return;
        };
        let skip = list(app).and_then(|l| l.hidden.as_ref().map(|h| h.shown.clone()));
        let more = !in_changes(app) && app.panes.get(pane).can_grow(&app.ctx);
        let (progress, len) = match rows(app) {
            Some(rows) => {
                let left = BUDGET.saturating_sub(t0.elapsed());
                let p = f.step(rows.as_ref(), more, skip.as_deref().map(|v| &v[..]), left);
                (p, rows.len())
            }
            None => (Progress::Done, 0),
        };
        let jump = f.take_jump();
        let Some(l) = list(app) else { return };
        l.find = Some(f);
        if let Some(i) = jump {
            l.set(i, len.max(l.len));
        }
        match progress {
            Progress::NeedRows if t0.elapsed() < BUDGET => {
                let ctx = &app.ctx;
                app.panes.get_mut(pane).grow(ctx);
            }
            _ => return,
        }
    }
}

/// `n`/`N`: the next or previous match.
pub fn next(app: &mut App, forward: bool) {
    let Some(l) = list(app) else { return };
    let Some(f) = &l.find else { return };
    match f.next(l.sel, forward) {
        Some(i) => {
            let len = l.len;
            l.set(i, len);
        }
        None => app.status = f.status(l.sel),
    }
}

/// `}`/`{`: the next or previous row that matters in this list.
pub fn matters(app: &mut App, forward: bool) -> bool {
    let pane = app.pane;
    let state = app.panes.get(pane);
    let Some(rows) = state.rows(&app.ctx) else {
        return false;
    };
    let Some(what) = rows.matters_what() else {
        app.status = format!("no row matters more than another in {}", pane.name());
        return true;
    };
    let Some(l) = state.list_ref() else {
        return false;
    };
    let shown = |i: usize| {
        l.hidden
            .as_ref()
            .is_none_or(|h| h.shown.binary_search(&i).is_ok())
    };
    let (sel, len) = (l.sel, rows.len());
    let t0 = Instant::now();
    let mut hit = None;
    let mut i = sel;
    loop {
        i = match (forward, i) {
            (true, i) if i.saturating_add(1) < len => i + 1,
            (false, i) if i > 0 => i - 1,
            _ => break,
        };
        if shown(i) && rows.matters(i) {
            hit = Some(i);
            break;
        }
        if i.is_multiple_of(4096) && t0.elapsed() > MATTERS_BUDGET {
            break;
        }
    }
    let gave_up = hit.is_none() && i != sel && i != 0 && i.saturating_add(1) < len;
    drop(rows);
    match hit {
        Some(i) => {
            if let Some(l) = list(app) {
                l.set(i, len);
            }
        }
        None if gave_up => {
            app.status = format!("no {what} within the rows looked at; {}", {
                if forward {
                    format!("press }} again to go on from row {i}")
                } else {
                    format!("press {{ again to go on from row {i}")
                }
            });
            if let Some(l) = list(app) {
                l.set(i, len);
            }
        }
        None => {
            app.status = format!(
                "no {what} {} the selection",
                if forward { "after" } else { "before" }
            );
        }
    }
    true
}

/// `u`: hide the rows that hold nothing, or show them again.
pub fn toggle_hidden(app: &mut App) -> bool {
    let pane = app.pane;
    let Some(what) = app
        .panes
        .get(pane)
        .rows(&app.ctx)
        .and_then(|r| r.empty_what())
    else {
        return false;
    };
    // The pane's rows are hidden in the pane's list, even under the Changes popup.
    let Some(l) = app.panes.get_mut(pane).list() else {
        return false;
    };
    if l.hidden.take().is_some() {
        app.status = format!("{what} rows shown again");
    } else {
        l.hidden = Some(Hidden {
            shown: Arc::new(Vec::new()),
            of: 0,
            id: u64::MAX,
            what,
            seen: None,
            builds: 0,
        });
        refresh_hidden(app);
    }
    // A search counts only the rows shown: look again.
    if let Some(l) = list(app)
        && let Some(f) = l.find.take()
    {
        l.find = Find::new(&f.query, l.sel);
        step(app);
    }
    true
}

/// Bring the list of shown rows up to date with rows that appeared (the Map
/// grows) or a list that changed length (a reload, another table).
///
/// Building a pane's rows can cost (a table read, every line of a log), so
/// nothing is looked at while no event came and the list kept its length. The
/// shown rows are the pane's own (not the Changes popup's, even while it is
/// open) and are updated where they are: rows that appeared are added to them.
fn refresh_hidden(app: &mut App) {
    let pane = app.pane;
    let events = app.events;
    let Some(l) = app.panes.get_mut(pane).list() else {
        return;
    };
    let drawn = l.len;
    let Some(mut h) = l.hidden.take() else {
        return;
    };
    if h.seen == Some((events, drawn)) {
        l.hidden = Some(h);
        return;
    }
    let changed = match app.panes.get(pane).rows(&app.ctx) {
        Some(rows) => {
            h.builds = h.builds.saturating_add(1);
            let (len, id) = (rows.len(), rows.id());
            let changed = len != h.of || id != h.id;
            if changed {
                let from = if len > h.of && id == h.id { h.of } else { 0 };
                let shown = Arc::make_mut(&mut h.shown);
                if from == 0 {
                    shown.clear();
                }
                shown.extend((from..len).filter(|i| !rows.empty(*i)));
                (h.of, h.id) = (len, id);
            }
            Some(changed)
        }
        None => None,
    };
    let Some(l) = app.panes.get_mut(pane).list() else {
        return;
    };
    let of = h.of;
    l.hidden = Some(h);
    let Some(changed) = changed else { return };
    if changed {
        let len = l.len.max(of);
        l.keep_shown(len);
    }
    let drawn = l.len;
    if let Some(h) = &mut l.hidden {
        h.seen = Some((events, drawn));
    }
}

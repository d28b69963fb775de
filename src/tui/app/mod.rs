//! The TUI's state and its update function (the Elm shape: state, actions,
//! update, view). `App` keeps the shared context, the panes' states, the current
//! pane, popups, the tour and the jump history; panes ask for everything else with
//! effects, which [`App::update`] applies in order. Slow, whole-image work runs on
//! worker threads and reports back over a channel, so no key ever waits for it.
//!
//! Here: the state, loading and moving along the history. The update function
//! is in `update`, the text prompts in `input`, the worker threads in `workers`
//! and the Compare popup in `compare`.

mod compare;
mod input;
mod update;
mod workers;

pub use input::{Input, InputFor};
pub use workers::Bg;

use super::ctx::Ctx;
use super::ctx::Pane;
use super::history::{History, Place};
use super::panes::Panes;
use super::widgets::ListView;
use ratatui::layout::Rect;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::SystemTime;

/// Options from the command line.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Capture the mouse.
    pub mouse: bool,
    /// Reload when the file changes.
    pub watch: bool,
    /// The passphrase of an encrypted image.
    pub passphrase: crate::cli::secret::Passphrase,
}

/// A window drawn over the panes (help, the Changes list, Compare, ...), which
/// takes the keys while it is open.
#[derive(Clone, Debug)]
pub enum Popup {
    /// Key help, and how far it is scrolled.
    Help(ListView),
    /// Text input.
    Input(InputFor, Input),
    /// What changed on disk since the previous load.
    Changes(ListView),
    /// Two states compared (the state is [`App::compare`]).
    Compare,
}

/// Screen areas remembered for mouse hit-testing.
#[derive(Clone, Debug, Default)]
pub struct Areas {
    /// Each tab's area.
    pub tabs: Vec<(Rect, Pane)>,
    /// The pane's area.
    pub pane: Rect,
}

/// A simulation on a worker thread.
struct SimJob {
    id: u64,
    cancel: Arc<AtomicBool>,
}

/// Everything on screen.
pub struct App {
    /// The command line's options for the viewer (mouse, watch, passphrase).
    pub opts: Options,
    /// The shared context.
    pub ctx: Ctx,
    /// Each pane's own state.
    pub panes: Panes,
    /// The current pane.
    pub pane: Pane,
    /// The popup open over the panes, if any.
    pub popup: Option<Popup>,
    /// Guided tour step.
    pub tour: Option<usize>,
    /// Places left by jumps (Backspace returns) and gone back from (Ctrl-I).
    pub history: History,
    /// Explanation panel on, and its scroll.
    pub explain: bool,
    /// The explanation panel's scroll.
    pub explain_view: ListView,
    /// Quit requested.
    pub quit: bool,
    /// Status line.
    pub status: String,
    /// Mouse areas.
    pub areas: Areas,
    /// File modification time at load.
    pub mtime: Option<SystemTime>,
    /// The state the last load recorded.
    pub recorded: Option<super::changes::State>,
    /// What changed between the two last loads (None before a second load).
    pub changes: Option<Vec<super::changes::Change>>,
    /// What the comparison could not cover.
    pub changes_limits: Option<String>,
    /// The Changes list while `/` asks what to find in it.
    pub parked: Option<ListView>,
    /// The Compare view.
    pub compare: super::compare::State,
    cmp_job: Option<SimJob>,
    sim_job: Option<SimJob>,
    jobs: u64,
    tx: Sender<Bg>,
    rx: Receiver<Bg>,
    generation: u64,
    /// Counts what can change a list's rows: a key or click, an effect, a
    /// worker's message, a reload. `u`'s hidden rows are worked out again only
    /// when it (or the list's length) moved since they were. One event counts
    /// once, whatever it sets off ([`App::event`]).
    pub events: u64,
    /// Inside [`App::event`]: what happens now is part of an event already counted.
    in_event: bool,
}

impl App {
    /// Open `path` and start the background work.
    pub fn new(path: PathBuf, opts: Options) -> App {
        let passphrase = opts.passphrase.clone();
        let (tx, rx) = channel();
        let mut app = App {
            opts,
            ctx: Ctx::open(path, None, passphrase),
            panes: Panes::default(),
            pane: Pane::Overview,
            popup: None,
            tour: None,
            history: History::default(),
            explain: false,
            explain_view: ListView::default(),
            quit: false,
            status: String::new(),
            areas: Areas::default(),
            mtime: None,
            recorded: None,
            changes: None,
            changes_limits: None,
            parked: None,
            compare: super::compare::State::default(),
            cmp_job: None,
            sim_job: None,
            jobs: 0,
            tx,
            rx,
            generation: 0,
            events: 0,
            in_event: false,
        };
        app.mtime = std::fs::metadata(&app.ctx.path)
            .and_then(|m| m.modified())
            .ok();
        let files = app.ctx.chain_files();
        if files.len() > 1 {
            app.ctx.layer = Some((0, files));
        }
        app.start_background();
        app
    }

    /// Show the next layer of the backing chain (after the last, the top again):
    /// every pane then reads that file, as if it had been opened on its own.
    pub fn next_layer(&mut self) {
        let Some((i, files)) = self.ctx.layer.clone() else {
            self.status = "this image has no backing file: it is the only layer".into();
            return;
        };
        let j = (i + 1) % files.len().max(1);
        let Some(path) = files.get(j).cloned() else {
            return;
        };
        self.ctx.path = path;
        self.ctx.view_snapshot = None;
        self.ctx.report = None;
        self.ctx.previous = None;
        // Another file: nothing to compare with the previous load.
        self.recorded = None;
        self.changes = None;
        self.changes_limits = None;
        self.panes.tables = Default::default();
        self.panes.layout = Default::default();
        self.panes.refcounts = Default::default();
        self.panes.hex = Default::default();
        // Places remembered in another file would show this one's bytes.
        self.history = History::default();
        self.ctx.layer = Some((j, files));
        self.load();
        self.status = format!(
            "now showing {}: L for the next layer",
            self.ctx.layer_name().unwrap_or_default()
        );
    }

    /// Count one event in [`App::events`] and do what it does: the actions, effects
    /// and reloads it sets off are that same event, so a key counts once.
    pub fn event<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        if self.in_event {
            return f(self);
        }
        self.events = self.events.wrapping_add(1);
        self.in_event = true;
        let r = f(self);
        self.in_event = false;
        r
    }

    /// (Re)open the image and restart the background work.
    pub fn load(&mut self) {
        self.event(Self::load_now);
    }

    fn load_now(&mut self) {
        self.generation += 1;
        let previous = self
            .ctx
            .report
            .as_ref()
            .map(|r| (r.corruptions, r.leaks, r.check_errors))
            .or(self.ctx.previous);
        self.mtime = std::fs::metadata(&self.ctx.path)
            .and_then(|m| m.modified())
            .ok();
        // The viewed snapshot: its ID and name, and which of the records with
        // that ID and name it is (records shift when an earlier one is deleted).
        let viewed = self.ctx.view_snapshot.and_then(|i| {
            let snaps = &self.ctx.img.as_ref()?.snapshots.snapshots;
            let s = snaps.get(i)?;
            let nth = snaps
                .iter()
                .take(i)
                .filter(|t| t.id == s.id && t.name == s.name)
                .count();
            Some((s.id.clone(), s.name.clone(), nth))
        });
        let mut ctx = Ctx::open(
            self.ctx.path.clone(),
            self.ctx.view_snapshot,
            self.opts.passphrase.clone(),
        );
        let same = match (&viewed, ctx.viewed()) {
            (Some((id, name, _)), Some(s)) => s.id == *id && s.name == *name,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if !same {
            // Follow the snapshot to its record in the new table.
            let moved = viewed.as_ref().and_then(|(id, name, nth)| {
                let snaps = &ctx.img.as_ref()?.snapshots.snapshots;
                let mut same_pair = snaps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.id == *id && s.name == *name);
                same_pair.nth(*nth).map(|(j, _)| j)
            });
            ctx.view_snapshot = moved;
            ctx.open_chain();
        }
        // A viewed snapshot that is gone (deleted while --watch showed it), or
        // whose L1 table cannot be read now: back to the active L1, and say so.
        if viewed.is_some() && (ctx.view_snapshot.is_none() || ctx.view().is_none()) {
            let gone = ctx.view_snapshot.is_none();
            self.status = format!(
                "snapshot {} {}: back to the active L1 table",
                viewed.map(|(id, _, _)| id).unwrap_or_default(),
                if gone {
                    "no longer exists in the file"
                } else {
                    "has an L1 table that cannot be read now"
                }
            );
            ctx.view_snapshot = None;
            ctx.open_chain();
        }
        ctx.previous = previous;
        ctx.layer = self.ctx.layer.clone();
        self.ctx = ctx;
        super::find::forget_all(self);
        // A comparison of the state loaded before is not one of this state.
        if let Some(j) = self.cmp_job.take() {
            j.cancel.store(true, Ordering::Relaxed);
        }
        self.compare = super::compare::State::default();
        self.panes.snapshots.diff = None;
        self.panes.snapshots.diff_running = false;
        self.panes.snapshots.marked.clear();
        self.panes.layout.looking = None;
        self.start_background();
    }

    /// What the Changes view lists, and what it compares: in the simulated view
    /// the simulation's deltas, otherwise what changed on disk between two loads.
    pub fn changes_shown(&self) -> Option<(&[super::changes::Change], &'static str)> {
        changes_shown(&self.ctx, &self.changes)
    }

    /// With --watch: reload when the file's modification time changes, once
    /// it has not changed for [`WATCH_QUIET`]. A command such as `qemu-img
    /// snapshot -c` writes the file several times, with flushes between; a
    /// load in the middle would read half of its changes, and the next load
    /// would show the other half as if they were all that changed.
    pub fn check_watch(&mut self) {
        if !self.opts.watch {
            return;
        }
        let now = std::fs::metadata(&self.ctx.path)
            .and_then(|m| m.modified())
            .ok();
        if now == self.mtime {
            return;
        }
        if now.is_some_and(|m| still_being_written(m, SystemTime::now())) {
            self.status = format!(
                "the file is changing on disk: reloading once it has not changed for {} ms",
                WATCH_QUIET.as_millis()
            );
            return;
        }
        self.status = "the file changed on disk: reloaded".into();
        self.load();
    }

    fn switch(&mut self, p: Pane) {
        if p != self.pane {
            self.pane = p;
            self.explain_view = ListView::default();
        }
    }

    /// Where the viewer is now.
    pub fn place(&self) -> Place {
        Place::of(&self.panes, self.pane)
    }

    /// Show a remembered place.
    fn show(&mut self, p: Place) {
        let pane = p.pane;
        p.restore(&mut self.panes);
        self.switch(pane);
    }

    /// Back to the place before the last jump.
    pub fn go_back(&mut self) {
        match self.history.back(self.place()) {
            Some(p) => self.show(p),
            None => self.status = "nothing to go back to".into(),
        }
    }

    /// Forward again to the place gone back from.
    pub fn go_forward(&mut self) {
        match self.history.forward(self.place()) {
            Some(p) => self.show(p),
            None => self.status = "nothing to go forward to".into(),
        }
    }
}

/// What the Changes view lists: in the simulated view the simulation's deltas,
/// otherwise what changed on disk between the two last loads.
pub fn changes_shown<'a>(
    ctx: &'a Ctx,
    changes: &'a Option<Vec<super::changes::Change>>,
) -> Option<(&'a [super::changes::Change], &'static str)> {
    match (&ctx.simulated, ctx.simulated_view()) {
        (Some(s), true) => Some((&s.changes, "the simulation")),
        _ => changes.as_deref().map(|c| (c, "the previous load")),
    }
}

/// Numbers as on the command line: decimal, 0x-hex, k/M/G/T suffixes.
pub fn parse_number(s: &str) -> Result<u64, String> {
    crate::cli::num::parse_size(s)
}

/// How long the file must have gone unchanged before `--watch` reloads it.
pub const WATCH_QUIET: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether a file last modified at `mtime` may still be in the middle of a
/// write at `now`: it changed less than [`WATCH_QUIET`] ago. A time further in
/// the future than that was set by hand (`touch -d`), not by a write going on.
pub fn still_being_written(mtime: SystemTime, now: SystemTime) -> bool {
    match now.duration_since(mtime) {
        Ok(age) => age < WATCH_QUIET,
        Err(e) => e.duration() <= WATCH_QUIET,
    }
}

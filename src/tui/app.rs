//! The TUI's state and its update function (the Elm shape: state, actions,
//! update, view). `App` keeps the shared context, the panes' states, the current
//! pane, popups, the tour and the jump history; panes ask for everything else with
//! effects, which [`App::update`] applies in order. Slow, whole-image work runs on
//! worker threads and reports back over a channel, so no key ever waits for it.

use super::ctx::{Ctx, Effect, Job, OffsetKind, Pane};
use super::history::{History, Place};
use super::keymap::Action;
use super::panes::Panes;
use super::panes::simulate::Outcome;
use super::panes::snapshots::Diff;
use super::widgets::ListView;
use qinspect::check::{CheckOptions, CheckReport, Progress, check};
use qinspect::image::Qcow2;
use qinspect::simulate::{Op, Sim};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
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

/// Messages from worker threads, tagged with the load they belong to.
pub enum Bg {
    /// Check progress.
    Progress(&'static str, u64, u64, u64),
    /// The check finished.
    Checked(Box<CheckReport>, u64),
    /// Roles of the first clusters.
    Roles(Vec<u16>, u64),
    /// The comparison of two snapshots.
    Diff(Diff, u64),
    /// Simulation progress (job id, phase, done, total).
    SimProgress(u64, String, u64, u64),
    /// A simulation finished (job id).
    Simulated(u64, Result<Outcome, String>),
    /// The state recorded right after a load opened the file.
    Recorded(Box<super::changes::State>, u64),
    /// Who references a cluster: cluster, referrers, roles.
    Lookup(u64, Vec<qinspect::check::Referrer>, String, u64),
    /// Compare progress (job id, done, total).
    CompareProgress(u64, u64, u64),
    /// A comparison finished (job id, the sides, the result).
    Compared(
        u64,
        super::compare::Choice,
        super::compare::Choice,
        Result<qinspect::compare::Comparison, String>,
    ),
    /// The snapshots ranked by distance from the active state (job id).
    Ranked(u64, Result<Vec<qinspect::compare::Distance>, String>),
}

/// What a line-editing popup is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputFor {
    /// An offset to jump to.
    Goto,
    /// A simulate operation.
    Simulate,
    /// What to find in the current list.
    FindInList,
    /// Bytes or text to find in Hex.
    HexSearch,
}

/// A one-line text field with a cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Input {
    /// The text.
    pub text: String,
    /// The cursor, in characters.
    pub cursor: usize,
}

impl Input {
    /// A field holding `text`, the cursor at its end.
    pub fn new(text: String) -> Input {
        let cursor = text.chars().count();
        Input { text, cursor }
    }

    fn byte(&self, c: usize) -> usize {
        self.text
            .char_indices()
            .nth(c)
            .map_or(self.text.len(), |(i, _)| i)
    }

    /// Edit with one key: characters are inserted at the cursor, Ctrl-U clears,
    /// ←/→/Home/End move, Backspace/Delete remove; other control keys do nothing.
    pub fn key(&mut self, k: &KeyEvent) {
        let ctrl =
            k.modifiers.contains(KeyModifiers::CONTROL) || k.modifiers.contains(KeyModifiers::ALT);
        let n = self.text.chars().count();
        match k.code {
            KeyCode::Char('u') if ctrl => {
                self.text.clear();
                self.cursor = 0;
            }
            KeyCode::Char('a') if ctrl => self.cursor = 0,
            KeyCode::Char('e') if ctrl => self.cursor = n,
            KeyCode::Char(_) if ctrl => {}
            KeyCode::Char(c) => {
                let at = self.byte(self.cursor);
                self.text.insert(at, c);
                self.cursor += 1;
            }
            KeyCode::Backspace if self.cursor > 0 => {
                let at = self.byte(self.cursor - 1);
                self.text.remove(at);
                self.cursor -= 1;
            }
            KeyCode::Delete if self.cursor < n => {
                let at = self.byte(self.cursor);
                self.text.remove(at);
            }
            KeyCode::Left => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Right => self.cursor = (self.cursor + 1).min(n),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = n,
            _ => {}
        }
    }
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
    /// when it (or the list's length) moved since they were.
    pub events: u64,
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

    /// (Re)open the image and restart the background work.
    pub fn load(&mut self) {
        self.generation += 1;
        self.events = self.events.wrapping_add(1);
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

    fn start_background(&mut self) {
        let Some(img) = self.ctx.img.clone() else {
            self.ctx.progress = None;
            return;
        };
        let generation = self.generation;
        let tx = self.tx.clone();
        self.ctx.progress = Some(("starting", 0, 1));
        std::thread::spawn(move || {
            // First what is on disk now (to compare with the next load), which
            // also gives Layout its colours.
            let state = super::changes::record(&img);
            let _ = tx.send(Bg::Roles(state.roles.clone(), generation));
            let _ = tx.send(Bg::Recorded(Box::new(state), generation));
            let ptx = tx.clone();
            let tick = move |p: Progress| {
                let _ = ptx.send(Bg::Progress(p.phase, p.done, p.total, generation));
            };
            let report = check(
                &img,
                &CheckOptions {
                    progress: Some(&tick),
                    ..Default::default()
                },
            );
            let _ = tx.send(Bg::Checked(Box::new(report), generation));
        });
    }

    /// Take in what the workers reported.
    pub fn poll_background(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            self.receive(msg);
        }
        super::find::step(self);
        self.panes.hex.poll();
    }

    fn receive(&mut self, msg: Bg) {
        self.events = self.events.wrapping_add(1);
        let current = |id: u64| self.sim_job.as_ref().is_some_and(|j| j.id == id);
        match msg {
            // The file's own check and roles, even while the simulated view
            // has put them aside.
            Bg::Progress(phase, done, total, g) if g == self.generation => self.on_disk(|c| {
                if c.report.is_none() {
                    c.progress = Some((phase, done, total));
                }
            }),
            Bg::Checked(r, g) if g == self.generation => self.on_disk(|c| {
                c.progress = None;
                c.report = Some(Arc::from(r));
            }),
            Bg::Roles(r, g) if g == self.generation => {
                self.on_disk(|c| c.roles = Some(Arc::new(r)))
            }
            Bg::Recorded(st, g) if g == self.generation => self.recorded_state(*st),
            Bg::Diff(d, g) if g == self.generation => self.panes.snapshots.diffed(d),
            Bg::Lookup(c, refs, roles, g) if g == self.generation => {
                self.panes.layout.looked_up(c, refs, roles)
            }
            Bg::SimProgress(id, phase, done, total) if current(id) => {
                self.panes.simulate.progress(phase, done, total)
            }
            Bg::CompareProgress(id, done, total) if self.cmp_is(id) => {
                if let Some(r) = &mut self.compare.running {
                    r.1 = done;
                    r.2 = total;
                }
            }
            Bg::Compared(id, a, b, r) if self.cmp_is(id) => {
                self.cmp_job = None;
                self.compare.running = None;
                self.compare.rows = ListView::default();
                self.compare.shown = match r {
                    Ok(c) => super::compare::Shown::Compared(a, b, Arc::new(c)),
                    Err(e) => super::compare::Shown::Failed(e),
                };
            }
            Bg::Ranked(id, r) if self.cmp_is(id) => {
                self.cmp_job = None;
                self.compare.running = None;
                self.compare.rows = ListView::default();
                self.compare.shown = match r {
                    Ok(d) => super::compare::Shown::Closest(Arc::new(d)),
                    Err(e) => super::compare::Shown::Failed(e),
                };
            }
            Bg::Simulated(id, r) if current(id) => {
                self.sim_job = None;
                let shown = self.ctx.simulated_view();
                let _ = self.ctx.set_simulated_view(false);
                self.ctx.simulated = r.as_ref().ok().and_then(|o| o.simulated.clone());
                if shown && self.ctx.set_simulated_view(true).is_err() {
                    self.status =
                        "the new simulation has no image to show: back to the file".into();
                }
                self.panes.simulate.finished(r);
            }
            _ => {}
        }
    }

    /// What the Changes view lists, and what it compares: in the simulated view
    /// the simulation's deltas, otherwise what changed on disk between two loads.
    pub fn changes_shown(&self) -> Option<(&[super::changes::Change], &'static str)> {
        changes_shown(&self.ctx, &self.changes)
    }

    fn cmp_is(&self, id: u64) -> bool {
        self.cmp_job.as_ref().is_some_and(|j| j.id == id)
    }

    /// A key in the Compare view: [/] side A, ←/→ side B, ↑/↓ rows, Enter
    /// compares (on a row of a current result: traces it), Space ranks the
    /// snapshots, Esc cancels the worker or closes.
    pub fn compare_key(&mut self, k: &KeyEvent) {
        use super::compare::{Choice, Shown, choices};
        let n = choices(&self.ctx).len();
        let len = self.compare.len();
        let ch = choices(&self.ctx);
        let (a, b) = (
            ch.get(self.compare.a).cloned().unwrap_or(Choice::Active),
            ch.get(self.compare.b).cloned().unwrap_or(Choice::Active),
        );
        match k.code {
            KeyCode::Esc => {
                if let Some(j) = self.cmp_job.take() {
                    j.cancel.store(true, Ordering::Relaxed);
                    self.compare.running = None;
                    self.status = "comparison cancelled".into();
                } else {
                    self.popup = None;
                }
            }
            KeyCode::Char('C') | KeyCode::Char('c') if self.cmp_job.is_none() => self.popup = None,
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('[') => self.compare.cycle(false, false, n),
            KeyCode::Char(']') => self.compare.cycle(false, true, n),
            KeyCode::Left | KeyCode::Char('h') => self.compare.cycle(true, false, n),
            KeyCode::Right | KeyCode::Char('l') => self.compare.cycle(true, true, n),
            KeyCode::Char(' ') => self.start_closest(),
            KeyCode::Enter => match &self.compare.shown {
                Shown::Compared(x, y, c) if *x == a && *y == b && len > 0 => {
                    if let Some(r) = c.rows.get(self.compare.rows.sel) {
                        let g = r.guest.get();
                        self.popup = None;
                        self.apply(Effect::Trace(g));
                    }
                }
                Shown::Closest(d) if len > 0 => {
                    if let Some(x) = d.get(self.compare.rows.sel) {
                        let id = x.id.clone();
                        self.compare.a = 0;
                        self.compare.b = ch
                            .iter()
                            .position(|c| *c == Choice::Snapshot(id.clone()))
                            .unwrap_or(0);
                        self.start_compare();
                    }
                }
                _ => self.start_compare(),
            },
            code => {
                let a = match code {
                    KeyCode::Up | KeyCode::Char('k') => Action::Up,
                    KeyCode::Down | KeyCode::Char('j') => Action::Down,
                    KeyCode::PageUp => Action::PageUp,
                    KeyCode::PageDown => Action::PageDown,
                    KeyCode::Home => Action::Home,
                    KeyCode::End => Action::End,
                    _ => return,
                };
                self.compare.rows.select(a, len);
            }
        }
    }

    fn new_cmp_job(&mut self, what: String) -> (u64, Arc<AtomicBool>) {
        if let Some(j) = self.cmp_job.take() {
            j.cancel.store(true, Ordering::Relaxed);
        }
        self.jobs += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        self.cmp_job = Some(SimJob {
            id: self.jobs,
            cancel: cancel.clone(),
        });
        self.compare.running = Some((what, 0, 1));
        (self.jobs, cancel)
    }

    /// Compare the two chosen states on a worker.
    pub fn start_compare(&mut self) {
        use super::compare::{Choice, choices, pick};
        let ch = choices(&self.ctx);
        let a = ch.get(self.compare.a).cloned().unwrap_or(Choice::Active);
        let b = ch.get(self.compare.b).cloned().unwrap_or(Choice::Active);
        let (pa, pb) = match (pick(&a, &self.ctx), pick(&b, &self.ctx)) {
            (Ok(x), Ok(y)) => (x, y),
            (Err(e), _) | (_, Err(e)) => {
                self.compare.shown = super::compare::Shown::Failed(e);
                return;
            }
        };
        let (id, cancel) = self.new_cmp_job(format!("comparing {} with {}", pa.name, pb.name));
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let tick = compare_tick(id, tx.clone(), cancel.clone());
            let r = (|| -> qinspect::Result<qinspect::compare::Comparison> {
                let (sa, sb) = (pa.side()?, pb.side()?);
                qinspect::compare::compare(
                    &sa,
                    &sb,
                    &qinspect::compare::Options {
                        progress: Some(&tick),
                        ..Default::default()
                    },
                )
            })();
            if !cancel.load(Ordering::Relaxed) {
                let _ = tx.send(Bg::Compared(id, a, b, r.map_err(|e| e.to_string())));
            }
        });
    }

    /// Rank the snapshots by distance from the active state, on a worker.
    pub fn start_closest(&mut self) {
        let Some(img) = self.ctx.disk_img() else {
            self.compare.shown = super::compare::Shown::Failed(self.ctx.unopened());
            return;
        };
        let (id, cancel) =
            self.new_cmp_job("comparing the active state with every snapshot".into());
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let tick = compare_tick(id, tx.clone(), cancel.clone());
            let r = qinspect::compare::closest(&img, Some(&tick));
            if !cancel.load(Ordering::Relaxed) {
                let _ = tx.send(Bg::Ranked(id, r.map_err(|e| e.to_string())));
            }
        });
    }

    /// Change the file's own state, whichever view is shown.
    fn on_disk(&mut self, f: impl FnOnce(&mut Ctx)) {
        let shown = self.ctx.simulated_view();
        let _ = self.ctx.set_simulated_view(false);
        f(&mut self.ctx);
        if shown {
            let _ = self.ctx.set_simulated_view(true);
        }
    }

    /// Toggle the simulated view: Layout, Tables, Refcounts, Check and Hex show the
    /// simulated image, or the file again.
    pub fn toggle_simulated(&mut self) {
        let on = !self.ctx.simulated_view();
        let r = self.ctx.set_simulated_view(on);
        if r.is_ok() {
            // What was looked up in the other state is not true in this one.
            self.panes.layout.detail = None;
            self.panes.layout.looking = None;
            self.panes.hex.cancel_search();
            super::find::forget_all(self);
        }
        match r {
            Ok(()) if on => {
                let n = self.ctx.simulated.as_ref().map_or(0, |s| s.changes.len());
                self.panes.tables.open(None, &self.ctx);
                self.panes.tables.l1 = ListView::default();
                self.status = format!(
                    "view: simulated — Layout, Tables, Refcounts, Check and Hex show the image after the operations ({n} change(s), c lists them; v: back to the file)"
                );
            }
            Ok(()) => {
                self.panes.tables.open(None, &self.ctx);
                self.panes.tables.l1 = ListView::default();
                self.status = "back to the file as it is on disk".into();
            }
            Err(e) => self.status = e,
        }
    }

    /// A load's record came back: compare it with the previous one.
    fn recorded_state(&mut self, new: super::changes::State) {
        if let (Some(old), Some(img)) = (self.recorded.take(), self.ctx.img.as_ref()) {
            let ch = super::changes::compare(&old, &new, &img.geometry());
            self.changes_limits = super::changes::limits(&old, &new);
            let rc = ch.iter().filter(|c| c.cluster.is_some()).count();
            let said = if ch.is_empty() {
                "nothing changed on disk since the previous load".to_string()
            } else {
                format!(
                    "{rc} refcount(s) and {} table entries changed on disk — c: what changed",
                    ch.len() - rc
                )
            };
            // What the reload itself said (a snapshot view that is gone) stays.
            self.status = match self.status.as_str() {
                "" | "reloaded" | "the file changed on disk: reloaded" => {
                    format!("reloaded: {said}")
                }
                s => format!("{s} · {said}"),
            };
            self.changes = Some(ch);
        }
        self.recorded = Some(new);
    }

    /// Whether a worker is still busy (tests wait for it).
    #[cfg(test)]
    pub fn busy(&self) -> bool {
        self.ctx.img.is_some()
            && (self.ctx.report.is_none() || self.ctx.roles.is_none() || self.recorded.is_none())
            || self.panes.snapshots.diff_running
            || self.panes.layout.looking.is_some()
            || self.sim_job.is_some()
            || self.panes.hex.searching()
            || self.cmp_job.is_some()
    }

    /// Wait for the background work (tests).
    #[cfg(test)]
    pub fn wait_background(&mut self) {
        self.panes.hex.wait_search();
        while self.busy() {
            match self.rx.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(msg) => self.receive(msg),
                Err(_) => break,
            }
        }
    }

    /// With --watch: reload when the file's modification time changes.
    pub fn check_watch(&mut self) {
        if !self.opts.watch {
            return;
        }
        let now = std::fs::metadata(&self.ctx.path)
            .and_then(|m| m.modified())
            .ok();
        if now != self.mtime {
            self.status = "the file changed on disk: reloaded".into();
            self.load();
        }
    }

    /// Handle a key while a text field is open.
    pub fn input_key(&mut self, k: &KeyEvent) {
        let Some(Popup::Input(purpose, input)) = &mut self.popup else {
            return;
        };
        match k.code {
            KeyCode::Esc if *purpose == InputFor::FindInList => {
                self.popup = None;
                super::find::clear(self);
            }
            KeyCode::Esc => self.popup = None,
            KeyCode::Enter if *purpose == InputFor::FindInList => {
                self.popup = None;
                super::find::submit(self);
            }
            _ if *purpose == InputFor::FindInList => {
                input.key(k);
                super::find::typed(self);
            }
            KeyCode::Enter => {
                let (purpose, text) = (purpose.clone(), input.text.trim().to_string());
                self.popup = None;
                match purpose {
                    InputFor::Goto => self.goto(&text),
                    InputFor::Simulate if !text.is_empty() => {
                        self.apply(Effect::Start(Job::Simulate(text)))
                    }
                    InputFor::Simulate | InputFor::FindInList => {}
                    InputFor::HexSearch => self.panes.hex.start_search(&text, &self.ctx),
                }
            }
            _ => input.key(k),
        }
    }

    /// Apply one action.
    pub fn update(&mut self, action: Action) {
        self.events = self.events.wrapping_add(1);
        if let Some(Popup::Help(v)) = &mut self.popup {
            match action {
                Action::Help | Action::Escape => self.popup = None,
                Action::Quit => self.quit = true,
                a => {
                    v.scroll(a);
                }
            }
            return;
        }
        if let Some(Popup::Changes(v)) = &mut self.popup {
            let shown = changes_shown(&self.ctx, &self.changes).map(|(c, _)| c);
            let n = shown.map_or(0, |c| c.len());
            let searching = v.find.is_some();
            match action {
                Action::Escape if searching => v.find = None,
                Action::FindInList => super::find::prompt(self),
                Action::NextStep | Action::PrevStep | Action::PrevMatch if searching => {
                    super::find::next(self, action == Action::NextStep)
                }
                Action::Changes | Action::Escape => self.popup = None,
                Action::Quit => self.quit = true,
                Action::Enter => {
                    let c = shown.and_then(|c| c.get(v.sel)).cloned();
                    if let Some(e) = c.as_ref().and_then(super::changes::follow) {
                        self.popup = None;
                        self.apply(e);
                    }
                }
                a => {
                    v.select(a, n);
                }
            }
            return;
        }
        self.status.clear();
        match action {
            Action::Quit => self.quit = true,
            Action::Pane(p) => self.switch(p),
            Action::NextPane => self.switch(self.pane.cycle(true)),
            Action::PrevPane => self.switch(self.pane.cycle(false)),
            Action::Help => self.popup = Some(Popup::Help(ListView::default())),
            Action::Escape if self.sim_job.is_none() && super::find::active(self) => {
                super::find::clear(self);
            }
            Action::Escape => {
                if self.panes.simulate.cancel() {
                    if let Some(j) = self.sim_job.take() {
                        j.cancel.store(true, Ordering::Relaxed);
                    }
                    self.status = "simulation cancelled".into();
                } else if self.panes.hex.cancel_search() {
                    self.status = "search cancelled".into();
                } else {
                    self.explain = false;
                    self.tour = None;
                }
            }
            Action::Explain => {
                self.explain = !self.explain;
                self.explain_view = ListView::default();
            }
            Action::ExplainUp | Action::ExplainDown if self.explain || self.tour.is_some() => {
                self.explain_view.scroll(action);
            }
            Action::Reload => {
                self.load();
                self.status = "reloaded".into();
            }
            Action::Goto => {
                self.popup = Some(Popup::Input(InputFor::Goto, Input::default()));
            }
            Action::Tour => super::tour::start(self),
            Action::HistoryForward => self.go_forward(),
            Action::Layer => self.next_layer(),
            Action::SimView => self.toggle_simulated(),
            Action::Compare => self.popup = Some(Popup::Compare),
            Action::Changes => match self.changes_shown() {
                Some(_) => self.popup = Some(Popup::Changes(ListView::default())),
                None => {
                    self.status =
                        "nothing to compare yet: after r or a --watch reload, c lists what changed on disk".into()
                }
            },
            Action::NextStep | Action::PrevStep if self.tour.is_some() => {
                super::tour::step(self, action == Action::NextStep);
            }
            // While a search is on, n/p (and N) move between its matches.
            Action::NextStep | Action::PrevStep if super::find::active(self) => {
                super::find::next(self, action == Action::NextStep);
            }
            Action::PrevMatch => super::find::next(self, false),
            // In Hex, `/` finds bytes in the file: the pane asks for them.
            Action::FindInList if self.pane == Pane::Hex => {
                let mut q = Vec::new();
                let _ = self
                    .panes
                    .get_mut(self.pane)
                    .handle(Action::Find, &self.ctx, &mut q);
                self.apply_all(q);
            }
            Action::FindInList => super::find::prompt(self),
            Action::NextMatters | Action::PrevMatters
                if super::find::matters(self, action == Action::NextMatters) => {}
            Action::HideEmpty if super::find::toggle_hidden(self) => {}
            // Backspace goes back along the history; with none, it backs out of
            // the pane's current level.
            Action::Back if !self.history.back.is_empty() => self.go_back(),
            a => {
                // Enter that drills in inside a pane (an L1 entry's L2 table) is a
                // step of the history too.
                let from = (a == Action::Enter).then(|| self.place());
                let mut q = Vec::new();
                let _ = self.panes.get_mut(self.pane).handle(a, &self.ctx, &mut q);
                let jumps = q.iter().any(Effect::is_jump);
                self.apply_all(q);
                if let Some(from) = from
                    && !jumps
                {
                    let to = self.place();
                    self.history.jumped(from, &to);
                }
            }
        }
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

    /// Apply effects in order.
    pub fn apply_all(&mut self, q: Vec<Effect>) {
        for e in q {
            self.apply(e);
        }
    }

    /// Apply one effect. A jump remembers the place it leaves.
    pub fn apply(&mut self, e: Effect) {
        self.events = self.events.wrapping_add(1);
        let jumps = e.is_jump();
        let from = jumps.then(|| self.place());
        self.apply_effect(e);
        if let Some(from) = from {
            let to = self.place();
            self.history.jumped(from, &to);
        }
    }

    fn apply_effect(&mut self, e: Effect) {
        match e {
            Effect::ShowHost {
                offset,
                label,
                mark,
                src,
            } => {
                self.panes.hex.show(offset, label, mark, src);
                self.switch(Pane::Hex);
            }
            Effect::Trace(off) => {
                match self.panes.trace.run(off, &self.ctx) {
                    Ok(()) => {}
                    Err(e) => self.status = e,
                }
                self.switch(Pane::Trace);
            }
            Effect::Cluster(c) => {
                self.panes.layout.select(c);
                self.switch(Pane::Layout);
            }
            Effect::Refcount(c) => {
                self.panes.refcounts.select(c, &self.ctx);
                self.switch(Pane::Refcounts);
            }
            Effect::Table(at) => {
                self.panes.tables.open(at, &self.ctx);
                self.switch(Pane::Tables);
            }
            Effect::L1Entry(i) => {
                self.panes.tables.select_l1(i, &self.ctx);
                self.switch(Pane::Tables);
            }
            Effect::Switch(p) | Effect::Jump(p) => self.switch(p),
            Effect::RefcountTable => {
                self.panes.refcounts.level = super::panes::refcounts::Level::Table;
                self.switch(Pane::Refcounts);
            }
            Effect::Input(purpose, text) => {
                self.popup = Some(Popup::Input(purpose, Input::new(text)));
            }
            Effect::View(v) => {
                self.ctx.view_snapshot = v;
                self.ctx.open_chain();
                self.panes.tables.open(None, &self.ctx);
                self.panes.tables.l1 = ListView::default();
                self.status = match self.ctx.viewed_name() {
                    Some(s) => format!("Tables, Trace and Hex now use snapshot {s}"),
                    None => "back to the active L1 table".into(),
                };
            }
            Effect::Reload => self.load(),
            Effect::Status(s) => self.status = s,
            Effect::SimulatedView(on) => {
                if on != self.ctx.simulated_view() {
                    self.toggle_simulated();
                }
            }
            Effect::Start(Job::Diff(a, b)) => self.compute_diff(a, b),
            Effect::Start(Job::Simulate(text)) => self.start_simulation(text),
            Effect::Start(Job::Lookup(c)) => {
                let Some(img) = self.ctx.img.clone() else {
                    return;
                };
                let (tx, generation) = (self.tx.clone(), self.generation);
                std::thread::spawn(move || {
                    let (refs, roles) = super::panes::layout::lookup(&img, c);
                    let _ = tx.send(Bg::Lookup(c, refs, roles, generation));
                });
            }
        }
    }

    /// Jump to an offset, as the current pane understands it, after checking it
    /// against the size of what it is an offset in.
    pub fn goto(&mut self, text: &str) {
        let Ok(off) = parse_number(text) else {
            self.status = format!("'{text}' is not an offset (try 0x10000, 64k or 65536)");
            return;
        };
        let kind = self.panes.get(self.pane).offset_kind();
        let (limit, what) = match kind {
            Some(OffsetKind::Host) if self.pane == Pane::Hex => {
                (self.panes.hex.limit(&self.ctx), "the file")
            }
            Some(OffsetKind::Host) => (self.ctx.file_len(), "the file"),
            _ => (self.ctx.disk_size(), "the disk"),
        };
        if self.ctx.img.is_none() && kind != Some(OffsetKind::Host) {
            self.status = format!("cannot follow a guest offset: {}", self.ctx.unopened());
            return;
        }
        if off >= limit {
            self.status = format!(
                "{off:#x} is past the end of {what} ({limit} bytes, offsets 0 to {:#x})",
                limit.saturating_sub(1)
            );
            return;
        }
        let from = self.place();
        let mut q = Vec::new();
        self.panes.get_mut(self.pane).goto(off, &self.ctx, &mut q);
        let jumps = q.iter().any(Effect::is_jump);
        self.apply_all(q);
        if !jumps {
            let to = self.place();
            self.history.jumped(from, &to);
        }
    }

    /// Run a simulation on a worker: it reports each operation and the check of
    /// the result, and stops between steps once cancelled.
    pub fn start_simulation(&mut self, text: String) {
        let Some(img) = self.ctx.img.clone() else {
            return;
        };
        let ops: Result<Vec<Op>, String> = text
            .split_whitespace()
            .map(|s| Op::parse(s, &|n: &str| parse_number(n)))
            .collect();
        let ops = match ops {
            Ok(o) if !o.is_empty() => o,
            Ok(_) => return,
            Err(e) => {
                self.status = e;
                return;
            }
        };
        if let Some(j) = self.sim_job.take() {
            j.cancel.store(true, Ordering::Relaxed);
        }
        self.jobs += 1;
        let id = self.jobs;
        let cancel = Arc::new(AtomicBool::new(false));
        self.sim_job = Some(SimJob {
            id,
            cancel: cancel.clone(),
        });
        let from = self.place();
        self.panes.simulate.started(text.clone());
        self.switch(Pane::Simulate);
        let to = self.place();
        self.history.jumped(from, &to);
        let tx = self.tx.clone();
        let path = self.ctx.path.clone();
        std::thread::spawn(move || {
            let r = simulate_on_worker(&img, &path, &ops, &text, id, &tx, &cancel);
            if !cancel.load(Ordering::Relaxed) {
                let _ = tx.send(Bg::Simulated(id, r));
            }
        });
    }

    /// Compare two snapshots guest cluster by guest cluster, on a worker.
    fn compute_diff(&mut self, a: usize, b: usize) {
        let Some(img) = self.ctx.img.clone() else {
            return;
        };
        let tx = self.tx.clone();
        let generation = self.generation;
        self.panes.snapshots.diff_running = true;
        std::thread::spawn(move || {
            let _ = tx.send(Bg::Diff(diff(&img, a, b), generation));
        });
    }
}

/// A comparison's progress callback: it reports at most about 200 times per job
/// (a huge L1 table would flood the channel otherwise) and says whether to go on.
fn compare_tick(
    id: u64,
    tx: Sender<Bg>,
    cancel: Arc<AtomicBool>,
) -> impl Fn(u64, u64) -> bool + Sync {
    let last = std::sync::atomic::AtomicU64::new(0);
    move |done: u64, total: u64| {
        let step = (total / 200).max(1);
        let prev = last.load(Ordering::Relaxed);
        if done == 0 || done >= total || done.saturating_sub(prev) >= step {
            last.store(done, Ordering::Relaxed);
            let _ = tx.send(Bg::CompareProgress(id, done, total));
        }
        !cancel.load(Ordering::Relaxed)
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

fn simulate_on_worker(
    img: &Qcow2,
    path: &std::path::Path,
    ops: &[Op],
    text: &str,
    id: u64,
    tx: &Sender<Bg>,
    cancel: &AtomicBool,
) -> Result<Outcome, String> {
    let total = ops.len() as u64 + 1;
    let say = |phase: String, done: u64| {
        let _ = tx.send(Bg::SimProgress(id, phase, done, total));
    };
    say("opening the image in memory".into(), 0);
    let mut sim = Sim::new(img, path).map_err(|e| e.to_string())?;
    for (i, op) in ops.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err("cancelled".into());
        }
        say(format!("operation {}: {}", i + 1, op.describe()), i as u64);
        sim.apply(op);
        if sim.records.last().is_some_and(|r| r.error.is_some()) {
            break;
        }
    }
    let failed = sim
        .records
        .iter()
        .position(|r| r.error.is_some())
        .map(|i| i + 1);
    say(
        "checking the simulated image".into(),
        sim.records.len() as u64,
    );
    let mut simulated = None;
    let (summary, consistent) = match sim.image() {
        Ok(after) => {
            let r = check(&after, &CheckOptions::default());
            let said = if r.corruptions + r.leaks + r.check_errors == 0 {
                ("check of the simulated image: no errors".to_string(), true)
            } else {
                (
                    format!(
                        "check of the simulated image: {} corruptions, {} leaks, {} check errors",
                        r.corruptions, r.leaks, r.check_errors
                    ),
                    false,
                )
            };
            say(
                "recording the states before and after".into(),
                sim.records.len() as u64,
            );
            let before = super::changes::record(img);
            let state = super::changes::record(&after);
            let changes = super::changes::compare(&before, &state, &after.geometry());
            simulated = Some(Arc::new(super::ctx::Simulated {
                ops: text.to_string(),
                img: Arc::new(after),
                src: sim.source(),
                report: Arc::new(r),
                before,
                after: state,
                changes,
            }));
            said
        }
        Err(e) => (format!("the simulated image cannot be opened: {e}"), false),
    };
    let summary = match failed {
        Some(n) => format!(
            "operation {n} failed as QEMU would fail it; nothing after it ran. The image as far as it got: {summary}"
        ),
        None => summary,
    };
    Ok(Outcome {
        text: text.to_string(),
        records: sim.records.clone(),
        summary,
        clean: consistent && failed.is_none(),
        simulated,
    })
}

/// Guest clusters that two snapshots map differently (at most 100000 listed).
fn diff(img: &Qcow2, a: usize, b: usize) -> Diff {
    let (Some(sa), Some(sb)) = (
        img.snapshots.snapshots.get(a),
        img.snapshots.snapshots.get(b),
    ) else {
        return Err("the snapshot is gone".into());
    };
    let la = img.snapshot_l1(sa).map_err(|e| e.to_string())?;
    let lb = img.snapshot_l1(sb).map_err(|e| e.to_string())?;
    let geo = img.geometry();
    let mut out = Vec::new();
    let strip = |e: Option<&qinspect::tables::L2Entry>| {
        e.map_or((0, 0), |e| {
            let e = e.with_copied(false);
            (e.raw, e.bitmap)
        })
    };
    for i in 0..la.len().max(lb.len()) {
        let ea = la.get(i).and_then(|e| e.l2_offset());
        let eb = lb.get(i).and_then(|e| e.l2_offset());
        if ea == eb {
            continue; // the same L2 table (or none): identical mappings
        }
        let ta = ea
            .map(|o| img.l2_table(o).map_err(|e| e.to_string()))
            .transpose()?;
        let tb = eb
            .map(|o| img.l2_table(o).map_err(|e| e.to_string()))
            .transpose()?;
        for j in 0..geo.l2_entries() as usize {
            let x = strip(ta.as_ref().and_then(|t| t.get(j)));
            let y = strip(tb.as_ref().and_then(|t| t.get(j)));
            if x != y && out.len() < 100_000 {
                let g = geo.guest_offset(i as u64, j as u64, 0).map_or(0, |g| g.0);
                out.push((g, format!("{:#x} vs {:#x}", x.0, y.0)));
            }
        }
    }
    Ok(out)
}

/// Numbers as on the command line: decimal, 0x-hex, k/M/G/T suffixes.
pub fn parse_number(s: &str) -> Result<u64, String> {
    crate::cli::num::parse_size(s)
}

//! The TUI's state and its update function (the Elm shape: state, actions,
//! update, view). Slow, whole-image work runs on worker threads and reports back
//! over a channel, so the first frame never waits for it.

use super::keymap::{Action, PANES, pane};
use qinspect::chain::{Chain, OpenOptions};
use qinspect::check::{CheckOptions, CheckReport, Progress, check, role_map};
use qinspect::image::{Qcow2, Strictness, View};
use qinspect::io::{FileSource, SharedSource};
use qinspect::lookup::{Trace, trace};
use qinspect::simulate::{Op, OpRecord, simulate};
use ratatui::layout::Rect;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::SystemTime;

/// How many host clusters the Layout pane colours (the rest are listed as "not shown").
pub const LAYOUT_LIMIT: u64 = 1 << 22;

/// Options from the command line.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Capture the mouse.
    pub mouse: bool,
    /// Reload when the file changes.
    pub watch: bool,
}

/// Messages from worker threads.
pub enum Bg {
    /// Check progress.
    Progress(&'static str, u64, u64),
    /// The check finished.
    Checked(Box<CheckReport>, u64),
    /// Roles of the first clusters.
    Roles(Vec<u16>, u64),
    /// The comparison of two snapshots.
    Diff(Result<Vec<(u64, String)>, String>, u64),
}

/// Tables pane level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TablesLevel {
    /// The L1 table.
    L1,
    /// The L2 table behind an L1 entry.
    L2(usize),
}

/// Refcounts pane level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefLevel {
    /// The refcount table.
    Table,
    /// One refcount block (table index).
    Block(usize),
}

/// A line-editing popup and what it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputFor {
    /// An offset to jump to.
    Goto,
    /// A simulate operation.
    Simulate,
}

/// Popups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Popup {
    /// Key help.
    Help,
    /// Text input.
    Input(InputFor, String),
}

/// Screen areas remembered for mouse hit-testing.
#[derive(Clone, Debug, Default)]
pub struct Areas {
    /// Each tab's area.
    pub tabs: Vec<(Rect, usize)>,
    /// The main list's area and the index of its first visible row.
    pub list: Option<(Rect, usize)>,
}

/// Everything on screen.
pub struct App {
    /// The image path.
    pub path: PathBuf,
    /// Options.
    pub opts: Options,
    /// The top image, opened leniently (None if it cannot be opened at all).
    pub img: Option<Arc<Qcow2>>,
    /// Why it could not be opened.
    pub load_error: Option<String>,
    /// The backing chain (for traces), or why it cannot be followed.
    pub chain: Result<Chain, String>,
    /// The current pane.
    pub pane: usize,
    /// The snapshot whose view Tables, Trace, Layout and Hex use.
    pub view_snapshot: Option<String>,
    /// Popup.
    pub popup: Option<Popup>,
    /// Explanation panel on.
    pub explain: bool,
    /// Quit requested.
    pub quit: bool,
    /// Status line.
    pub status: String,
    /// Mouse areas.
    pub areas: Areas,
    /// Overview scroll.
    pub overview_scroll: u16,
    /// Layout: selected cluster.
    pub layout_sel: u64,
    /// Layout: cells per grid row at the last draw.
    pub layout_per_row: u64,
    /// Layout: the referrers of a cluster, once looked up.
    pub detail: Option<(u64, Vec<String>)>,
    /// Layout: roles of the first clusters, when computed.
    pub roles: Option<Arc<Vec<u16>>>,
    /// Tables state.
    pub tables_level: TablesLevel,
    /// Selected L1 row.
    pub l1_sel: usize,
    /// Selected L2 row.
    pub l2_sel: usize,
    /// Refcounts state.
    pub ref_level: RefLevel,
    /// Selected refcount table row.
    pub rt_sel: usize,
    /// Selected refcount block row.
    pub rb_sel: usize,
    /// Selected snapshot.
    pub snap_sel: usize,
    /// Marked snapshots (up to two).
    pub marked: Vec<usize>,
    /// Guest clusters that differ between the two marked snapshots.
    pub diff: Option<Result<Vec<(u64, String)>, String>>,
    /// The comparison is running on a worker thread.
    pub diff_running: bool,
    /// Hex: bytes come from this file instead of the image (a backing layer).
    pub hex_src: Option<qinspect::io::SharedSource>,
    /// Trace: offset, result, current step.
    pub trace: Option<Trace>,
    /// Current trace step.
    pub trace_step: usize,
    /// Check: the report.
    pub report: Option<Arc<CheckReport>>,
    /// Counts of the previous load's check (for "what changed").
    pub previous: Option<(u64, u64, u64)>,
    /// Check progress: phase, done, total; None when not running.
    pub progress: Option<(&'static str, u64, u64)>,
    /// Selected finding.
    pub finding_sel: usize,
    /// Simulate: chosen template.
    pub sim_choice: usize,
    /// The last simulation's records and the check of its result.
    pub sim: Option<(Vec<OpRecord>, String)>,
    /// Current simulation step (over all operations).
    pub sim_step: usize,
    /// Hex: base host offset shown, and whether it came from a guest offset.
    pub hex_base: u64,
    /// Hex: what `hex_base` is ("host cluster 5", "guest 0x10000 -> ...").
    pub hex_label: String,
    /// Hex: byte range to highlight (host offsets).
    pub hex_mark: Option<(u64, u64)>,
    /// Hex: the bytes shown come from the guest view (not the host file).
    pub hex_guest: Option<u64>,
    /// Guided tour step.
    pub tour: Option<usize>,
    /// File modification time at load.
    pub mtime: Option<SystemTime>,
    tx: Sender<Bg>,
    rx: Receiver<Bg>,
    generation: u64,
}

/// Operation templates offered by the Simulate pane.
pub const SIM_TEMPLATES: [(&str, &str); 8] = [
    (
        "snapshot-create:snap",
        "qemu-img snapshot -c: copy the L1, +1 on everything it reaches",
    ),
    (
        "snapshot-delete-id:1",
        "delete by ID (QMP): -1 on the snapshot's tree, then the addend-0 pass",
    ),
    (
        "snapshot-apply:1",
        "qemu-img snapshot -a: +1 on the snapshot, -1 on the old active tree",
    ),
    (
        "write:0:4096",
        "a guest write: copy-on-write of shared L2 tables and data clusters",
    ),
    (
        "discard:0:65536",
        "a guest discard: entries become zero clusters, clusters released",
    ),
    (
        "refcount-update:active:1",
        "QEMU's walk with addend +1 over the active L1",
    ),
    (
        "refcount-update:active:0",
        "addend 0: no refcount changes, COPIED flags recomputed",
    ),
    (
        "refcount-update:active:-1",
        "addend -1: what a delete does to a snapshot's tree",
    ),
];

impl App {
    /// Open `path` and start the background work.
    pub fn new(path: PathBuf, opts: Options) -> App {
        let (tx, rx) = channel();
        let mut app = App {
            path,
            opts,
            img: None,
            load_error: None,
            chain: Err(String::new()),
            pane: pane::OVERVIEW,
            view_snapshot: None,
            popup: None,
            explain: false,
            quit: false,
            status: String::new(),
            areas: Areas::default(),
            overview_scroll: 0,
            layout_sel: 0,
            layout_per_row: 64,
            detail: None,
            roles: None,
            tables_level: TablesLevel::L1,
            l1_sel: 0,
            l2_sel: 0,
            ref_level: RefLevel::Table,
            rt_sel: 0,
            rb_sel: 0,
            snap_sel: 0,
            marked: Vec::new(),
            diff: None,
            diff_running: false,
            hex_src: None,
            trace: None,
            trace_step: 0,
            report: None,
            previous: None,
            progress: None,
            finding_sel: 0,
            sim_choice: 0,
            sim: None,
            sim_step: 0,
            hex_base: 0,
            hex_label: "host cluster 0 (the header)".into(),
            hex_mark: None,
            hex_guest: None,
            tour: None,
            mtime: None,
            tx,
            rx,
            generation: 0,
        };
        app.load();
        app
    }

    /// (Re)open the image and restart the background work.
    pub fn load(&mut self) {
        self.generation += 1;
        if let Some(r) = &self.report {
            self.previous = Some((r.corruptions, r.leaks, r.check_errors));
        }
        self.mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let opened = FileSource::open(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                let src: SharedSource = Arc::new(f);
                Qcow2::open(src, Strictness::Lenient).map_err(|e| e.to_string())
            });
        match opened {
            Ok(img) => {
                self.img = Some(Arc::new(img));
                self.load_error = None;
            }
            Err(e) => {
                self.img = None;
                self.load_error = Some(e);
            }
        }
        self.open_chain();
        self.report = None;
        self.roles = None;
        self.start_background();
    }

    /// Reopen the chain with the current snapshot view.
    pub fn open_chain(&mut self) {
        let opts = OpenOptions {
            snapshot: self.view_snapshot.clone(),
            strictness: Strictness::Lenient,
            ..Default::default()
        };
        self.chain = Chain::open(&self.path, &opts).map_err(|e| e.to_string());
    }

    fn start_background(&mut self) {
        let Some(img) = self.img.clone() else { return };
        let generation = self.generation;
        let tx = self.tx.clone();
        self.progress = Some(("starting", 0, 1));
        std::thread::spawn(move || {
            let cs = img.geometry().cluster_size();
            let n = img.file_len().div_ceil(cs).clamp(1, LAYOUT_LIMIT);
            let roles = role_map(&img, 0, n - 1);
            let _ = tx.send(Bg::Roles(roles, generation));
            let ptx = tx.clone();
            let tick = move |p: Progress| {
                let _ = ptx.send(Bg::Progress(p.phase, p.done, p.total));
            };
            let report = check(
                &img,
                &CheckOptions {
                    progress: Some(&tick),
                },
            );
            let _ = tx.send(Bg::Checked(Box::new(report), generation));
        });
    }

    /// Take in what the workers reported.
    pub fn poll_background(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            self.apply(msg);
        }
    }

    fn apply(&mut self, msg: Bg) {
        match msg {
            Bg::Progress(phase, done, total) if self.report.is_none() => {
                self.progress = Some((phase, done, total));
            }
            Bg::Checked(r, g) if g == self.generation => {
                self.progress = None;
                self.report = Some(Arc::from(r));
            }
            Bg::Roles(r, g) if g == self.generation => self.roles = Some(Arc::new(r)),
            Bg::Diff(d, g) if g == self.generation => {
                self.diff = Some(d);
                self.diff_running = false;
            }
            _ => {}
        }
    }

    /// Wait for the background work (tests).
    #[cfg(test)]
    pub fn wait_background(&mut self) {
        while self.img.is_some()
            && (self.report.is_none() || self.roles.is_none() || self.diff_running)
        {
            match self.rx.recv_timeout(std::time::Duration::from_secs(30)) {
                Ok(msg) => self.apply(msg),
                Err(_) => break,
            }
        }
    }

    /// With --watch: reload when the file's modification time changes.
    pub fn check_watch(&mut self) {
        if !self.opts.watch {
            return;
        }
        let now = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if now != self.mtime {
            self.load();
            self.status = "the file changed on disk: reloaded".into();
        }
    }

    /// The view Tables and Hex use.
    pub fn view(&self) -> Option<View> {
        let img = self.img.as_ref()?;
        match &self.view_snapshot {
            None => Some(img.active_view()),
            Some(s) => img.snapshot_view(s).ok(),
        }
    }

    /// Apply one action.
    pub fn update(&mut self, action: Action) {
        self.status.clear();
        // Popups take keys first.
        if let Some(Popup::Help) = self.popup {
            if matches!(action, Action::Help | Action::Escape | Action::Quit) {
                self.popup = None;
            }
            return;
        }
        match action {
            Action::Quit => self.quit = true,
            Action::Pane(n) if n < PANES.len() => self.pane = n,
            Action::Pane(_) => {}
            Action::NextPane => self.pane = (self.pane + 1) % PANES.len(),
            Action::PrevPane => self.pane = (self.pane + PANES.len() - 1) % PANES.len(),
            Action::Help => self.popup = Some(Popup::Help),
            Action::Escape => {
                self.explain = false;
                self.tour = None;
            }
            Action::Explain => self.explain = !self.explain,
            Action::Reload => {
                self.load();
                self.status = "reloaded".into();
            }
            Action::Goto => {
                self.popup = Some(Popup::Input(InputFor::Goto, String::new()));
            }
            Action::Tour => super::tour::start(self),
            _ => {
                if self.tour.is_some() && matches!(action, Action::NextStep | Action::PrevStep) {
                    super::tour::step(self, action == Action::NextStep);
                    return;
                }
                super::panes::handle(self, action);
            }
        }
    }

    /// Type a character into the input popup; Enter submits, Esc cancels.
    pub fn input_key(&mut self, key: ratatui::crossterm::event::KeyCode) {
        use ratatui::crossterm::event::KeyCode;
        let Some(Popup::Input(purpose, text)) = &mut self.popup else {
            return;
        };
        match key {
            KeyCode::Esc => self.popup = None,
            KeyCode::Backspace => {
                text.pop();
            }
            KeyCode::Char(c) => text.push(c),
            KeyCode::Enter => {
                let (purpose, text) = (purpose.clone(), text.clone());
                self.popup = None;
                match purpose {
                    InputFor::Goto => self.goto(&text),
                    InputFor::Simulate => self.run_simulation(&text),
                }
            }
            _ => {}
        }
    }

    /// Jump to an offset, as the current pane understands it.
    pub fn goto(&mut self, text: &str) {
        let Ok(off) = parse_number(text) else {
            self.status = format!("'{text}' is not an offset (try 0x10000, 64k or 65536)");
            return;
        };
        let Some(img) = self.img.clone() else { return };
        let cs = img.geometry().cluster_size();
        match self.pane {
            pane::LAYOUT | pane::REFCOUNTS => {
                self.layout_sel = off / cs;
                if self.pane == pane::REFCOUNTS {
                    let per = img.refcount_geometry().entries_per_block();
                    self.ref_level = RefLevel::Block(((off / cs) / per) as usize);
                    self.rb_sel = ((off / cs) % per) as usize;
                }
            }
            pane::HEX => self.show_host(off, format!("host offset {off:#x}"), None),
            pane::TABLES => {
                let g = img.geometry();
                let go = qinspect::types::GuestOffset(off);
                self.tables_level = TablesLevel::L2(g.l1_index(go) as usize);
                self.l1_sel = g.l1_index(go) as usize;
                self.l2_sel = g.l2_index(go) as usize;
            }
            _ => {
                self.pane = pane::TRACE;
                self.run_trace(off);
            }
        }
    }

    /// Trace a guest offset.
    pub fn run_trace(&mut self, off: u64) {
        match &self.chain {
            Ok(c) => {
                self.trace = Some(trace(c, off));
                self.trace_step = 0;
            }
            Err(e) => self.status = format!("cannot trace: {e}"),
        }
    }

    /// Show host bytes in the Hex pane.
    pub fn show_host(&mut self, off: u64, label: String, mark: Option<(u64, u64)>) {
        let cs = self
            .img
            .as_ref()
            .map_or(512, |i| i.geometry().cluster_size());
        self.hex_base = off / cs * cs;
        self.hex_label = label;
        self.hex_mark = mark.or(Some((off, off + 1)));
        self.hex_guest = None;
        self.hex_src = None;
        self.pane = pane::HEX;
    }

    /// Run a simulation from an operation string.
    pub fn run_simulation(&mut self, text: &str) {
        let Some(img) = self.img.clone() else { return };
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
        match simulate(&img, &self.path, &ops) {
            Ok(sim) => {
                let summary = match sim.image() {
                    Ok(after) => {
                        let r = check(&after, &CheckOptions::default());
                        if r.corruptions + r.leaks + r.check_errors == 0 {
                            "check of the simulated image: no errors".to_string()
                        } else {
                            format!(
                                "check of the simulated image: {} corruptions, {} leaks, {} check errors",
                                r.corruptions, r.leaks, r.check_errors
                            )
                        }
                    }
                    Err(e) => format!("the simulated image cannot be opened: {e}"),
                };
                self.sim = Some((sim.records.clone(), summary));
                self.sim_step = 0;
            }
            Err(e) => self.status = e.to_string(),
        }
    }

    /// Compare the two marked snapshots guest cluster by guest cluster.
    pub fn compute_diff(&mut self) {
        let Some(img) = self.img.clone() else { return };
        let [a, b] = self.marked[..] else { return };
        let tx = self.tx.clone();
        let generation = self.generation;
        self.diff_running = true;
        self.status = "comparing the two snapshots on a worker thread…".into();
        std::thread::spawn(move || {
            let (Some(sa), Some(sb)) = (
                img.snapshots.snapshots.get(a),
                img.snapshots.snapshots.get(b),
            ) else {
                return;
            };
            let r = (|| -> Result<Vec<(u64, String)>, String> {
                let la = img.snapshot_l1(sa).map_err(|e| e.to_string())?;
                let lb = img.snapshot_l1(sb).map_err(|e| e.to_string())?;
                let geo = img.geometry();
                let mut out = Vec::new();
                for i in 0..la.len().max(lb.len()) {
                    let ea = la.get(i).and_then(|e| e.l2_offset());
                    let eb = lb.get(i).and_then(|e| e.l2_offset());
                    if ea == eb {
                        continue; // the same L2 table (or none): identical mappings
                    }
                    let ta = match ea {
                        Some(o) => Some(img.l2_table(o).map_err(|e| e.to_string())?),
                        None => None,
                    };
                    let tb = match eb {
                        Some(o) => Some(img.l2_table(o).map_err(|e| e.to_string())?),
                        None => None,
                    };
                    for j in 0..geo.l2_entries() as usize {
                        let x = ta
                            .as_ref()
                            .and_then(|t| t.get(j))
                            .map(|e| (e.raw & !qinspect::tables::OFLAG_COPIED, e.bitmap));
                        let y = tb
                            .as_ref()
                            .and_then(|t| t.get(j))
                            .map(|e| (e.raw & !qinspect::tables::OFLAG_COPIED, e.bitmap));
                        if x.unwrap_or((0, 0)) != y.unwrap_or((0, 0)) && out.len() < 100_000 {
                            let g = geo.guest_offset(i as u64, j as u64, 0).map_or(0, |g| g.0);
                            out.push((
                                g,
                                format!(
                                    "{:#x} vs {:#x}",
                                    x.unwrap_or((0, 0)).0,
                                    y.unwrap_or((0, 0)).0
                                ),
                            ));
                        }
                    }
                }
                Ok(out)
            })();
            let _ = tx.send(Bg::Diff(r, generation));
        });
    }
}

/// Numbers as on the command line: decimal, 0x-hex, k/M/G/T suffixes.
pub fn parse_number(s: &str) -> Result<u64, String> {
    crate::cli::num::parse_size(s)
}

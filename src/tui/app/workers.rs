//! Work off the key path: the whole-image check and roles after each load, a
//! simulation, a snapshot diff and a cluster lookup run on worker threads and
//! report over the channel; [`App::poll_background`] takes their messages in.

use super::{App, SimJob, parse_number};
use crate::tui::ctx::{Ctx, Pane};
use crate::tui::panes::simulate::Outcome;
use crate::tui::panes::snapshots::Diff;
use crate::tui::widgets::ListView;
use qinspect::check::{CheckOptions, CheckReport, Progress, check};
use qinspect::image::Qcow2;
use qinspect::simulate::{Op, Sim};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

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
    Recorded(Box<crate::tui::changes::State>, u64),
    /// Who references a cluster: cluster, referrers, roles.
    Lookup(u64, Vec<qinspect::check::Referrer>, String, u64),
    /// Compare progress (job id, done, total).
    CompareProgress(u64, u64, u64),
    /// A comparison finished (job id, the sides, the result).
    Compared(
        u64,
        crate::tui::compare::Choice,
        crate::tui::compare::Choice,
        Result<qinspect::compare::Comparison, String>,
    ),
    /// The snapshots ranked by distance from the active state (job id).
    Ranked(u64, Result<Vec<qinspect::compare::Distance>, String>),
}

impl App {
    pub(super) fn start_background(&mut self) {
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
            let state = crate::tui::changes::record(&img);
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
        crate::tui::find::step(self);
        self.panes.hex.poll();
    }

    /// One worker's message is one event.
    fn receive(&mut self, msg: Bg) {
        self.event(|a| a.take_in(msg));
    }

    fn take_in(&mut self, msg: Bg) {
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
                    Ok(c) => crate::tui::compare::Shown::Compared(a, b, Arc::new(c)),
                    Err(e) => crate::tui::compare::Shown::Failed(e),
                };
            }
            Bg::Ranked(id, r) if self.cmp_is(id) => {
                self.cmp_job = None;
                self.compare.running = None;
                self.compare.rows = ListView::default();
                self.compare.shown = match r {
                    Ok(d) => crate::tui::compare::Shown::Closest(Arc::new(d)),
                    Err(e) => crate::tui::compare::Shown::Failed(e),
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
            crate::tui::find::forget_all(self);
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
    fn recorded_state(&mut self, new: crate::tui::changes::State) {
        if let (Some(old), Some(img)) = (self.recorded.take(), self.ctx.img.as_ref()) {
            let ch = crate::tui::changes::compare(&old, &new, &img.geometry());
            self.changes_limits = crate::tui::changes::limits(&old, &new);
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
    pub(super) fn compute_diff(&mut self, a: usize, b: usize) {
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
            let before = crate::tui::changes::record(img);
            let state = crate::tui::changes::record(&after);
            let changes = crate::tui::changes::compare(&before, &state, &after.geometry());
            simulated = Some(Arc::new(crate::tui::ctx::Simulated {
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
                let ea = ta.as_ref().and_then(|t| t.get(j));
                let eb = tb.as_ref().and_then(|t| t.get(j));
                out.push((g, diff_words(img, ea, eb)));
            }
        }
    }
    Ok(out)
}

/// One differing guest cluster in words, as `qinspect compare` says it:
/// "unallocated (zeros) vs data at 0x2a0000 in this file". When both sides name
/// the same file, the first side leaves it out, so that a row fits 80 columns.
fn diff_words(
    img: &Qcow2,
    a: Option<&qinspect::tables::L2Entry>,
    b: Option<&qinspect::tables::L2Entry>,
) -> String {
    use qinspect::compare::Mapping;
    let backing = img.backing_name.is_some();
    let data_file = img.header.has_data_file();
    let mapping = |e: Option<&qinspect::tables::L2Entry>| {
        e.map_or(Mapping::Unallocated, |e| Mapping::of(e, img))
    };
    let (ma, mb) = (mapping(a), mapping(b));
    let (wa, wb) = (ma.words(backing, data_file), mb.words(backing, data_file));
    if wa == wb {
        // The same mapping in other bits (reserved ones): the entries say how.
        let raw = |e: Option<&qinspect::tables::L2Entry>| e.map_or(0, |e| e.raw);
        return format!("{wa} in both, entries {:#x} vs {:#x}", raw(a), raw(b));
    }
    // Both sides' data is in the one file of the image: said once.
    let wa = match (&ma, &mb) {
        (Mapping::Data { .. }, Mapping::Data { .. }) => ma.words_unplaced(backing),
        _ => wa,
    };
    format!("{wa} vs {wb}")
}

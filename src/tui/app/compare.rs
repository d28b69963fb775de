//! The Compare popup: its keys, and the comparisons it starts on a worker.

use super::{App, Bg, SimJob};
use crate::tui::ctx::Effect;
use crate::tui::keymap::Action;
use ratatui::crossterm::event::{KeyCode, KeyEvent};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;

impl App {
    pub(super) fn cmp_is(&self, id: u64) -> bool {
        self.cmp_job.as_ref().is_some_and(|j| j.id == id)
    }

    /// A key in the Compare view: [/] side A, ←/→ side B, ↑/↓ rows, Enter
    /// compares (on a row of a current result: traces it), Space ranks the
    /// snapshots, Esc cancels the worker or closes.
    pub fn compare_key(&mut self, k: &KeyEvent) {
        use crate::tui::compare::{Choice, Shown, choices};
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
                        let g = r.guest;
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
        use crate::tui::compare::{Choice, choices, pick};
        let ch = choices(&self.ctx);
        let a = ch.get(self.compare.a).cloned().unwrap_or(Choice::Active);
        let b = ch.get(self.compare.b).cloned().unwrap_or(Choice::Active);
        let (pa, pb) = match (pick(&a, &self.ctx), pick(&b, &self.ctx)) {
            (Ok(x), Ok(y)) => (x, y),
            (Err(e), _) | (_, Err(e)) => {
                self.compare.shown = crate::tui::compare::Shown::Failed(e);
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
            self.compare.shown = crate::tui::compare::Shown::Failed(self.ctx.unopened());
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

//! Pane 8: choose an operation, run it on a worker thread (Esc cancels), then step
//! through every change it would make. Nothing is written.

use super::{PaneState, color};
use crate::tui::app::InputFor;
use crate::tui::ctx::{Ctx, Effect};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::simulate::{Op, OpRecord};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Text};
use ratatui::widgets::{Gauge, Paragraph};

/// A finished simulation.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// What was asked for.
    pub text: String,
    /// One record per operation that ran.
    pub records: Vec<OpRecord>,
    /// The check of the simulated image, or why there is none.
    pub summary: String,
    /// Whether the simulated image is consistent and every operation succeeded.
    pub clean: bool,
    /// The simulated image, for the simulated view (None when it cannot be opened).
    pub simulated: Option<std::sync::Arc<crate::tui::ctx::Simulated>>,
}

/// A simulation on the worker: what it runs and how far it is.
#[derive(Clone, Debug)]
pub struct Running {
    /// What was asked for.
    pub text: String,
    /// What the worker is doing.
    pub phase: String,
    /// Done and total, for the gauge.
    pub done: u64,
    /// How many steps the work has in all.
    pub total: u64,
}

/// Simulate's state.
#[derive(Default)]
pub struct State {
    /// The template list.
    pub menu: ListView,
    /// The last simulation.
    pub outcome: Option<Result<Outcome, String>>,
    /// The one running now.
    pub running: Option<Running>,
    /// Scroll and selection of the changes.
    pub steps: ListView,
}

/// Operation templates for this image: snapshot operations name a snapshot that
/// exists, or are left out.
pub fn templates(ctx: &Ctx) -> Vec<(String, &'static str)> {
    let first = ctx
        .img
        .as_ref()
        .and_then(|i| i.snapshots.snapshots.first())
        .map(|s| (s.id.clone(), s.name.clone()));
    let mut v = vec![(
        "snapshot-create:snap".to_string(),
        "qemu-img snapshot -c: copy the L1, +1 on everything it reaches",
    )];
    if let Some((id, name)) = first {
        // qemu-img snapshot -d matches names only; -a takes an ID or a name.
        v.push((
            format!("snapshot-delete:{name}"),
            "qemu-img snapshot -d: -1 on the snapshot's tree, then the addend-0 pass",
        ));
        v.push((
            format!("snapshot-apply:{id}"),
            "qemu-img snapshot -a: +1 on the snapshot, -1 on the old active tree",
        ));
    }
    v.extend([
        (
            "write:0:4096".to_string(),
            "a guest write: copy-on-write of shared L2 tables and data clusters",
        ),
        (
            "discard:0:65536".to_string(),
            "a guest discard: entries become zero clusters, clusters released",
        ),
        (
            "refcount-update:active:1".to_string(),
            "QEMU's walk with addend +1 over the active L1",
        ),
        (
            "refcount-update:active:0".to_string(),
            "addend 0: no refcount changes, COPIED flags recomputed",
        ),
        (
            "refcount-update:active:-1".to_string(),
            "addend -1: what a delete does to a snapshot's tree",
        ),
    ]);
    v
}

/// All steps of a simulation, flattened: (operation index, step text, failed).
pub fn flat(o: &Outcome) -> Vec<(usize, String, bool)> {
    let mut v = Vec::new();
    for (i, r) in o.records.iter().enumerate() {
        for s in &r.steps {
            v.push((i, s.describe(), false));
        }
        match &r.error {
            // What qinspect does not follow is no failure of QEMU's.
            Some(e) if r.not_simulated() => v.push((i, e.clone(), true)),
            Some(e) => v.push((i, format!("QEMU fails here: {e}"), true)),
            None => {}
        }
    }
    v
}

/// The change behind row `sel` of [`flat`] (None on a failure row).
pub fn change_at(o: &Outcome, sel: usize) -> Option<&qinspect::simulate::Change> {
    let mut k = 0usize;
    for r in &o.records {
        for s in &r.steps {
            if k == sel {
                return Some(s);
            }
            k += 1;
        }
        if r.error.is_some() {
            if k == sel {
                return None;
            }
            k += 1;
        }
    }
    None
}

/// Where Enter on a simulated change goes, in the simulated view: the refcount
/// entry it changed, the L1 or L2 entry it changed (in Tables, in the snapshot's
/// view when it is a snapshot's table), or the host cluster it allocated, freed or
/// wrote (in Layout).
pub fn follow(c: &qinspect::simulate::Change, ctx: &Ctx) -> Result<Vec<Effect>, String> {
    use qinspect::simulate::Target;
    let img = ctx
        .simulated
        .as_ref()
        .map(|s| s.img.clone())
        .ok_or("the simulated image cannot be opened")?;
    let cs = img.geometry().cluster_size();
    let index = |i: u64| usize::try_from(i).map_err(|e| e.to_string());
    Ok(match &c.target {
        Target::Refcount { cluster } => vec![Effect::Refcount(*cluster)],
        Target::L1Entry {
            table,
            snapshot: None,
            index: i,
            ..
        } if table == "active L1" => {
            vec![Effect::View(None), Effect::L1Entry(index(*i)?)]
        }
        // The record the change was made to, if the simulated image still holds
        // it there (a deleted snapshot's L1 is gone, and the records after it
        // moved up).
        Target::L1Entry {
            table,
            table_offset,
            index: i,
            snapshot: Some(id),
        } => match img.snapshots.snapshots.get(*id) {
            Some(s) if s.l1_table_offset == *table_offset => {
                vec![Effect::View(Some(*id)), Effect::L1Entry(index(*i)?)]
            }
            _ => return Err(format!("{table} is not in the simulated image")),
        },
        Target::L1Entry { table, .. } => {
            return Err(format!("{table} is not in the simulated image"));
        }
        Target::L2Entry {
            table_offset,
            index: j,
        } => {
            let holds = |l1: &[qinspect::tables::L1Entry]| {
                l1.iter()
                    .position(|e| e.l2_offset().is_some_and(|o| o == *table_offset))
            };
            let j = index(*j)?;
            if let Some(i) = holds(&img.l1) {
                vec![Effect::View(None), Effect::Table(Some((i, j)))]
            } else {
                let found = img
                    .snapshots
                    .snapshots
                    .iter()
                    .enumerate()
                    .find_map(|(k, s)| {
                        let l1 = img.snapshot_l1(s).ok()?;
                        holds(&l1).map(|i| (k, i))
                    });
                match found {
                    Some((id, i)) => vec![Effect::View(Some(id)), Effect::Table(Some((i, j)))],
                    None => {
                        return Err(format!(
                            "no L1 table of the simulated image points to the L2 table at {table_offset:#x} any more"
                        ));
                    }
                }
            }
        }
        Target::Allocate { offset, .. } | Target::Free { offset, .. } => {
            vec![Effect::Cluster(offset.get() / cs)]
        }
        // The cluster the entry or field sits in.
        Target::RefcountTableEntry { at, .. } | Target::ExtensionField { at, .. } => {
            vec![Effect::Cluster(at.get() / cs)]
        }
        Target::Copy { to, .. } => vec![Effect::Cluster(to.get() / cs)],
        Target::SnapshotTable { offset, .. } => vec![Effect::Cluster(offset.get() / cs)],
        Target::Header { field } => {
            return Err(format!(
                "{} is a header field: Overview (1) shows the header",
                field.name()
            ));
        }
        Target::Note => return Err("a note, not a change".into()),
    })
}

impl State {
    /// The worker started.
    pub fn started(&mut self, text: String) {
        self.running = Some(Running {
            text,
            phase: "starting".into(),
            done: 0,
            total: 1,
        });
    }

    /// The worker reports progress.
    pub fn progress(&mut self, phase: String, done: u64, total: u64) {
        if let Some(r) = &mut self.running {
            r.phase = phase;
            r.done = done;
            r.total = total.max(1);
        }
    }

    /// The worker is done.
    pub fn finished(&mut self, o: Result<Outcome, String>) {
        self.running = None;
        self.outcome = Some(o);
        self.steps = ListView::default();
    }

    /// Esc: stop waiting for the worker. Returns whether one was running.
    pub fn cancel(&mut self) -> bool {
        self.running.take().is_some()
    }

    fn render_result(&mut self, f: &mut Frame, steps: Rect, detail: Rect) {
        if let Some(r) = &self.running {
            let g = Gauge::default()
                .block(boxed(format!("Simulating {} — Esc cancels", r.text)))
                .gauge_style(Style::new().fg(color::DATA))
                .ratio((r.done as f64 / r.total as f64).clamp(0.0, 1.0))
                .label(format!("{}: {}/{}", r.phase, r.done, r.total));
            f.render_widget(
                g,
                Rect {
                    height: 3.min(steps.height),
                    ..steps
                },
            );
            f.render_widget(
                Paragraph::new(Line::styled(
                    "The simulation runs on a worker thread: every other pane keeps working meanwhile.",
                    color::dim(),
                ))
                .block(boxed("")),
                detail,
            );
            return;
        }
        match &self.outcome {
            None => {
                f.render_widget(boxed("Changes"), steps);
                f.render_widget(
                    Paragraph::new(Line::styled(
                        "Choose an operation; several can be chained, separated by spaces.",
                        color::dim(),
                    ))
                    .block(boxed("")),
                    detail,
                );
            }
            Some(Err(e)) => {
                f.render_widget(boxed("Changes"), steps);
                f.render_widget(
                    Paragraph::new(Line::styled(
                        format!("the simulation cannot run: {e}"),
                        Style::new().fg(color::BAD),
                    ))
                    .wrap(ratatui::widgets::Wrap { trim: true })
                    .block(boxed("")),
                    detail,
                );
            }
            Some(Ok(o)) => {
                let all = flat(o);
                let title = format!(
                    "{}: {} operation(s), change {}/{} (↑/↓ move, Enter: what it changed, v: simulated view)",
                    o.text,
                    o.records.len(),
                    self.steps.sel + 1,
                    all.len()
                );
                self.steps
                    .render_list(f, steps, boxed(title), all.len(), true, |r| {
                        all[r]
                            .iter()
                            .map(|(op, text, failed)| {
                                let st = if *failed {
                                    Style::new().fg(color::BAD)
                                } else {
                                    Style::new()
                                };
                                Line::styled(format!("op {} · {text}", op + 1), st)
                            })
                            .collect()
                    });
                let op = all.get(self.steps.sel).map_or(0, |x| x.0);
                let d = vec![
                    Line::raw(
                        o.records
                            .get(op)
                            .map(|r| r.description.clone())
                            .unwrap_or_default(),
                    ),
                    Line::styled(
                        o.summary.clone(),
                        Style::new().fg(if o.clean { color::DATA } else { color::BAD }),
                    ),
                ];
                f.render_widget(
                    Paragraph::new(Text::from(d))
                        .wrap(ratatui::widgets::Wrap { trim: true })
                        .block(boxed("")),
                    detail,
                );
            }
        }
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        if ctx.img.is_none() {
            return super::nothing(f, area, "Simulate", ctx.unopened());
        }
        let t = templates(ctx);
        let [menu, steps, detail] = Layout::vertical([
            Constraint::Length(t.len() as u16 + 2),
            Constraint::Min(3),
            Constraint::Length(4),
        ])
        .areas(area);
        let choosing = self.outcome.is_none() && self.running.is_none();
        let title = if choosing {
            "Simulate — ↑/↓ choose, Enter edit and run (nothing is written)"
        } else {
            "Simulate — Bksp: back to the operations (nothing is written)"
        };
        let w = t.iter().map(|x| x.0.len()).max().unwrap_or(0);
        self.menu
            .render_list(f, menu, boxed(title), t.len(), choosing, |r| {
                t[r].iter()
                    .map(|(op, what)| Line::raw(format!("{op:<w$} {what}")))
                    .collect()
            });
        self.render_result(f, steps, detail);
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let t = templates(ctx);
        let n = match &self.outcome {
            Some(Ok(o)) => flat(o).len(),
            _ => 0,
        };
        match action {
            // Enter on a change: the cluster or entry it changed, in the simulated view.
            Action::Enter if n > 0 => {
                let Some(Ok(o)) = &self.outcome else {
                    return false;
                };
                let Some(c) = change_at(o, self.steps.sel) else {
                    return false;
                };
                q.push(Effect::SimulatedView(true));
                // The view the simulated view starts with (the active L1), or the
                // one it shows now: a View effect that would not change it is left out.
                let shown = if ctx.simulated_view() {
                    ctx.view_snapshot
                } else {
                    None
                };
                match follow(c, ctx) {
                    Ok(e) => q.extend(
                        e.into_iter()
                            .filter(|e| !matches!(e, Effect::View(v) if *v == shown)),
                    ),
                    Err(e) => q.push(Effect::Status(e)),
                }
            }
            Action::Enter | Action::Run => {
                let op = t
                    .get(self.menu.sel)
                    .map(|x| x.0.clone())
                    .unwrap_or_default();
                q.push(Effect::Input(InputFor::Simulate, op));
            }
            Action::NextStep if n > 0 => return self.steps.select(Action::Down, n),
            Action::PrevStep if n > 0 => return self.steps.select(Action::Up, n),
            Action::Back if self.outcome.is_some() => self.outcome = None,
            a if self.outcome.is_some() && n > 0 => return self.steps.select(a, n),
            a if self.outcome.is_none() => return self.menu.select(a, t.len()),
            _ => return false,
        }
        true
    }

    fn explain(&self, _: &Ctx) -> String {
        let general = "Addend +1 (snapshot create/apply) shares clusters: refcounts go up and COPIED is cleared. Addend -1 (delete) unshares them. Addend 0 recomputes COPIED only. A write to a shared cluster allocates a new one, copies the rest of the cluster, and releases the old one (-1). Nothing is written to the image.";
        let Some(Ok(o)) = &self.outcome else {
            return general.into();
        };
        let all = flat(o);
        let Some((op, text, _)) = all.get(self.steps.sel) else {
            return general.into();
        };
        let addend = match o.records.get(*op).map(|r| &r.op) {
            Some(Op::RefcountUpdate { addend: 0, .. }) => {
                " Addend 0 changes no refcount; it only sets COPIED exactly where a cluster's refcount is 1."
            }
            Some(Op::SnapshotDelete { .. }) => {
                " A delete walks the snapshot with addend -1, then the active L1 with addend 0 so that clusters no longer shared get COPIED back."
            }
            _ => "",
        };
        format!("{text}.{addend}  —  {general}")
    }

    fn click(&mut self, x: u16, y: u16, _: &Ctx, _: &mut Vec<Effect>) {
        if self.outcome.is_none() {
            if let Some(r) = self.menu.row_at(x, y) {
                self.menu.sel = r;
            }
        } else if let Some(r) = self.steps.row_at(x, y) {
            self.steps.sel = r;
        }
    }

    fn rows<'a>(&'a self, _: &'a Ctx) -> Option<Box<dyn crate::tui::find::Rows + 'a>> {
        let Some(Ok(o)) = &self.outcome else {
            return None;
        };
        Some(Box::new(super::rows::TextRows {
            lines: flat(o)
                .into_iter()
                .map(|(op, text, _)| format!("op {} · {text}", op + 1))
                .collect(),
        }))
    }

    fn list(&mut self) -> Option<&mut ListView> {
        matches!(self.outcome, Some(Ok(_))).then_some(&mut self.steps)
    }

    fn list_ref(&self) -> Option<&ListView> {
        matches!(self.outcome, Some(Ok(_))).then_some(&self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qinspect::simulate::SimError;

    /// What qinspect does not follow ([`SimError::NotModelled`]) is shown in its
    /// own words, a failure of QEMU's as one: the kind decides, not the words.
    #[test]
    fn a_step_not_simulated_is_no_failure_of_qemus() {
        let op = Op::Resize {
            size: 1 << 20,
            shrink: false,
        };
        let record = |cause: SimError| OpRecord {
            op: op.clone(),
            description: op.describe(),
            steps: Vec::new(),
            error: Some(cause.text()),
            cause: Some(cause),
        };
        let o = Outcome {
            text: String::new(),
            records: vec![
                record(SimError::NotModelled("growing this image".into())),
                record(SimError::Qemu("not simulated: QEMU's own words".into())),
            ],
            summary: String::new(),
            clean: false,
            simulated: None,
        };
        assert_eq!(
            flat(&o),
            vec![
                (0, "not simulated: growing this image".to_string(), true),
                (
                    1,
                    "QEMU fails here: not simulated: QEMU's own words".to_string(),
                    true
                ),
            ]
        );
    }
}

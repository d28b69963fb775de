//! The Compare view (key `C`): two states of the image side by side, guest cluster
//! by guest cluster — the active state, any snapshot, the simulated image — with
//! the differences in words, and on request the snapshot the active state is
//! closest to. The comparison itself is `qinspect::compare`; it runs on a worker.

use super::ctx::Ctx;
use super::panes::color;
use super::widgets::{ListView, boxed};
use qinspect::compare::{Comparison, Distance, Mapping, Side};
use qinspect::image::Qcow2;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Gauge, Paragraph, Wrap};
use std::sync::Arc;

/// A state that can be compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The file's active L1 table.
    Active,
    /// A snapshot, by ID.
    Snapshot(String),
    /// The last simulation's result.
    Simulated,
}

/// What the view shows below the sides.
#[derive(Clone, Debug)]
pub enum Shown {
    /// Nothing asked yet.
    Nothing,
    /// A comparison of these two choices.
    Compared(Choice, Choice, Arc<Comparison>),
    /// The snapshots ranked by distance from the active state.
    Closest(Arc<Vec<Distance>>),
    /// Why it could not be done.
    Failed(String),
}

/// The view's state.
pub struct State {
    /// Side A and side B, as indexes into [`choices`].
    pub a: usize,
    /// Side B.
    pub b: usize,
    /// The result shown.
    pub shown: Shown,
    /// The rows' scroll and selection.
    pub rows: ListView,
    /// The running job: what it does, done, total.
    pub running: Option<(String, u64, u64)>,
}

impl Default for State {
    fn default() -> Self {
        State {
            a: 0,
            b: 1,
            shown: Shown::Nothing,
            rows: ListView::default(),
            running: None,
        }
    }
}

/// The states of this image, in order: active, each snapshot, the simulated image.
pub fn choices(ctx: &Ctx) -> Vec<Choice> {
    let mut v = vec![Choice::Active];
    if let Some(img) = ctx.disk_img() {
        v.extend(
            img.snapshots
                .snapshots
                .iter()
                .map(|s| Choice::Snapshot(s.id.clone())),
        );
    }
    if ctx.simulated.is_some() {
        v.push(Choice::Simulated);
    }
    v
}

/// A choice's name on screen.
pub fn name(c: &Choice, ctx: &Ctx) -> String {
    match c {
        Choice::Active => "the active state".into(),
        Choice::Snapshot(id) => ctx
            .disk_img()
            .and_then(|i| {
                i.snapshots
                    .snapshots
                    .iter()
                    .find(|s| &s.id == id)
                    .map(|s| format!("snapshot {} '{}'", s.id, s.name))
            })
            .unwrap_or_else(|| format!("snapshot {id}")),
        Choice::Simulated => match &ctx.simulated {
            Some(s) => format!("the simulated image ({})", s.ops),
            None => "the simulated image".into(),
        },
    }
}

/// The images a worker needs for a choice: the image and which L1.
#[derive(Clone)]
pub struct Picked {
    /// The image.
    pub img: Arc<Qcow2>,
    /// A snapshot ID, or None for the active L1.
    pub snapshot: Option<String>,
    /// The name.
    pub name: String,
}

/// What a worker needs to compare a choice.
pub fn pick(c: &Choice, ctx: &Ctx) -> Result<Picked, String> {
    let name = name(c, ctx);
    match c {
        Choice::Active | Choice::Snapshot(_) => {
            let img = ctx.disk_img().ok_or_else(|| ctx.unopened())?;
            let snapshot = match c {
                Choice::Snapshot(id) => Some(id.clone()),
                _ => None,
            };
            Ok(Picked {
                img,
                snapshot,
                name,
            })
        }
        Choice::Simulated => {
            let s = ctx.simulated.as_ref().ok_or("no simulation yet")?;
            Ok(Picked {
                img: s.img.clone(),
                snapshot: None,
                name,
            })
        }
    }
}

impl Picked {
    /// The side, for `qinspect::compare`.
    pub fn side(&self) -> qinspect::Result<Side<'_>> {
        let mut s = match &self.snapshot {
            None => Side::active(&self.img),
            Some(id) => Side::snapshot(&self.img, id)?,
        };
        s.name = self.name.clone();
        Ok(s)
    }
}

fn colour(m: &Mapping) -> Color {
    match m {
        Mapping::Data { .. } => color::DATA,
        Mapping::Compressed { .. } => color::COMPRESSED,
        Mapping::Zero { .. } => color::META,
        Mapping::Unallocated | Mapping::PastEnd => Color::DarkGray,
        Mapping::Subclusters { .. } => color::TABLE,
    }
}

impl State {
    /// Move side A (`which` false) or B to the next or previous choice.
    pub fn cycle(&mut self, b: bool, forward: bool, n: usize) {
        let n = n.max(1);
        let i = if b { &mut self.b } else { &mut self.a };
        *i = if forward {
            (*i + 1) % n
        } else {
            (*i + n - 1) % n
        };
    }

    /// The rows' count.
    pub fn len(&self) -> usize {
        match &self.shown {
            Shown::Compared(_, _, c) => c.rows.len(),
            Shown::Closest(d) => d.len(),
            _ => 0,
        }
    }

    /// Draw the view into `area`.
    pub fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        let ch = choices(ctx);
        let a = ch.get(self.a).cloned().unwrap_or(Choice::Active);
        let b = ch.get(self.b).cloned().unwrap_or(Choice::Active);
        let title = "Compare — [/] side A, ←/→ side B, Enter compares (on a row: trace it), Space: closest snapshot, Esc closes";
        let [sides, summary, list] = Layout::vertical([
            Constraint::Length(4),
            Constraint::Length(5),
            Constraint::Min(3),
        ])
        .areas(area);
        let current = matches!(&self.shown, Shown::Compared(x, y, _) if *x == a && *y == b);
        let sides_text = vec![
            Line::from(vec![
                Span::styled("A: ", color::head()),
                Span::raw(name(&a, ctx)),
            ]),
            Line::from(vec![
                Span::styled("B: ", color::head()),
                Span::raw(name(&b, ctx)),
                Span::styled(
                    if current || self.running.is_some() || matches!(self.shown, Shown::Closest(_))
                    {
                        String::new()
                    } else {
                        "   (Enter compares them)".into()
                    },
                    color::dim(),
                ),
            ]),
        ];
        f.render_widget(Paragraph::new(sides_text).block(boxed(title)), sides);
        if let Some((what, done, total)) = &self.running {
            let g = Gauge::default()
                .block(boxed(format!("{what} — on a worker thread, Esc cancels")))
                .gauge_style(Style::new().fg(color::DATA))
                .ratio((*done as f64 / (*total).max(1) as f64).clamp(0.0, 1.0))
                .label(format!("{done}/{total} guest clusters"));
            f.render_widget(g, summary);
            f.render_widget(boxed(""), list);
            return;
        }
        match &self.shown {
            Shown::Nothing => {
                f.render_widget(
                    Paragraph::new(Line::styled(
                        "Choose two states and press Enter; Space ranks the snapshots by how close the active state is to each.",
                        color::dim(),
                    ))
                    .wrap(Wrap { trim: true })
                    .block(boxed("")),
                    summary,
                );
                f.render_widget(boxed(""), list);
            }
            Shown::Failed(e) => {
                f.render_widget(
                    Paragraph::new(Line::styled(e.clone(), Style::new().fg(color::BAD)))
                        .wrap(Wrap { trim: true })
                        .block(boxed("")),
                    summary,
                );
                f.render_widget(boxed(""), list);
            }
            Shown::Compared(_, _, c) => {
                let c = c.clone();
                self.render_compared(f, summary, list, &c, current);
            }
            Shown::Closest(d) => {
                let d = d.clone();
                self.render_closest(f, summary, list, &d);
            }
        }
    }

    /// A comparison's summary and its differing clusters.
    fn render_compared(
        &mut self,
        f: &mut Frame,
        summary: Rect,
        list: Rect,
        c: &Comparison,
        current: bool,
    ) {
        let mut s = vec![Line::from(vec![
            Span::styled(
                format!("{} of {} guest clusters differ", c.differing, c.clusters),
                color::head(),
            ),
            Span::styled(format!(" ({} bytes each)", c.cluster_size), color::dim()),
        ])];
        s.push(Line::raw(
            c.counts
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(" · "),
        ));
        s.push(Line::raw(
            c.kinds
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(" · "),
        ));
        f.render_widget(
            Paragraph::new(s)
                .wrap(Wrap { trim: true })
                .block(boxed(if current {
                    "Summary".to_string()
                } else {
                    format!(
                        "Summary of {} vs {} (Enter compares the sides chosen now)",
                        c.a, c.b
                    )
                })),
            summary,
        );
        let more = if c.omitted > 0 {
            format!(" ({} more not listed)", c.omitted)
        } else {
            String::new()
        };
        let t = format!("Differing clusters: guest offset, A vs B{more}");
        self.rows
            .render_list(f, list, boxed(t), c.rows.len(), true, |r| {
                c.rows[r]
                    .iter()
                    .map(|row| {
                        Line::from(vec![
                            Span::raw(format!("{:>#12x}  ", row.guest)),
                            Span::styled("■", Style::new().fg(colour(&row.a))),
                            Span::styled("■ ", Style::new().fg(colour(&row.b))),
                            Span::raw(row.words.clone()),
                        ])
                    })
                    .collect()
            });
    }

    /// The snapshots ranked by how close the active state is to each.
    fn render_closest(&mut self, f: &mut Frame, summary: Rect, list: Rect, d: &[Distance]) {
        let s = match d.first() {
            Some(best) => format!(
                "the active state is closest to snapshot {} '{}': {} guest cluster(s) mapped differently",
                best.id, best.name, best.differing
            ),
            None => "this image has no internal snapshots".into(),
        };
        f.render_widget(
            Paragraph::new(Line::styled(s, color::head()))
                .wrap(Wrap { trim: true })
                .block(boxed("Closest snapshot")),
            summary,
        );
        self.rows.render_list(
            f,
            list,
            boxed("Snapshots by differing clusters, fewest first (Enter: compare it with the active state)"),
            d.len(),
            true,
            |r| {
                d[r].iter()
                    .map(|x| {
                        Line::raw(format!(
                            "{:>10}  snapshot {} '{}'",
                            x.differing, x.id, x.name
                        ))
                    })
                    .collect()
            },
        );
    }
}

//! Pane 4: the refcount table, then a block's refcounts beside the references the
//! check counted; mismatches in red (corruption) or yellow (leak).

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect, OffsetKind};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::refcount::get_refcount;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};

/// Which level is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Level {
    /// The refcount table.
    #[default]
    Table,
    /// One refcount block (table index).
    Block(usize),
}

/// Refcounts' state.
#[derive(Default)]
pub struct State {
    /// Which level.
    pub level: Level,
    /// The table list.
    pub table: ListView,
    /// The block list.
    pub block: ListView,
}

/// Title, rows and length.
fn rows(level: Level, app: &Ctx, w: std::ops::Range<usize>) -> (String, Vec<Line<'static>>, usize) {
    let Some(img) = &app.img else {
        return (String::new(), vec![], 0);
    };
    let rg = img.refcount_geometry();
    let per = rg.entries_per_block();
    let Ok(table) = img.refcount_table() else {
        return (
            "refcount table".into(),
            vec![Line::raw("cannot be read")],
            1,
        );
    };
    match level {
        Level::Table => {
            let rows = table
                .iter()
                .enumerate()
                .skip(w.start)
                .take(w.len())
                .map(|(i, e)| {
                    let first = i as u64 * per;
                    let text = match e.block_offset() {
                        Some(o) => format!(
                            // The end is exclusive, as in `dump refcount-table`.
                            "refcount block at {o} for clusters {first}..{}",
                            first.saturating_add(per)
                        ),
                        None => "no block: these clusters have refcount 0".to_string(),
                    };
                    let st = if e.0 == 0 {
                        color::dim()
                    } else {
                        Style::new().fg(color::REFCOUNT)
                    };
                    Line::from(vec![
                        Span::raw(format!("{i:>6}  ")),
                        Span::styled(format!("{:#018x}  ", e.0), st),
                        Span::raw(text),
                    ])
                })
                .collect();
            (
                format!(
                    "refcount table at {:#x} ({}-bit refcounts) — Enter opens a block",
                    img.header.refcount_table_offset,
                    rg.bits()
                ),
                rows,
                table.len(),
            )
        }
        Level::Block(ti) => {
            let Some(off) = table.get(ti).and_then(|e| e.block_offset()) else {
                return (
                    format!("refcount table entry {ti}"),
                    vec![Line::raw("no refcount block")],
                    1,
                );
            };
            let block = match img.refcount_block(off) {
                Ok(b) => b,
                Err(e) => return ("block".into(), vec![Line::raw(e.to_string())], 1),
            };
            let imrt = app.report.as_ref().and_then(|r| r.imrt.clone());
            let rows = (0..per)
                .skip(w.start)
                .take(w.len())
                .map(|j| {
                    let c = ti as u64 * per + j;
                    let stored = get_refcount(&block, rg.order, j);
                    let computed = imrt.as_ref().map(|i| i.get(c));
                    let (st, word) = match computed {
                        Some(k) if stored < k => (
                            Style::new().fg(color::BAD),
                            "ERROR: fewer than its references (corruption)",
                        ),
                        Some(k) if stored > k => (
                            Style::new().fg(color::LEAK),
                            "leaked: more than its references",
                        ),
                        Some(_) if stored == 0 => (color::dim(), ""),
                        Some(_) => (Style::new(), "ok"),
                        None => (Style::new(), "(check running)"),
                    };
                    let shown = match app.refcount_was(c, stored) {
                        Some(was) => format!("{was}→{stored}"),
                        None => stored.to_string(),
                    };
                    Line::styled(
                        format!(
                            "{j:>6}  cluster {c:>10}  stored {shown:>6}  counted {:>6}  {word}",
                            computed.map_or("…".into(), |k| k.to_string())
                        ),
                        st,
                    )
                })
                .collect();
            (
                format!("refcount block {ti} at {off} — Backspace: back to the table"),
                rows,
                per as usize,
            )
        }
    }
}

impl State {
    /// Show the refcount of host cluster `c`.
    pub fn select(&mut self, c: u64, ctx: &Ctx) {
        let Some(img) = &ctx.img else { return };
        let per = img.refcount_geometry().entries_per_block();
        let ti = usize::try_from(c / per).unwrap_or(usize::MAX);
        self.table.set(ti, ti.saturating_add(1));
        self.level = Level::Block(ti);
        self.block.set((c % per) as usize, per as usize);
    }

    fn cluster(&self, ctx: &Ctx) -> Option<u64> {
        let per = ctx.img.as_ref()?.refcount_geometry().entries_per_block();
        match self.level {
            Level::Table => None,
            Level::Block(ti) => Some(
                (ti as u64)
                    .saturating_mul(per)
                    .saturating_add(self.block.sel as u64),
            ),
        }
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        if ctx.img.is_none() {
            return super::nothing(f, area, "Refcounts", ctx.unopened());
        }
        let level = self.level;
        let (mut title, _, len) = rows(level, ctx, 0..0);
        title.push_str(&ctx.view_word());
        if let (Some((c, l, e)), Some(r)) = (ctx.previous, &ctx.report) {
            title.push_str(&format!(
                " · since the last load: corruptions {c}→{}, leaks {l}→{}, check errors {e}→{}",
                r.corruptions, r.leaks, r.check_errors
            ));
        }
        let v = match level {
            Level::Table => &mut self.table,
            Level::Block(_) => &mut self.block,
        };
        // Only the visible rows are built.
        v.render_list(f, area, boxed(title), len, true, |r| rows(level, ctx, r).1);
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let len = rows(self.level, ctx, 0..0).2;
        match (self.level, action) {
            (Level::Table, Action::Enter) => {
                self.level = Level::Block(self.table.sel);
                self.block = ListView::default();
            }
            (Level::Block(_), Action::Enter) => {
                if let Some(c) = self.cluster(ctx) {
                    q.push(Effect::Cluster(c));
                }
            }
            (Level::Block(_), Action::Back) => self.level = Level::Table,
            (Level::Table, a) => return self.table.select(a, len),
            (Level::Block(_), a) => return self.block.select(a, len),
        }
        true
    }

    fn explain(&self, ctx: &Ctx) -> String {
        let general = "The refcount table points at refcount blocks; each block holds one refcount per host cluster. A cluster shared by a snapshot has refcount 2 or more; QEMU copies it before writing (copy-on-write).";
        let Some(img) = &ctx.img else {
            return general.into();
        };
        let sel = match self.level {
            Level::Table => img.refcount_table().ok().and_then(|t| {
                let e = t.get(self.table.sel)?;
                Some(format!(
                    "Refcount table entry {}: {}.",
                    self.table.sel,
                    match e.block_offset() {
                        Some(o) => format!(
                            "a refcount block at {o} holds {} refcounts",
                            img.refcount_geometry().entries_per_block()
                        ),
                        None => "no block, so every cluster it would cover has refcount 0".into(),
                    }
                ))
            }),
            Level::Block(_) => self.cluster(ctx).and_then(|c| {
                let stored = ctx.stored_refcount(c)?;
                Some(match ctx.counted(c) {
                    Some(k) if stored < k => format!(
                        "Cluster {c}: stored {stored}, counted {k}. Fewer than its references: QEMU could reuse it while it is in use (a corruption)."
                    ),
                    Some(k) if stored > k => format!(
                        "Cluster {c}: stored {stored}, counted {k}. More than its references: the space is wasted (a leak), the data is safe."
                    ),
                    Some(k) if k > 1 => format!(
                        "Cluster {c}: {k} references — shared, typically by snapshots; a write copies it first."
                    ),
                    Some(k) => format!("Cluster {c}: stored {stored}, counted {k}: consistent."),
                    None => format!(
                        "Cluster {c}: stored refcount {stored}; the check is still counting references."
                    ),
                })
            }),
        };
        match sel {
            Some(s) => format!("{s}  —  {general}"),
            None => general.into(),
        }
    }

    fn offset_kind(&self) -> Option<OffsetKind> {
        Some(OffsetKind::Host)
    }

    fn goto(&mut self, offset: u64, ctx: &Ctx, _: &mut Vec<Effect>) {
        self.select(offset / ctx.cluster_size(), ctx);
    }

    fn click(&mut self, x: u16, y: u16, _: &Ctx, _: &mut Vec<Effect>) {
        let v = match self.level {
            Level::Table => &mut self.table,
            Level::Block(_) => &mut self.block,
        };
        if let Some(r) = v.row_at(x, y) {
            v.sel = r;
        }
    }

    fn rows<'a>(&'a self, ctx: &'a Ctx) -> Option<Box<dyn crate::tui::find::Rows + 'a>> {
        super::rows::refcounts(self, ctx)
    }

    fn list(&mut self) -> Option<&mut ListView> {
        Some(match self.level {
            Level::Table => &mut self.table,
            Level::Block(_) => &mut self.block,
        })
    }

    fn list_ref(&self) -> Option<&ListView> {
        Some(match self.level {
            Level::Table => &self.table,
            Level::Block(_) => &self.block,
        })
    }
}

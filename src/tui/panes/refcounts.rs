//! Pane 4: the refcount table, then a block's refcounts beside the references the
//! check counted; mismatches in red (corruption) or yellow (leak).

use super::{color, first_row, move_sel};
use crate::tui::app::{App, RefLevel};
use crate::tui::keymap::Action;
use qinspect::refcount::get_refcount;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};

/// Title, rows and selection.
pub fn rows(app: &App, w: std::ops::Range<usize>) -> (String, Vec<Line<'static>>, usize, usize) {
    let Some(img) = &app.img else {
        return (String::new(), vec![], 0, 0);
    };
    let rg = img.refcount_geometry();
    let per = rg.entries_per_block();
    let Ok(table) = img.refcount_table() else {
        return (
            "refcount table".into(),
            vec![Line::raw("cannot be read")],
            0,
            1,
        );
    };
    match app.ref_level {
        RefLevel::Table => {
            let rows = table
                .iter()
                .enumerate()
                .skip(w.start)
                .take(w.len())
                .map(|(i, e)| {
                    let first = i as u64 * per;
                    let text = match e.block_offset() {
                        Some(o) => format!(
                            "refcount block at {o} for clusters {first}..{}",
                            first + per - 1
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
                app.rt_sel,
                table.len(),
            )
        }
        RefLevel::Block(ti) => {
            let Some(off) = table.get(ti).and_then(|e| e.block_offset()) else {
                return (
                    format!("refcount table entry {ti}"),
                    vec![Line::raw("no refcount block")],
                    0,
                    1,
                );
            };
            let block = match img.refcount_block(off) {
                Ok(b) => b,
                Err(e) => return ("block".into(), vec![Line::raw(e.to_string())], 0, 1),
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
                    Line::styled(
                        format!(
                            "{j:>6}  cluster {c:>10}  stored {stored:>6}  counted {:>6}  {word}",
                            computed.map_or("…".into(), |k| k.to_string())
                        ),
                        st,
                    )
                })
                .collect();
            (
                format!("refcount block {ti} at {off} — Backspace: back to the table"),
                rows,
                app.rb_sel,
                per as usize,
            )
        }
    }
}

/// Draw.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    let h = area.height.saturating_sub(2) as usize;
    let sel = match app.ref_level {
        RefLevel::Table => app.rt_sel,
        RefLevel::Block(_) => app.rb_sel,
    };
    let first = first_row(sel, h);
    // Only the visible rows are built.
    let (mut title, rows, sel, _) = rows(app, first..first + h);
    if let (Some((c, l, e)), Some(r)) = (app.previous, &app.report) {
        title.push_str(&format!(
            " · since the last load: corruptions {c}→{}, leaks {l}→{}, check errors {e}→{}",
            r.corruptions, r.leaks, r.check_errors
        ));
    }
    super::draw_list(f, area, app, &title, rows, first, sel);
}

/// Keys.
pub fn handle(app: &mut App, action: Action) {
    let len = rows(app, 0..0).3;
    match (app.ref_level, action) {
        (RefLevel::Table, Action::Enter) => {
            app.ref_level = RefLevel::Block(app.rt_sel);
            app.rb_sel = 0;
        }
        (RefLevel::Block(ti), Action::Enter) => {
            if let Some(img) = &app.img {
                let per = img.refcount_geometry().entries_per_block();
                app.layout_sel = ti as u64 * per + app.rb_sel as u64;
                app.pane = crate::tui::keymap::pane::LAYOUT;
            }
        }
        (RefLevel::Block(_), Action::Back) => app.ref_level = RefLevel::Table,
        (RefLevel::Table, a) => {
            move_sel(&mut app.rt_sel, len, 20, a);
        }
        (RefLevel::Block(_), a) => {
            move_sel(&mut app.rb_sel, len, 20, a);
        }
    }
}

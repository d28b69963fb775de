//! Pane 3: the L1 table, and the L2 table behind an entry.

use super::{color, first_row, move_sel};
use crate::tui::app::{App, TablesLevel};
use crate::tui::keymap::Action;
use qinspect::tables::{L1Entry, L2Entry};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};

/// The rows shown and the selected index.
pub fn rows(app: &App, w: std::ops::Range<usize>) -> (String, Vec<Line<'static>>, usize, usize) {
    let Some(img) = &app.img else {
        return ("Tables".into(), vec![], 0, 0);
    };
    let Some(view) = app.view() else {
        return (
            "Tables".into(),
            vec![Line::raw("the snapshot's L1 table cannot be read")],
            0,
            1,
        );
    };
    let geo = img.geometry();
    let has_df = img.header.has_data_file();
    match app.tables_level {
        TablesLevel::L1 => {
            let rows = view
                .l1
                .iter()
                .enumerate()
                .skip(w.start)
                .take(w.len())
                .map(|(i, e)| {
                    let st = if e.0 == 0 {
                        color::dim()
                    } else {
                        Style::new().fg(color::TABLE)
                    };
                    Line::from(vec![
                        Span::raw(format!("{i:>6}  {:>#10x}  ", view.l1_offset + i as u64 * 8)),
                        Span::styled(format!("{:#018x}  ", e.0), st),
                        Span::raw(L1Entry::describe(e, &geo)),
                    ])
                })
                .collect();
            (
                format!(
                    "{} at {:#x} — Enter opens an L2 table",
                    view.label(),
                    view.l1_offset
                ),
                rows,
                app.l1_sel,
                view.l1.len(),
            )
        }
        TablesLevel::L2(i) => {
            let Some(off) = view.l1.get(i).and_then(|e| e.l2_offset()) else {
                return (
                    format!("{}[{i}]", view.label()),
                    vec![Line::raw(
                        "no L2 table: the whole range is unallocated here",
                    )],
                    0,
                    1,
                );
            };
            let table = match img.l2_table(off) {
                Ok(t) => t,
                Err(e) => return ("L2".into(), vec![Line::raw(e.to_string())], 0, 1),
            };
            let rows = table
                .iter()
                .enumerate()
                .skip(w.start)
                .take(w.len())
                .map(|(j, e): (usize, &L2Entry)| {
                    let g = geo.guest_offset(i as u64, j as u64, 0).map_or(0, |g| g.0);
                    let ct = e.cluster_type(&geo, has_df);
                    let st = match ct {
                        qinspect::tables::ClusterType::Normal => Style::new().fg(color::DATA),
                        qinspect::tables::ClusterType::Compressed => {
                            Style::new().fg(color::COMPRESSED)
                        }
                        qinspect::tables::ClusterType::Unallocated if e.bitmap == 0 => color::dim(),
                        _ => Style::new().fg(color::META),
                    };
                    let mut spans = vec![
                        Span::raw(format!("{j:>5}  guest {g:>#12x}  ")),
                        Span::styled(format!("{:#018x}  ", e.raw), st),
                    ];
                    if geo.extended_l2 {
                        let map: String = (0..32)
                            .map(|s| match e.subcluster_type(&geo, has_df, s) {
                                qinspect::tables::SubclusterType::Normal => 'D',
                                qinspect::tables::SubclusterType::ZeroAlloc
                                | qinspect::tables::SubclusterType::ZeroPlain => '0',
                                qinspect::tables::SubclusterType::Invalid => '!',
                                qinspect::tables::SubclusterType::Compressed => 'C',
                                _ => '.',
                            })
                            .collect();
                        spans.push(Span::raw(format!("[{map}]  ")));
                    }
                    spans.push(Span::raw(e.describe(&geo, has_df)));
                    Line::from(spans)
                })
                .collect();
            (
                format!(
                    "L2 table at {off} (from {}[{i}]) — Backspace: back to L1",
                    view.label()
                ),
                rows,
                app.l2_sel,
                table.len(),
            )
        }
    }
}

/// Draw.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    let h = area.height.saturating_sub(2) as usize;
    let sel = match app.tables_level {
        TablesLevel::L1 => app.l1_sel,
        TablesLevel::L2(_) => app.l2_sel,
    };
    let first = first_row(sel, h);
    // Only the visible rows are built, however long the table.
    let (title, rows, sel, _) = rows(app, first..first + h);
    super::draw_list(f, area, app, &title, rows, first, sel);
}

/// Keys.
pub fn handle(app: &mut App, action: Action) {
    let len = rows(app, 0..0).3;
    match (app.tables_level, action) {
        (TablesLevel::L1, Action::Enter) => {
            app.tables_level = TablesLevel::L2(app.l1_sel);
            app.l2_sel = 0;
        }
        (TablesLevel::L2(i), Action::Enter) => {
            // The selected L2 entry's cluster in Hex.
            if let Some(img) = app.img.clone() {
                let geo = img.geometry();
                let view = app.view();
                let e = view
                    .and_then(|v| v.l1.get(i).and_then(|e| e.l2_offset()))
                    .and_then(|o| img.l2_table(o).ok().map(|t| (o, t)));
                if let Some((o, t)) = e {
                    let j = app.l2_sel;
                    let entry_off = o.0 + j as u64 * geo.l2_entry_size();
                    if let Some(en) = t.get(j) {
                        if en.host_offset().0 != 0 && !en.compressed() {
                            let h = en.host_offset().0;
                            app.show_host(
                                h,
                                format!(
                                    "data of guest {:#x} (L2 {o}[{j}])",
                                    geo.guest_offset(i as u64, j as u64, 0).map_or(0, |g| g.0)
                                ),
                                None,
                            );
                        } else {
                            app.show_host(
                                entry_off,
                                format!("L2 {o}[{j}] entry"),
                                Some((entry_off, entry_off + geo.l2_entry_size())),
                            );
                        }
                    }
                }
            }
        }
        (TablesLevel::L2(_), Action::Back) => app.tables_level = TablesLevel::L1,
        (TablesLevel::L1, a) => {
            move_sel(&mut app.l1_sel, len, 20, a);
        }
        (TablesLevel::L2(_), a) => {
            move_sel(&mut app.l2_sel, len, 20, a);
        }
    }
}

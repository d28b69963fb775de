//! Pane 5: every field of every snapshot; Enter makes a snapshot the view; two
//! marked snapshots show which guest clusters differ.

use super::{color, move_sel};
use crate::tui::app::App;
use crate::tui::keymap::Action;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph};

/// Draw.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    let Some(img) = app.img.clone() else { return };
    let [list, diff] = Layout::vertical([Constraint::Min(4), Constraint::Length(9)]).areas(area);
    let mut lines = vec![Line::styled(
        format!(
            "{:>3} {:<4} {:<16} {:>10} {:>12} {:>6} {:>14} {:>10} {:>8} {:<19}",
            "",
            "ID",
            "NAME",
            "VM STATE",
            "L1 OFFSET",
            "L1 SZ",
            "DISK SIZE",
            "VM CLOCK",
            "ICOUNT",
            "DATE"
        ),
        color::head(),
    )];
    for (i, s) in img.snapshots.snapshots.iter().enumerate() {
        let mark = if app.marked.contains(&i) { "*" } else { " " };
        let view = if app.view_snapshot.as_deref() == Some(s.id.as_str()) {
            "▶"
        } else {
            " "
        };
        let l = Line::raw(format!(
            "{view}{mark}  {:<4} {:<16} {:>10} {:>#12x} {:>6} {:>14} {:>10} {:>8} {}",
            s.id,
            s.name,
            s.vm_state_size,
            s.l1_table_offset,
            s.l1_size,
            s.disk_size.map_or("current".into(), |d| d.to_string()),
            format!(
                "{}.{:03}s",
                s.vm_clock_nsec / 1_000_000_000,
                s.vm_clock_nsec / 1_000_000 % 1000
            ),
            s.icount.map_or("-".into(), |c| c.to_string()),
            crate::cli::info::format_date(s.date_sec)
        ));
        lines.push(if i == app.snap_sel {
            l.style(color::selected())
        } else {
            l
        });
    }
    if img.snapshots.snapshots.is_empty() {
        lines.push(Line::styled(
            "no internal snapshots (simulate snapshot-create in pane 8 to see what one would do)",
            color::dim(),
        ));
    }
    if let Some(e) = &img.snapshots.error {
        lines.push(Line::styled(
            format!("snapshot table error: {e}"),
            Style::new().fg(color::BAD),
        ));
    }
    app.areas.list = Some((
        Rect {
            y: list.y + 1,
            ..list
        },
        0,
    ));
    let view = match &app.view_snapshot {
        Some(s) => {
            format!(" Snapshots — viewing snapshot {s} (Enter on it again: back to the active L1) ")
        }
        None => " Snapshots — Enter: use as the view · m: mark two to compare ".to_string(),
    };
    f.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(view)),
        list,
    );
    let mut d = Vec::new();
    match &app.diff {
        None => d.push(Line::styled(
            "mark two snapshots with m to see which guest clusters differ",
            color::dim(),
        )),
        Some(Err(e)) => d.push(Line::raw(e.clone())),
        Some(Ok(v)) => {
            d.push(Line::raw(format!(
                "{} guest cluster(s) map differently:",
                v.len()
            )));
            for (g, what) in v.iter().take(6) {
                d.push(Line::raw(format!("  guest {g:#x}: {what}")));
            }
        }
    }
    f.render_widget(
        Paragraph::new(d).block(Block::new().borders(Borders::ALL).title(" Difference ")),
        diff,
    );
}

/// Keys.
pub fn handle(app: &mut App, action: Action) {
    let Some(img) = app.img.clone() else { return };
    let n = img.snapshots.snapshots.len();
    match action {
        Action::Enter => {
            if let Some(s) = img.snapshots.snapshots.get(app.snap_sel) {
                if app.view_snapshot.as_deref() == Some(s.id.as_str()) {
                    app.view_snapshot = None;
                } else {
                    app.view_snapshot = Some(s.id.clone());
                }
                app.tables_level = crate::tui::app::TablesLevel::L1;
                app.l1_sel = 0;
                app.open_chain();
                app.status = match &app.view_snapshot {
                    Some(s) => format!("Tables, Trace and Hex now use snapshot {s}"),
                    None => "back to the active L1 table".into(),
                };
            }
        }
        Action::Mark => {
            let i = app.snap_sel;
            if let Some(p) = app.marked.iter().position(|m| *m == i) {
                app.marked.remove(p);
            } else {
                if app.marked.len() == 2 {
                    app.marked.remove(0);
                }
                app.marked.push(i);
            }
            app.diff = None;
            if app.marked.len() == 2 {
                app.compute_diff();
            }
        }
        a => {
            move_sel(&mut app.snap_sel, n, 10, a);
        }
    }
}

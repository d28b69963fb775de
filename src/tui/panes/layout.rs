//! Pane 2: the host file as a grid of clusters coloured by role.

use super::color;
use crate::tui::app::{App, LAYOUT_LIMIT};
use crate::tui::keymap::Action;
use qinspect::check::{ROLES, Role, clusters};
use qinspect::image::RefcountReader;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

/// The colour of a role.
pub fn role_color(r: Role) -> Color {
    match r {
        Role::Header | Role::CryptoHeader => color::META,
        Role::L1Table | Role::L2Table => color::TABLE,
        Role::Data | Role::VmState => color::DATA,
        Role::Compressed => color::COMPRESSED,
        Role::SnapshotTable => color::SNAPSHOT,
        Role::RefcountTable | Role::RefcountBlock => color::REFCOUNT,
        Role::BitmapDirectory | Role::BitmapTable | Role::BitmapData => color::BITMAP,
    }
}

/// What a cell shows: the colour, and a word for the legend and details.
pub fn cell(app: &App, c: u64, stored: Option<u64>) -> (Color, &'static str) {
    let bits = app
        .roles
        .as_ref()
        .and_then(|r| r.get(c as usize).copied())
        .unwrap_or(0);
    let computed = app
        .report
        .as_ref()
        .and_then(|r| r.imrt.as_ref())
        .map(|i| i.get(c));
    if let (Some(s), Some(k)) = (stored, computed) {
        if s < k {
            return (color::BAD, "over-referenced");
        }
        if s > k {
            return (color::LEAK, "leaked");
        }
    }
    match ROLES.iter().find(|r| bits & (1 << (**r as u16)) != 0) {
        Some(r) => (role_color(*r), "used"),
        None => (color::FREE, "free"),
    }
}

fn legend() -> Line<'static> {
    let item = |c: Color, t: &'static str| {
        vec![
            Span::styled("■", Style::new().fg(c)),
            Span::raw(format!(" {t}  ")),
        ]
    };
    Line::from(
        [
            item(color::META, "header"),
            item(color::TABLE, "L1/L2"),
            item(color::DATA, "data"),
            item(color::COMPRESSED, "compressed"),
            item(color::REFCOUNT, "refcounts"),
            item(color::SNAPSHOT, "snapshot table"),
            item(color::BITMAP, "bitmaps"),
            item(color::FREE, "free"),
            item(color::LEAK, "leaked"),
            item(color::BAD, "over-referenced"),
        ]
        .concat(),
    )
}

/// Draw.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    let Some(img) = app.img.clone() else { return };
    let cs = img.geometry().cluster_size();
    let n = img.file_len().div_ceil(cs).max(1);
    let [grid_area, info_area] =
        Layout::vertical([Constraint::Min(5), Constraint::Length(7)]).areas(area);
    let inner_w = grid_area.width.saturating_sub(2 + 10) as u64;
    let per_row = inner_w.max(1);
    let rows = grid_area.height.saturating_sub(3) as u64;
    app.layout_sel = app.layout_sel.min(n - 1);
    let sel_row = app.layout_sel / per_row;
    let first_row = super::first_row(sel_row as usize, rows as usize) as u64;
    let mut reader = RefcountReader::new(&img);
    let mut lines = vec![legend()];
    for r in first_row..(first_row + rows) {
        let start = r * per_row;
        if start >= n {
            break;
        }
        let mut spans = vec![Span::styled(format!("{start:>9} "), color::dim())];
        for c in start..(start + per_row).min(n) {
            let stored = reader.get(c).ok();
            let (col, _) = cell(app, c, stored);
            let mut st = Style::new().fg(col);
            if c == app.layout_sel {
                st = st.bg(Color::White);
            }
            spans.push(Span::styled(if c >= LAYOUT_LIMIT { "·" } else { "■" }, st));
        }
        lines.push(Line::from(spans));
    }
    app.areas.list = Some((grid_area, first_row as usize));
    let title = if app.roles.is_none() {
        " Layout (finding roles…) "
    } else {
        " Layout "
    };
    f.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(title)),
        grid_area,
    );
    // Details of the selected cluster.
    let c = app.layout_sel;
    let stored = reader.get(c).ok();
    let computed = app
        .report
        .as_ref()
        .and_then(|r| r.imrt.as_ref())
        .map(|i| i.get(c));
    let bits = app
        .roles
        .as_ref()
        .and_then(|r| r.get(c as usize).copied())
        .unwrap_or(0);
    let names: Vec<String> = ROLES
        .iter()
        .filter(|r| bits & (1 << (**r as u16)) != 0)
        .map(|r| {
            serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        })
        .collect();
    let (col, word) = cell(app, c, stored);
    let mut info = vec![Line::from(vec![
        Span::styled(format!("cluster {c} at {:#x}: ", c * cs), color::head()),
        Span::styled(
            if names.is_empty() {
                "free".to_string()
            } else {
                names.join(", ")
            },
            Style::new().fg(col),
        ),
        Span::raw(format!(
            " · stored refcount {} · references counted {} · {word}",
            stored.map_or("?".into(), |s| s.to_string()),
            computed.map_or("…".into(), |s| s.to_string())
        )),
    ])];
    match &app.detail {
        Some((dc, refs)) if *dc == c => {
            for r in refs.iter().take(4) {
                info.push(Line::raw(format!("  referenced by {r}")));
            }
        }
        _ => info.push(Line::styled(
            "  i: who references it · Enter: open in Hex (an L1/L2 table opens in Tables)",
            color::dim(),
        )),
    }
    f.render_widget(
        Paragraph::new(info).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" Selected cluster "),
        ),
        info_area,
    );
    app.layout_per_row = per_row;
}

/// Keys.
pub fn handle(app: &mut App, action: Action) {
    let Some(img) = app.img.clone() else { return };
    let cs = img.geometry().cluster_size();
    let n = img.file_len().div_ceil(cs).max(1);
    let per_row = app.layout_per_row.max(1);
    let c = &mut app.layout_sel;
    match action {
        Action::Left => *c = c.saturating_sub(1),
        Action::Right => *c = (*c + 1).min(n - 1),
        Action::Up => *c = c.saturating_sub(per_row),
        Action::Down => *c = (*c + per_row).min(n - 1),
        Action::PageUp => *c = c.saturating_sub(per_row * 10),
        Action::PageDown => *c = (*c + per_row * 10).min(n - 1),
        Action::Home => *c = 0,
        Action::End => *c = n - 1,
        Action::Mark | Action::Run | Action::NextStep => {}
        Action::Enter => {
            let c = app.layout_sel;
            let info = clusters(&img, c, c);
            let is_l1 = info
                .first()
                .is_some_and(|i| i.roles.contains(&Role::L1Table));
            // An L2 table named by the active L1: open it in Tables.
            let l2_of = img
                .l1
                .iter()
                .position(|e| e.l2_offset().map(|o| o.0) == Some(c * cs));
            if is_l1 {
                app.pane = crate::tui::keymap::pane::TABLES;
                app.tables_level = crate::tui::app::TablesLevel::L1;
            } else if let Some(i) = l2_of {
                app.pane = crate::tui::keymap::pane::TABLES;
                app.tables_level = crate::tui::app::TablesLevel::L2(i);
                app.l1_sel = i;
                app.l2_sel = 0;
            } else {
                app.show_host(c * cs, format!("host cluster {c}"), None);
            }
        }
        _ => {}
    }
}

/// Look up who references the selected cluster (the `i` key, via Enter in tests).
pub fn lookup(app: &mut App) {
    let Some(img) = app.img.clone() else { return };
    let c = app.layout_sel;
    let refs = clusters(&img, c, c)
        .first()
        .map(|i| i.referrers.iter().map(|r| r.describe()).collect())
        .unwrap_or_default();
    app.detail = Some((c, refs));
}

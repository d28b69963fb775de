//! One module per pane: each draws itself and handles the actions that mean
//! something there.

pub mod check;
pub mod hex;
pub mod layout;
pub mod overview;
pub mod refcounts;
pub mod simulate;
pub mod snapshots;
pub mod tables;
pub mod trace;

use super::app::App;
use super::keymap::{Action, pane};
use ratatui::Frame;
use ratatui::layout::Rect;

/// Draw the current pane.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    match app.pane {
        pane::OVERVIEW => overview::render(f, area, app),
        pane::LAYOUT => layout::render(f, area, app),
        pane::TABLES => tables::render(f, area, app),
        pane::REFCOUNTS => refcounts::render(f, area, app),
        pane::SNAPSHOTS => snapshots::render(f, area, app),
        pane::TRACE => trace::render(f, area, app),
        pane::CHECK => check::render(f, area, app),
        pane::SIMULATE => simulate::render(f, area, app),
        _ => hex::render(f, area, app),
    }
}

/// Let the current pane handle an action.
pub fn handle(app: &mut App, action: Action) {
    match app.pane {
        pane::OVERVIEW => overview::handle(app, action),
        pane::LAYOUT => layout::handle(app, action),
        pane::TABLES => tables::handle(app, action),
        pane::REFCOUNTS => refcounts::handle(app, action),
        pane::SNAPSHOTS => snapshots::handle(app, action),
        pane::TRACE => trace::handle(app, action),
        pane::CHECK => check::handle(app, action),
        pane::SIMULATE => simulate::handle(app, action),
        _ => hex::handle(app, action),
    }
}

/// Move a selection by an action within `len` rows (`page` rows per page).
pub fn move_sel(sel: &mut usize, len: usize, page: usize, action: Action) -> bool {
    let last = len.saturating_sub(1);
    let new = match action {
        Action::Up => sel.saturating_sub(1),
        Action::Down => (*sel + 1).min(last),
        Action::PageUp => sel.saturating_sub(page.max(1)),
        Action::PageDown => (*sel + page.max(1)).min(last),
        Action::Home => 0,
        Action::End => last,
        _ => return false,
    };
    *sel = new;
    true
}

/// Draw a bordered list whose visible rows start at `first`, the selected one
/// reversed, and remember it for mouse clicks.
pub fn draw_list(
    f: &mut Frame,
    area: Rect,
    app: &mut App,
    title: &str,
    rows: Vec<ratatui::text::Line<'static>>,
    first: usize,
    sel: usize,
) {
    use ratatui::widgets::{Block, Borders, Paragraph};
    let visible: Vec<ratatui::text::Line> = rows
        .into_iter()
        .enumerate()
        .map(|(k, l)| {
            if first + k == sel {
                l.style(color::selected())
            } else {
                l
            }
        })
        .collect();
    app.areas.list = Some((area, first));
    f.render_widget(
        Paragraph::new(visible).block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!(" {title} ")),
        ),
        area,
    );
}

/// The first visible row so that `sel` is on screen in `height` rows.
pub fn first_row(sel: usize, height: usize) -> usize {
    if height == 0 {
        0
    } else {
        sel.saturating_sub(height - 1)
            .max(sel / height * height)
            .min(sel)
    }
}

/// Styles that carry meaning, shared by the panes.
pub mod color {
    use ratatui::style::{Color, Modifier, Style};
    /// Header and metadata.
    pub const META: Color = Color::Cyan;
    /// L1/L2 tables.
    pub const TABLE: Color = Color::Blue;
    /// Guest data.
    pub const DATA: Color = Color::Green;
    /// Compressed data.
    pub const COMPRESSED: Color = Color::Magenta;
    /// Refcount structures.
    pub const REFCOUNT: Color = Color::Yellow;
    /// Snapshot structures.
    pub const SNAPSHOT: Color = Color::LightBlue;
    /// Bitmaps.
    pub const BITMAP: Color = Color::LightMagenta;
    /// Free space.
    pub const FREE: Color = Color::DarkGray;
    /// Leaked (stored refcount above references).
    pub const LEAK: Color = Color::LightYellow;
    /// Over-referenced (stored refcount below references): a corruption.
    pub const BAD: Color = Color::Red;
    /// The selected row.
    pub fn selected() -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }
    /// Headings.
    pub fn head() -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }
    /// Dim text.
    pub fn dim() -> Style {
        Style::new().fg(Color::DarkGray)
    }
}

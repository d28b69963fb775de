//! Pane 9: a hexyl view of a host cluster, with the selected entry highlighted.

use super::color;
use crate::tui::app::App;
use crate::tui::keymap::Action;
use ansi_to_tui::IntoText;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Text;
use ratatui::widgets::{Block, Borders, Paragraph};

/// Column of byte `i` (0..16) of a hexyl row with borders.
pub fn byte_column(i: u64) -> u16 {
    if i < 8 {
        11 + 3 * i as u16
    } else {
        37 + 3 * (i as u16 - 8)
    }
}

/// Rendered rows for `bytes` starting at `base`.
pub fn hex_text(base: u64, bytes: &[u8]) -> Text<'static> {
    let mut out = Vec::new();
    let _ = crate::cli::hexdump::render(&mut out, base, bytes, true);
    out.into_text().unwrap_or_default()
}

/// Draw.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    let Some(img) = app.img.clone() else { return };
    let rows = area.height.saturating_sub(4) as u64;
    let len = (rows * 16).min(img.geometry().cluster_size());
    let mut buf = vec![0u8; len as usize];
    let src = app.hex_src.clone().unwrap_or_else(|| img.src.clone());
    let _ = qinspect::io::read_into(src.as_ref(), "hex", app.hex_base, &mut buf);
    let text = hex_text(app.hex_base, &buf);
    let title = format!(
        " Hex — {} at {:#x} (g: another host offset; ←/→ clusters) ",
        app.hex_label, app.hex_base
    );
    f.render_widget(
        Paragraph::new(text).block(Block::new().borders(Borders::ALL).title(title)),
        area,
    );
    // Restyle the highlighted bytes in place.
    if let Some((from, to)) = app.hex_mark {
        let buf = f.buffer_mut();
        for b in from..to {
            if b < app.hex_base || b >= app.hex_base + len {
                continue;
            }
            let rel = b - app.hex_base;
            let y = area.y + 1 + 1 + (rel / 16) as u16;
            let x = area.x + 1 + byte_column(rel % 16);
            for dx in 0..2 {
                if let Some(cell) = buf.cell_mut((x + dx, y)) {
                    cell.set_style(
                        Style::new()
                            .bg(Color::Yellow)
                            .fg(Color::Black)
                            .add_modifier(Modifier::BOLD),
                    );
                }
            }
        }
    }
    let _ = color::dim();
}

/// Keys.
pub fn handle(app: &mut App, action: Action) {
    let cs = app
        .img
        .as_ref()
        .map_or(512, |i| i.geometry().cluster_size());
    match action {
        Action::Right | Action::PageDown | Action::Down => {
            app.hex_base += cs;
            app.hex_label = format!("host cluster {}", app.hex_base / cs);
        }
        Action::Left | Action::PageUp | Action::Up => {
            app.hex_base = app.hex_base.saturating_sub(cs);
            app.hex_label = format!("host cluster {}", app.hex_base / cs);
        }
        Action::Home => app.hex_base = 0,
        _ => {}
    }
}

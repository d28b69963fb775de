//! Pane 9: the bytes of one file of the chain, row by row across cluster
//! boundaries, with the entry or field chosen elsewhere highlighted. Bytes past
//! the end of the file are marked, not drawn as zeros.

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect, OffsetKind};
use crate::tui::keymap::Action;
use qinspect::io::SharedSource;
use ratatui::Frame;
use ratatui::layout::{Alignment, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

/// Bytes per row.
const ROW: u64 = 16;

/// Hex's state.
#[derive(Default)]
pub struct State {
    /// The file shown (None: the image file).
    pub src: Option<SharedSource>,
    /// The first row's offset.
    pub top: u64,
    /// The byte jumped to last, and what it is.
    pub target: Option<(u64, String)>,
    /// Bytes highlighted.
    pub mark: Option<(u64, u64)>,
    /// Rows visible at the last draw.
    pub rows: u64,
}

/// The style hexyl gives a byte: NUL, printable, whitespace, other ASCII, non-ASCII.
fn byte_style(b: u8) -> Style {
    let c = match b {
        0 => Color::DarkGray,
        b if b.is_ascii_graphic() => Color::Cyan,
        b if b.is_ascii_whitespace() => Color::Green,
        b if b.is_ascii() => Color::Magenta,
        _ => Color::Yellow,
    };
    Style::new().fg(c)
}

/// The highlight of marked bytes.
pub fn marked() -> Style {
    Style::new()
        .bg(Color::Yellow)
        .fg(Color::Black)
        .add_modifier(Modifier::BOLD)
}

impl State {
    fn file<'a>(&'a self, ctx: &'a Ctx) -> Option<&'a SharedSource> {
        self.src.as_ref().or(ctx.file.as_ref())
    }

    fn len(&self, ctx: &Ctx) -> u64 {
        self.file(ctx).map_or(0, |f| f.len())
    }

    fn page(&self) -> u64 {
        if self.rows == 0 { 16 } else { self.rows }
    }

    /// The top row that shows the end of the file (and the line saying so).
    fn last_top(&self, ctx: &Ctx) -> u64 {
        let rows_in_file = self.len(ctx).div_ceil(ROW) + 1;
        rows_in_file.saturating_sub(self.page()) * ROW
    }

    /// Jump to `offset` of `src` (None: the image file), highlighting `mark`.
    pub fn show(
        &mut self,
        offset: u64,
        label: String,
        mark: Option<(u64, u64)>,
        src: Option<SharedSource>,
    ) {
        self.src = src;
        self.target = Some((offset, label));
        self.mark = mark.or(Some((offset, offset.saturating_add(1))));
        // A few rows of context above the target, so it is on screen and not at
        // the very edge.
        let context = (self.page() / 4).min(4);
        self.top = (offset / ROW).saturating_sub(context) * ROW;
    }

    fn row(
        &self,
        off: u64,
        bytes: &[u8],
        valid: usize,
        width: usize,
        ascii_col: bool,
    ) -> Line<'static> {
        let mut spans = vec![Span::styled(format!("{off:0width$x}  "), color::dim())];
        let mut ascii = Vec::new();
        for i in 0..ROW as usize {
            let at = off + i as u64;
            let in_mark = self.mark.is_some_and(|(a, b)| at >= a && at < b);
            if i == 8 {
                spans.push(Span::raw(" "));
            }
            if i >= valid {
                spans.push(Span::styled("-- ", color::dim()));
                ascii.push(Span::styled(" ", color::dim()));
                continue;
            }
            let b = bytes.get(i).copied().unwrap_or(0);
            let st = if in_mark { marked() } else { byte_style(b) };
            spans.push(Span::styled(format!("{b:02x}"), st));
            spans.push(Span::raw(" "));
            let ch = if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else if b == 0 {
                '⋄'
            } else {
                '•'
            };
            ascii.push(Span::styled(ch.to_string(), st));
        }
        if ascii_col {
            spans.push(Span::raw(" │"));
            spans.extend(ascii);
        }
        Line::from(spans)
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        let Some(src) = self.file(ctx).cloned() else {
            return super::nothing(
                f,
                area,
                "Hex",
                format!("{} cannot be read", ctx.path.display()),
            );
        };
        let len = src.len();
        let block = ratatui::widgets::Block::new().borders(ratatui::widgets::Borders::ALL);
        let inner = block.inner(area);
        self.rows = u64::from(inner.height.saturating_sub(1)).max(1);
        let top = self.top.min(self.last_top(ctx));
        self.top = top;
        let mut buf = vec![0u8; (self.rows * ROW) as usize];
        let got = qinspect::io::read_into(src.as_ref(), "hex", top, &mut buf).unwrap_or(0);
        let width = format!("{:x}", len.max(top + self.rows * ROW)).len().max(8);
        // Wide offsets keep every column aligned; the ASCII column goes first
        // when the box is too narrow for all of it.
        let ascii_col = usize::from(inner.width) >= width + 2 + 49 + 2 + 16;
        let mut lines = vec![Line::styled(
            format!(
                "{:<width$}  00 01 02 03 04 05 06 07  08 09 0a 0b 0c 0d 0e 0f {}",
                "offset",
                if ascii_col { " │ascii" } else { "" }
            ),
            color::head(),
        )];
        for r in 0..self.rows {
            let off = top + r * ROW;
            if off >= len {
                lines.push(Line::styled(
                    format!("{:<width$}  -- the file ends at {len:#x} ({len} bytes)", ""),
                    color::dim(),
                ));
                break;
            }
            let start = (r * ROW) as usize;
            let valid = got.saturating_sub(start).min((len - off).min(ROW) as usize);
            let bytes = buf.get(start..start + ROW as usize).unwrap_or(&[]);
            lines.push(self.row(off, bytes, valid, width, ascii_col));
        }
        let cs = ctx.cluster_size();
        let end = (top + self.rows * ROW)
            .min(len.max(top + 1))
            .saturating_sub(1);
        let title = format!(
            "Hex — {}: {top:#x}–{end:#x} (host cluster {}{}) · ↑↓ rows, ←→ clusters, g offset",
            src.name().display(),
            top / cs,
            if end / cs != top / cs {
                format!("–{}", end / cs)
            } else {
                String::new()
            }
        );
        let bottom = match &self.target {
            Some((t, label)) => {
                let on = *t >= top && *t < top + self.rows * ROW;
                Line::from(vec![
                    Span::styled(" ■ ", marked()),
                    Span::raw(format!(
                        " {label} at {t:#x}{} ",
                        if on {
                            ""
                        } else {
                            " (scrolled off; g to return)"
                        }
                    )),
                ])
            }
            None => Line::raw(""),
        }
        .alignment(Alignment::Left);
        f.render_widget(
            Paragraph::new(lines).block(block.title(format!(" {title} ")).title_bottom(bottom)),
            area,
        );
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, _: &mut Vec<Effect>) -> bool {
        let cs = ctx.cluster_size();
        let last = self.last_top(ctx);
        let page = self.page() * ROW;
        self.top = match action {
            Action::Down => (self.top + ROW).min(last),
            Action::Up => self.top.saturating_sub(ROW),
            Action::PageDown => (self.top + page).min(last),
            Action::PageUp => self.top.saturating_sub(page),
            Action::Right => (self.top / cs * cs + cs).min(last),
            Action::Left => (self.top.saturating_sub(1)) / cs * cs,
            Action::Home => 0,
            Action::End => last,
            _ => return false,
        };
        true
    }

    fn explain(&self, ctx: &Ctx) -> String {
        let file = self
            .file(ctx)
            .map_or(String::new(), |f| f.name().display().to_string());
        let what = match &self.target {
            Some((t, l)) => format!("The highlighted bytes are {l} at {t:#x} of {file}.  —  "),
            None => String::new(),
        };
        format!(
            "{what}Bytes of one file of the chain, sixteen to a row, coloured as hexyl colours them (NUL, printable, whitespace, other ASCII, non-ASCII); rows past the end of the file are marked -- and not read as zeros."
        )
    }

    fn offset_kind(&self) -> Option<OffsetKind> {
        Some(OffsetKind::Host)
    }

    fn goto(&mut self, offset: u64, ctx: &Ctx, _: &mut Vec<Effect>) {
        let _ = ctx;
        let src = self.src.clone();
        self.show(offset, format!("host offset {offset:#x}"), None, src);
    }
}

impl State {
    /// The size of the file `g` jumps in.
    pub fn limit(&self, ctx: &Ctx) -> u64 {
        self.len(ctx)
    }
}

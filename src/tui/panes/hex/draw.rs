//! Drawing Hex: the rows of bytes coloured as hexyl colours them, the title and
//! the line of the byte jumped to, and the side panel that decodes the structure
//! under the cursor.

use super::{BELOW, ROW, SIDE, State, WIDE_ROW};
use crate::tui::ctx::Ctx;
use crate::tui::panes::color;
use crate::tui::panes::hexsearch;
use qinspect::check::{ROLES, Role};
use qinspect::io::SharedSource;
use qinspect::locate::Decoded;
use qinspect::types::HostOffset;
use ratatui::Frame;
use ratatui::layout::{Alignment, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};

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

/// The highlight of the field the side panel decodes.
pub fn field() -> Style {
    Style::new().bg(Color::Blue).fg(Color::White)
}

/// The cursor.
pub fn cursor() -> Style {
    Style::new()
        .bg(Color::White)
        .fg(Color::Black)
        .add_modifier(Modifier::BOLD)
}

/// Characters a row of `w` bytes takes: offset, gap, the bytes (a space after
/// each and one more every eight), and the ASCII column.
fn row_chars(offset_width: usize, w: u64, ascii: bool) -> usize {
    let w = w as usize;
    offset_width + 2 + w * 3 + (w / 8).saturating_sub(1) + if ascii { 2 + w } else { 0 }
}

fn role_word(r: Role) -> &'static str {
    match r {
        Role::Header => "the header cluster",
        Role::L1Table => "an L1 table",
        Role::L2Table => "an L2 table",
        Role::Data => "guest data",
        Role::Compressed => "compressed guest data",
        Role::SnapshotTable => "the snapshot table",
        Role::RefcountTable => "the refcount table",
        Role::RefcountBlock => "a refcount block",
        Role::CryptoHeader => "the LUKS header",
        Role::BitmapDirectory => "the bitmap directory",
        Role::BitmapTable => "a bitmap table",
        Role::BitmapData => "bitmap data",
        Role::VmState => "a snapshot's saved VM state",
    }
}

impl State {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        off: HostOffset,
        bytes: &[u8],
        valid: usize,
        width: usize,
        ascii_col: bool,
        w: u64,
        fieldr: Option<(HostOffset, HostOffset)>,
    ) -> Line<'static> {
        let mut spans = vec![Span::styled(format!("{off:0width$x}  "), color::dim())];
        let mut ascii = Vec::new();
        for i in 0..w as usize {
            let at = off.saturating_add(i as u64);
            let in_mark = self.mark.is_some_and(|(a, b)| at >= a && at < b);
            let in_field = fieldr.is_some_and(|(a, b)| at >= a && at < b);
            if i > 0 && i % 8 == 0 {
                spans.push(Span::raw(" "));
            }
            if i >= valid {
                spans.push(Span::styled("-- ", color::dim()));
                ascii.push(Span::styled(" ", color::dim()));
                continue;
            }
            let b = bytes.get(i).copied().unwrap_or(0);
            let st = if at == self.cursor {
                cursor()
            } else if in_mark {
                marked()
            } else if in_field {
                field()
            } else {
                byte_style(b)
            };
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

    /// The side panel: what the cursor is on, and the search.
    fn side(&self, ctx: &Ctx, src: &SharedSource, d: Option<&Decoded>) -> Vec<Line<'static>> {
        let c = self.cursor;
        let key = |k: &str| Span::styled(format!("{k}: "), color::head());
        let mut v = Vec::new();
        if let Some(r) = &self.search {
            let (done, total) = r.progress;
            let pct = (done as f64 / total.max(1) as f64 * 100.0).min(100.0);
            let at = r.at();
            v.push(Line::styled(
                format!(
                    "searching for {}… at {at:#x}, {pct:.1}% (Esc cancels)",
                    hexsearch::show(&r.pattern)
                ),
                Style::new().fg(Color::Yellow),
            ));
        } else if let Some(f) = &self.found {
            v.push(Line::raw(format!("{f} · n/N next/previous")));
        }
        let mut at = vec![Line::from(vec![
            key("cursor"),
            Span::raw(format!("{c:#x}")),
        ])];
        let mut be = [0u8; 8];
        let got = qinspect::io::read_into(src.as_ref(), "hex", c, &mut be).unwrap_or(0);
        if got > 0 {
            let n = |k: usize| {
                be.get(..k)
                    .filter(|_| got >= k)
                    .map(|b| b.iter().fold(0u64, |a, x| (a << 8) | u64::from(*x)))
            };
            let mut s = format!("u8 {}", be[0]);
            if let Some(x) = n(4) {
                s.push_str(&format!(" · u32 {x:#x}"));
            }
            if let Some(x) = n(8) {
                s.push_str(&format!(" · u64 {x:#x}"));
            }
            at.push(Line::from(vec![key("big-endian"), Span::raw(s)]));
        }
        match d {
            Some(d) => {
                v.push(Line::from(vec![
                    key("structure"),
                    Span::styled(d.structure.clone(), Style::new().fg(color::META)),
                ]));
                v.push(Line::from(vec![
                    key("field"),
                    Span::styled(d.item.clone(), field()),
                ]));
                let bytes = format!(
                    "{:#x}–{:#x} ({} bytes)",
                    d.start,
                    d.end.get().saturating_sub(1),
                    d.end.saturating_sub(d.start)
                );
                v.push(Line::from(match d.raw {
                    Some(r) => vec![key("raw"), Span::raw(format!("{r:#x} ({r}) in {bytes}"))],
                    None => vec![key("bytes"), Span::raw(bytes)],
                }));
                v.push(Line::from(vec![
                    key("meaning"),
                    Span::raw(d.meaning.clone()),
                ]));
            }
            None => {
                let in_chain = self.is_image_file(ctx)
                    || ctx.chain.as_ref().is_ok_and(|c| {
                        c.layers
                            .iter()
                            .any(|l| Some(l.src.name()) == self.src.as_ref().map(|s| s.name()))
                    });
                let what = if !in_chain {
                    "bytes in memory, not a file of the chain: no qcow2 structure".to_string()
                } else if self.image(ctx).is_none() {
                    "this file is not opened as qcow2: no structure to decode".to_string()
                } else if !self.is_image_file(ctx) {
                    "no metadata structure of this layer holds this byte".to_string()
                } else {
                    let cs = ctx.cluster_size();
                    let cl = c.get() / cs;
                    let role = (cl < crate::tui::ctx::LAYOUT_LIMIT)
                        .then_some(ctx.roles.as_ref())
                        .flatten()
                        .map(|r| {
                            let bits = usize::try_from(cl)
                                .ok()
                                .and_then(|i| r.get(i))
                                .copied()
                                .unwrap_or(0);
                            let names: Vec<&str> = ROLES
                                .iter()
                                .filter(|r| bits & (1 << (**r as u16)) != 0)
                                .map(|r| role_word(*r))
                                .collect();
                            if names.is_empty() {
                                "free: nothing references it".to_string()
                            } else {
                                names.join(", ")
                            }
                        });
                    format!(
                        "host cluster {cl}: {}",
                        role.unwrap_or_else(|| "its roles are not known yet".into())
                    )
                };
                v.push(Line::from(vec![key("structure"), Span::raw("none")]));
                v.push(Line::raw(what));
            }
        }
        v.push(Line::raw(""));
        v.extend(at);
        v
    }

    /// Where the bytes and the side panel go in `area`. Sets how many bytes a
    /// row holds (16 or 32); when that changes, the first row stays on a row
    /// boundary.
    fn areas(&mut self, area: Rect, offset_width: usize) -> (Rect, Rect) {
        // 32 bytes a row when a whole row with its ASCII and the side panel fit;
        // else 16, with the side panel beside the bytes when there is room and
        // below them when not (80 columns).
        let need = |w: u64| row_chars(offset_width, w, true) as u16 + 2;
        let (w, beside) = if area.width >= need(WIDE_ROW).saturating_add(SIDE) {
            (WIDE_ROW, true)
        } else {
            (ROW, area.width >= need(ROW).saturating_add(SIDE))
        };
        if w != self.width {
            self.width = w;
            self.top = self.row_start(self.top);
        }
        if beside {
            // The bytes take what they need, the side panel the rest.
            let hex = Rect {
                width: need(w).min(area.width - SIDE),
                ..area
            };
            let side = Rect {
                x: area.x + hex.width,
                width: area.width - hex.width,
                ..area
            };
            (hex, side)
        } else {
            let below = BELOW.min(area.height / 3);
            let hex = Rect {
                height: area.height - below,
                ..area
            };
            let side = Rect {
                y: area.y + hex.height,
                height: below,
                ..area
            };
            (hex, side)
        }
    }

    /// Draw the pane: the bytes, and the side panel beside or below them.
    pub(super) fn draw(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        self.poll();
        let Some(src) = self.file(ctx).cloned() else {
            return crate::tui::panes::nothing(
                f,
                area,
                "Hex",
                format!("{} cannot be read", ctx.path.display()),
            );
        };
        let len = src.len();
        let offset_width = format!("{:x}", len.max(self.top.get() + 64 * WIDE_ROW))
            .len()
            .max(8);
        let (hex_area, side_area) = self.areas(area, offset_width);
        let w = self.width;
        let block = Block::new().borders(Borders::ALL);
        let inner = block.inner(hex_area);
        self.rows = u64::from(inner.height.saturating_sub(1)).max(1);
        self.cursor = self.cursor.min(HostOffset(len.saturating_sub(1)));
        self.follow(ctx);
        let top = self.top.min(self.last_top(ctx));
        self.top = top;
        let decoded = self.decoded(ctx);
        let fieldr = decoded.as_ref().map(|d| (d.start, d.end));
        let mut buf = vec![0u8; (self.rows * w) as usize];
        let got = qinspect::io::read_into(src.as_ref(), "hex", top, &mut buf).unwrap_or(0);
        let ascii_col = usize::from(inner.width) >= row_chars(offset_width, w, true);
        let cols: String = (0..w)
            .map(|i| {
                if i > 0 && i % 8 == 0 {
                    format!(" {i:02x}")
                } else {
                    format!("{i:02x}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        let mut lines = vec![Line::styled(
            format!(
                "{:<offset_width$}  {cols} {}",
                "offset",
                if ascii_col { " │ascii" } else { "" }
            ),
            color::head(),
        )];
        for r in 0..self.rows {
            let off = top.saturating_add(r * w);
            if off.get() >= len {
                lines.push(Line::styled(
                    format!(
                        "{:<offset_width$}  -- the file ends at {len:#x} ({len} bytes)",
                        ""
                    ),
                    color::dim(),
                ));
                break;
            }
            let start = (r * w) as usize;
            let valid = got
                .saturating_sub(start)
                .min((len - off.get()).min(w) as usize);
            let bytes = buf.get(start..start + w as usize).unwrap_or(&[]);
            lines.push(self.row(off, bytes, valid, offset_width, ascii_col, w, fieldr));
        }
        let cs = ctx.cluster_size();
        let end = (top.get() + self.rows * w)
            .min(len.max(top.get() + 1))
            .saturating_sub(1);
        // The image file is named as its layer of the chain, when it has one.
        let who = match ctx.layer_name() {
            Some(l) if self.is_image_file(ctx) => l,
            _ => src.name().display().to_string(),
        };
        let title = format!(
            "Hex — {who}: {top:#x}–{end:#x} (host cluster {}{}) · arrows move, [ ] clusters, / find, g offset",
            top.get() / cs,
            if end / cs != top.get() / cs {
                format!("–{}", end / cs)
            } else {
                String::new()
            }
        );
        let bottom = match &self.target {
            Some((t, label)) => {
                let on = *t >= top && *t < top.saturating_add(self.rows * w);
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
            hex_area,
        );
        let side = self.side(ctx, &src, decoded.as_ref());
        f.render_widget(
            Paragraph::new(side)
                .wrap(Wrap { trim: true })
                .block(crate::tui::widgets::boxed("Under the cursor")),
            side_area,
        );
    }
}

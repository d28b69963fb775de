//! Pane 9: the bytes of one file of the chain, row by row across cluster
//! boundaries, with a byte cursor and a side panel that decodes the structure
//! under it (header field, header extension, L1/L2 entry, refcount-table or
//! refcount-block entry, snapshot-table field, bitmap directory field) with the
//! core's [`qinspect::locate`]. Rows are 32 bytes on wide terminals and 16
//! otherwise. `/` finds bytes or text on a worker thread. Bytes past the end of
//! the file are marked, not drawn as zeros.

use super::hexsearch::{self, Running};
use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect, OffsetKind};
use crate::tui::keymap::Action;
use qinspect::check::{ROLES, Role};
use qinspect::image::Qcow2;
use qinspect::io::SharedSource;
use qinspect::locate::Decoded;
use qinspect::types::HostOffset;
use ratatui::Frame;
use ratatui::layout::{Alignment, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};
use std::sync::Arc;

/// Bytes per row at 80 columns.
const ROW: u64 = 16;
/// Bytes per row on wide terminals.
const WIDE_ROW: u64 = 32;
/// The side panel's width when it sits beside the bytes.
const SIDE: u16 = 40;
/// Its height when it sits below them.
const BELOW: u16 = 8;

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
    /// The byte under the cursor.
    pub cursor: u64,
    /// Bytes per row at the last draw (16 or 32).
    pub width: u64,
    /// The last search pattern (n/N repeat it).
    pub pattern: Option<Vec<u8>>,
    /// A search running on a worker.
    pub search: Option<Running>,
    /// What the last search found, or why it did not.
    pub found: Option<String>,
}

/// Show the guest cluster a compressed L2 entry maps, inflated, in Hex: a file
/// in memory named after the guest cluster (or, for an entry that is not
/// compressed or does not inflate, a message saying so).
pub fn inflated(
    img: &Qcow2,
    l2: u64,
    l1_index: u64,
    j: u64,
    e: &qinspect::tables::L2Entry,
) -> Effect {
    let geo = img.geometry();
    let g = geo.guest_offset(l1_index, j, 0).map_or(0, |g| g.0);
    let gc = g >> geo.cluster_bits;
    let d = match e.compressed_descriptor(&geo) {
        Some(d) if e.compressed() => d,
        _ => {
            return Effect::Status(format!(
                "L2 {l2:#x}[{j}] is not compressed: x shows its bytes in Hex"
            ));
        }
    };
    let (a, b) = d.range();
    let method = img.header.compression_type().qemu_name();
    match qinspect::lookup::read_compressed(img, &d, qinspect::types::GuestOffset(g), "the image") {
        Ok(bytes) => {
            let name = format!(
                "guest data of guest cluster {gc} ({g:#x}), inflated ({method}) from host {a:#x}–{:#x}",
                b.saturating_sub(1)
            );
            let src: SharedSource = Arc::new(qinspect::io::MemSource::new(name, bytes));
            Effect::ShowHost {
                offset: HostOffset(0),
                label: format!("guest {g:#x}"),
                mark: Some((HostOffset(0), HostOffset(0))),
                src: Some(src),
            }
        }
        Err(err) => Effect::Status(format!(
            "guest cluster {gc} ({g:#x}) does not inflate: {err}"
        )),
    }
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
    fn file<'a>(&'a self, ctx: &'a Ctx) -> Option<&'a SharedSource> {
        self.src.as_ref().or(ctx.file.as_ref())
    }

    fn len(&self, ctx: &Ctx) -> u64 {
        self.file(ctx).map_or(0, |f| f.len())
    }

    fn page(&self) -> u64 {
        if self.rows == 0 { 16 } else { self.rows }
    }

    fn w(&self) -> u64 {
        if self.width == 0 { ROW } else { self.width }
    }

    /// Whether the file shown is the image file itself.
    fn is_image_file(&self, ctx: &Ctx) -> bool {
        match (&self.src, &ctx.file) {
            (None, _) => true,
            (Some(s), Some(f)) => s.name() == f.name(),
            _ => false,
        }
    }

    /// The qcow2 image whose file is shown, if it is one.
    fn image<'a>(&self, ctx: &'a Ctx) -> Option<&'a Qcow2> {
        if self.is_image_file(ctx) {
            return ctx.img.as_deref();
        }
        let name = self.src.as_ref()?.name().to_path_buf();
        let chain = ctx.chain.as_ref().ok()?;
        chain
            .layers
            .iter()
            .find(|l| l.src.name() == name)
            .and_then(|l| l.qcow2())
    }

    /// What the cursor is on, decoded by the core.
    pub fn decoded(&self, ctx: &Ctx) -> Option<Decoded> {
        let img = self.image(ctx)?;
        let s = ctx.structures_of(img);
        s.decode(img, HostOffset(self.cursor))
    }

    /// The top row that shows the end of the file (and the line saying so).
    fn last_top(&self, ctx: &Ctx) -> u64 {
        let w = self.w();
        let rows_in_file = self.len(ctx).div_ceil(w) + 1;
        rows_in_file.saturating_sub(self.page()) * w
    }

    /// Scroll so that the cursor is on screen.
    fn follow(&mut self, ctx: &Ctx) {
        let w = self.w();
        let page = self.page() * w;
        if self.cursor < self.top {
            self.top = self.cursor / w * w;
        } else if self.cursor >= self.top + page {
            self.top = (self.cursor / w + 1).saturating_sub(self.page()) * w;
        }
        // On the last row, the line saying where the file ends shows too.
        let last_row = self.len(ctx).saturating_sub(1) / w;
        if self.cursor / w == last_row {
            self.top = self.top.max(self.last_top(ctx));
        }
        self.top = self.top.min(self.last_top(ctx));
    }

    /// Jump to `offset` of `src` (None: the image file), highlighting `mark`.
    pub fn show(
        &mut self,
        offset: HostOffset,
        label: String,
        mark: Option<(HostOffset, HostOffset)>,
        src: Option<SharedSource>,
    ) {
        let mark = mark.map(|(a, b)| (a.get(), b.get()));
        let offset = offset.get();
        self.src = src;
        self.target = Some((offset, label));
        self.mark = mark.or(Some((offset, offset.saturating_add(1))));
        self.cursor = offset;
        // A few rows of context above the target, so it is on screen and not at
        // the very edge.
        let w = self.w();
        let context = (self.page() / 4).min(4);
        self.top = (offset / w).saturating_sub(context) * w;
    }

    /// Start a search for `text` from the cursor on (the command `/`).
    pub fn start_search(&mut self, text: &str, ctx: &Ctx) {
        match hexsearch::parse(text) {
            Ok(p) => {
                self.pattern = Some(p.clone());
                self.run_search(p, self.cursor, true, ctx);
            }
            Err(e) => self.found = Some(e),
        }
    }

    fn run_search(&mut self, p: Vec<u8>, from: u64, forward: bool, ctx: &Ctx) {
        if let Some(r) = self.search.take() {
            r.cancel();
        }
        let Some(src) = self.file(ctx).cloned() else {
            return;
        };
        self.found = None;
        self.search = Some(Running::start(src, p, from, forward));
    }

    /// Repeat the last search after (or before) the cursor.
    fn again(&mut self, forward: bool, ctx: &Ctx) {
        match self.pattern.clone() {
            Some(p) if forward => self.run_search(p, self.cursor.saturating_add(1), true, ctx),
            Some(p) => self.run_search(p, self.cursor, false, ctx),
            None => self.found = Some("nothing to repeat: / starts a search".into()),
        }
    }

    /// Stop a running search; false if none runs.
    pub fn cancel_search(&mut self) -> bool {
        match self.search.take() {
            Some(r) => {
                r.cancel();
                self.found = Some(format!(
                    "search for {} cancelled at {:#x}",
                    hexsearch::show(&r.pattern),
                    if r.forward {
                        r.from.saturating_add(r.progress.0)
                    } else {
                        r.from.saturating_sub(r.progress.0)
                    }
                ));
                true
            }
            None => false,
        }
    }

    /// Whether a search is running.
    #[cfg(test)]
    pub fn searching(&self) -> bool {
        self.search.is_some()
    }

    /// Take in what the search worker reported.
    pub fn poll(&mut self) {
        let Some(r) = self.search.as_mut() else {
            return;
        };
        let Some(end) = r.poll() else { return };
        self.finished(end);
    }

    /// Wait for the running search (tests).
    #[cfg(test)]
    pub fn wait_search(&mut self) {
        if let Some(r) = self.search.as_mut() {
            let end = r.wait();
            self.finished(end);
        }
    }

    fn finished(&mut self, end: Result<Option<u64>, String>) {
        let Some(r) = self.search.take() else { return };
        let what = hexsearch::show(&r.pattern);
        let n = r.pattern.len() as u64;
        self.found = Some(match end {
            Ok(Some(at)) => {
                self.cursor = at;
                self.mark = Some((at, at.saturating_add(n)));
                self.target = Some((at, format!("{what} found")));
                let w = self.w();
                let context = (self.page() / 4).min(4);
                self.top = (at / w).saturating_sub(context) * w;
                format!("{what} found at {at:#x}")
            }
            Ok(None) if r.forward => format!("{what} does not occur at or after {:#x}", r.from),
            Ok(None) => format!("{what} does not occur before {:#x}", r.from),
            Err(e) => format!("search for {what} failed: {e}"),
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        off: u64,
        bytes: &[u8],
        valid: usize,
        width: usize,
        ascii_col: bool,
        w: u64,
        fieldr: Option<(u64, u64)>,
    ) -> Line<'static> {
        let mut spans = vec![Span::styled(format!("{off:0width$x}  "), color::dim())];
        let mut ascii = Vec::new();
        for i in 0..w as usize {
            let at = off + i as u64;
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
            let at = if r.forward {
                r.from.saturating_add(done)
            } else {
                r.from.saturating_sub(done)
            };
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
        let got = qinspect::io::read_into(src.as_ref(), "hex", HostOffset(c), &mut be).unwrap_or(0);
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
                    let cl = c / cs;
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
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        self.poll();
        let Some(src) = self.file(ctx).cloned() else {
            return super::nothing(
                f,
                area,
                "Hex",
                format!("{} cannot be read", ctx.path.display()),
            );
        };
        let len = src.len();
        let offset_width = format!("{:x}", len.max(self.top + 64 * WIDE_ROW))
            .len()
            .max(8);
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
            self.top = self.top / w * w;
        }
        let (hex_area, side_area) = if beside {
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
        };
        let block = Block::new().borders(Borders::ALL);
        let inner = block.inner(hex_area);
        self.rows = u64::from(inner.height.saturating_sub(1)).max(1);
        self.cursor = self.cursor.min(len.saturating_sub(1));
        self.follow(ctx);
        let top = self.top.min(self.last_top(ctx));
        self.top = top;
        let decoded = self.decoded(ctx);
        let fieldr = decoded.as_ref().map(|d| (d.start.get(), d.end.get()));
        let mut buf = vec![0u8; (self.rows * w) as usize];
        let got =
            qinspect::io::read_into(src.as_ref(), "hex", HostOffset(top), &mut buf).unwrap_or(0);
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
            let off = top + r * w;
            if off >= len {
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
            let valid = got.saturating_sub(start).min((len - off).min(w) as usize);
            let bytes = buf.get(start..start + w as usize).unwrap_or(&[]);
            lines.push(self.row(off, bytes, valid, offset_width, ascii_col, w, fieldr));
        }
        let cs = ctx.cluster_size();
        let end = (top + self.rows * w)
            .min(len.max(top + 1))
            .saturating_sub(1);
        // The image file is named as its layer of the chain, when it has one.
        let who = match ctx.layer_name() {
            Some(l) if self.is_image_file(ctx) => l,
            _ => src.name().display().to_string(),
        };
        let title = format!(
            "Hex — {who}: {top:#x}–{end:#x} (host cluster {}{}) · arrows move, [ ] clusters, / find, g offset",
            top / cs,
            if end / cs != top / cs {
                format!("–{}", end / cs)
            } else {
                String::new()
            }
        );
        let bottom = match &self.target {
            Some((t, label)) => {
                let on = *t >= top && *t < top + self.rows * w;
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

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let cs = ctx.cluster_size();
        let w = self.w();
        let last = self.len(ctx).saturating_sub(1);
        let page = self.page() * w;
        let c = self.cursor;
        self.cursor = match action {
            Action::Down => c.saturating_add(w).min(last),
            Action::Up => c.checked_sub(w).unwrap_or(c),
            Action::Right => c.saturating_add(1).min(last),
            Action::Left => c.saturating_sub(1),
            Action::PageDown => c.saturating_add(page).min(last),
            Action::PageUp => c.saturating_sub(page),
            Action::ClusterNext => (c / cs * cs).saturating_add(cs).min(last),
            Action::ClusterPrev => c.saturating_sub(1) / cs * cs,
            Action::Home => 0,
            Action::End => last,
            Action::Find => {
                q.push(Effect::Input(
                    crate::tui::app::InputFor::HexSearch,
                    String::new(),
                ));
                return true;
            }
            Action::NextStep => {
                self.again(true, ctx);
                return true;
            }
            Action::PrevStep | Action::FindPrev => {
                self.again(false, ctx);
                return true;
            }
            _ => return false,
        };
        if matches!(action, Action::ClusterNext | Action::ClusterPrev) {
            // A cluster jump puts the cluster's first row at the top.
            self.top = (self.cursor / w * w).min(self.last_top(ctx));
        }
        self.follow(ctx);
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
        let here = match self.decoded(ctx) {
            Some(d) => format!(
                "The cursor is on {} of the {} ({:#x}–{:#x}): {}.  —  ",
                d.item,
                d.structure,
                d.start,
                d.end.get().saturating_sub(1),
                d.meaning
            ),
            None => String::new(),
        };
        format!(
            "{here}{what}Bytes of one file of the chain, sixteen to a row (thirty-two on a wide terminal), coloured as hexyl colours them (NUL, printable, whitespace, other ASCII, non-ASCII); the cursor's structure is decoded beside them. Rows past the end of the file are marked -- and not read as zeros."
        )
    }

    fn offset_kind(&self) -> Option<OffsetKind> {
        Some(OffsetKind::Host)
    }

    fn goto(&mut self, offset: u64, ctx: &Ctx, _: &mut Vec<Effect>) {
        let _ = ctx;
        let src = self.src.clone();
        self.show(
            HostOffset(offset),
            format!("host offset {offset:#x}"),
            None,
            src,
        );
    }
}

impl State {
    /// The size of the file `g` jumps in.
    pub fn limit(&self, ctx: &Ctx) -> u64 {
        self.len(ctx)
    }
}

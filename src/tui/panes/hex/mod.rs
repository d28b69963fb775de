//! Pane 9: the bytes of one file of the chain, row by row across cluster
//! boundaries, with a byte cursor and a side panel that decodes the structure
//! under it (header field, header extension, L1/L2 entry, refcount-table or
//! refcount-block entry, snapshot-table field, bitmap directory field) with the
//! core's [`qinspect::locate`]. Rows are 32 bytes on wide terminals and 16
//! otherwise. `/` finds bytes or text on a worker thread. Bytes past the end of
//! the file are marked, not drawn as zeros.

mod draw;

use super::PaneState;
use super::hexsearch::{self, Running};
use crate::tui::ctx::{Ctx, Effect, OffsetKind};
use crate::tui::keymap::Action;
use qinspect::image::Qcow2;
use qinspect::io::SharedSource;
use qinspect::locate::Decoded;
use qinspect::types::HostOffset;
use ratatui::Frame;
use ratatui::layout::Rect;
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
    pub top: HostOffset,
    /// The byte jumped to last, and what it is.
    pub target: Option<(HostOffset, String)>,
    /// Bytes highlighted: the first, and one past the last.
    pub mark: Option<(HostOffset, HostOffset)>,
    /// Rows visible at the last draw.
    pub rows: u64,
    /// The byte under the cursor.
    pub cursor: HostOffset,
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
        s.decode(img, self.cursor)
    }

    /// The top row that shows the end of the file (and the line saying so).
    fn last_top(&self, ctx: &Ctx) -> HostOffset {
        let w = self.w();
        let rows_in_file = self.len(ctx).div_ceil(w) + 1;
        HostOffset(rows_in_file.saturating_sub(self.page()) * w)
    }

    /// The first byte of the row `at` is on.
    fn row_start(&self, at: HostOffset) -> HostOffset {
        let w = self.w();
        HostOffset(at.get() / w * w)
    }

    /// Put `at` on screen with a few rows of context above it, so it is not at
    /// the very edge.
    fn scroll_to(&mut self, at: HostOffset) {
        let w = self.w();
        let context = (self.page() / 4).min(4);
        self.top = HostOffset((at.get() / w).saturating_sub(context) * w);
    }

    /// Scroll so that the cursor is on screen.
    fn follow(&mut self, ctx: &Ctx) {
        let w = self.w();
        let page = self.page() * w;
        if self.cursor < self.top {
            self.top = self.row_start(self.cursor);
        } else if self.cursor >= self.top.saturating_add(page) {
            self.top = HostOffset((self.cursor.get() / w + 1).saturating_sub(self.page()) * w);
        }
        // On the last row, the line saying where the file ends shows too.
        let last_row = self.len(ctx).saturating_sub(1) / w;
        if self.cursor.get() / w == last_row {
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
        self.src = src;
        self.target = Some((offset, label));
        self.mark = mark.or(Some((offset, offset.saturating_add(1))));
        self.cursor = offset;
        self.scroll_to(offset);
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

    fn run_search(&mut self, p: Vec<u8>, from: HostOffset, forward: bool, ctx: &Ctx) {
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
                    r.at()
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

    fn finished(&mut self, end: Result<Option<HostOffset>, String>) {
        let Some(r) = self.search.take() else { return };
        let what = hexsearch::show(&r.pattern);
        let n = r.pattern.len() as u64;
        self.found = Some(match end {
            Ok(Some(at)) => {
                self.cursor = at;
                self.mark = Some((at, at.saturating_add(n)));
                self.target = Some((at, format!("{what} found")));
                self.scroll_to(at);
                format!("{what} found at {at:#x}")
            }
            Ok(None) if r.forward => format!("{what} does not occur at or after {:#x}", r.from),
            Ok(None) => format!("{what} does not occur before {:#x}", r.from),
            Err(e) => format!("search for {what} failed: {e}"),
        });
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        self.draw(f, area, ctx);
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let cs = ctx.cluster_size();
        let w = self.w();
        let last = self.len(ctx).saturating_sub(1);
        let page = self.page() * w;
        let c = self.cursor.get();
        self.cursor = HostOffset(match action {
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
        });
        if matches!(action, Action::ClusterNext | Action::ClusterPrev) {
            // A cluster jump puts the cluster's first row at the top.
            self.top = self.row_start(self.cursor).min(self.last_top(ctx));
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

//! Pane 0: the guest address space as `qemu-img map` extents, coloured by what
//! answers a read there (data of which layer, zeros, compressed data, nothing) and
//! mapped lazily, a few GiB at a time, so it scrolls at once on a 1 TiB disk.

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect, OffsetKind};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::map::{MapEntry, map_range, qemu_length};
use qinspect::types::{GuestOffset, human_size};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use std::time::{Duration, Instant};

/// Guest bytes mapped per call.
const CHUNK: u64 = 4 << 30;
/// How long one draw may spend mapping before it shows what it has.
const BUDGET: Duration = Duration::from_millis(40);

/// Extents kept at once (`g` starts the list elsewhere).
const MAX_EXTENTS: usize = 1 << 20;

/// The Map's state: the extents mapped so far, and which image and view they are of.
#[derive(Default)]
pub struct State {
    /// The selected extent and the scroll.
    pub list: ListView,
    /// Where the list starts: 0, or the offset `g` jumped to.
    pub base: u64,
    /// Extents from `base` up to `next`.
    pub extents: Vec<MapEntry>,
    /// Where mapping continues.
    pub next: u64,
    /// The guest size `qemu-img map` covers.
    pub end: u64,
    /// Why mapping stopped early.
    pub error: Option<String>,
    /// Keep mapping until the end (End was pressed).
    to_end: bool,
    /// The image (its address) and view the extents belong to.
    of: Option<(usize, Option<usize>)>,
}

/// What an extent is, in words, and its colour.
pub fn kind(e: &MapEntry, ctx: &Ctx) -> (String, Color) {
    let layer = |d: usize| {
        ctx.chain
            .as_ref()
            .ok()
            .and_then(|c| c.layers.get(d))
            .map(|l| {
                l.path
                    .file_name()
                    .map_or(l.path.display().to_string(), |n| {
                        n.to_string_lossy().into_owned()
                    })
            })
            .unwrap_or_else(|| format!("layer {d}"))
    };
    // Where the layer's data clusters are, when that is not the image itself: its
    // external data file.
    let data_file = |d: usize| {
        ctx.chain
            .as_ref()
            .ok()
            .and_then(|c| c.layers.get(d))
            .filter(|l| l.data_path() != l.path.as_path())
            .map(|l| {
                let p = l.data_path();
                p.file_name().map_or(p.display().to_string(), |n| {
                    n.to_string_lossy().into_owned()
                })
            })
    };
    let in_layer = |d: usize| match data_file(d) {
        Some(df) => format!("{df} (the data file of {}, layer {d})", layer(d)),
        None => format!("{} (layer {d})", layer(d)),
    };
    let layer_size = |d: usize| {
        ctx.chain
            .as_ref()
            .ok()
            .and_then(|c| c.layers.get(d))
            .map(|l| l.size())
    };
    if e.compressed {
        return (
            format!("compressed data in {} (layer {})", layer(e.depth), e.depth),
            color::COMPRESSED,
        );
    }
    if e.data {
        const DEPTH: [Color; 4] = [Color::Green, Color::Blue, Color::Yellow, Color::LightRed];
        return (
            format!("data in {}", in_layer(e.depth)),
            DEPTH[e.depth.min(DEPTH.len() - 1)],
        );
    }
    if e.zero && e.present {
        let raw = ctx
            .chain
            .as_ref()
            .ok()
            .and_then(|c| c.layers.get(e.depth))
            .is_some_and(|l| l.qcow2().is_none());
        let how = if raw {
            "zeros (a hole or zero bytes) in"
        } else if e.offset.is_some() {
            "zeros in an allocated cluster of"
        } else {
            "zeros (the zero flag) in"
        };
        return (
            if e.offset.is_some() && !raw {
                format!("{how} {}", in_layer(e.depth))
            } else {
                format!("{how} {} (layer {})", layer(e.depth), e.depth)
            },
            color::META,
        );
    }
    if e.depth > 0 && layer_size(e.depth).is_some_and(|s| e.start.get() >= s) {
        return (
            format!(
                "past the end of {} (layer {}): reads as zeros",
                layer(e.depth),
                e.depth
            ),
            Color::Gray,
        );
    }
    (
        "unallocated in every layer: reads as zeros".to_string(),
        color::FREE,
    )
}

impl State {
    /// Forget the extents when the image or the view changed.
    fn sync(&mut self, ctx: &Ctx) {
        let of = Self::of(ctx);
        if of != self.of {
            self.of = of;
            self.restart(ctx, 0);
        }
    }

    /// The image (its address) and view now.
    fn of(ctx: &Ctx) -> Option<(usize, Option<usize>)> {
        ctx.img
            .as_ref()
            .map(|i| (std::sync::Arc::as_ptr(i) as usize, ctx.view_snapshot))
    }

    /// Map again from guest offset `base`.
    fn restart(&mut self, ctx: &Ctx, base: u64) {
        let of = self.of.take();
        *self = State {
            of,
            base,
            next: base,
            end: ctx.chain.as_ref().map_or(0, |c| qemu_length(c.top())),
            ..State::default()
        };
    }

    /// Map more of the disk until `rows` extents are known, the end is reached, or
    /// the time for this draw is spent.
    fn fill(&mut self, ctx: &Ctx, rows: usize) {
        let Ok(chain) = ctx.chain.as_ref() else {
            return;
        };
        let t0 = Instant::now();
        while (self.to_end || self.extents.len() <= rows)
            && self.extents.len() < MAX_EXTENTS
            && self.next < self.end
            && self.error.is_none()
            && t0.elapsed() < BUDGET
        {
            match map_range(chain, GuestOffset(self.next), CHUNK) {
                Ok(v) => {
                    let Some(last) = v.last() else { break };
                    let reached = last.start.get().saturating_add(last.length);
                    if reached <= self.next {
                        break;
                    }
                    self.next = reached;
                    for e in v {
                        self.push(e);
                    }
                }
                Err(e) => self.error = Some(e.to_string()),
            }
        }
        if self.next >= self.end {
            self.to_end = false;
        }
    }

    /// Add an extent, merging it with the previous one where `qemu-img map` would
    /// (a chunk boundary is no extent boundary).
    fn push(&mut self, e: MapEntry) {
        if let Some(p) = self.extents.last_mut()
            && p.depth == e.depth
            && p.present == e.present
            && p.zero == e.zero
            && p.data == e.data
            && p.compressed == e.compressed
            && match (p.offset, e.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(p.length) == Some(b),
                _ => false,
            }
        {
            p.length = p.length.saturating_add(e.length);
            return;
        }
        self.extents.push(e);
    }

    fn done(&self) -> bool {
        self.next >= self.end || self.error.is_some() || self.extents.len() >= MAX_EXTENTS
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        if ctx.img.is_none() {
            return super::nothing(f, area, "Map", ctx.unopened());
        }
        if let Err(e) = &ctx.chain {
            return super::nothing(f, area, "Map", format!("the chain cannot be opened: {e}"));
        }
        if let Some(why) = ctx.l1_unread() {
            return super::nothing(f, area, "Map", why);
        }
        self.sync(ctx);
        let want = self.list.offset + 2 * self.list.page() + 1;
        self.fill(ctx, want.max(self.list.sel + 1));
        if self.to_end {
            self.list.sel = self.extents.len().saturating_sub(1);
        }
        let view = ctx
            .viewed_name()
            .map_or("the active L1".to_string(), |s| format!("snapshot {s}"));
        let from = if self.base > 0 {
            format!(" from {:#x}", self.base)
        } else {
            String::new()
        };
        let progress = if self.done() {
            format!("{} extents", self.extents.len())
        } else {
            format!(
                "{} extents so far, mapped to {:#x} of {:#x}",
                self.extents.len(),
                self.next,
                self.end
            )
        };
        let title = format!(
            "Map — {}{from} via {view} · {progress} · Enter: trace",
            ctx.path.display()
        );
        let extents = self.extents.clone();
        let error = self.error.clone();
        let more = !self.done();
        let len =
            extents.len() + usize::from(more || error.is_some() || extents.len() >= MAX_EXTENTS);
        // Columns as wide as the largest offset they can hold.
        let wa = format!("{:#x}", self.end).len().max(5);
        let file = ctx.chain.as_ref().map_or(0, |c| {
            c.layers.iter().map(|l| l.src.len()).max().unwrap_or(0)
        });
        let wo = format!("{file:#x}").len().max(11);
        let heading = Line::styled(
            format!(
                "{:>wa$} {:>wa$} {:>9}  {:<wo$}  what answers a read",
                "START", "END", "LENGTH", "FILE OFFSET"
            ),
            color::head(),
        );
        self.list
            .render_table(f, area, boxed(title), Some(heading), len, true, |rows| {
                rows.map(|i| match extents.get(i) {
                    Some(e) => {
                        let (what, c) = kind(e, ctx);
                        Line::from(vec![
                            Span::raw(format!(
                                "{:>#wa$x} {:>#wa$x} {:>9}  {:<wo$}  ",
                                e.start,
                                e.start.saturating_add(e.length),
                                human_size(e.length),
                                e.offset.map_or("-".to_string(), |o| format!("{o:#x}")),
                            )),
                            Span::styled(what, Style::new().fg(c)),
                        ])
                    }
                    None => match &error {
                        Some(e) => Line::styled(
                            format!("mapping stopped: {e}"),
                            Style::new().fg(color::BAD),
                        ),
                        None if extents.len() >= MAX_EXTENTS => Line::styled(
                            format!(
                                "{MAX_EXTENTS} extents listed: g and an offset lists from there"
                            ),
                            color::dim(),
                        ),
                        None => Line::styled("mapping… (↓ or End maps more)", color::dim()),
                    },
                })
                .collect()
            });
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        match action {
            Action::Enter => {
                if let Some(e) = self.extents.get(self.list.sel) {
                    q.push(Effect::Trace(e.start));
                }
                true
            }
            Action::End => {
                self.to_end = !self.done();
                self.list.select(action, self.extents.len())
            }
            Action::Home if self.base > 0 => {
                self.restart(ctx, 0);
                true
            }
            a => {
                let n = self.extents.len() + usize::from(!self.done());
                self.list.select(a, n)
            }
        }
    }

    fn explain(&self, ctx: &Ctx) -> String {
        let general = "qemu-img map's view of the disk: each extent is a run of guest bytes that one layer answers the same way (data at consecutive file offsets, zeros, or nothing), the depth saying which layer of the backing chain it is.";
        match self.extents.get(self.list.sel) {
            Some(e) => format!(
                "{:#x}–{:#x} ({}): {}.  —  {general}",
                e.start,
                e.start.saturating_add(e.length),
                human_size(e.length),
                kind(e, ctx).0
            ),
            None => general.into(),
        }
    }

    fn offset_kind(&self) -> Option<OffsetKind> {
        Some(OffsetKind::Guest)
    }

    fn goto(&mut self, offset: u64, ctx: &Ctx, _: &mut Vec<Effect>) {
        // The list starts again at the offset: its first row is the rest of the
        // extent the offset falls in.
        self.sync(ctx);
        self.restart(ctx, offset);
    }

    fn click(&mut self, x: u16, y: u16, _: &Ctx, _: &mut Vec<Effect>) {
        if let Some(r) = self.list.row_at(x, y) {
            self.list.sel = r;
        }
    }

    fn rows<'a>(&'a self, ctx: &'a Ctx) -> Option<Box<dyn crate::tui::find::Rows + 'a>> {
        ctx.img.as_ref()?;
        Some(Box::new(super::rows::MapRows {
            list: &self.extents,
            base: self.base,
            ctx,
        }))
    }

    fn list(&mut self) -> Option<&mut ListView> {
        Some(&mut self.list)
    }

    fn list_ref(&self) -> Option<&ListView> {
        Some(&self.list)
    }

    fn can_grow(&self, ctx: &Ctx) -> bool {
        ctx.chain.is_ok() && (Self::of(ctx) != self.of || !self.done())
    }

    fn grow(&mut self, ctx: &Ctx) {
        self.sync(ctx);
        let want = self.extents.len().saturating_add(4096);
        self.fill(ctx, want);
    }
}

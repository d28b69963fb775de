//! The one list/scroll widget every list and every scrolling text uses: the
//! selection is always on screen, a page is the height of the box, and a scrollbar
//! with an `n/total` position shows where the view is.

use super::find::{Find, Hidden};
use super::keymap::Action;
use ratatui::Frame;
use ratatui::layout::{Alignment, Margin, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Text};
use ratatui::widgets::{
    Block, Borders, Paragraph, Scrollbar, ScrollbarOrientation, ScrollbarState, Wrap,
};

/// Scroll state of one list or text.
#[derive(Clone, Debug, Default)]
pub struct ListView {
    /// The selected row (for lists).
    pub sel: usize,
    /// The first visible row.
    pub offset: usize,
    /// Rows visible at the last draw (a page).
    pub height: usize,
    /// Rows in all at the last draw.
    pub len: usize,
    /// The inner area at the last draw (for mouse clicks).
    pub area: Rect,
    /// The search in this list (`/`), if any.
    pub find: Option<Find>,
    /// The rows shown while `u` hides those that hold nothing.
    pub hidden: Option<Hidden>,
}

impl ListView {
    /// A page: the box's height at the last draw (10 before the first draw).
    pub fn page(&self) -> usize {
        if self.height == 0 { 10 } else { self.height }
    }

    /// Move the selection of a list of `len` rows; false if the action is not a move.
    pub fn select(&mut self, action: Action, len: usize) -> bool {
        self.len = len;
        let last = self.shown_len().saturating_sub(1);
        let page = self.page();
        let p = self.pos(self.sel);
        let p = match action {
            Action::Up => p.saturating_sub(1),
            Action::Down => p.saturating_add(1).min(last),
            Action::PageUp => p.saturating_sub(page),
            Action::PageDown => p.saturating_add(page).min(last),
            Action::Home => 0,
            Action::End => last,
            _ => return false,
        };
        self.sel = self.row(p);
        self.reveal();
        true
    }

    /// How many rows are on show: all of them, or those `u` leaves.
    pub fn shown_len(&self) -> usize {
        match &self.hidden {
            None => self.len,
            Some(h) => h.shown.len().saturating_add(self.len.saturating_sub(h.of)),
        }
    }

    /// The place among the rows on show of row `i` (of the first row on show
    /// after it, when it is hidden).
    fn pos(&self, i: usize) -> usize {
        match &self.hidden {
            None => i,
            Some(h) if i < h.of => h.shown.partition_point(|r| *r < i),
            Some(h) => h.shown.len().saturating_add(i - h.of),
        }
    }

    /// The row at place `p` among the rows on show.
    fn row(&self, p: usize) -> usize {
        match &self.hidden {
            None => p,
            Some(h) => match h.shown.get(p) {
                Some(r) => *r,
                None => h.of.saturating_add(p.saturating_sub(h.shown.len())),
            },
        }
    }

    /// Scroll a text (no selection); false if the action is not a move.
    pub fn scroll(&mut self, action: Action) -> bool {
        let page = self.page();
        self.offset = match action {
            Action::Up | Action::ExplainUp => self.offset.saturating_sub(1),
            Action::Down | Action::ExplainDown => self.offset.saturating_add(1),
            Action::PageUp => self.offset.saturating_sub(page),
            Action::PageDown => self.offset.saturating_add(page),
            Action::Home => 0,
            Action::End => usize::MAX,
            _ => return false,
        };
        self.clamp_offset();
        true
    }

    /// Select row `i` (clamped) and bring it on screen.
    /// A row hidden by `u` is shown again with all the others: a jump to it
    /// (a cross-link, `g`, the history) must land on it.
    pub fn set(&mut self, i: usize, len: usize) {
        self.len = len;
        self.sel = i.min(len.saturating_sub(1));
        if let Some(h) = &self.hidden
            && self.sel < h.of
            && h.shown.binary_search(&self.sel).is_err()
        {
            self.hidden = None;
        }
        self.reveal();
    }

    /// Keep the selection on a row on show (after the hidden rows changed).
    pub fn keep_shown(&mut self, len: usize) {
        self.len = len;
        self.sel = self.sel.min(len.saturating_sub(1));
        self.snap();
        self.reveal();
    }

    /// A hidden selection moves to the next row on show (the last one past the end).
    fn snap(&mut self) {
        if self.hidden.is_some() {
            let last = self.shown_len().saturating_sub(1);
            self.sel = self.row(self.pos(self.sel).min(last));
        }
    }

    fn clamp_offset(&mut self) {
        let n = self.shown_len();
        if n > 0 {
            self.offset = self.offset.min(n.saturating_sub(self.page()));
        }
    }

    /// Move the view so the selection is on screen.
    fn reveal(&mut self) {
        let h = self.page();
        let p = self.pos(self.sel);
        if p < self.offset {
            self.offset = p;
        } else if p >= self.offset.saturating_add(h) {
            self.offset = p.saturating_sub(h - 1);
        }
        self.clamp_offset();
    }

    /// The row a click at screen row `y` lands on.
    pub fn row_at(&self, x: u16, y: u16) -> Option<usize> {
        let a = self.area;
        (x >= a.x && x < a.x + a.width && y >= a.y && y < a.y + a.height)
            .then(|| self.offset + usize::from(y - a.y))
            .filter(|p| *p < self.shown_len())
            .map(|p| self.row(p))
    }

    /// Lay out for a box of `inner` with `len` rows: remember the page, keep the
    /// selection visible, and return the visible range.
    pub fn layout(&mut self, inner: Rect, len: usize, selectable: bool) -> std::ops::Range<usize> {
        self.area = inner;
        self.height = usize::from(inner.height).max(1);
        self.len = len;
        self.sel = self.sel.min(len.saturating_sub(1));
        self.snap();
        if selectable {
            self.reveal();
        } else {
            self.clamp_offset();
        }
        self.offset
            ..self
                .offset
                .saturating_add(self.height)
                .min(self.shown_len())
    }

    /// Draw a bordered list. `rows` builds only the visible rows (lists can be
    /// millions long); `selectable` highlights the selected one.
    pub fn render_list(
        &mut self,
        f: &mut Frame,
        area: Rect,
        block: Block,
        len: usize,
        selectable: bool,
        rows: impl FnMut(std::ops::Range<usize>) -> Vec<Line<'static>>,
    ) {
        self.render_table(f, area, block, None, len, selectable, rows)
    }

    /// [`ListView::render_list`] with a heading row that does not scroll.
    #[allow(clippy::too_many_arguments)]
    pub fn render_table(
        &mut self,
        f: &mut Frame,
        area: Rect,
        block: Block,
        heading: Option<Line<'static>>,
        len: usize,
        selectable: bool,
        mut rows: impl FnMut(std::ops::Range<usize>) -> Vec<Line<'static>>,
    ) {
        let mut inner = block.inner(area);
        let has_heading = heading.is_some();
        if has_heading {
            inner.y = inner.y.saturating_add(1);
            inner.height = inner.height.saturating_sub(1);
        }
        let range = self.layout(inner, len, selectable);
        // The rows on show: a run of the list, or with rows hidden, one at a time.
        let (built, index): (Vec<Line>, Vec<usize>) = if self.hidden.is_none() {
            (rows(range.clone()), range.collect())
        } else {
            let index: Vec<usize> = range.map(|p| self.row(p)).collect();
            let built = index.iter().flat_map(|i| rows(*i..i + 1)).collect();
            (built, index)
        };
        let lines: Vec<Line> = heading
            .into_iter()
            .chain(built)
            .enumerate()
            .map(|(k, l)| {
                // The row's index in the list (the heading has none).
                let row = k
                    .checked_sub(usize::from(has_heading))
                    .and_then(|k| index.get(k));
                let is_heading = has_heading && k == 0;
                if selectable && !is_heading && row == Some(&self.sel) {
                    l.patch_style(selected())
                } else {
                    l
                }
            })
            .collect();
        let mut block = block.title_bottom(self.position(selectable));
        // At the bottom, where the pane's own title cannot push it off.
        if let Some(h) = &self.hidden {
            block = block.title_bottom(Line::styled(
                format!(" (hiding {} {}: u shows them) ", h.count(), h.what),
                Style::new().fg(super::panes::color::META),
            ));
        }
        if let Some(fd) = &self.find {
            let st = if fd.done() && fd.matches().is_empty() {
                Style::new().fg(super::panes::color::BAD)
            } else {
                Style::new().fg(super::panes::color::META)
            };
            block = block.title_bottom(Line::styled(format!(" {} ", fd.status(self.sel)), st));
        }
        f.render_widget(Paragraph::new(lines).block(block), area);
        self.scrollbar(f, area);
    }

    /// Draw a bordered, wrapped text that scrolls.
    pub fn render_text(&mut self, f: &mut Frame, area: Rect, block: Block, text: Text<'static>) {
        let inner = block.inner(area);
        let p = Paragraph::new(text).wrap(Wrap { trim: false });
        let len = p.line_count(inner.width);
        let _ = self.layout(inner, len, false);
        let block = block.title_bottom(self.position(false));
        let y = u16::try_from(self.offset).unwrap_or(u16::MAX);
        f.render_widget(p.scroll((y, 0)).block(block), area);
        self.scrollbar(f, area);
    }

    /// "n/total" (the selected row, or the last visible row of a text), right
    /// aligned; empty when everything fits.
    fn position(&self, selectable: bool) -> Line<'static> {
        if self.shown_len() <= self.height && !selectable {
            return Line::raw("");
        }
        let total = self.shown_len();
        let n = if selectable {
            self.pos(self.sel).saturating_add(1)
        } else {
            self.offset.saturating_add(self.height).min(total)
        };
        if total == 0 {
            return Line::raw("");
        }
        Line::raw(format!(" {n}/{total} ")).alignment(Alignment::Right)
    }

    fn scrollbar(&self, f: &mut Frame, area: Rect) {
        let total = self.shown_len();
        if total <= self.height {
            return;
        }
        let mut st = ScrollbarState::new(total.saturating_sub(self.height))
            .position(self.offset)
            .viewport_content_length(self.height);
        f.render_stateful_widget(
            Scrollbar::new(ScrollbarOrientation::VerticalRight)
                .begin_symbol(None)
                .end_symbol(None),
            area.inner(Margin {
                vertical: 1,
                horizontal: 0,
            }),
            &mut st,
        );
    }
}

/// The style of the selected row.
pub fn selected() -> Style {
    Style::new().add_modifier(Modifier::REVERSED)
}

/// A bordered block with a title.
pub fn boxed(title: impl Into<String>) -> Block<'static> {
    let title = title.into();
    let b = Block::new().borders(Borders::ALL);
    if title.is_empty() {
        b
    } else {
        b.title(format!(" {title} "))
    }
}

//! Pane 5: every field of every snapshot; Enter makes a snapshot the view; two
//! marked snapshots show which guest clusters differ.

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect, Job};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::Paragraph;

/// The comparison of two snapshots: guest offset and what each maps it to.
pub type Diff = Result<Vec<(u64, String)>, String>;

/// Snapshots' state.
#[derive(Default)]
pub struct State {
    /// The snapshot list.
    pub list: ListView,
    /// Marked snapshots (up to two).
    pub marked: Vec<usize>,
    /// The two marked snapshots' difference.
    pub diff: Option<Diff>,
    /// The comparison is running.
    pub diff_running: bool,
    /// Scroll of the difference.
    pub diff_view: ListView,
    /// The arrows scroll the difference.
    pub focus_diff: bool,
    /// The first of the columns right of NAME on screen (Left/Right scroll them).
    pub first_column: usize,
    /// How far right `first_column` may go at the width last drawn.
    pub max_first_column: usize,
}

/// The columns right of ID and NAME, which Left/Right scroll: heading and width
/// (right-aligned but for the date, the last).
const COLUMNS: [(&str, usize); 7] = [
    ("VM STATE", 10),
    ("L1 OFFSET", 12),
    ("L1 SZ", 6),
    ("DISK SIZE", 14),
    ("VM CLOCK", 10),
    ("ICOUNT", 8),
    ("DATE", 19),
];

/// The width of the marks, ID and NAME, which stay on screen.
const FIXED: usize = 2 + 1 + 4 + 1 + 16;

/// Column `c` of `COLUMNS` for snapshot `s`, unpadded.
fn cell(s: &qinspect::snapshot::Snapshot, c: usize) -> String {
    match c {
        0 => s.vm_state_size.to_string(),
        1 => format!("{:#x}", s.l1_table_offset),
        2 => s.l1_size.to_string(),
        3 => s.disk_size.map_or("current".into(), |d| d.to_string()),
        4 => vm_clock(s.vm_clock_nsec),
        5 => s.icount.map_or("-".into(), |c| c.to_string()),
        _ => crate::cli::info::format_date(s.date_sec),
    }
}

/// Columns `first..` of a row, each after a space, padded to its width (the
/// last one, the date, only in the heading).
fn tail(first: usize, heading: bool, mut value: impl FnMut(usize) -> String) -> String {
    let mut out = String::new();
    for (c, (_, w)) in COLUMNS.iter().enumerate().skip(first) {
        let v = value(c);
        let w = *w;
        out.push_str(&match c {
            6 if heading => format!(" {v:<w$}"),
            6 => format!(" {v}"),
            _ => format!(" {v:>w$}"),
        });
    }
    out
}

fn header(first: usize) -> String {
    format!(
        "{:>2} {:<4} {:<16}{}",
        "",
        "ID",
        "NAME",
        tail(first, true, |c| COLUMNS
            .get(c)
            .map_or(String::new(), |h| h.0.to_string()))
    )
}

/// The last column wholly on screen when `first` is the first, in `width` cells
/// (`first` itself when not even it fits).
fn last_shown(first: usize, width: usize) -> usize {
    let mut used = FIXED;
    let mut last = first;
    for (c, (_, w)) in COLUMNS.iter().enumerate().skip(first) {
        used += w + 1;
        if used > width {
            break;
        }
        last = c;
    }
    last
}

/// How many columns are off screen on each side, and that the arrows scroll
/// them, with `first` the first column shown in `width` cells.
fn off_screen(first: usize, width: usize) -> String {
    let last = last_shown(first, width);
    let right = COLUMNS.len().saturating_sub(last.saturating_add(1));
    let side = |n: usize, side: &str| match n {
        0 => None,
        1 => Some(format!("1 column to the {side}")),
        n => Some(format!("{n} columns to the {side}")),
    };
    let off: Vec<String> = [side(first, "left"), side(right, "right")]
        .into_iter()
        .flatten()
        .collect();
    format!(" ←/→: {} ", off.join(", "))
}

/// The first column to show so that columns `first..` fit in `width` cells, as
/// far right as Right may scroll: 0 when everything fits.
fn last_first(width: usize) -> usize {
    let room = width.saturating_sub(FIXED);
    let mut need = 0;
    for (c, (_, w)) in COLUMNS.iter().enumerate().rev() {
        need += w + 1;
        if need > room {
            return (c + 1).min(COLUMNS.len() - 1);
        }
    }
    0
}

/// The guest clock, in seconds with milliseconds (the VM CLOCK column).
fn vm_clock(nsec: u64) -> String {
    format!("{}.{:03}s", nsec / 1_000_000_000, nsec / 1_000_000 % 1000)
}

/// Every field of a snapshot's table entry, in words: the explanation shows
/// them all, since a narrow screen cuts the table's last columns.
fn fields(s: &qinspect::snapshot::Snapshot) -> String {
    format!(
        "Snapshot {} '{}' (table entry {} at {}): its own L1 table of {} entries at {:#x}; VM state {} bytes; disk size {}; VM clock {}; icount {}; taken {}; {} bytes of extra data.",
        s.id,
        s.name,
        s.index,
        s.entry_offset,
        s.l1_size,
        s.l1_table_offset,
        s.vm_state_size,
        s.disk_size
            .map_or("not stored (the image's current size)".into(), |d| format!(
                "{d} bytes"
            )),
        vm_clock(s.vm_clock_nsec),
        s.icount.map_or("not stored".into(), |c| c.to_string()),
        crate::cli::info::format_date(s.date_sec),
        s.extra_data_size
    )
}

impl State {
    /// The comparison finished.
    pub fn diffed(&mut self, d: Diff) {
        self.diff = Some(d);
        self.diff_running = false;
        self.diff_view = ListView::default();
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        let Some(img) = ctx.img.clone() else {
            return super::nothing(f, area, "Snapshots", ctx.unopened());
        };
        // A viewed record whose ID another record shares: which one is shown, and
        // which one QEMU would read.
        let shared = ctx.view_snapshot.and_then(|i| {
            let first = ctx.first_with_id(i)?;
            let id = &ctx.viewed()?.id;
            Some(if first == i {
                format!(
                    "ID {id} is not unique in this table: the view is record {} (the first with this ID, the one `qemu-img convert -l {id}` reads)",
                    i.saturating_add(1)
                )
            } else {
                format!(
                    "ID {id} is not unique in this table: the view is record {}, but `qemu-img convert -l {id}` reads the first with this ID, record {}",
                    i.saturating_add(1),
                    first.saturating_add(1)
                )
            })
        });
        let [list, note, diff] = Layout::vertical([
            Constraint::Min(5),
            Constraint::Length(if shared.is_some() { 2 } else { 0 }),
            Constraint::Length(9),
        ])
        .areas(area);
        if let Some(n) = shared {
            f.render_widget(
                Paragraph::new(Line::styled(n, Style::new().fg(color::BAD)))
                    .wrap(ratatui::widgets::Wrap { trim: true }),
                note,
            );
        }
        let title = match ctx.viewed_name() {
            Some(s) => format!(
                "Snapshots — viewing snapshot {s} (Enter on it again: back to the active L1)"
            ),
            None => "Snapshots — Enter: use as the view · m: mark two to compare".to_string(),
        };
        let snaps = &img.snapshots.snapshots;
        let mut extra = Vec::new();
        if snaps.is_empty() {
            extra.push(Line::styled(
                "no internal snapshots (simulate snapshot-create in pane 8 to see what one would do)",
                color::dim(),
            ));
        }
        if let Some(e) = &img.snapshots.error {
            extra.push(Line::styled(
                format!("snapshot table error: {e}"),
                Style::new().fg(color::BAD),
            ));
        }
        self.max_first_column = last_first(usize::from(list.width.saturating_sub(2)));
        self.first_column = self.first_column.min(self.max_first_column);
        let first = self.first_column;
        if !extra.is_empty() {
            extra.insert(0, Line::styled(header(first), color::head()));
            f.render_widget(Paragraph::new(extra).block(boxed(title)), list);
        } else {
            let marked = self.marked.clone();
            let mut block = boxed(title);
            if self.max_first_column > 0 {
                let width = usize::from(list.width.saturating_sub(2));
                block = block.title_bottom(Line::styled(off_screen(first, width), color::dim()));
            }
            self.list.render_table(
                f,
                list,
                block,
                Some(Line::styled(header(first), color::head())),
                snaps.len(),
                true,
                |r| {
                    snaps[r.clone()]
                        .iter()
                        .zip(r)
                        .map(|(s, i)| {
                            let mark = if marked.contains(&i) { "*" } else { " " };
                            let view = if ctx.view_snapshot == Some(i) {
                                "▶"
                            } else {
                                " "
                            };
                            Line::raw(format!(
                                "{view}{mark} {:<4} {:<16}{}",
                                s.id,
                                s.name,
                                tail(first, false, |c| cell(s, c))
                            ))
                        })
                        .collect()
                },
            );
        }
        let names = |i: usize| snaps.get(i).map_or("?".to_string(), |s| s.id.clone());
        let pair = match self.marked.as_slice() {
            [a, b] => format!(" between snapshots {} and {}", names(*a), names(*b)),
            _ => String::new(),
        };
        let keys = if self.focus_diff {
            "↑/↓ scroll, f: the list"
        } else {
            "f: scroll"
        };
        let title = format!("Difference{pair}");
        match &self.diff {
            _ if self.diff_running => f.render_widget(
                Paragraph::new(Line::styled(
                    "comparing the two snapshots on a worker thread…",
                    color::dim(),
                ))
                .block(boxed(title)),
                diff,
            ),
            None => f.render_widget(
                Paragraph::new(Line::styled(
                    "mark two snapshots with m to see which guest clusters differ",
                    color::dim(),
                ))
                .block(boxed(title)),
                diff,
            ),
            Some(Err(e)) => f.render_widget(Paragraph::new(e.clone()).block(boxed(title)), diff),
            Some(Ok(v)) => {
                let v = v.clone();
                let title = format!(
                    "{} guest cluster(s) map differently{pair} ({keys})",
                    v.len()
                );
                self.diff_view
                    .render_list(f, diff, boxed(title), v.len(), false, |r| {
                        v[r].iter()
                            .map(|(g, what)| Line::raw(format!("guest {g:#x}: {what}")))
                            .collect()
                    });
            }
        }
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let Some(img) = ctx.img.clone() else {
            return false;
        };
        let n = img.snapshots.snapshots.len();
        if self.focus_diff && self.diff_view.scroll(action) {
            return true;
        }
        match action {
            Action::Enter => {
                let i = self.list.sel;
                if i < n {
                    if ctx.view_snapshot == Some(i) {
                        q.push(Effect::View(None));
                    } else {
                        q.push(Effect::View(Some(i)));
                    }
                }
            }
            Action::Mark if n > 0 => {
                let i = self.list.sel;
                if let Some(p) = self.marked.iter().position(|m| *m == i) {
                    self.marked.remove(p);
                } else {
                    if self.marked.len() == 2 {
                        self.marked.remove(0);
                    }
                    self.marked.push(i);
                }
                self.diff = None;
                self.focus_diff = false;
                if let [a, b] = self.marked[..] {
                    self.diff_running = true;
                    q.push(Effect::Start(Job::Diff(a, b)));
                }
            }
            Action::Focus if self.diff.is_none() && !self.focus_diff => q.push(Effect::Status(
                "f scrolls the Difference box, once two snapshots are marked (m) and compared"
                    .into(),
            )),
            Action::Focus => self.focus_diff = !self.focus_diff,
            // The columns right of NAME, sideways; ID and NAME stay.
            Action::Left => self.first_column = self.first_column.saturating_sub(1),
            Action::Right => {
                self.first_column = self
                    .first_column
                    .saturating_add(1)
                    .min(self.max_first_column);
            }
            a => return self.list.select(a, n),
        }
        true
    }

    fn explain(&self, ctx: &Ctx) -> String {
        let general = "An internal snapshot is a frozen copy of the L1 table. Taking one adds 1 to every L2 table and data cluster it reaches (addend +1); deleting one subtracts 1 (addend -1), then walks the active L1 with addend 0, which changes no refcount and only sets COPIED again where a cluster is no longer shared.";
        match ctx
            .img
            .as_ref()
            .and_then(|i| i.snapshots.snapshots.get(self.list.sel))
        {
            Some(s) => format!(
                "{} Every cluster it reaches had 1 added to its refcount when it was taken.  —  {general}",
                fields(s)
            ),
            None => general.into(),
        }
    }

    fn click(&mut self, x: u16, y: u16, _: &Ctx, _: &mut Vec<Effect>) {
        if let Some(r) = self.list.row_at(x, y) {
            self.list.sel = r;
        }
    }

    fn rows<'a>(&'a self, ctx: &'a Ctx) -> Option<Box<dyn crate::tui::find::Rows + 'a>> {
        let img = ctx.img.as_ref()?;
        Some(Box::new(super::rows::SnapshotRows {
            list: &img.snapshots.snapshots,
        }))
    }

    fn list(&mut self) -> Option<&mut ListView> {
        Some(&mut self.list)
    }

    fn list_ref(&self) -> Option<&ListView> {
        Some(&self.list)
    }
}

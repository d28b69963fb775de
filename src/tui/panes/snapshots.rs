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
}

fn header() -> String {
    format!(
        "{:>2} {:<4} {:<16} {:>10} {:>12} {:>6} {:>14} {:>10} {:>8} {:<19}",
        "",
        "ID",
        "NAME",
        "VM STATE",
        "L1 OFFSET",
        "L1 SZ",
        "DISK SIZE",
        "VM CLOCK",
        "ICOUNT",
        "DATE"
    )
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
        if !extra.is_empty() {
            extra.insert(0, Line::styled(header(), color::head()));
            f.render_widget(Paragraph::new(extra).block(boxed(title)), list);
        } else {
            let marked = self.marked.clone();
            self.list.render_table(
                f,
                list,
                boxed(title),
                Some(Line::styled(header(), color::head())),
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
                                "{view}{mark} {:<4} {:<16} {:>10} {:>#12x} {:>6} {:>14} {:>10} {:>8} {}",
                                s.id,
                                s.name,
                                s.vm_state_size,
                                s.l1_table_offset,
                                s.l1_size,
                                s.disk_size.map_or("current".into(), |d| d.to_string()),
                                vm_clock(s.vm_clock_nsec),
                                s.icount.map_or("-".into(), |c| c.to_string()),
                                crate::cli::info::format_date(s.date_sec)
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
            Action::Focus => self.focus_diff = !self.focus_diff,
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

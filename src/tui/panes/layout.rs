//! Pane 2: the host file as a grid of clusters coloured by role.

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect, Job, LAYOUT_LIMIT, OffsetKind};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::check::{ROLES, Referrer, Role, clusters};
use qinspect::image::RefcountReader;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

/// Layout's state.
#[derive(Default)]
pub struct State {
    /// The selected host cluster.
    pub sel: u64,
    /// Cells per grid row at the last draw.
    pub per_row: u64,
    /// Grid rows visible at the last draw.
    rows: u64,
    /// The first grid row shown.
    pub first_row: u64,
    /// The grid's inner area at the last draw.
    grid: Rect,
    /// Who references a cluster, once looked up with `i`, and its scroll.
    pub detail: Option<(u64, Vec<qinspect::check::Referrer>)>,
    /// A lookup running on the worker, for this cluster.
    pub looking: Option<u64>,
    /// The roles found by that lookup.
    pub detail_roles: String,
    /// Scroll of the referrer list.
    pub refs: ListView,
    /// The arrows scroll the referrers instead of moving in the grid.
    pub focus_refs: bool,
}

/// The nearest host cluster after (or before) `c` that a finding of the check
/// names.
fn next_with_finding(ctx: &Ctx, c: u64, forward: bool) -> Option<u64> {
    let r = ctx.report.as_ref()?;
    let named = r.findings.iter().filter_map(|f| f.cluster);
    if forward {
        named.filter(|n| *n > c).min()
    } else {
        named.filter(|n| *n < c).max()
    }
}

/// The colour of a role.
pub fn role_color(r: Role) -> Color {
    match r {
        Role::Header | Role::CryptoHeader => color::META,
        Role::L1Table | Role::L2Table => color::TABLE,
        Role::Data | Role::VmState => color::DATA,
        Role::Compressed => color::COMPRESSED,
        Role::SnapshotTable => color::SNAPSHOT,
        Role::RefcountTable | Role::RefcountBlock => color::REFCOUNT,
        Role::BitmapDirectory | Role::BitmapTable | Role::BitmapData => color::BITMAP,
    }
}

/// The role bits of cluster `c`, or None when the role map does not cover it.
fn role_bits(ctx: &Ctx, c: u64) -> Option<u16> {
    if c >= LAYOUT_LIMIT {
        return None;
    }
    ctx.roles.as_ref().map(|r| {
        usize::try_from(c)
            .ok()
            .and_then(|i| r.get(i))
            .copied()
            .unwrap_or(0)
    })
}

/// What a cell shows: the colour, and a word for the legend and details.
pub fn cell(ctx: &Ctx, c: u64, stored: Option<u64>) -> (Color, &'static str) {
    if let (Some(s), Some(k)) = (stored, ctx.counted(c)) {
        if s < k {
            return (color::BAD, "over-referenced");
        }
        if s > k {
            return (color::LEAK, "leaked");
        }
    }
    match role_bits(ctx, c) {
        None if c >= LAYOUT_LIMIT => (color::UNCLASSIFIED, "not classified"),
        None => (color::FREE, "roles still being found"),
        Some(bits) => match ROLES.iter().find(|r| bits & (1 << (**r as u16)) != 0) {
            Some(r) => (role_color(*r), "used"),
            None => (color::FREE, "free"),
        },
    }
}

/// The legend in lines of at most `width` columns, each square kept with its word.
fn legend(wide: bool, unclassified: bool, width: usize) -> Vec<Line<'static>> {
    let item = |c: Color, t: &'static str| {
        vec![
            Span::styled("■", Style::new().fg(c)),
            Span::raw(format!(" {t} ")),
        ]
    };
    let mut v = vec![
        item(color::META, "header"),
        item(color::TABLE, "L1/L2"),
        item(color::DATA, "data"),
        item(color::COMPRESSED, if wide { "compressed" } else { "compr" }),
        item(color::REFCOUNT, "refcounts"),
        item(
            color::SNAPSHOT,
            if wide { "snapshot table" } else { "snap" },
        ),
        item(color::BITMAP, "bitmaps"),
        item(color::FREE, "free"),
        item(color::LEAK, "leaked"),
        item(
            color::BAD,
            if wide { "over-referenced" } else { "over-ref" },
        ),
    ];
    if unclassified {
        v.push(item(color::UNCLASSIFIED, "not classified"));
    }
    let mut lines: Vec<Vec<Span<'static>>> = vec![Vec::new()];
    let mut used = 0;
    for it in v {
        let w: usize = it.iter().map(Span::width).sum();
        // The trailing space of an item may run past the edge.
        if used > 0 && used + w.saturating_sub(1) > width {
            lines.push(Vec::new());
            used = 0;
        }
        used += w;
        if let Some(l) = lines.last_mut() {
            l.extend(it);
        }
    }
    lines.into_iter().map(Line::from).collect()
}

pub fn role_names(bits: u16) -> Vec<String> {
    ROLES
        .iter()
        .filter(|r| bits & (1 << (**r as u16)) != 0)
        .map(|r| {
            serde_json::to_value(r)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        })
        .collect()
}

/// Referrers in a natural order: snapshot 5 before snapshot 11.
pub fn sort_referrers(v: &mut [Referrer]) {
    fn natural(s: &Option<String>) -> (String, u64, String) {
        let s = s.clone().unwrap_or_default();
        let start = s.find(|c: char| c.is_ascii_digit()).unwrap_or(s.len());
        let end = s[start..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(s.len(), |e| start + e);
        let n = s[start..end].parse().unwrap_or(0);
        (s[..start].to_string(), n, s[end..].to_string())
    }
    v.sort_by(|a, b| {
        (
            a.role,
            natural(&a.l1),
            a.l1_index,
            a.l2_table,
            a.l2_index,
            a.guest_offset,
        )
            .cmp(&(
                b.role,
                natural(&b.l1),
                b.l1_index,
                b.l2_table,
                b.l2_index,
                b.guest_offset,
            ))
            .then_with(|| a.detail.cmp(&b.detail))
    });
}

impl State {
    /// The box under the grid: the selected cluster's roles, refcounts and
    /// referrers.
    fn render_details(
        &mut self,
        f: &mut Frame,
        info_area: Rect,
        ctx: &Ctx,
        reader: &mut RefcountReader<'_>,
        cs: u64,
    ) {
        let c = self.sel;
        let stored = reader.get(c).ok();
        let (col, word) = cell(ctx, c, stored);
        let roles = match role_bits(ctx, c) {
            Some(b) if b != 0 => role_names(b).join(", "),
            Some(_) => "free".into(),
            None if matches!(&self.detail, Some((dc, _)) if *dc == c) => {
                format!("{} (looked up)", self.detail_roles)
            }
            None if c >= LAYOUT_LIMIT => format!(
                "not classified (the role map covers the first {LAYOUT_LIMIT} clusters; i looks this one up)"
            ),
            None => "roles still being found".into(),
        };
        let mut head = vec![
            Span::styled(format!("cluster {c} at {:#x}: ", c * cs), color::head()),
            Span::styled(roles, Style::new().fg(col)),
            Span::raw(format!(
                " · stored refcount {} · references counted {}",
                stored.map_or("?".into(), |s| match ctx.refcount_was(c, s) {
                    Some(was) => format!("{was}→{s}"),
                    None => s.to_string(),
                }),
                ctx.counted(c).map_or("…".into(), |s| s.to_string())
            )),
        ];
        if word != "used" && word != "free" && !word.starts_with("not") {
            head.push(Span::styled(format!(" · {word}"), Style::new().fg(col)));
        }
        let head = Line::from(head);
        let [h1, h2] = Layout::vertical([Constraint::Length(2), Constraint::Min(1)])
            .areas(boxed("").inner(info_area));
        let title = match &self.detail {
            Some((dc, refs)) if *dc == c => format!(
                "Selected cluster — {} referrer(s){}",
                refs.len(),
                if self.focus_refs {
                    " (↑/↓ choose, Enter: its entry, f: back to the grid)"
                } else {
                    " (f: scroll them)"
                }
            ),
            _ => "Selected cluster".to_string(),
        };
        f.render_widget(boxed(title), info_area);
        f.render_widget(
            Paragraph::new(head).wrap(ratatui::widgets::Wrap { trim: true }),
            h1,
        );
        match &self.detail {
            _ if self.looking == Some(c) => f.render_widget(
                Paragraph::new(Line::styled(
                    "  looking up who references it on a worker thread…",
                    color::dim(),
                )),
                h2,
            ),
            Some((dc, refs)) if *dc == c => {
                let refs = refs.clone();
                if refs.is_empty() {
                    f.render_widget(Paragraph::new("  nothing references it"), h2);
                } else {
                    self.refs.render_list(
                        f,
                        h2,
                        ratatui::widgets::Block::new(),
                        refs.len(),
                        self.focus_refs,
                        |r| {
                            refs[r]
                                .iter()
                                .map(|x| Line::raw(format!("  referenced by {}", x.describe())))
                                .collect()
                        },
                    );
                }
            }
            _ => f.render_widget(
                Paragraph::new(Line::styled(
                    "  i: who references it · Enter: its refcount (an L1/L2 table opens in Tables) · x: its bytes in Hex",
                    color::dim(),
                )),
                h2,
            ),
        }
    }

    /// Select cluster `c`.
    pub fn select(&mut self, c: u64) {
        self.sel = c;
        self.focus_refs = false;
    }

    fn clusters_in(ctx: &Ctx) -> u64 {
        ctx.file_len().div_ceil(ctx.cluster_size()).max(1)
    }

    /// The lookup of cluster `c` came back from the worker.
    pub fn looked_up(&mut self, c: u64, refs: Vec<qinspect::check::Referrer>, roles: String) {
        if self.looking == Some(c) {
            self.looking = None;
        }
        self.detail = Some((c, refs));
        self.detail_roles = roles;
        self.refs = ListView::default();
    }
}

/// Who references host cluster `c`, in natural order, and its roles (this walks
/// every table of the image, so it runs on a worker).
pub fn lookup(img: &qinspect::image::Qcow2, c: u64) -> (Vec<qinspect::check::Referrer>, String) {
    let info = clusters(img, c, c);
    let mut refs = info
        .first()
        .map(|i| i.referrers.clone())
        .unwrap_or_default();
    let roles = info
        .first()
        .map(|i| {
            let bits = i.roles.iter().fold(0u16, |b, r| b | (1 << (*r as u16)));
            if bits == 0 {
                "free".to_string()
            } else {
                role_names(bits).join(", ")
            }
        })
        .unwrap_or_default();
    sort_referrers(&mut refs);
    (refs, roles)
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        let Some(img) = ctx.img.clone() else {
            return super::nothing(f, area, &ctx.titled("Layout".into()), ctx.unopened());
        };
        let cs = img.geometry().cluster_size();
        let n = Self::clusters_in(ctx);
        let [grid_area, info_area] =
            Layout::vertical([Constraint::Min(5), Constraint::Length(8)]).areas(area);
        let unclassified = n > LAYOUT_LIMIT;
        let inner_w = usize::from(grid_area.width.saturating_sub(2));
        let wide = legend(true, unclassified, inner_w).len() == 1;
        let legend = legend(wide, unclassified, inner_w);
        let legend_rows = u16::try_from(legend.len()).unwrap_or(u16::MAX).min(4);
        let per_row = u64::from(grid_area.width.saturating_sub(2 + 10)).max(1);
        let rows = u64::from(grid_area.height.saturating_sub(2 + legend_rows)).max(1);
        self.sel = self.sel.min(n - 1);
        let sel_row = self.sel / per_row;
        if sel_row < self.first_row || self.per_row != per_row {
            self.first_row = sel_row.min(self.first_row);
        }
        if sel_row >= self.first_row + rows {
            self.first_row = sel_row + 1 - rows;
        }
        if self.per_row != per_row {
            self.first_row = sel_row.saturating_sub(rows / 2);
        }
        let total_rows = n.div_ceil(per_row);
        self.first_row = self.first_row.min(total_rows.saturating_sub(rows));
        let mut reader = RefcountReader::new(&img);
        let mut lines = Vec::new();
        for r in self.first_row..(self.first_row + rows).min(total_rows) {
            let start = r * per_row;
            let mut spans = vec![Span::styled(format!("{start:>9} "), color::dim())];
            for c in start..(start + per_row).min(n) {
                let (col, _) = cell(ctx, c, reader.get(c).ok());
                let mut st = Style::new().fg(col);
                if c == self.sel {
                    st = st.bg(Color::White);
                }
                spans.push(Span::styled(if c >= LAYOUT_LIMIT { "·" } else { "■" }, st));
            }
            lines.push(Line::from(spans));
        }
        let block = boxed(String::new());
        let inner = block.inner(grid_area);
        let [legend_area, cells] =
            Layout::vertical([Constraint::Length(legend_rows), Constraint::Min(1)]).areas(inner);
        self.grid = Rect {
            x: cells.x + 10,
            y: cells.y,
            width: cells.width.saturating_sub(10),
            height: cells.height,
        };
        let title = ctx.titled(if ctx.roles.is_none() {
            "Layout (finding roles…)".to_string()
        } else {
            format!("Layout of {} clusters of {cs} bytes{}", n, ctx.view_word())
        });
        f.render_widget(
            boxed(title).title_bottom(
                Line::raw(format!(" row {}/{total_rows} ", sel_row + 1))
                    .alignment(ratatui::layout::Alignment::Right),
            ),
            grid_area,
        );
        f.render_widget(Paragraph::new(legend), legend_area);
        f.render_widget(Paragraph::new(lines), cells);
        self.per_row = per_row;
        self.rows = rows;
        self.render_details(f, info_area, ctx, &mut reader, cs);
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let Some(img) = ctx.img.clone() else {
            return false;
        };
        let cs = img.geometry().cluster_size();
        let n = Self::clusters_in(ctx);
        let per_row = self.per_row.max(1);
        let page = per_row * self.rows.max(1);
        if self.focus_refs {
            let refs = match &self.detail {
                Some((dc, r)) if *dc == self.sel => r.as_slice(),
                _ => &[],
            };
            if action == Action::Enter {
                if let Some(r) = refs.get(self.refs.sel) {
                    super::follow_referrer(ctx, r, q);
                }
                return true;
            }
            if self.refs.select(action, refs.len()) {
                return true;
            }
        }
        let c = &mut self.sel;
        match action {
            Action::Left => *c = c.saturating_sub(1),
            Action::Right => *c = (*c + 1).min(n - 1),
            Action::Up => *c = c.saturating_sub(per_row),
            Action::Down => *c = (*c + per_row).min(n - 1),
            Action::PageUp => *c = c.saturating_sub(page),
            Action::PageDown => *c = (*c + page).min(n - 1),
            Action::Home => *c = 0,
            Action::End => *c = n - 1,
            Action::Lookup => {
                self.looking = Some(*c);
                self.focus_refs = true;
                q.push(Effect::Start(Job::Lookup(*c)));
            }
            Action::Focus
                if !self.focus_refs
                    && !matches!(&self.detail, Some((dc, r)) if *dc == *c && !r.is_empty()) =>
            {
                q.push(Effect::Status(format!(
                    "f moves to the list of who references cluster {c}, once i has found someone"
                )));
            }
            Action::Focus => self.focus_refs = !self.focus_refs,
            Action::Enter => {
                let c = *c;
                let is_l1 = role_bits(ctx, c).is_some_and(|b| b & (1 << Role::L1Table as u16) != 0);
                let l2_of = ctx.view().and_then(|v| {
                    v.l1.iter()
                        .position(|e| e.l2_offset().map(|o| o.0) == Some(c * cs))
                });
                if let Some(i) = l2_of {
                    q.push(Effect::Table(Some((i, 0))));
                } else if is_l1 {
                    q.push(Effect::Table(None));
                } else {
                    q.push(Effect::Refcount(c));
                }
            }
            Action::NextMatters | Action::PrevMatters => {
                let forward = action == Action::NextMatters;
                match next_with_finding(ctx, *c, forward) {
                    Some(n) => *c = n,
                    None => q.push(Effect::Status(format!(
                        "no cluster with a finding {} cluster {}{}",
                        if forward { "after" } else { "before" },
                        *c,
                        if ctx.report.is_none() {
                            " (the check is still running)"
                        } else {
                            ""
                        }
                    ))),
                }
            }
            Action::Hex => q.push(Effect::ShowHost {
                offset: qinspect::types::HostOffset(*c * cs),
                label: format!("host cluster {}", *c),
                mark: None,
                src: None,
            }),
            _ => return false,
        }
        true
    }

    fn explain(&self, ctx: &Ctx) -> String {
        let c = self.sel;
        let cs = ctx.cluster_size();
        let refs = match &self.detail {
            Some((dc, r)) if *dc == c && !r.is_empty() => {
                format!(" It is referenced by {} thing(s) (listed below).", r.len())
            }
            _ => String::new(),
        };
        let counts = match (ctx.stored_refcount(c), ctx.counted(c)) {
            (Some(s), Some(k)) if s < k => format!(
                " Its stored refcount {s} is below the {k} references counted: QEMU could reuse it while it is in use (a corruption)."
            ),
            (Some(s), Some(k)) if s > k => format!(
                " Its stored refcount {s} is above the {k} references counted: the space is wasted (a leak); the data is safe."
            ),
            (Some(s), Some(_)) => format!(" Stored refcount {s}, as many as its references."),
            _ => String::new(),
        };
        let unclassified = if c >= LAYOUT_LIMIT {
            format!(
                " Its role is not classified: the grid finds roles for the first {LAYOUT_LIMIT} clusters only; i looks it up."
            )
        } else {
            String::new()
        };
        format!(
            "Host cluster {c} at {:#x}.{counts}{refs}{unclassified}  —  Every host cluster has a role: metadata (header, tables, refcounts) or guest data. Its stored refcount must equal the number of references the check counts: fewer is a corruption (it could be reused while in use), more is a leak (wasted space).",
            c.saturating_mul(cs)
        )
    }

    fn offset_kind(&self) -> Option<OffsetKind> {
        Some(OffsetKind::Host)
    }

    fn goto(&mut self, offset: u64, ctx: &Ctx, _: &mut Vec<Effect>) {
        self.select(offset / ctx.cluster_size());
    }

    fn click(&mut self, x: u16, y: u16, _: &Ctx, _: &mut Vec<Effect>) {
        let g = self.grid;
        if x >= g.x && x < g.x + g.width && y >= g.y && y < g.y + g.height {
            self.select((self.first_row + u64::from(y - g.y)) * self.per_row + u64::from(x - g.x));
        }
    }
}

//! Pane 7: the consistency check, run on a worker thread; findings by kind.

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::check::{Category, FindingKind};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Wrap};

/// Check's state.
#[derive(Default)]
pub struct State {
    /// The findings.
    pub list: ListView,
    /// Who is involved in the selected finding.
    pub detail: ListView,
    /// The arrows and Enter work in the "Who is involved" box.
    pub focus_detail: bool,
}

fn render(st: &mut State, f: &mut Frame, area: Rect, app: &Ctx) {
    if app.img.is_none() {
        return super::nothing(
            f,
            area,
            "Check",
            format!("The check cannot run: {}", app.unopened()),
        );
    }
    let Some(r) = app.report.clone() else {
        let (phase, done, total) = app.progress.unwrap_or(("starting", 0, 1));
        let ratio = if total == 0 {
            0.0
        } else {
            (done as f64 / total as f64).min(1.0)
        };
        let g = Gauge::default()
            .block(
                Block::new()
                    .borders(Borders::ALL)
                    .title(" Check — running on a worker thread "),
            )
            .ratio(ratio)
            .label(format!("{phase}: {done}/{total}"));
        f.render_widget(
            g,
            Rect {
                height: 3.min(area.height),
                ..area
            },
        );
        return;
    };
    let verdict = if r.corruptions + r.leaks + r.check_errors == 0 {
        Line::styled(
            "No errors were found on the image.",
            Style::new().fg(color::DATA),
        )
    } else {
        Line::styled(
            format!(
                "{} corruptions, {} leaks, {} check errors (exit code {})",
                r.corruptions,
                r.leaks,
                r.check_errors,
                r.exit_code()
            ),
            Style::new().fg(color::BAD),
        )
    };
    let mut s = vec![
        verdict,
        Line::raw(format!(
            "{}/{} allocated, {} fragmented, {} compressed · image end offset {}",
            r.allocated_clusters,
            r.total_clusters,
            r.fragmented_clusters,
            r.compressed_clusters,
            r.image_end_offset.get()
        )),
    ];
    if let Some((c, l, e)) = app.previous {
        s.push(Line::raw(format!(
            "since the previous load: corruptions {c} → {}, leaks {l} → {}, check errors {e} → {}",
            r.corruptions, r.leaks, r.check_errors
        )));
    }
    for w in &r.warnings {
        s.push(Line::styled(
            format!("warning: {w}"),
            Style::new().fg(color::LEAK),
        ));
    }
    // The summary box grows to show every warning wrapped (a dirty image's is
    // longer than a wide terminal), up to half the pane.
    let p = Paragraph::new(s).wrap(Wrap { trim: true }).block(
        Block::new()
            .borders(Borders::ALL)
            .title(format!(" Check{} ", app.view_word())),
    );
    // line_count counts the borders too; it takes the width inside them.
    let rows = u16::try_from(p.line_count(area.width.saturating_sub(2))).unwrap_or(u16::MAX);
    let height = rows.min(area.height / 2).max(5);
    let [summary, list, detail] = Layout::vertical([
        Constraint::Length(height),
        Constraint::Min(3),
        Constraint::Length(6),
    ])
    .areas(area);
    f.render_widget(p, summary);
    let findings = r.findings.clone();
    let title = format!(
        "Findings — Enter: the entry at fault{}",
        if r.findings_omitted > 0 {
            format!(" ({} more not listed)", r.findings_omitted)
        } else {
            String::new()
        }
    );
    st.list
        .render_list(f, list, boxed(title), findings.len(), true, |rows| {
            findings[rows]
                .iter()
                .map(|f| {
                    let style = match f.kind {
                        FindingKind::Corruption | FindingKind::CheckError => {
                            Style::new().fg(color::BAD)
                        }
                        FindingKind::Leak => Style::new().fg(color::LEAK),
                        FindingKind::Note => Style::new().fg(color::META),
                    };
                    Line::styled(
                        format!(
                            "{:<11} {}{}",
                            format!("{:?}", f.kind).to_lowercase(),
                            f.message,
                            if f.count > 1 {
                                format!(" (×{})", f.count)
                            } else {
                                String::new()
                            }
                        ),
                        style,
                    )
                })
                .collect()
        });
    let d: Vec<Line<'static>> = match r.findings.get(st.list.sel) {
        Some(f) => {
            let refs = sorted_referrers(f);
            let mut v: Vec<Line> = refs
                .iter()
                .map(|x| Line::raw(format!("referenced by {}", x.describe())))
                .collect();
            if let Some(rep) = &f.repair {
                v.push(Line::raw(format!("repair: {rep}")));
            }
            v
        }
        None => vec![],
    };
    let title = if st.focus_detail {
        "Who is involved — ↑/↓ choose, Enter: its entry in Tables, f: back to the findings"
    } else {
        "Who is involved — f: choose one"
    };
    st.detail
        .render_list(f, detail, boxed(title), d.len(), st.focus_detail, |r| {
            d[r].to_vec()
        });
}

/// A finding's referrers in natural order (as listed).
fn sorted_referrers(f: &qinspect::check::Finding) -> Vec<qinspect::check::Referrer> {
    let mut refs = f.referrers.clone();
    super::layout::sort_referrers(&mut refs);
    refs
}

/// The entry at fault in a finding: a refcount that disagrees is the refcount
/// entry; a table entry that is wrong (COPIED, reserved bits, alignment, ...) is
/// the L2 or L1 entry naming the cluster; anything else, the cluster in Layout.
fn at_fault(f: &qinspect::check::Finding, ctx: &Ctx, q: &mut Vec<Effect>) {
    let refcount = matches!(
        f.category,
        Category::Refcount | Category::Refblock | Category::RefcountPastEof
    );
    match f.cluster {
        Some(c) if refcount => q.push(Effect::Refcount(c)),
        _ => {
            let followed = sorted_referrers(f)
                .first()
                .is_some_and(|r| super::follow_referrer(ctx, r, q));
            if !followed && let Some(c) = f.cluster {
                q.push(Effect::Cluster(c));
            }
        }
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        render(self, f, area, ctx);
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let n = ctx.report.as_ref().map_or(0, |r| r.findings.len());
        match action {
            Action::Run => q.push(Effect::Reload),
            Action::Enter => {
                let Some(f) = ctx
                    .report
                    .as_ref()
                    .and_then(|r| r.findings.get(self.list.sel))
                else {
                    return true;
                };
                if self.focus_detail {
                    let refs = sorted_referrers(f);
                    if let Some(r) = refs.get(self.detail.sel) {
                        super::follow_referrer(ctx, r, q);
                    }
                } else {
                    at_fault(f, ctx, q);
                }
            }
            Action::Focus => self.focus_detail = !self.focus_detail,
            Action::ExplainDown => return self.detail.scroll(Action::Down),
            Action::ExplainUp => return self.detail.scroll(Action::Up),
            a if self.focus_detail => {
                let n = ctx
                    .report
                    .as_ref()
                    .and_then(|r| r.findings.get(self.list.sel))
                    .map_or(0, |f| f.referrers.len());
                return self.detail.select(a, n);
            }
            a => {
                let moved = self.list.select(a, n);
                if moved {
                    self.detail = ListView::default();
                }
                return moved;
            }
        }
        true
    }

    fn explain(&self, ctx: &Ctx) -> String {
        let general = "The check recounts every reference the way qemu-img check does and compares with the stored refcounts, then checks that COPIED is set exactly where the refcount is 1.";
        match ctx
            .report
            .as_ref()
            .and_then(|r| r.findings.get(self.list.sel))
        {
            Some(f) => format!(
                "{}{}  —  {general}",
                f.message,
                f.repair
                    .as_ref()
                    .map(|r| format!(". Repair: {r}."))
                    .unwrap_or_default()
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
        let r = ctx.report.as_ref()?;
        Some(Box::new(super::rows::FindingRows {
            list: &r.findings,
            cs: ctx.cluster_size(),
        }))
    }

    fn list(&mut self) -> Option<&mut ListView> {
        Some(&mut self.list)
    }

    fn list_ref(&self) -> Option<&ListView> {
        Some(&self.list)
    }
}

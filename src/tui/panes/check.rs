//! Pane 7: the consistency check, run on a worker thread; findings by kind.

use super::{color, first_row, move_sel};
use crate::tui::app::App;
use crate::tui::keymap::Action;
use qinspect::check::FindingKind;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Wrap};

/// Draw.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    let Some(r) = app.report.clone() else {
        let (phase, done, total) = app.progress.unwrap_or(("waiting", 0, 1));
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
    let [summary, list, detail] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Min(3),
        Constraint::Length(6),
    ])
    .areas(area);
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
            r.image_end_offset
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
    f.render_widget(
        Paragraph::new(s).block(Block::new().borders(Borders::ALL).title(" Check ")),
        summary,
    );
    let h = list.height.saturating_sub(2) as usize;
    let first = first_row(app.finding_sel, h);
    let lines: Vec<Line> = r
        .findings
        .iter()
        .enumerate()
        .skip(first)
        .take(h)
        .map(|(i, f)| {
            let st = match f.kind {
                FindingKind::Corruption | FindingKind::CheckError => Style::new().fg(color::BAD),
                FindingKind::Leak => Style::new().fg(color::LEAK),
                FindingKind::Note => Style::new().fg(color::META),
            };
            let l = Line::styled(
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
                st,
            );
            if i == app.finding_sel {
                l.style(color::selected())
            } else {
                l
            }
        })
        .collect();
    app.areas.list = Some((list, first));
    f.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" Findings — Enter: the cluster in Layout "),
        ),
        list,
    );
    let d: Vec<Line> = match r.findings.get(app.finding_sel) {
        Some(f) => {
            let mut v: Vec<Line> = f
                .referrers
                .iter()
                .take(3)
                .map(|x| Line::raw(format!("referenced by {}", x.describe())))
                .collect();
            if let Some(rep) = &f.repair {
                v.push(Line::raw(format!("repair: {rep}")));
            }
            v
        }
        None => vec![],
    };
    f.render_widget(
        Paragraph::new(d).wrap(Wrap { trim: true }).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" Who is involved "),
        ),
        detail,
    );
}

/// Keys.
pub fn handle(app: &mut App, action: Action) {
    let n = app.report.as_ref().map_or(0, |r| r.findings.len());
    match action {
        Action::Run => app.load(),
        Action::Enter => {
            if let Some(c) = app
                .report
                .as_ref()
                .and_then(|r| r.findings.get(app.finding_sel))
                .and_then(|f| f.cluster)
            {
                app.layout_sel = c;
                app.pane = crate::tui::keymap::pane::LAYOUT;
            }
        }
        a => {
            move_sel(&mut app.finding_sel, n, 10, a);
        }
    }
}

//! Pane 8: choose an operation, then step through every change it would make.

use super::{color, move_sel};
use crate::tui::app::{App, InputFor, Popup, SIM_TEMPLATES};
use crate::tui::keymap::Action;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};

/// All steps of the last simulation, flattened: (operation index, step text).
pub fn flat(app: &App) -> Vec<(usize, String)> {
    let Some((records, _)) = &app.sim else {
        return vec![];
    };
    let mut v = Vec::new();
    for (i, r) in records.iter().enumerate() {
        for s in &r.steps {
            v.push((i, s.describe()));
        }
        if let Some(e) = &r.error {
            v.push((i, format!("QEMU fails here: {e}")));
        }
    }
    v
}

/// Draw.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    let [menu, steps, detail] = Layout::vertical([
        Constraint::Length(SIM_TEMPLATES.len() as u16 + 2),
        Constraint::Min(3),
        Constraint::Length(4),
    ])
    .areas(area);
    let items: Vec<Line> = SIM_TEMPLATES
        .iter()
        .enumerate()
        .map(|(i, (op, what))| {
            let l = Line::raw(format!("{op:<28} {what}"));
            if i == app.sim_choice && app.sim.is_none() {
                l.style(color::selected())
            } else {
                l
            }
        })
        .collect();
    app.areas.list = Some((menu, 0));
    f.render_widget(
        Paragraph::new(items).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" Simulate — ↑/↓ choose, Enter edit and run (nothing is written) "),
        ),
        menu,
    );
    let all = flat(app);
    let h = steps.height.saturating_sub(2) as usize;
    let first = super::first_row(app.sim_step, h);
    let lines: Vec<Line> = all
        .iter()
        .enumerate()
        .skip(first)
        .take(h)
        .map(|(i, (op, text))| {
            let st = if text.starts_with("QEMU fails") {
                Style::new().fg(color::BAD)
            } else {
                Style::new()
            };
            let l = Line::styled(format!("op {} · {text}", op + 1), st);
            if i == app.sim_step {
                l.style(color::selected())
            } else {
                l
            }
        })
        .collect();
    let title = match &app.sim {
        Some((r, _)) => format!(
            " {} operation(s), change {}/{} (n/p) ",
            r.len(),
            app.sim_step + 1,
            all.len()
        ),
        None => " Changes ".into(),
    };
    f.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(title)),
        steps,
    );
    let d = match &app.sim {
        Some((records, summary)) => {
            let op = all.get(app.sim_step).map(|(i, _)| *i).unwrap_or(0);
            vec![
                Line::raw(
                    records
                        .get(op)
                        .map(|r| r.description.clone())
                        .unwrap_or_default(),
                ),
                Line::styled(
                    summary.clone(),
                    if summary.contains("no errors") {
                        Style::new().fg(color::DATA)
                    } else {
                        Style::new().fg(color::BAD)
                    },
                ),
            ]
        }
        None => vec![Line::styled(
            "Choose an operation; several can be chained, separated by spaces.",
            color::dim(),
        )],
    };
    f.render_widget(
        Paragraph::new(d)
            .wrap(Wrap { trim: true })
            .block(Block::new().borders(Borders::ALL)),
        detail,
    );
}

/// Keys.
pub fn handle(app: &mut App, action: Action) {
    let n = flat(app).len();
    match action {
        Action::Enter | Action::Run => {
            let t = SIM_TEMPLATES.get(app.sim_choice).map(|t| t.0).unwrap_or("");
            app.popup = Some(Popup::Input(InputFor::Simulate, t.to_string()));
        }
        Action::NextStep => app.sim_step = (app.sim_step + 1).min(n.saturating_sub(1)),
        Action::PrevStep => app.sim_step = app.sim_step.saturating_sub(1),
        Action::Back => app.sim = None,
        a if app.sim.is_some() && n > 0 => {
            move_sel(&mut app.sim_step, n, 10, a);
        }
        a => {
            move_sel(&mut app.sim_choice, SIM_TEMPLATES.len(), 4, a);
        }
    }
}

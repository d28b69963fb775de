//! Drawing the whole screen: tabs, the pane, the explanation, status, footer and
//! popups. Narrow terminals get short tab labels and a footer that keeps `?` and `q`.

use super::app::{App, InputFor, Popup};
use super::ctx::{OffsetKind, Pane};
use super::keymap::{KEYMAP, footer, scope_text};
use super::panes::color;
use super::widgets::boxed;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{Clear, Paragraph};

/// Draw everything.
pub fn draw(f: &mut Frame, app: &mut App) {
    let area = f.area();
    let explain_h = if app.explain || app.tour.is_some() {
        if area.height >= 36 { 8 } else { 5 }
    } else {
        0
    };
    // A status message longer than the screen is wide wraps onto up to three
    // lines rather than being cut off.
    let status_line = Line::from(status_spans(app));
    let status_h = u16::try_from(status_line.width().div_ceil(usize::from(area.width.max(1))))
        .unwrap_or(3)
        .clamp(1, 3);
    let [tabs, main, explain, status, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(explain_h),
        Constraint::Length(status_h),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_tabs(f, tabs, app);
    app.areas.pane = main;
    app.panes.get_mut(app.pane).render(f, main, &app.ctx);
    if explain_h > 0 {
        let (title, text) = if app.tour.is_some() {
            (
                "Tour (n/p step, J/K scroll, Esc ends)",
                super::tour::text(app).to_string(),
            )
        } else {
            (
                "Explanation (J/K scroll, e or Esc closes)",
                explanation(app),
            )
        };
        app.explain_view
            .render_text(f, explain, boxed(title), Text::raw(text));
    }
    f.render_widget(
        Paragraph::new(status_line).wrap(ratatui::widgets::Wrap { trim: false }),
        status,
    );
    draw_footer(f, foot, app.pane);
    let offset_kind = app.panes.get(app.pane).offset_kind();
    match &mut app.popup {
        Some(Popup::Help(v)) => {
            let lines = help_lines(app.pane);
            let w = area.width.min(100);
            let rows = Paragraph::new(lines.clone())
                .wrap(ratatui::widgets::Wrap { trim: false })
                .line_count(w.saturating_sub(2));
            let h = u16::try_from(rows + 2).unwrap_or(u16::MAX);
            let r = centered(area, w, h.min(area.height));
            f.render_widget(Clear, r);
            v.render_text(
                f,
                r,
                boxed("Help — ↑/↓ PgUp/PgDn Home/End scroll, ? or Esc closes"),
                Text::from(lines),
            );
        }
        Some(Popup::Changes(v)) => {
            let (changes, since) = super::app::changes_shown(&app.ctx, &app.changes)
                .map_or((Vec::new(), "the previous load"), |(c, s)| (c.to_vec(), s));
            let simulated = since == "the simulation";
            let w = area.width.min(110);
            let h = u16::try_from(changes.len().max(1) + 3)
                .unwrap_or(u16::MAX)
                .min(area.height);
            let r = centered(area, w, h);
            f.render_widget(Clear, r);
            let rc = changes.iter().filter(|c| c.cluster.is_some()).count();
            let title = if simulated {
                format!(
                    "Changes the simulation makes — {rc} refcount(s), {} other · Enter: that entry, c/Esc closes",
                    changes.len() - rc
                )
            } else {
                format!(
                    "Changes since the previous load — {rc} refcount(s), {} other · Enter: that entry, c/Esc closes",
                    changes.len() - rc
                )
            };
            let limits = if simulated {
                String::new()
            } else {
                app.changes_limits
                    .as_ref()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default()
            };
            let heading = Line::styled(
                if changes.is_empty() && simulated {
                    "the simulation changes no refcount and no table entry".to_string()
                } else if changes.is_empty() {
                    format!("nothing changed on disk{limits}")
                } else {
                    format!("old→new, host clusters first{limits}")
                },
                crate::tui::panes::color::dim(),
            );
            v.render_table(
                f,
                r,
                boxed(title),
                Some(heading),
                changes.len(),
                true,
                |rows| {
                    changes[rows]
                        .iter()
                        .map(|c| {
                            let style = if c.cluster.is_some() {
                                Style::new().fg(crate::tui::panes::color::REFCOUNT)
                            } else {
                                Style::new().fg(crate::tui::panes::color::TABLE)
                            };
                            Line::styled(c.text.clone(), style)
                        })
                        .collect()
                },
            );
        }
        Some(Popup::Input(purpose, input)) => draw_input(f, area, purpose, input, offset_kind),
        Some(Popup::Compare) => {
            let w = area.width.min(140);
            let h = area.height.saturating_sub(2).max(3);
            let r = centered(area, w, h);
            f.render_widget(Clear, r);
            app.compare.render(f, r, &app.ctx);
        }
        None => {}
    }
}

/// The status line: the file, which view is shown, work in progress, the last message.
fn status_spans(app: &App) -> Vec<Span<'static>> {
    let mut st = vec![Span::styled(
        format!(" {} ", app.ctx.path.display()),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    if let (true, Some(s)) = (app.ctx.simulated_view(), &app.ctx.simulated) {
        st.push(Span::styled(
            format!(" view: simulated ({}) ", s.ops),
            Style::new().fg(Color::Black).bg(Color::LightMagenta),
        ));
    }
    if let Some(s) = app.ctx.viewed_name() {
        st.push(Span::styled(
            format!(" view: snapshot {s} "),
            Style::new().fg(Color::Black).bg(Color::LightBlue),
        ));
    }
    if let Some((phase, done, total)) = app.ctx.progress {
        st.push(Span::styled(
            format!(" check: {phase} {done}/{total} "),
            color::dim(),
        ));
    }
    if let Some(r) = &app.panes.simulate.running {
        st.push(Span::styled(
            format!(
                " simulating: {} {}/{} (Esc cancels) ",
                r.phase, r.done, r.total
            ),
            color::dim(),
        ));
    }
    if !app.status.is_empty() {
        st.push(Span::raw(format!(" {}", app.status)));
    }
    st
}

/// A one-line input box, its purpose in the title, the cursor shown reversed.
fn draw_input(
    f: &mut Frame,
    area: Rect,
    purpose: &InputFor,
    input: &super::app::Input,
    offset_kind: Option<OffsetKind>,
) {
    let r = centered(area, 70, 3);
    f.render_widget(Clear, r);
    let title = match purpose {
        InputFor::Goto => match offset_kind {
            Some(OffsetKind::Host) => "Go to host offset (Enter, Esc; Ctrl-U clears)",
            _ => "Go to guest offset (Enter, Esc; Ctrl-U clears)",
        },
        InputFor::Simulate => "Operation(s) to simulate (Enter runs, Esc cancels)",
        InputFor::FindInList => {
            "Find: words, an offset or a raw value (Enter selects, Esc cancels)"
        }
        InputFor::HexSearch => "Find bytes: de ad be ef, 0xdeadbeef or \"text\" (Enter, Esc)",
    };
    let at = input
        .text
        .char_indices()
        .nth(input.cursor)
        .map_or(input.text.len(), |(i, _)| i);
    let (before, rest) = input.text.split_at(at);
    let mut chars = rest.chars();
    let under = chars.next().map_or(" ".to_string(), |c| c.to_string());
    let line = Line::from(vec![
        Span::raw(before.to_string()),
        Span::styled(under, Style::new().add_modifier(Modifier::REVERSED)),
        Span::raw(chars.as_str().to_string()),
    ]);
    f.render_widget(Paragraph::new(line).block(boxed(title)), r);
}

fn draw_tabs(f: &mut Frame, area: Rect, app: &mut App) {
    let full: usize = Pane::ALL.iter().map(|p| p.name().len() + 4).sum();
    let tight: usize = Pane::ALL.iter().map(|p| p.name().len() + 3).sum();
    let short: usize = Pane::ALL.iter().map(|p| p.short().len() + 4).sum();
    let label = |p: Pane| {
        if full <= usize::from(area.width) {
            format!(" {} {} ", p.number(), p.name())
        } else if tight <= usize::from(area.width) {
            format!(" {} {}", p.number(), p.name())
        } else if short <= usize::from(area.width) {
            format!(" {} {} ", p.number(), p.short())
        } else {
            format!(" {} ", p.number())
        }
    };
    let mut x = area.x;
    let mut spans = Vec::new();
    app.areas.tabs.clear();
    for p in Pane::ALL {
        let text = label(p);
        let w = text.chars().count() as u16;
        let st = if p == app.pane {
            Style::new()
                .fg(Color::Black)
                .bg(Color::Cyan)
                .add_modifier(Modifier::BOLD)
        } else {
            Style::new()
        };
        app.areas.tabs.push((
            Rect {
                x,
                y: area.y,
                width: w,
                height: 1,
            },
            p,
        ));
        spans.push(Span::styled(text, st));
        x = x.saturating_add(w);
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// The footer: as many hints as fit, and always `?` and `q` at the end.
fn draw_footer(f: &mut Frame, area: Rect, pane: Pane) {
    let items = footer(pane);
    let width = |(k, d): &(&str, &str)| k.chars().count() + d.chars().count() + 3;
    let keep = items.len().saturating_sub(2);
    let reserved: usize = items[keep..].iter().map(width).sum();
    let mut room = usize::from(area.width).saturating_sub(reserved);
    let mut shown = Vec::new();
    for it in &items[..keep] {
        let w = width(it);
        if w > room {
            break;
        }
        room -= w;
        shown.push(*it);
    }
    shown.extend_from_slice(&items[keep..]);
    let hints: Vec<Span> = shown
        .into_iter()
        .flat_map(|(k, d)| {
            vec![
                Span::styled(format!(" {k}"), Style::new().fg(Color::Cyan)),
                Span::raw(format!(" {d} ")),
            ]
        })
        .collect();
    f.render_widget(Paragraph::new(Line::from(hints)), area);
}

/// The help: every binding once, the current pane's own keys first.
pub fn help_lines(pane: Pane) -> Vec<Line<'static>> {
    let mut lines = vec![Line::styled(
        "Keys (this table is also what the footer shows)",
        color::head(),
    )];
    let own = KEYMAP
        .iter()
        .filter(|b| !b.scope.is_global() && b.scope.covers(pane));
    let rest = KEYMAP
        .iter()
        .filter(|b| b.scope.is_global() || !b.scope.covers(pane));
    for b in own.chain(rest) {
        let scope = scope_text(b.scope);
        let mut spans = vec![Span::styled(
            format!("{:<11}", b.keys),
            Style::new().fg(Color::Cyan),
        )];
        if !scope.is_empty() {
            spans.push(Span::styled(format!("[{scope}] "), color::dim()));
        }
        spans.push(Span::raw(b.help));
        lines.push(Line::from(spans));
    }
    lines.push(Line::styled(
        "Text fields: ←/→ Home/End move, Ctrl-U clears, Backspace/Delete remove, Enter submits, Esc cancels.",
        color::dim(),
    ));
    lines.push(Line::styled(
        "Mouse: click a tab or a row, scroll with the wheel (--no-mouse turns it off).",
        color::dim(),
    ));
    lines
}

fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

/// What the explanation panel says: first about the selected item, then about
/// the pane's structures in general.
pub fn explanation(app: &App) -> String {
    app.panes.get(app.pane).explain(&app.ctx)
}

//! Pane 6: one guest lookup, stepped through with n and p.

use super::color;
use crate::tui::app::{App, InputFor, Popup};
use crate::tui::keymap::Action;
use qinspect::lookup::StepKind;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph, Wrap};

fn step_color(k: &StepKind) -> Color {
    match k {
        StepKind::Data { .. } => color::DATA,
        StepKind::Zero { .. } => color::META,
        StepKind::Compressed { .. } => color::COMPRESSED,
        StepKind::Error { .. } => color::BAD,
        StepKind::FallThrough { .. } | StepKind::PastEnd { .. } | StepKind::BeyondL1 { .. } => {
            color::REFCOUNT
        }
        _ => Color::Reset,
    }
}

/// Draw.
pub fn render(f: &mut Frame, area: Rect, app: &mut App) {
    let Some(t) = &app.trace else {
        let p = Paragraph::new(vec![
            Line::raw("Type g and a guest offset (65536, 0x10000, 64k) to follow one read through the L1 table,"),
            Line::raw("the L2 table and down the backing chain, one step at a time (n: next, p: previous)."),
        ])
        .block(Block::new().borders(Borders::ALL).title(" Trace "));
        f.render_widget(p, area);
        return;
    };
    let [list, detail] = Layout::vertical([Constraint::Min(4), Constraint::Length(6)]).areas(area);
    let mut lines = Vec::new();
    let mut last_depth = usize::MAX;
    for (i, s) in t.steps.iter().enumerate().take(app.trace_step + 1) {
        if s.depth != last_depth {
            lines.push(Line::styled(
                format!("layer {}: {}", s.depth, s.layer),
                color::head(),
            ));
            last_depth = s.depth;
        }
        let st = Style::new().fg(step_color(&s.kind));
        let l = Line::styled(format!("  {:>2}. {}", i + 1, short(&s.kind)), st);
        lines.push(if i == app.trace_step {
            l.style(color::selected())
        } else {
            l
        });
    }
    if app.trace_step + 1 >= t.steps.len() {
        lines.push(Line::styled(
            format!("result: {}", t.outcome),
            color::head(),
        ));
    }
    let title = format!(
        " Trace of guest {:#x} via the {} — step {}/{} (n/p) ",
        t.guest_offset,
        t.view,
        app.trace_step + 1,
        t.steps.len()
    );
    f.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(title)),
        list,
    );
    let text = t
        .steps
        .get(app.trace_step)
        .map(|s| s.explanation.clone())
        .unwrap_or_default();
    f.render_widget(
        Paragraph::new(text).wrap(Wrap { trim: true }).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" What this step means "),
        ),
        detail,
    );
}

fn short(k: &StepKind) -> String {
    match k {
        StepKind::Split {
            l1_index,
            l2_index,
            in_cluster,
            ..
        } => match (l1_index, l2_index, in_cluster) {
            (Some(a), Some(b), Some(c)) => {
                format!("split: L1 index {a}, L2 index {b}, offset {c:#x} in the cluster")
            }
            _ => "raw layer: guest offset = file offset".into(),
        },
        StepKind::L1Entry {
            table,
            index,
            entry_offset,
            raw,
            ..
        } => format!("{table}[{index}] at {entry_offset:#x} = {raw}"),
        StepKind::L2Entry {
            table_offset,
            index,
            raw,
            subcluster_type,
            ..
        } => format!("L2 {table_offset}[{index}] = {raw}: {subcluster_type}"),
        StepKind::Data {
            file,
            host_offset,
            past_eof,
        } => format!(
            "data in {file} at {host_offset}{}",
            if *past_eof { " (past EOF: zeros)" } else { "" }
        ),
        StepKind::Compressed { descriptor, .. } => format!(
            "compressed: {} bytes at {}",
            descriptor.size, descriptor.offset
        ),
        StepKind::Zero { reason, .. } => format!("zeros: {reason}"),
        StepKind::FallThrough { next } => format!(
            "not here: down to {}",
            next.clone()
                .unwrap_or_else(|| "zeros (no backing file)".into())
        ),
        StepKind::PastEnd { layer_size } => {
            format!("past the end of this layer ({layer_size} bytes): zeros")
        }
        StepKind::BeyondL1 { l1_index, l1_size } => {
            format!("L1 index {l1_index} beyond the {l1_size}-entry table")
        }
        StepKind::Error { message } => format!("QEMU fails: {message}"),
    }
}

/// Keys.
pub fn handle(app: &mut App, action: Action) {
    let n = app.trace.as_ref().map_or(0, |t| t.steps.len());
    match action {
        Action::NextStep | Action::Down => {
            app.trace_step = (app.trace_step + 1).min(n.saturating_sub(1))
        }
        Action::PrevStep | Action::Up => app.trace_step = app.trace_step.saturating_sub(1),
        Action::End => app.trace_step = n.saturating_sub(1),
        Action::Home => app.trace_step = 0,
        Action::Enter => {
            // Show the entry the current step reads, or the data it lands on, in Hex.
            let Some(s) = app
                .trace
                .as_ref()
                .and_then(|t| t.steps.get(app.trace_step))
                .cloned()
            else {
                app.popup = Some(Popup::Input(InputFor::Goto, String::new()));
                return;
            };
            match s.kind {
                StepKind::L1Entry { entry_offset, .. } => app.show_host(
                    entry_offset,
                    format!("{} (L1 entry)", s.layer),
                    Some((entry_offset, entry_offset + 8)),
                ),
                StepKind::L2Entry { entry_offset, .. } => app.show_host(
                    entry_offset,
                    format!("{} (L2 entry)", s.layer),
                    Some((entry_offset, entry_offset + 8)),
                ),
                StepKind::Data {
                    host_offset,
                    ref file,
                    ..
                } => {
                    let h =
                        u64::from_str_radix(host_offset.trim_start_matches("0x"), 16).unwrap_or(0);
                    // The data may be in a backing layer or a data file: show that file.
                    let src = app
                        .chain
                        .as_ref()
                        .ok()
                        .and_then(|c| c.layers.get(s.depth))
                        .map(|l| match &l.kind {
                            qinspect::chain::LayerKind::Qcow2 {
                                data_file: Some(df),
                                ..
                            } if l.path.display().to_string() != *file => df.clone(),
                            _ => l.src.clone(),
                        });
                    app.show_host(h, format!("data in {file}"), Some((h, h + 16)));
                    app.hex_src = src;
                }
                _ => {}
            }
        }
        _ => {}
    }
}

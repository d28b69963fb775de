//! Pane 6: one guest lookup, stepped through with n and p.

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect, OffsetKind};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::lookup::{StepKind, Trace, trace};
use qinspect::types::GuestOffset;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Text};

/// Trace's state.
#[derive(Default)]
pub struct State {
    /// The last trace.
    pub trace: Option<Trace>,
    /// The current step.
    pub step: usize,
    /// Scroll of the steps.
    pub list: ListView,
    /// Scroll of the step's explanation.
    pub detail: ListView,
}

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

impl State {
    /// Trace `off` through the chain. Where a backing file is missing, the layers
    /// above it are traced and the trace stops where the read would reach it.
    pub fn run(&mut self, off: GuestOffset, ctx: &Ctx) -> Result<(), String> {
        let c = ctx
            .chain
            .as_ref()
            .map_err(|e| format!("cannot trace: {e}"))?;
        let mut t = trace(c, off);
        if let Some((missing, gap)) = &ctx.chain_gap {
            let missing = missing.display();
            for s in t.steps.iter_mut() {
                if let StepKind::FallThrough { next } = &mut s.kind
                    && next.is_none()
                {
                    *next = Some(format!("{missing} (missing)"));
                    s.explanation = format!(
                        "Not allocated in {}: the read falls through to the backing file {missing}, which cannot be opened ({gap}). The trace stops here; QEMU would fail to open the image.",
                        s.layer
                    );
                    t.outcome = format!("stops: the backing file {missing} cannot be opened");
                }
            }
        }
        self.trace = Some(t);
        self.step = 0;
        self.detail = ListView::default();
        Ok(())
    }

    fn lines(&self, t: &Trace) -> (Vec<Line<'static>>, usize) {
        let mut lines = Vec::new();
        let mut sel = 0;
        let mut last_depth = usize::MAX;
        let mut sub = None;
        for (i, s) in t.steps.iter().enumerate().take(self.step + 1) {
            if s.depth != last_depth {
                lines.push(Line::styled(
                    format!("layer {}: {}", s.depth, s.layer),
                    color::head(),
                ));
                last_depth = s.depth;
            }
            if let StepKind::Split { subcluster, .. } = &s.kind {
                sub = *subcluster;
            }
            let st = Style::new().fg(step_color(&s.kind));
            let l = Line::styled(format!("  {:>2}. {}", i + 1, short(&s.kind, sub)), st);
            if i == self.step {
                sel = lines.len();
            }
            lines.push(l);
        }
        if self.step + 1 >= t.steps.len() {
            lines.push(Line::styled(
                format!("result: {}", t.outcome),
                color::head(),
            ));
        }
        (lines, sel)
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, _: &Ctx) {
        let Some(t) = &self.trace else {
            // One line, so the sentence wraps as one at any width.
            let p = ratatui::widgets::Paragraph::new(Line::raw(
                "Type g and a guest offset (65536, 0x10000, 64k) to follow one read through the L1 table, the L2 table and down the backing chain, one step at a time (n: next, p: previous).",
            ))
            .wrap(ratatui::widgets::Wrap { trim: true })
            .block(boxed("Trace"));
            f.render_widget(p, area);
            return;
        };
        let [list, detail] =
            Layout::vertical([Constraint::Min(4), Constraint::Length(6)]).areas(area);
        let (lines, sel) = self.lines(t);
        let title = format!(
            "Trace of guest {:#x} via the {} — step {}/{} (n/p, Enter: in Hex)",
            t.guest_offset,
            t.view,
            self.step + 1,
            t.steps.len()
        );
        let text = t
            .steps
            .get(self.step)
            .map(|s| s.explanation.clone())
            .unwrap_or_default();
        self.list.set(sel, lines.len());
        self.list
            .render_list(f, list, boxed(title), lines.len(), false, |r| {
                lines[r].to_vec()
            });
        self.detail
            .render_text(f, detail, boxed("What this step means"), Text::raw(text));
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let n = self.trace.as_ref().map_or(0, |t| t.steps.len());
        let before = self.step;
        match action {
            Action::NextStep | Action::PrevStep if self.trace.is_none() => {
                q.push(Effect::Status(
                    "n/p step through a trace: g and a guest offset start one".into(),
                ));
                return true;
            }
            Action::NextStep | Action::Down => self.step = (self.step + 1).min(n.saturating_sub(1)),
            Action::PrevStep | Action::Up => self.step = self.step.saturating_sub(1),
            Action::End => self.step = n.saturating_sub(1),
            Action::Home => self.step = 0,
            Action::PageDown => self.step = (self.step + 5).min(n.saturating_sub(1)),
            Action::PageUp => self.step = self.step.saturating_sub(5),
            Action::Enter => {
                // The entry the current step reads, or the data it lands on, in Hex.
                let Some(s) = self
                    .trace
                    .as_ref()
                    .and_then(|t| t.steps.get(self.step))
                    .cloned()
                else {
                    q.push(Effect::Input(
                        crate::tui::app::InputFor::Goto,
                        String::new(),
                    ));
                    return true;
                };
                let layer = ctx.chain.as_ref().ok().and_then(|c| c.layers.get(s.depth));
                match s.kind {
                    StepKind::L1Entry {
                        entry_offset,
                        ref table,
                        index,
                        ..
                    } => q.push(Effect::ShowHost {
                        offset: entry_offset,
                        label: format!("{table}[{index}] in {}", s.layer),
                        mark: Some((entry_offset, entry_offset.saturating_add(8))),
                        src: layer.map(|l| l.src.clone()),
                    }),
                    StepKind::L2Entry {
                        entry_offset,
                        ref table_offset,
                        index,
                        ..
                    } => q.push(Effect::ShowHost {
                        offset: entry_offset,
                        label: format!("L2 {table_offset}[{index}] in {}", s.layer),
                        mark: Some((entry_offset, entry_offset.saturating_add(8))),
                        src: layer.map(|l| l.src.clone()),
                    }),
                    StepKind::Data {
                        host_offset: h,
                        ref file,
                        ..
                    } => {
                        // The data may be in a backing layer or a data file: show that file.
                        let src = layer.map(|l| match &l.kind {
                            qinspect::chain::LayerKind::Qcow2 {
                                data_file: Some(df),
                                ..
                            } if l.path.display().to_string() != *file => df.clone(),
                            _ => l.src.clone(),
                        });
                        q.push(Effect::ShowHost {
                            offset: h,
                            label: format!(
                                "data of guest {:#x}",
                                self.trace.as_ref().map_or(0, |t| t.guest_offset.get())
                            ),
                            mark: Some((h, h.saturating_add(16))),
                            src,
                        });
                    }
                    _ => {}
                }
                return true;
            }
            a => {
                return self.detail.scroll(match a {
                    Action::ExplainDown => Action::Down,
                    Action::ExplainUp => Action::Up,
                    _ => return false,
                });
            }
        }
        if self.step != before {
            self.detail = ListView::default();
        }
        true
    }

    fn explain(&self, _: &Ctx) -> String {
        let general = "A read splits the guest offset into an L1 index, an L2 index and an offset in the cluster. Unallocated means: ask the backing file at the same offset (zeros when there is none). Past the end of a shorter backing file, the read returns zeros.";
        match self.trace.as_ref().and_then(|t| t.steps.get(self.step)) {
            Some(s) => format!("{}  —  {general}", s.explanation),
            None => general.into(),
        }
    }

    fn offset_kind(&self) -> Option<OffsetKind> {
        Some(OffsetKind::Guest)
    }
}

fn short(k: &StepKind, sub: Option<u32>) -> String {
    match k {
        StepKind::Split {
            l1_index,
            l2_index,
            in_cluster,
            ..
        } => match (l1_index, l2_index, in_cluster) {
            (Some(a), Some(b), Some(c)) => format!(
                "split: L1 index {a}, L2 index {b}, offset {c:#x} in the cluster{}",
                sub.map(|s| format!(", subcluster {s}")).unwrap_or_default()
            ),
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
            bitmap,
            subcluster_type,
            ..
        } => match (bitmap, sub) {
            (Some(b), Some(s)) => format!(
                "L2 {table_offset}[{index}] = {raw}, bitmap {b}: subcluster {s} is {subcluster_type}"
            ),
            _ => format!("L2 {table_offset}[{index}] = {raw}: {subcluster_type}"),
        },
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
        StepKind::Decrypt(d) => format!(
            "decrypt {}: IV from {} sector {}{}",
            d.cipher,
            d.iv_from,
            d.iv_sector,
            d.key_slot
                .map(|s| format!(", key slot {s}"))
                .unwrap_or_default()
        ),
    }
}

//! Pane 1: the header field by field, features, extensions, the backing chain.

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::types::human_size;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span, Text};

/// The Overview's state: how far it is scrolled.
#[derive(Default)]
pub struct State {
    /// The scroll position.
    pub view: ListView,
}

/// The overview's lines (also used by tests).
pub fn lines(app: &Ctx) -> Vec<Line<'static>> {
    let mut v: Vec<Line> = Vec::new();
    let Some(img) = &app.img else {
        v.push(Line::styled(
            format!(
                "{} cannot be opened: {}",
                app.path.display(),
                app.load_error.clone().unwrap_or_default()
            ),
            Style::new().fg(color::BAD),
        ));
        v.push(Line::raw(format!(
            "Hex (9) shows the file's {} bytes as they are.",
            app.file_len()
        )));
        return v;
    };
    let h = &img.header;
    let geo = img.geometry();
    v.push(Line::styled(
        format!("{}", app.path.display()),
        color::head(),
    ));
    v.push(Line::raw(format!(
        "qcow2 v{} · virtual {} · file {} ({} on disk) · clusters {}{} · {}-bit refcounts",
        h.version,
        human_size(h.size),
        human_size(img.file_len()),
        human_size(img.src.allocated_size()),
        human_size(geo.cluster_size()),
        if geo.extended_l2 {
            " (extended L2)"
        } else {
            ""
        },
        h.refcount_bits()
    )));
    match &app.report {
        Some(r) => v.push(Line::raw(format!(
            "check: {} corruptions, {} leaks, {} check errors · {} allocated / {} guest clusters · image ends at {:#x}",
            r.corruptions, r.leaks, r.check_errors, r.allocated_clusters, r.total_clusters, r.image_end_offset
        ))),
        None => v.push(Line::styled("check: running…", color::dim())),
    }
    for p in &img.problems {
        v.push(Line::styled(
            format!("QEMU would refuse this: {p}"),
            Style::new().fg(color::BAD),
        ));
    }
    v.push(Line::raw(""));
    v.push(Line::styled("Backing chain", color::head()));
    match &app.chain {
        Ok(c) => {
            for (i, l) in c.layers.iter().enumerate() {
                v.push(Line::raw(format!(
                    "  {i}  {}  {}  {}",
                    l.path.display(),
                    l.format().name(),
                    human_size(l.size())
                )));
            }
            if let Some((name, why)) = &app.chain_gap {
                v.push(Line::styled(
                    format!(
                        "  {}  {} cannot be opened: {why}",
                        c.layers.len(),
                        name.display()
                    ),
                    Style::new().fg(color::BAD),
                ));
            }
        }
        Err(e) => v.push(Line::styled(
            format!("  cannot be followed: {e}"),
            Style::new().fg(color::BAD),
        )),
    }
    if let Some(df) = &img.data_file_name {
        v.push(Line::raw(format!("  data file: {df}")));
    }
    v.push(Line::raw(""));
    v.push(Line::styled(
        "Header fields (offset, name, value, meaning)",
        color::head(),
    ));
    for f in h.fields() {
        v.push(Line::from(vec![
            Span::styled(format!("{:>4} ", f.offset), color::dim()),
            Span::styled(format!("{:<24}", f.name), Style::new().fg(color::META)),
            Span::raw(format!("{:>#18x}  ", f.value)),
            Span::raw(f.meaning),
        ]));
    }
    v.push(Line::raw(""));
    v.push(Line::styled("Feature bits", color::head()));
    if img.features.is_empty() {
        v.push(Line::raw("  none set"));
    }
    for f in &img.features {
        let st = if f.known {
            Style::new()
        } else {
            Style::new().fg(color::BAD)
        };
        v.push(Line::styled(
            format!(
                "  {:?} bit {}: {}{}",
                f.group,
                f.bit,
                f.name,
                if f.known { "" } else { " (unknown to QEMU)" }
            ),
            st,
        ));
    }
    v.push(Line::raw(""));
    v.push(Line::styled("Header extensions", color::head()));
    for e in &img.extensions {
        v.push(Line::raw(format!(
            "  at {:#06x}  {:#010x}  {} ({} bytes)",
            e.offset,
            e.ext_type,
            e.type_name(),
            e.length
        )));
    }
    v.push(Line::raw(""));
    v.push(Line::raw(format!(
        "{} snapshot(s) · {} L1 entries · {} bitmap(s)",
        img.snapshots.snapshots.len(),
        img.l1.len(),
        match &img.bitmaps {
            Some(Ok(b)) => b.len(),
            _ => 0,
        }
    )));
    v
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        self.view
            .render_text(f, area, boxed("Overview"), Text::from(lines(ctx)));
    }

    fn handle(&mut self, action: Action, _: &Ctx, _: &mut Vec<Effect>) -> bool {
        self.view.scroll(action)
    }

    fn explain(&self, _: &Ctx) -> String {
        "The header is the first bytes of the file. It says where everything else is: the active L1 table (l1_table_offset), the refcount table, the snapshot table. Feature bits say what a reader must understand (incompatible), may ignore (compatible) or must clear when it writes (autoclear).".into()
    }
}

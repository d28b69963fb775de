//! Pane 1: the header field by field, features, extensions, the backing chain.

use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::image::Qcow2;
use qinspect::types::{HostOffset, human_size};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span, Text};

/// The Overview's state: how far it is scrolled, and the header field selected.
#[derive(Default)]
pub struct State {
    /// The scroll position.
    pub view: ListView,
    /// The selected header field (↑/↓ move it, Enter follows it).
    pub field: usize,
    /// The selection moved: bring it on screen at the next draw.
    follow: bool,
}

/// Header fields QEMU refuses to open, by byte offset in the header, and why.
pub fn rejected(ctx: &Ctx) -> Vec<(qinspect::types::HostOffset, String)> {
    let Some(img) = &ctx.img else { return vec![] };
    img.header
        .validate(img.file_len())
        .into_iter()
        .filter_map(|e| match e {
            qinspect::Error::Invalid { offset, reason, .. } => Some((offset, reason)),
            _ => None,
        })
        .collect()
}

/// The Overview's lines, with no field highlighted (what the tests read).
#[cfg(test)]
pub fn lines(app: &Ctx) -> Vec<Line<'static>> {
    lines_at(app, None).0
}

/// The lines with header field `sel` highlighted, and the index of the first
/// header field line.
fn lines_at(app: &Ctx, sel: Option<usize>) -> (Vec<Line<'static>>, usize) {
    let mut v: Vec<Line> = Vec::new();
    let Some(img) = &app.img else {
        if app.is_raw_layer() {
            // A raw backing file opens as it is: not a qcow2 that failed.
            v.push(Line::raw(app.unopened()));
            v.push(Line::raw(format!(
                "The file is {} bytes long.",
                app.file_len()
            )));
            return (v, 0);
        }
        v.push(Line::styled(
            format!(
                "{} cannot be opened: {}",
                app.path.display(),
                app.load_error.clone().unwrap_or_default()
            ),
            Style::new().fg(color::BAD),
        ));
        if app.file.is_some() {
            v.push(Line::raw(format!(
                "Hex (9) shows the file's {} bytes as they are.",
                app.file_len()
            )));
        }
        return (v, 0);
    };
    summary(app, img, &mut v);
    chain(app, img, &mut v);
    let first_field = header_fields(app, img, sel, &mut v);
    features_and_extensions(img, &mut v);
    encryption(app, img, &mut v);
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
    (v, first_field)
}

/// The image's path, its sizes, check's verdict and what QEMU would refuse.
fn summary(app: &Ctx, img: &Qcow2, v: &mut Vec<Line<'static>>) {
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
}

/// The backing chain, layer by layer, and the data file.
fn chain(app: &Ctx, img: &Qcow2, v: &mut Vec<Line<'static>>) {
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
}

/// The header fields, field `sel` highlighted; returns the index of the first
/// field's line.
fn header_fields(app: &Ctx, img: &Qcow2, sel: Option<usize>, v: &mut Vec<Line<'static>>) -> usize {
    v.push(Line::styled(
        "Header fields (offset, name, value, meaning)",
        color::head(),
    ));
    let first_field = v.len();
    let h = &img.header;
    let rejected = rejected(app);
    for (i, f) in h.fields().into_iter().enumerate() {
        let why = rejected.iter().find(|(o, _)| *o == f.offset);
        let name = if why.is_some() {
            Style::new().fg(color::BAD)
        } else {
            Style::new().fg(color::META)
        };
        let mut spans = vec![
            Span::styled(format!("{:>4} ", f.offset.get()), color::dim()),
            Span::styled(format!("{:<24}", f.name), name),
            Span::raw(format!("{:>#18x}  ", f.value)),
            Span::raw(f.meaning),
        ];
        if let Some((_, why)) = why {
            spans.push(Span::styled(
                format!(" · QEMU refuses it: {why}"),
                Style::new().fg(color::BAD),
            ));
        }
        let line = Line::from(spans);
        v.push(if sel == Some(i) {
            line.patch_style(crate::tui::widgets::selected())
        } else {
            line
        });
    }
    v.push(Line::raw(""));
    first_field
}

/// The feature bits set and the header extensions.
fn features_and_extensions(img: &Qcow2, v: &mut Vec<Line<'static>>) {
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
}

/// Where Enter on a header field goes: the table or bytes it points to.
fn follow(field: &qinspect::header::HeaderField, ctx: &Ctx) -> Effect {
    match field.name {
        "l1_table_offset" | "l1_size" => Effect::L1Entry(0),
        "refcount_table_offset" | "refcount_table_clusters" => Effect::RefcountTable,
        "snapshots_offset" | "nb_snapshots" => Effect::Jump(crate::tui::ctx::Pane::Snapshots),
        "backing_file_offset" | "backing_file_size" if ctx.has_backing() => {
            let (at, len) = ctx
                .img
                .as_ref()
                .map_or((qinspect::types::HostOffset(0), 0), |i| {
                    (
                        i.header.backing_file_offset,
                        u64::from(i.header.backing_file_size),
                    )
                });
            Effect::ShowHost {
                offset: at,
                label: format!("the backing file name ({len} bytes)"),
                mark: Some((at, at.saturating_add(len))),
                src: None,
            }
        }
        _ => Effect::ShowHost {
            offset: field.offset,
            label: format!("header field {}", field.name),
            mark: Some((field.offset, field.offset.saturating_add(field.size))),
            src: None,
        },
    }
}

/// The encryption section: the method, whether a key opened, and for LUKS
/// every header field and key slot.
fn encryption(app: &Ctx, img: &qinspect::image::Qcow2, v: &mut Vec<Line<'static>>) {
    use qinspect::crypto::luks::{SLOT_DISABLED, SLOT_ENABLED};
    use qinspect::header::CryptMethod;
    let method = match img.header.crypt() {
        CryptMethod::None => return,
        CryptMethod::Aes => {
            "legacy AES-128-CBC (crypt_method 1): key = the passphrase's first 16 bytes, IV = guest sector number"
        }
        CryptMethod::Luks => "LUKS (crypt_method 2): data clusters are encrypted, metadata is not",
        CryptMethod::Unknown(_) => "an unknown method",
    };
    v.push(Line::raw(""));
    v.push(Line::styled("Encryption", color::head()));
    v.push(Line::raw(format!("  {method}")));
    v.push(match &app.unlocked {
        Some(Ok(s)) => Line::styled(format!("  key: {s}"), Style::new().fg(color::DATA)),
        Some(Err(e)) => Line::styled(format!("  key: {e}"), Style::new().fg(color::BAD)),
        None => Line::styled(
            "  key: none given (start with --passphrase-file PATH, or --object secret,... --image-opts): guest data cannot be shown",
            color::dim(),
        ),
    });
    let Some(h) = qinspect::crypto::luks_header(img) else {
        return;
    };
    let h = match h {
        Ok(h) => h,
        Err(e) => {
            v.push(Line::styled(
                format!("  LUKS header: {e}"),
                Style::new().fg(color::BAD),
            ));
            return;
        }
    };
    let geo = img.geometry();
    let last = HostOffset(
        h.offset
            .saturating_add(h.length.max(1))
            .get()
            .saturating_sub(1),
    );
    v.push(Line::raw(format!(
        "  LUKS header at {:#x}, {} bytes = host clusters {}..={} (crypto-header in the Layout pane; check counts them)",
        h.offset,
        h.length,
        geo.host_cluster(h.offset).get(),
        geo.host_cluster(last).get()
    )));
    if let Err(e) = h.check() {
        v.push(Line::styled(
            format!("  QEMU refuses this header: {e}"),
            Style::new().fg(color::BAD),
        ));
    }
    for f in h
        .fields()
        .into_iter()
        .filter(|f| !f.name.starts_with("slot["))
    {
        v.push(Line::from(vec![
            Span::styled(format!("  {:#8x} ", f.offset), color::dim()),
            Span::styled(format!("{:<15}", f.name), Style::new().fg(color::META)),
            Span::raw(format!("{}  ", f.value)),
            Span::styled(f.meaning, color::dim()),
        ]));
    }
    v.push(Line::styled(
        "  Key slots: an active slot holds the master key, encrypted with a key PBKDF2 makes from one passphrase and split into stripes",
        color::dim(),
    ));
    for sl in &h.slots {
        let at = h.offset.saturating_add(sl.key_offset());
        let (state, st) = match sl.active_raw {
            SLOT_ENABLED => ("active", Style::new().fg(color::DATA)),
            SLOT_DISABLED => ("free", color::dim()),
            _ => ("CORRUPT", Style::new().fg(color::BAD)),
        };
        let detail = if sl.active() {
            format!(
                "{} iterations · salt {} · key material at {at:#x} · {} stripes",
                sl.iterations, sl.salt, sl.stripes
            )
        } else {
            format!("key material reserved at {at:#x} · {} stripes", sl.stripes)
        };
        v.push(Line::from(vec![
            Span::raw(format!("  slot {}  ", sl.index)),
            Span::styled(format!("{state:<8}"), st),
            Span::raw(detail),
        ]));
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        let n = ctx.img.as_ref().map_or(0, |i| i.header.fields().len());
        self.field = self.field.min(n.saturating_sub(1));
        let (lines, first) = lines_at(ctx, (n > 0).then_some(self.field));
        let block = boxed("Overview — ↑/↓ choose a header field, Enter: what it points to");
        if self.follow {
            // The row the selected field starts on, once the lines above it wrap.
            self.follow = false;
            let inner = block.inner(area);
            let above = ratatui::widgets::Paragraph::new(lines[..first + self.field].to_vec())
                .wrap(ratatui::widgets::Wrap { trim: false })
                .line_count(inner.width);
            let h = usize::from(inner.height).max(1);
            if above < self.view.offset {
                self.view.offset = above;
            } else if above >= self.view.offset + h {
                self.view.offset = above + 1 - h;
            }
        }
        self.view.render_text(f, area, block, Text::from(lines));
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let fields = ctx
            .img
            .as_ref()
            .map(|i| i.header.fields())
            .unwrap_or_default();
        match action {
            // The cursor walks the header fields; past either end the text scrolls.
            Action::Up if self.field > 0 => {
                self.field -= 1;
                self.follow = true;
                true
            }
            Action::Down if self.field + 1 < fields.len() => {
                self.field += 1;
                self.follow = true;
                true
            }
            Action::Enter => {
                if let Some(fd) = fields.get(self.field) {
                    let e = follow(fd, ctx);
                    if matches!(e, Effect::L1Entry(_)) && ctx.view_snapshot.is_some() {
                        q.push(Effect::View(None));
                    }
                    q.push(e);
                }
                true
            }
            a => self.view.scroll(a),
        }
    }

    fn explain(&self, _: &Ctx) -> String {
        "The header is the first bytes of the file. It says where everything else is: the active L1 table (l1_table_offset), the refcount table, the snapshot table. Feature bits say what a reader must understand (incompatible), may ignore (compatible) or must clear when it writes (autoclear).".into()
    }
}

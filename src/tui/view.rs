//! Drawing the whole screen: tabs, the pane, the explanation, footer and popups.

use super::app::{App, InputFor, Popup};
use super::keymap::{KEYMAP, PANES, footer, pane};
use super::panes::{self, color};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

/// Draw everything.
pub fn draw(f: &mut Frame, app: &mut App) {
    let area = f.area();
    let explain_h = if app.explain || app.tour.is_some() {
        5
    } else {
        0
    };
    let [tabs, main, explain, status, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(explain_h),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_tabs(f, tabs, app);
    panes::render(f, main, app);
    if explain_h > 0 {
        let text = if app.tour.is_some() {
            app.status.clone()
        } else {
            explanation(app)
        };
        f.render_widget(
            Paragraph::new(text).wrap(Wrap { trim: true }).block(
                Block::new()
                    .borders(Borders::ALL)
                    .title(if app.tour.is_some() {
                        " Tour (n/p, Esc) "
                    } else {
                        " Explanation (e) "
                    }),
            ),
            explain,
        );
    }
    let mut st = vec![Span::styled(
        format!(" {} ", app.path.display()),
        Style::new().add_modifier(Modifier::BOLD),
    )];
    if let Some(s) = &app.view_snapshot {
        st.push(Span::styled(
            format!(" view: snapshot {s} "),
            Style::new().fg(Color::Black).bg(color::SNAPSHOT),
        ));
    }
    if let Some((phase, done, total)) = app.progress {
        st.push(Span::styled(
            format!(" check: {phase} {done}/{total} "),
            color::dim(),
        ));
    }
    if app.tour.is_none() && !app.status.is_empty() {
        st.push(Span::raw(format!(" {}", app.status)));
    }
    f.render_widget(Paragraph::new(Line::from(st)), status);
    let hints: Vec<Span> = footer(app.pane)
        .into_iter()
        .flat_map(|(k, d)| {
            vec![
                Span::styled(format!(" {k}"), Style::new().fg(Color::Cyan)),
                Span::raw(format!(" {d} ")),
            ]
        })
        .collect();
    f.render_widget(Paragraph::new(Line::from(hints)), foot);
    match &app.popup {
        Some(Popup::Help) => draw_help(f, area),
        Some(Popup::Input(purpose, text)) => {
            let r = centered(area, 70, 3);
            f.render_widget(Clear, r);
            let title = match purpose {
                InputFor::Goto => match app.pane {
                    pane::LAYOUT | pane::REFCOUNTS | pane::HEX => {
                        " Go to host offset (Enter, Esc) "
                    }
                    _ => " Go to guest offset (Enter, Esc) ",
                },
                InputFor::Simulate => " Operation(s) to simulate (Enter runs, Esc cancels) ",
            };
            f.render_widget(
                Paragraph::new(format!("{text}▏"))
                    .block(Block::new().borders(Borders::ALL).title(title)),
                r,
            );
        }
        None => {}
    }
}

fn draw_tabs(f: &mut Frame, area: Rect, app: &mut App) {
    let mut x = area.x;
    let mut spans = Vec::new();
    app.areas.tabs.clear();
    for (i, name) in PANES.iter().enumerate() {
        let label = format!(" {} {} ", i + 1, name);
        let w = label.chars().count() as u16;
        let st = if i == app.pane {
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
            i,
        ));
        spans.push(Span::styled(label, st));
        x = x.saturating_add(w);
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn draw_help(f: &mut Frame, area: Rect) {
    let r = centered(area, 90, (KEYMAP.len() as u16 + 4).min(area.height));
    f.render_widget(Clear, r);
    let mut lines = vec![Line::styled(
        "Keys (this table is also what the footer shows)",
        color::head(),
    )];
    for b in KEYMAP {
        lines.push(Line::from(vec![
            Span::styled(format!("{:<11}", b.keys), Style::new().fg(Color::Cyan)),
            Span::raw(b.help),
        ]));
    }
    lines.push(Line::styled(
        "Mouse: click a tab or a row, scroll with the wheel (--no-mouse turns it off).",
        color::dim(),
    ));
    f.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: true }).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" Help (? or Esc closes) "),
        ),
        r,
    );
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
    match selected(app) {
        Some(s) => format!("{s}  —  {}", pane_explanation(app)),
        None => pane_explanation(app),
    }
}

/// A sentence about the selected entry, row, finding or step, if there is one.
fn selected(app: &App) -> Option<String> {
    use super::app::{RefLevel, TablesLevel};
    let img = app.img.as_ref()?;
    let geo = img.geometry();
    let has_df = img.header.has_data_file();
    match app.pane {
        pane::TABLES => {
            let view = app.view()?;
            match app.tables_level {
                TablesLevel::L1 => {
                    let e = view.l1.get(app.l1_sel)?;
                    let copied = match (e.l2_offset(), e.copied()) {
                        (None, _) => "An entry of 0: no L2 table, so the whole range reads from the backing file (or as zeros).".to_string(),
                        (Some(_), true) => "COPIED is set: the L2 table's refcount is exactly 1, so QEMU may change it in place.".to_string(),
                        (Some(_), false) => "COPIED is clear: the L2 table may be shared with a snapshot, so the next write copies it first.".to_string(),
                    };
                    Some(format!(
                        "{}[{}] = {:#018x}: {}. {copied}",
                        view.label(),
                        app.l1_sel,
                        e.0,
                        e.describe(&geo)
                    ))
                }
                TablesLevel::L2(i) => {
                    let off = view.l1.get(i)?.l2_offset()?;
                    let t = img.l2_table(off).ok()?;
                    let e = t.get(app.l2_sel)?;
                    let why = match e.cluster_type(&geo, has_df) {
                        qinspect::tables::ClusterType::Normal if e.copied() => {
                            "COPIED: refcount 1, a write goes straight into this cluster."
                        }
                        qinspect::tables::ClusterType::Normal => {
                            "No COPIED: the cluster is shared (or the flag is stale), so a write allocates a new cluster and copies it."
                        }
                        qinspect::tables::ClusterType::Compressed => {
                            "Compressed clusters are never written in place: a write always allocates a new cluster."
                        }
                        qinspect::tables::ClusterType::ZeroPlain
                        | qinspect::tables::ClusterType::ZeroAlloc => {
                            "The zero flag: reads return zeros without asking the backing file."
                        }
                        qinspect::tables::ClusterType::Unallocated => {
                            "Unallocated: reads fall through to the backing file at the same guest offset."
                        }
                    };
                    Some(format!(
                        "L2 {off}[{}] = {:#018x}: {}. {why}",
                        app.l2_sel,
                        e.raw,
                        e.describe(&geo, has_df)
                    ))
                }
            }
        }
        pane::REFCOUNTS => match app.ref_level {
            RefLevel::Table => {
                let t = img.refcount_table().ok()?;
                let e = t.get(app.rt_sel)?;
                Some(format!(
                    "Refcount table entry {}: {}.",
                    app.rt_sel,
                    match e.block_offset() {
                        Some(o) => format!(
                            "a refcount block at {o} holds {} refcounts",
                            img.refcount_geometry().entries_per_block()
                        ),
                        None => "no block, so every cluster it would cover has refcount 0".into(),
                    }
                ))
            }
            RefLevel::Block(ti) => {
                let c = (ti as u64)
                    .saturating_mul(img.refcount_geometry().entries_per_block())
                    .saturating_add(app.rb_sel as u64);
                let stored = img.refcount(qinspect::types::HostCluster(c)).ok()?;
                let counted = app
                    .report
                    .as_ref()
                    .and_then(|r| r.imrt.as_ref())
                    .map(|i| i.get(c));
                Some(match counted {
                    Some(k) if stored < k => format!(
                        "Cluster {c}: stored {stored}, counted {k}. Fewer than its references: QEMU could reuse it while it is in use (a corruption)."
                    ),
                    Some(k) if stored > k => format!(
                        "Cluster {c}: stored {stored}, counted {k}. More than its references: the space is wasted (a leak), the data is safe."
                    ),
                    Some(k) if k > 1 => format!(
                        "Cluster {c}: {k} references — shared, typically by snapshots; a write copies it first."
                    ),
                    Some(k) => format!("Cluster {c}: stored {stored}, counted {k}: consistent."),
                    None => format!(
                        "Cluster {c}: stored refcount {stored}; the check is still counting references."
                    ),
                })
            }
        },
        pane::LAYOUT => {
            let c = app.layout_sel;
            let refs = match &app.detail {
                Some((dc, r)) if *dc == c && !r.is_empty() => {
                    format!(" Referenced by: {}.", r.join("; "))
                }
                _ => String::new(),
            };
            Some(format!(
                "Host cluster {c} at {:#x}.{refs}",
                c.saturating_mul(geo.cluster_size())
            ))
        }
        pane::CHECK => {
            let f = app.report.as_ref()?.findings.get(app.finding_sel)?;
            Some(format!(
                "{}{}",
                f.message,
                f.repair
                    .as_ref()
                    .map(|r| format!(". Repair: {r}."))
                    .unwrap_or_default()
            ))
        }
        pane::SIMULATE => {
            let steps = super::panes::simulate::flat(app);
            let (op, text) = steps.get(app.sim_step)?;
            let records = &app.sim.as_ref()?.0;
            let addend = match records.get(*op).map(|r| &r.op) {
                Some(qinspect::simulate::Op::RefcountUpdate { addend: 0, .. }) => {
                    " Addend 0 changes no refcount; it only sets COPIED exactly where a cluster's refcount is 1."
                }
                Some(qinspect::simulate::Op::SnapshotDelete { .. }) => {
                    " A delete walks the snapshot with addend -1, then the active L1 with addend 0 so that clusters no longer shared get COPIED back."
                }
                _ => "",
            };
            Some(format!("{text}.{addend}"))
        }
        pane::TRACE => app
            .trace
            .as_ref()?
            .steps
            .get(app.trace_step)
            .map(|s| s.explanation.clone()),
        pane::SNAPSHOTS => {
            let s = img.snapshots.snapshots.get(app.snap_sel)?;
            Some(format!(
                "Snapshot {} '{}': its own L1 table of {} entries at {:#x}; every cluster it reaches had 1 added to its refcount when it was taken.",
                s.id, s.name, s.l1_size, s.l1_table_offset
            ))
        }
        _ => None,
    }
}

fn pane_explanation(app: &App) -> String {
    match app.pane {
        pane::OVERVIEW => "The header is the first bytes of the file. It says where everything else is: the active L1 table (l1_table_offset), the refcount table, the snapshot table. Feature bits say what a reader must understand (incompatible), may ignore (compatible) or must clear when it writes (autoclear).".into(),
        pane::LAYOUT => "Every host cluster has a role: metadata (header, tables, refcounts) or guest data. Its stored refcount must equal the number of references the check counts: fewer is a corruption (it could be reused while in use), more is a leak (wasted space).".into(),
        pane::TABLES => "An L1 entry names an L2 table; bit 63 (COPIED) is set only when that table's refcount is exactly 1, so QEMU may write it in place. An L2 entry maps one guest cluster: to a host offset (data), to zeros (bit 0), to compressed bytes (bit 62), or to nothing (the backing file answers).".into(),
        pane::REFCOUNTS => "The refcount table points at refcount blocks; each block holds one refcount per host cluster. A cluster shared by a snapshot has refcount 2 or more; QEMU copies it before writing (copy-on-write).".into(),
        pane::SNAPSHOTS => "An internal snapshot is a frozen copy of the L1 table. Taking one adds 1 to every L2 table and data cluster it reaches (addend +1); deleting one subtracts 1 (addend -1), then walks the active L1 with addend 0, which changes no refcount and only sets COPIED again where a cluster is no longer shared.".into(),
        pane::TRACE => "A read splits the guest offset into an L1 index, an L2 index and an offset in the cluster. Unallocated means: ask the backing file at the same offset. Past the end of a shorter backing file, the read returns zeros.".into(),
        pane::CHECK => "The check recounts every reference the way qemu-img check does and compares with the stored refcounts, then checks that COPIED is set exactly where the refcount is 1.".into(),
        pane::SIMULATE => "Addend +1 (snapshot create/apply) shares clusters: refcounts go up and COPIED is cleared. Addend -1 (delete) unshares them. Addend 0 recomputes COPIED only. A write to a shared cluster allocates a new one, copies the rest of the cluster, and releases the old one (-1). Nothing is written to the image.".into(),
        _ => "Bytes of the image file, as hexyl shows them; the highlighted bytes are the entry or field selected elsewhere.".into(),
    }
}

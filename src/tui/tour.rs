//! The guided tour (`t`): header → L1 → L2 → a data cluster → its refcount → the
//! snapshots → what a write would copy. Each step is a list of effects, applied as
//! any pane's effects are.

use super::app::App;
use super::ctx::{Effect, Job, Pane};

/// Tour steps: the text shown while that step is on screen.
pub const STEPS: [&str; 7] = [
    "1/7 The header (Overview): magic, version, cluster size, where the L1 table, refcount table and snapshot table are. Everything else is found from here.",
    "2/7 The L1 table (Tables): one entry per L2 table; bit 63 (COPIED) says the L2 table's refcount is exactly 1, so it may be written in place.",
    "3/7 An L2 table (Tables): one entry per guest cluster: a host offset, zero flag, compressed descriptor, COPIED.",
    "4/7 A data cluster (Hex): the guest bytes themselves, at the host offset the L2 entry gave.",
    "5/7 Its refcount (Refcounts): how many tables point at it. 1 for private data; more when snapshots share it.",
    "6/7 Snapshots (Snapshots): a snapshot is a frozen copy of the L1 table; taking one added 1 to every cluster it reaches.",
    "7/7 What a write would do (Simulate): a shared cluster is copied first (copy-on-write) and the old one loses a reference. Esc ends the tour.",
];

/// Start the tour.
pub fn start(app: &mut App) {
    if app.ctx.img.is_none() {
        app.status = format!("the tour needs an image that opens: {}", app.ctx.unopened());
        return;
    }
    app.tour = Some(0);
    show(app);
}

/// Next or previous step.
pub fn step(app: &mut App, forward: bool) {
    let Some(i) = app.tour else { return };
    let n = if forward {
        (i + 1).min(STEPS.len() - 1)
    } else {
        i.saturating_sub(1)
    };
    if n != i {
        app.tour = Some(n);
        show(app);
    }
}

/// The text of the current step.
pub fn text(app: &App) -> &'static str {
    app.tour.and_then(|i| STEPS.get(i)).copied().unwrap_or("")
}

/// Move the panes and highlights for the current step.
fn show(app: &mut App) {
    let Some(i) = app.tour else { return };
    let Some(img) = app.ctx.img.clone() else {
        return;
    };
    app.explain_view = Default::default();
    // The first allocated data cluster, if any: (L1 index, L2 index, host offset).
    let first = (|| {
        for (li, e) in img.l1.iter().enumerate() {
            let Some(off) = e.l2_offset() else { continue };
            let Ok(t) = img.l2_table(off) else { continue };
            for (j, x) in t.iter().enumerate() {
                if x.host_offset().0 != 0 && !x.compressed() {
                    return Some((li, j, x.host_offset().0));
                }
            }
        }
        None
    })();
    let cs = img.geometry().cluster_size();
    let effects = match i {
        0 => vec![Effect::Switch(Pane::Overview)],
        1 => vec![Effect::Table(None), Effect::Switch(Pane::Tables)],
        2 => vec![Effect::Table(first.map(|(l1, l2, _)| (l1, l2)))],
        3 => vec![match first {
            Some((_, _, host)) => Effect::ShowHost {
                offset: qinspect::types::HostOffset(host),
                label: "the first data cluster".into(),
                mark: Some((
                    qinspect::types::HostOffset(host),
                    qinspect::types::HostOffset(host + 16),
                )),
                src: None,
            },
            None => Effect::ShowHost {
                offset: qinspect::types::HostOffset(0),
                label: "the header (no data cluster yet)".into(),
                mark: Some((
                    qinspect::types::HostOffset(0),
                    qinspect::types::HostOffset(4),
                )),
                src: None,
            },
        }],
        4 => vec![Effect::Refcount(first.map_or(0, |f| f.2 / cs))],
        5 => vec![Effect::Switch(Pane::Snapshots)],
        _ => {
            let g = first.map_or(0, |(l1, l2, _)| {
                img.geometry()
                    .guest_offset(l1 as u64, l2 as u64, 0)
                    .map_or(0, |g| g.0)
            });
            vec![Effect::Start(Job::Simulate(format!(
                "snapshot-create:tour write:{g}:4096"
            )))]
        }
    };
    if i == 1 {
        app.panes
            .tables
            .l1
            .set(first.map_or(0, |f| f.0), img.l1.len());
    }
    // The tour moves on its own; Backspace history is for the user's jumps.
    let kept = app.history.clone();
    app.apply_all(effects);
    app.history = kept;
}

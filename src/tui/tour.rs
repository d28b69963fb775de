//! The guided tour (`t`): header → L1 → L2 → a data cluster → its refcount → a
//! snapshot sharing it → what a write would copy, moving panes and highlights.

use super::app::{App, RefLevel, TablesLevel};
use super::keymap::pane;

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
    app.tour = Some(n);
    show(app);
}

/// Move the panes and highlights for the current step.
fn show(app: &mut App) {
    let Some(i) = app.tour else { return };
    let Some(img) = app.img.clone() else { return };
    // The first allocated data cluster, if any: (L1 index, L2 index, host offset).
    let first = (|| {
        for (li, e) in img.l1.iter().enumerate() {
            let off = e.l2_offset()?;
            let t = img.l2_table(off).ok()?;
            for (j, x) in t.iter().enumerate() {
                if x.host_offset().0 != 0 && !x.compressed() {
                    return Some((li, j, x.host_offset().0));
                }
            }
        }
        None
    })();
    match i {
        0 => app.pane = pane::OVERVIEW,
        1 => {
            app.pane = pane::TABLES;
            app.tables_level = TablesLevel::L1;
            app.l1_sel = first.map_or(0, |f| f.0);
        }
        2 => {
            app.pane = pane::TABLES;
            if let Some((l1, l2, _)) = first {
                app.tables_level = TablesLevel::L2(l1);
                app.l2_sel = l2;
            }
        }
        3 => {
            if let Some((_, _, host)) = first {
                app.show_host(
                    host,
                    "the first data cluster".into(),
                    Some((host, host + 16)),
                );
            } else {
                app.show_host(0, "the header (no data cluster yet)".into(), None);
            }
        }
        4 => {
            app.pane = pane::REFCOUNTS;
            if let Some((_, _, host)) = first {
                let c = host / img.geometry().cluster_size();
                let per = img.refcount_geometry().entries_per_block();
                app.ref_level = RefLevel::Block((c / per) as usize);
                app.rb_sel = (c % per) as usize;
            }
        }
        5 => app.pane = pane::SNAPSHOTS,
        _ => {
            app.pane = pane::SIMULATE;
            app.sim_choice = 3;
            let g = first.map_or(0, |(l1, l2, _)| {
                img.geometry()
                    .guest_offset(l1 as u64, l2 as u64, 0)
                    .map_or(0, |g| g.0)
            });
            app.run_simulation(&format!("snapshot-create:tour write:{g}:4096"));
        }
    }
    app.status = STEPS.get(i).copied().unwrap_or("").to_string();
}

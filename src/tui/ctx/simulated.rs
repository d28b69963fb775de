//! The simulated view: a simulation's result opened like an image, and the
//! file's own state put aside while the panes show it.

use super::Ctx;
use qinspect::chain::{Chain, OpenOptions};
use qinspect::check::CheckReport;
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::SharedSource;
use qinspect::tables::L1Entry;
use std::path::PathBuf;
use std::sync::Arc;

/// A simulation's result, opened like an image: what the panes show in the
/// simulated view, and the file's state before it, for before→after rows.
pub struct Simulated {
    /// The operations, as typed.
    pub ops: String,
    /// The simulated image (the file's bytes with the changed clusters laid over them).
    pub img: Arc<Qcow2>,
    /// Its bytes.
    pub src: SharedSource,
    /// The check of the simulated image.
    pub report: Arc<CheckReport>,
    /// The file's state before the operations.
    pub before: crate::tui::changes::State,
    /// The simulated state after them.
    pub after: crate::tui::changes::State,
    /// Every delta, in the Changes view's words.
    pub changes: Vec<crate::tui::changes::Change>,
}

impl std::fmt::Debug for Simulated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Simulated({}, {} changes)", self.ops, self.changes.len())
    }
}

/// The file's own state, kept while the simulated view replaces it.
pub struct Disk {
    img: Option<Arc<Qcow2>>,
    file: Option<SharedSource>,
    report: Option<Arc<CheckReport>>,
    progress: Option<(&'static str, u64, u64)>,
    roles: Option<Arc<Vec<u16>>>,
    chain: Result<Chain, String>,
    chain_gap: Option<(PathBuf, String)>,
    view_snapshot: Option<usize>,
    /// Hex's structure cache is keyed by file name, which the simulated image
    /// shares with the file: each state keeps its own.
    structures: Vec<(PathBuf, Arc<qinspect::locate::Structures>)>,
    /// The simulated image is the top image alone: no layer is chosen in it.
    layer: Option<(usize, Vec<PathBuf>)>,
}

impl Ctx {
    /// Whether the panes show the simulated image instead of the file.
    pub fn simulated_view(&self) -> bool {
        self.disk.is_some()
    }

    /// The file's state before the simulation, while the simulated view is shown
    /// (for before→after on changed rows).
    pub fn before(&self) -> Option<&crate::tui::changes::State> {
        self.disk.as_ref()?;
        self.simulated.as_ref().map(|s| &s.before)
    }

    /// In the simulated view, a host cluster's refcount before the simulation
    /// when the simulation changed it.
    pub fn refcount_was(&self, cluster: u64, now: u64) -> Option<u64> {
        let b = self.before()?;
        let i = usize::try_from(cluster).ok()?;
        let was = b.refcounts.get(i).copied().unwrap_or(0);
        (was != now).then_some(was)
    }

    /// In the simulated view, an active L1 entry before the simulation when it
    /// changed.
    pub fn l1_was(&self, i: usize, now: L1Entry) -> Option<L1Entry> {
        let was = self.before()?.l1.get(i).copied().unwrap_or_default();
        (was != now).then_some(was)
    }

    /// In the simulated view, the raw value of L2 entry `j` behind active L1
    /// entry `i` before the simulation, when it changed.
    pub fn l2_was(&self, i: usize, j: usize, now: u64) -> Option<u64> {
        let b = self.before()?;
        let was =
            b.l2.get(i)
                .and_then(|t| t.as_ref())
                .and_then(|t| t.get(j))
                .copied()
                .unwrap_or(0);
        (was != now).then_some(was)
    }

    /// The file's own image, whichever view is shown.
    pub fn disk_img(&self) -> Option<Arc<Qcow2>> {
        match &self.disk {
            Some(d) => d.img.clone(),
            None => self.img.clone(),
        }
    }

    /// What a pane title adds to say which state it shows.
    pub fn view_word(&self) -> String {
        match (&self.simulated, self.disk.is_some()) {
            (Some(s), true) => format!(" · view: simulated ({})", s.ops),
            _ => String::new(),
        }
    }

    /// Show the simulated image in place of the file (true), or the file again.
    pub fn set_simulated_view(&mut self, on: bool) -> Result<(), String> {
        if on == self.disk.is_some() {
            return Ok(());
        }
        if !on {
            if let Some(d) = self.disk.take() {
                self.img = d.img;
                self.file = d.file;
                self.report = d.report;
                self.progress = d.progress;
                self.roles = d.roles;
                self.chain = d.chain;
                self.chain_gap = d.chain_gap;
                self.view_snapshot = d.view_snapshot;
                *self.structures_cache() = d.structures;
                self.layer = d.layer;
            }
            return Ok(());
        }
        let Some(s) = self.simulated.clone() else {
            return Err(
                "no simulated image of the file as loaded now: run a simulation in Simulate (8) first"
                    .into(),
            );
        };
        let opts = OpenOptions {
            strictness: Strictness::Lenient,
            ..Default::default()
        };
        let chain = Chain::from_source(s.src.clone(), &self.path, &opts).map_err(|e| e.to_string());
        let gap = s.img.backing_name.as_ref().map(|b| {
            (
                PathBuf::from(b),
                "the simulated view shows the image alone: reads it does not allocate are not followed into the backing file".to_string(),
            )
        });
        let structures = std::mem::take(&mut *self.structures_cache());
        let disk = Disk {
            img: self.img.replace(s.img.clone()),
            file: self.file.replace(s.src.clone()),
            report: self.report.replace(s.report.clone()),
            progress: self.progress.take(),
            roles: self.roles.replace(Arc::new(s.after.roles.clone())),
            chain: std::mem::replace(&mut self.chain, chain),
            chain_gap: std::mem::replace(&mut self.chain_gap, gap),
            view_snapshot: self.view_snapshot.take(),
            structures,
            layer: self.layer.take(),
        };
        self.disk = Some(Box::new(disk));
        Ok(())
    }
}

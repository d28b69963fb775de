//! What every pane may read but none owns: the image, its chain, the check report,
//! the role map and the snapshot being viewed. Panes get it by shared reference and
//! ask for changes through [`Effect`]s, which `App::update` applies.

use qinspect::chain::{Chain, OpenOptions};
use qinspect::check::CheckReport;
use qinspect::image::{Qcow2, Strictness, View};
use qinspect::io::{FileSource, SharedSource};
use std::path::PathBuf;
use std::sync::Arc;

/// How many host clusters the role map (Layout's colours) covers.
pub const LAYOUT_LIMIT: u64 = 1 << 22;

mod effect;
mod simulated;

pub use effect::{Effect, Job, OffsetKind, Pane};
pub use simulated::{Disk, Simulated};

/// The shared, read-only context.
pub struct Ctx {
    /// The image path.
    pub path: PathBuf,
    /// The image file, whether or not it opens as qcow2 (Hex shows it regardless).
    pub file: Option<SharedSource>,
    /// The top image, opened leniently.
    pub img: Option<Arc<Qcow2>>,
    /// Why it cannot be opened.
    pub load_error: Option<String>,
    /// The backing chain for traces. When a backing file is missing this is the
    /// chain down to the last layer that opens, with `chain_gap` saying what is missing.
    pub chain: Result<Chain, String>,
    /// The backing file that cannot be opened, and why.
    pub chain_gap: Option<(PathBuf, String)>,
    /// The check report, once the worker is done.
    pub report: Option<Arc<CheckReport>>,
    /// Check progress while it runs: phase, done, total.
    pub progress: Option<(&'static str, u64, u64)>,
    /// The previous load's counts (corruptions, leaks, check errors).
    pub previous: Option<(u64, u64, u64)>,
    /// Roles of the first [`LAYOUT_LIMIT`] clusters, once the worker is done.
    pub roles: Option<Arc<Vec<u16>>>,
    /// The snapshot viewed instead of the active L1: its record's index in the
    /// snapshot table (two records of a corrupt table can share an ID).
    pub view_snapshot: Option<usize>,
    /// The passphrase for an encrypted image, kept to reopen it.
    pub passphrase: crate::cli::secret::Passphrase,
    /// For an encrypted image: how the key was opened, or why it was not.
    pub unlocked: Option<Result<String, String>>,
    /// Where the metadata structures of each qcow2 file are (Hex decodes the
    /// byte under its cursor with them), found once per load.
    pub structures: std::sync::Mutex<Vec<(PathBuf, Arc<qinspect::locate::Structures>)>>,
    /// With a backing chain: the layer shown (0: the top image) and the files of
    /// the whole chain, top first.
    pub layer: Option<(usize, Vec<PathBuf>)>,
    /// The last simulation's result, which `v` shows in place of the file.
    pub simulated: Option<Arc<Simulated>>,
    /// While the simulated view is shown: the file's own state, put aside.
    pub disk: Option<Box<Disk>>,
}

impl Ctx {
    /// Open `path` (nothing is written), with the passphrase of an encrypted image.
    pub fn open(
        path: PathBuf,
        view_snapshot: Option<usize>,
        passphrase: crate::cli::secret::Passphrase,
    ) -> Ctx {
        let file: Option<SharedSource> = FileSource::open(&path)
            .ok()
            .map(|f| Arc::new(f) as SharedSource);
        let opened = FileSource::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                let src: SharedSource = Arc::new(f);
                Qcow2::open(src, Strictness::Lenient).map_err(|e| e.to_string())
            });
        let (img, load_error) = match opened {
            Ok(i) => (Some(Arc::new(i)), None),
            Err(e) => (None, Some(e)),
        };
        let mut c = Ctx {
            path,
            file,
            img,
            load_error,
            chain: Err(String::new()),
            chain_gap: None,
            report: None,
            progress: None,
            previous: None,
            roles: None,
            view_snapshot,
            passphrase,
            unlocked: None,
            structures: Default::default(),
            layer: None,
            simulated: None,
            disk: None,
        };
        c.open_chain();
        c
    }

    /// (Re)open the chain with the current view. A backing file that cannot be
    /// opened leaves the layers above it usable.
    pub fn open_chain(&mut self) {
        if let (Some(s), true) = (&self.simulated, self.disk.is_some()) {
            let opts = OpenOptions {
                snapshot_record: self.view_snapshot,
                strictness: Strictness::Lenient,
                ..Default::default()
            };
            self.chain =
                Chain::from_source(s.src.clone(), &self.path, &opts).map_err(|e| e.to_string());
            return;
        }
        let opts = OpenOptions {
            snapshot_record: self.view_snapshot,
            strictness: Strictness::Lenient,
            ..Default::default()
        };
        self.chain_gap = None;
        match Chain::open(&self.path, &opts) {
            Ok(c) => {
                self.unlocked = c
                    .top()
                    .qcow2()
                    .and_then(|top| crate::cli::secret::unlock_with(top, &self.passphrase));
                self.chain = Ok(c);
            }
            Err(e) => {
                let why = e.to_string();
                match self.partial_chain(opts) {
                    Some((c, missing)) => {
                        self.chain_gap = Some((missing, why));
                        self.chain = Ok(c);
                    }
                    None => self.chain = Err(why),
                }
            }
        }
    }

    /// The layers that open, one at a time from the top, and the first backing
    /// file that does not.
    fn partial_chain(&self, mut opts: OpenOptions) -> Option<(Chain, PathBuf)> {
        opts.no_backing = true;
        let mut chain = Chain::open(&self.path, &opts).ok()?;
        opts.snapshot_record = None;
        while chain.layers.len() < 64 {
            let last = chain.layers.last()?;
            let img = last.qcow2()?;
            let name = img.backing_name.as_ref()?;
            let next = qinspect::chain::resolve_relative(&last.path, name);
            opts.format = match &img.backing_format {
                Some(f) => Some(qinspect::chain::Format::parse(f).ok()?),
                None => None,
            };
            match Chain::open(&next, &opts) {
                Ok(mut c) => chain.layers.append(&mut c.layers),
                Err(_) => return Some((chain, next)),
            }
        }
        None
    }

    /// The cache of [`Ctx::structures_of`], locked.
    fn structures_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, Vec<(PathBuf, Arc<qinspect::locate::Structures>)>> {
        match self.structures.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        }
    }

    /// The metadata structures of `img`, found on first use.
    pub fn structures_of(&self, img: &Qcow2) -> Arc<qinspect::locate::Structures> {
        let name = img.src.name().to_path_buf();
        let mut cache = self.structures_cache();
        if let Some((_, s)) = cache.iter().find(|(n, _)| *n == name) {
            return s.clone();
        }
        let s = Arc::new(qinspect::locate::Structures::of(img));
        cache.push((name, s.clone()));
        s
    }

    /// The view Tables, Layout and Hex use.
    pub fn view(&self) -> Option<View> {
        let img = self.img.as_ref()?;
        match self.view_snapshot {
            None => Some(img.active_view()),
            Some(i) => img.snapshot_view_at(i).ok(),
        }
    }

    /// The snapshot record viewed, if one is.
    pub fn viewed(&self) -> Option<&qinspect::snapshot::Snapshot> {
        self.img
            .as_ref()?
            .snapshots
            .snapshots
            .get(self.view_snapshot?)
    }

    /// The viewed snapshot in words: "1 'name'", and which record of the table it
    /// is when another record has the same ID.
    pub fn viewed_name(&self) -> Option<String> {
        let i = self.view_snapshot?;
        let s = self.viewed()?;
        let name = format!("{} '{}'", s.id, s.name);
        Some(match self.first_with_id(i) {
            Some(_) => format!("{name} (record {} of the table)", i.saturating_add(1)),
            None => name,
        })
    }

    /// When another record of the snapshot table has the same ID as record `i`:
    /// the first record with that ID, the one QEMU's `-l ID` reads.
    pub fn first_with_id(&self, i: usize) -> Option<usize> {
        let snaps = &self.img.as_ref()?.snapshots.snapshots;
        let id = &snaps.get(i)?.id;
        let mut with_id = snaps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.id == *id)
            .map(|(j, _)| j);
        let first = with_id.next()?;
        with_id.next().is_some().then_some(first)
    }

    /// Whether reads that are not allocated here go to a backing file.
    pub fn has_backing(&self) -> bool {
        self.img.as_ref().is_some_and(|i| i.backing_name.is_some())
    }

    /// The virtual disk size.
    pub fn disk_size(&self) -> u64 {
        self.img.as_ref().map_or(0, |i| i.header.size)
    }

    /// The size of the disk in view: the viewed snapshot's (its own size when it
    /// stores one), else the active disk's. Tables, Trace and Map read through it.
    pub fn view_disk_size(&self) -> u64 {
        let active = self.disk_size();
        self.viewed()
            .map_or(active, |s| s.effective_disk_size(active))
    }

    /// The image file's size.
    pub fn file_len(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| f.len())
    }

    /// The cluster size (512 when the header cannot be read, for Hex paging).
    pub fn cluster_size(&self) -> u64 {
        self.img
            .as_ref()
            .map_or(512, |i| i.geometry().cluster_size())
    }

    /// The stored refcount of a host cluster.
    pub fn stored_refcount(&self, cluster: u64) -> Option<u64> {
        self.img
            .as_ref()?
            .refcount(qinspect::types::HostCluster(cluster))
            .ok()
    }

    /// The references the check counted for a host cluster.
    pub fn counted(&self, cluster: u64) -> Option<u64> {
        Some(self.report.as_ref()?.imrt.as_ref()?.get(cluster))
    }

    /// "layer 1: base.qcow2" when the chain has more than one layer.
    pub fn layer_name(&self) -> Option<String> {
        let (i, paths) = self.layer.as_ref()?;
        let p = paths.get(*i)?;
        let name = p.file_name().map_or(p.display().to_string(), |n| {
            n.to_string_lossy().into_owned()
        });
        Some(format!("layer {i}: {name}"))
    }

    /// A pane title with the layer named in front.
    pub fn titled(&self, title: String) -> String {
        match self.layer_name() {
            Some(l) => format!("{l} · {title}"),
            None => title,
        }
    }

    /// The chain's files, top first (the layers `L` steps through).
    pub fn chain_files(&self) -> Vec<PathBuf> {
        match &self.chain {
            Ok(c) => c.layers.iter().map(|l| l.path.clone()).collect(),
            Err(_) => vec![self.path.clone()],
        }
    }

    /// Whether the file shown is a raw layer (no qcow2 structures at all).
    pub fn is_raw_layer(&self) -> bool {
        self.img.is_none()
            && self.layer.as_ref().is_some_and(|(i, _)| *i > 0)
            && self.chain.as_ref().is_ok_and(|c| {
                c.layers.len() <= 1 && c.layers.first().is_some_and(|l| l.qcow2().is_none())
            })
    }

    /// Why a pane that needs the qcow2 structures has nothing to show.
    pub fn unopened(&self) -> String {
        if self.is_raw_layer() {
            return format!(
                "{} is a raw file: it has no L1/L2 tables, refcounts or clusters of its own, and guest offset N is byte N of the file. Hex (9) shows its bytes; L goes to the next layer.",
                self.layer_name()
                    .unwrap_or_else(|| self.path.display().to_string())
            );
        }
        format!(
            "{} cannot be opened as qcow2: {}",
            self.path.display(),
            self.load_error.as_deref().unwrap_or("unknown error")
        )
    }

    /// Why the active L1 table was not read, when the header's L1 fields are
    /// ones QEMU refuses (the lenient open then leaves the table empty, and
    /// nothing it would show is true of the file).
    pub fn l1_unread(&self) -> Option<String> {
        let img = self.img.as_ref()?;
        if self.view_snapshot.is_some() {
            return None;
        }
        img.header
            .validate(img.file_len())
            .into_iter()
            .find_map(|e| match e {
                qinspect::Error::Invalid {
                    kind: qinspect::CorruptKind::L1Table,
                    ..
                } => Some(format!(
                    "The active L1 table is not read: {e}. QEMU refuses to open the image, so no guest offset maps to anything; Hex (9) shows the bytes at the header's l1_table_offset."
                )),
                _ => None,
            })
    }

    /// What an unallocated range reads as, in this image.
    pub fn fall_through(&self) -> &'static str {
        if self.has_backing() {
            "reads fall through to the backing file at the same guest offset"
        } else {
            "reads as zeros: no backing file"
        }
    }
}

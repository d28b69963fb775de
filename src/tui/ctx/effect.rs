//! The panes as the app names them, and the effects a pane (or the tour) asks
//! the app to apply: jumps, background jobs, prompts, views.

use qinspect::io::SharedSource;
use qinspect::types::{GuestOffset, HostOffset};

/// The panes, in number-key order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pane {
    /// The header and the chain.
    Overview,
    /// The host file as a grid of clusters.
    Layout,
    /// L1 and L2 tables.
    Tables,
    /// Refcount table and blocks.
    Refcounts,
    /// Internal snapshots.
    Snapshots,
    /// One guest read, step by step.
    Trace,
    /// The consistency check.
    Check,
    /// What an operation would change.
    Simulate,
    /// Bytes of a file of the chain.
    Hex,
    /// The guest address space as `qemu-img map` extents.
    Map,
}

impl Pane {
    /// Whether the pane shows qcow2 structures only, with nothing to show of a
    /// raw layer.
    pub fn needs_qcow2(self) -> bool {
        !matches!(self, Pane::Overview | Pane::Trace | Pane::Hex)
    }
    /// Every pane, in number-key order.
    pub const ALL: [Pane; 10] = [
        Pane::Overview,
        Pane::Layout,
        Pane::Tables,
        Pane::Refcounts,
        Pane::Snapshots,
        Pane::Trace,
        Pane::Check,
        Pane::Simulate,
        Pane::Hex,
        Pane::Map,
    ];

    /// Its name on the tab bar.
    pub fn name(self) -> &'static str {
        match self {
            Pane::Overview => "Overview",
            Pane::Layout => "Layout",
            Pane::Tables => "Tables",
            Pane::Refcounts => "Refcounts",
            Pane::Snapshots => "Snapshots",
            Pane::Trace => "Trace",
            Pane::Check => "Check",
            Pane::Simulate => "Simulate",
            Pane::Hex => "Hex",
            Pane::Map => "Map",
        }
    }

    /// A short name for narrow terminals.
    pub fn short(self) -> &'static str {
        match self {
            Pane::Overview => "Info",
            Pane::Layout => "Grid",
            Pane::Tables => "L1/2",
            Pane::Refcounts => "Refs",
            Pane::Snapshots => "Snap",
            Pane::Trace => "Trace",
            Pane::Check => "Check",
            Pane::Simulate => "Sim",
            Pane::Hex => "Hex",
            Pane::Map => "Map",
        }
    }

    /// Its number key: 1 to 9, then 0.
    pub fn number(self) -> usize {
        Pane::ALL
            .iter()
            .position(|p| *p == self)
            .map_or(0, |i| (i + 1) % 10)
    }

    /// The next pane (Tab) or the previous one.
    pub fn cycle(self, forward: bool) -> Pane {
        let i = Pane::ALL.iter().position(|p| *p == self).unwrap_or(0);
        let n = Pane::ALL.len();
        let j = if forward {
            (i + 1) % n
        } else {
            (i + n - 1) % n
        };
        Pane::ALL[j]
    }
}

/// Whether an offset typed after `g` is a guest or a host offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetKind {
    /// An offset in the virtual disk.
    Guest,
    /// An offset in the image file.
    Host,
}

/// A piece of background work.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Job {
    /// Compare two snapshots (indexes in the snapshot table).
    Diff(usize, usize),
    /// Simulate operations given as text.
    Simulate(String),
    /// Who references a host cluster.
    Lookup(u64),
}

/// What a pane (or the tour) asks the app to do.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Show these bytes in Hex: offset, what it is, highlighted range, and the file
    /// (None: the image file itself).
    ShowHost {
        /// The byte to show.
        offset: HostOffset,
        /// What it is.
        label: String,
        /// Bytes to highlight: the first, and one past the last.
        mark: Option<(HostOffset, HostOffset)>,
        /// The file of the chain they are in.
        src: Option<SharedSource>,
    },
    /// Trace a guest offset in Trace.
    Trace(GuestOffset),
    /// Select a host cluster in Layout.
    Cluster(u64),
    /// Select a host cluster's refcount in Refcounts.
    Refcount(u64),
    /// Open Tables at an L1 index (and an L2 index inside it).
    Table(Option<(usize, usize)>),
    /// Select an L1 entry in Tables (the L1 table shown).
    L1Entry(usize),
    /// Show the refcount table in Refcounts.
    RefcountTable,
    /// Switch pane as a jump (remembered in the history).
    Jump(Pane),
    /// Switch pane.
    Switch(Pane),
    /// Start background work.
    Start(Job),
    /// Ask for text.
    Input(crate::tui::app::InputFor, String),
    /// View a snapshot record, by its index in the snapshot table (None: the
    /// active L1), in Tables, Trace, Layout and Hex.
    View(Option<usize>),
    /// Reopen the image and rerun the check.
    Reload,
    /// Say something on the status line.
    Status(String),
    /// Show the simulated image (true) or the file (false).
    SimulatedView(bool),
}

impl Effect {
    /// Whether it moves to another place (remembered in the history).
    pub fn is_jump(&self) -> bool {
        matches!(
            self,
            Effect::ShowHost { .. }
                | Effect::Trace(_)
                | Effect::Cluster(_)
                | Effect::Refcount(_)
                | Effect::Table(_)
                | Effect::L1Entry(_)
                | Effect::RefcountTable
                | Effect::Jump(_)
        )
    }
}

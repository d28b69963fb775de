//! The change log: what each simulated operation changes, merged into runs of
//! alike changes, in plain words.

use super::Sim;
use crate::header::Field;
use crate::types::HostOffset;
use serde::{Serialize, Serializer};

/// What changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// The refcount of host clusters `cluster..cluster+count`.
    Refcount {
        /// First cluster.
        cluster: u64,
    },
    /// Entries of an L1 table.
    L1Entry {
        /// Which table ("active L1" or "snapshot 1 'name' L1").
        table: String,
        /// Its offset.
        table_offset: HostOffset,
        /// First index.
        index: u64,
        /// The snapshot record whose L1 table it is, by its position in the
        /// snapshot table as the operation saw it (None for the active L1, or an
        /// L1 table no record names): two records with one ID and name share a
        /// `table` label but not a record. Not in the JSON output, which names the
        /// table by `table`.
        #[serde(skip)]
        snapshot: Option<usize>,
    },
    /// Entries of an L2 table.
    L2Entry {
        /// The table's offset.
        table_offset: HostOffset,
        /// First index.
        index: u64,
    },
    /// A header field (its name as in the specification in the output).
    Header {
        /// Which field.
        #[serde(serialize_with = "field_name")]
        field: Field,
    },
    /// An entry of the refcount table, which QEMU points at a new refcount
    /// block or clears (its kind in the output reads "header", with the
    /// field "refcount table entry").
    #[serde(rename = "header")]
    RefcountTableEntry {
        /// The entry's index.
        #[serde(rename = "field", serialize_with = "refcount_table_entry")]
        index: u64,
        /// Where the entry is.
        #[serde(skip)]
        at: HostOffset,
    },
    /// A field of a header extension (its kind in the output reads "header").
    #[serde(rename = "header")]
    ExtensionField {
        /// The field's name in the specification.
        field: &'static str,
        /// Where the field is.
        #[serde(skip)]
        at: HostOffset,
    },
    /// Clusters allocated (refcount 0 -> 1) for a purpose.
    Allocate {
        /// First byte.
        offset: HostOffset,
        /// Its length in bytes.
        length: u64,
        /// What for.
        purpose: String,
    },
    /// Clusters released (a -1 that may free them).
    Free {
        /// First byte.
        offset: HostOffset,
        /// Its length in bytes.
        length: u64,
        /// What they were.
        purpose: String,
    },
    /// Bytes copied (an L1 table into a snapshot, or guest data for copy-on-write).
    Copy {
        /// From (host offset, or guest offset for data read through the chain).
        from: String,
        /// To host offset.
        to: HostOffset,
        /// Its length in bytes.
        length: u64,
    },
    /// The snapshot table was rewritten.
    SnapshotTable {
        /// New offset.
        offset: HostOffset,
        /// New size in bytes.
        size: u64,
        /// Number of entries.
        entries: u64,
    },
    /// Something to know that is not a change.
    Note,
}

/// What a refcount table entry's change names as its field.
const REFCOUNT_TABLE_ENTRY: &str = "refcount table entry";

/// A header field as its name.
fn field_name<S: Serializer>(field: &Field, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(field.name())
}

/// A refcount table entry's index as the field name its change carries.
fn refcount_table_entry<S: Serializer>(_index: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(REFCOUNT_TABLE_ENTRY)
}

/// One change (or a run of alike changes) an operation makes.
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// What was changed: a refcount, a table entry, a header field, or a
    /// range of the file.
    #[serde(flatten)]
    pub target: Target,
    /// How many consecutive clusters or entries this covers.
    pub count: u64,
    /// Value before.
    pub before: u64,
    /// Value after.
    pub after: u64,
    /// Why, in plain words.
    pub reason: String,
}

impl Change {
    /// One line for people.
    pub fn describe(&self) -> String {
        let range = |first: u64| {
            if self.count > 1 {
                format!(
                    "{first}..{}",
                    first.saturating_add(self.count.saturating_sub(1))
                )
            } else {
                first.to_string()
            }
        };
        match &self.target {
            Target::Refcount { cluster } => format!(
                "refcount of cluster{} {}: {} -> {} ({})",
                if self.count > 1 { "s" } else { "" },
                range(*cluster),
                self.before,
                self.after,
                self.reason
            ),
            Target::L1Entry { table, index, .. } => format!(
                "{table}[{}]: {:#x} -> {:#x} ({})",
                range(*index),
                self.before,
                self.after,
                self.reason
            ),
            Target::L2Entry {
                table_offset,
                index,
            } => format!(
                "L2 {table_offset:#x}[{}]: {:#x} -> {:#x}{} ({})",
                range(*index),
                self.before,
                self.after,
                if self.count > 1 { " and alike" } else { "" },
                self.reason
            ),
            Target::Header { field } => self.header_line(field.name()),
            Target::RefcountTableEntry { .. } => self.header_line(REFCOUNT_TABLE_ENTRY),
            Target::ExtensionField { field, .. } => self.header_line(field),
            Target::Allocate {
                offset,
                length,
                purpose,
            } => format!(
                "allocate {length} bytes at {offset:#x} (cluster {}) for {purpose}",
                self.before
            ),
            Target::Free {
                offset,
                length,
                purpose,
            } => format!("release {length} bytes at {offset:#x}: {purpose}"),
            Target::Copy { from, to, length } => {
                format!(
                    "copy {length} bytes from {from} to {to:#x} ({})",
                    self.reason
                )
            }
            Target::SnapshotTable {
                offset,
                size,
                entries,
            } => {
                format!("write the snapshot table ({entries} entries, {size} bytes) at {offset:#x}")
            }
            Target::Note => self.reason.clone(),
        }
    }

    /// The line of a change to a field called `name`.
    fn header_line(&self, name: &str) -> String {
        format!(
            "header {name}: {:#x} -> {:#x} ({})",
            self.before, self.after, self.reason
        )
    }

    /// Whether a change of `target` from `before` to `after`, for `reason`,
    /// continues this run.
    fn extended_by(&self, target: &Target, before: u64, after: u64, reason: &str) -> bool {
        // Refcounts merge when they change the same way; table entries when the
        // same bits flip (e.g. COPIED cleared on a run of entries).
        let same = match self.target {
            Target::L1Entry { .. } | Target::L2Entry { .. } => {
                self.before ^ self.after == before ^ after
            }
            _ => self.before == before && self.after == after,
        };
        if !same {
            return false;
        }
        (match (&self.target, target) {
            (Target::Refcount { cluster: a }, Target::Refcount { cluster: b }) => {
                a.checked_add(self.count) == Some(*b)
            }
            (
                Target::L2Entry {
                    table_offset: t1,
                    index: a,
                },
                Target::L2Entry {
                    table_offset: t2,
                    index: b,
                },
            ) => t1 == t2 && a.checked_add(self.count) == Some(*b),
            (
                Target::L1Entry {
                    table_offset: t1,
                    index: a,
                    ..
                },
                Target::L1Entry {
                    table_offset: t2,
                    index: b,
                    ..
                },
            ) => t1 == t2 && a.checked_add(self.count) == Some(*b),
            _ => false,
        }) && self.reason == reason
    }
}

/// How many records back a new change can extend ([`Sim::record`]).
const MERGE_BACK: usize = 2;

/// Where the change log stood at one moment ([`Sim::step_mark`]): how many
/// records it held, and the counts of the last of them, the only ones a
/// later change can extend.
#[derive(Clone, Debug)]
pub(super) struct StepMark {
    len: usize,
    tail: Vec<u64>,
}

impl StepMark {
    /// The records the log held then.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Sim {
    /// Where the change log stands now, to go back to it
    /// ([`Sim::steps_since`]) without a copy of it.
    pub(super) fn step_mark(&self) -> StepMark {
        let from = self.steps.len().saturating_sub(MERGE_BACK);
        StepMark {
            len: self.steps.len(),
            tail: self
                .steps
                .get(from..)
                .unwrap_or_default()
                .iter()
                .map(|c| c.count)
                .collect(),
        }
    }

    /// The records made since `mark`, or `None` when a record from before it
    /// was extended since (then the log before `mark` is not what it was).
    pub(super) fn steps_since(&self, mark: &StepMark) -> Option<&[Change]> {
        let from = mark.len.saturating_sub(mark.tail.len());
        let then = self.steps.get(from..mark.len)?;
        then.iter()
            .map(|c| c.count)
            .eq(mark.tail.iter().copied())
            .then(|| self.steps.get(mark.len..))
            .flatten()
    }

    // ---- recording ---------------------------------------------------------

    pub(super) fn record(&mut self, target: Target, before: u64, after: u64) {
        // Merge with the previous change, or with the one before it when the two
        // alternate (a refcount, then the L2 entry whose COPIED flag follows it).
        // Most changes of a walk extend a run: the reason is copied only for a
        // new one.
        let n = self.steps.len();
        for back in 1..=MERGE_BACK.min(n) {
            if let Some(prev) = n.checked_sub(back).and_then(|i| self.steps.get_mut(i))
                && prev.extended_by(&target, before, after, &self.reason)
            {
                prev.count = prev.count.saturating_add(1);
                return;
            }
        }
        self.steps.push(Change {
            target,
            count: 1,
            before,
            after,
            reason: self.reason.clone(),
        });
    }

    pub(super) fn note(&mut self, text: String) {
        self.steps.push(Change {
            target: Target::Note,
            count: 1,
            before: 0,
            after: 0,
            reason: text,
        });
    }

    pub(super) fn why(&mut self, r: impl Into<String>) {
        self.reason = r.into();
    }
}

//! What changed on disk between two loads: every host cluster whose refcount
//! changed, every active L1/L2 entry and every snapshot table entry that changed.
//! Each load records the state right after it opens the file (on a worker), and
//! the next load's record is compared with it.

use super::ctx::LAYOUT_LIMIT;
use qinspect::check::role_map;
use qinspect::image::Qcow2;
use qinspect::tables::L1Entry;
use qinspect::types::HostCluster;

/// L2 entries recorded at most (beyond that only L1 entries are compared).
const L2_LIMIT: usize = 1 << 22;

/// The state of one load.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// Stored refcount of each host cluster (the first [`LAYOUT_LIMIT`]).
    pub refcounts: Vec<u64>,
    /// Role bits of each of those clusters.
    pub roles: Vec<u16>,
    /// Active L1 entries.
    pub l1: Vec<L1Entry>,
    /// Standard words of the L2 entries behind each active L1 entry (None: no L2
    /// table, or too many to keep). Bare words, not `L2Entry`: the subcluster
    /// bitmaps are not compared, and this halves what is kept.
    pub l2: Vec<Option<Vec<u64>>>,
    /// Whether every L2 table was recorded.
    pub l2_complete: bool,
    /// Each snapshot: its ID and a description of its table entry.
    pub snapshots: Vec<(String, String)>,
}

/// Record the state of `img`.
pub fn record(img: &Qcow2) -> State {
    let cs = img.geometry().cluster_size();
    let n = img.file_len().div_ceil(cs).clamp(1, LAYOUT_LIMIT);
    let refcounts = (0..n)
        .map(|c| img.refcount(HostCluster(c)).unwrap_or(0))
        .collect();
    let roles = role_map(img, 0, n - 1);
    let l1: Vec<L1Entry> = img.l1.to_vec();
    let mut kept = 0usize;
    let mut complete = true;
    let l2 = img
        .l1
        .iter()
        .map(|e| {
            let o = e.l2_offset()?;
            let t = img.l2_table(o).ok()?;
            if kept.saturating_add(t.len()) > L2_LIMIT {
                complete = false;
                return None;
            }
            kept += t.len();
            Some(t.iter().map(|x| x.raw).collect())
        })
        .collect();
    let snapshots = img
        .snapshots
        .snapshots
        .iter()
        .map(|s| {
            (
                s.id.clone(),
                format!(
                    "'{}' L1 at {:#x} ({} entries), VM state {} bytes, disk {}",
                    s.name,
                    s.l1_table_offset,
                    s.l1_size,
                    s.vm_state_size,
                    s.disk_size.map_or("-".into(), |d| d.to_string())
                ),
            )
        })
        .collect();
    State {
        refcounts,
        roles,
        l1,
        l2,
        l2_complete: complete,
        snapshots,
    }
}

/// What the comparison could not cover, if anything.
pub fn limits(old: &State, new: &State) -> Option<String> {
    (!old.l2_complete || !new.l2_complete).then(|| {
        format!(
            "L2 entries compared in the first L2 tables only ({L2_LIMIT} entries); refcounts of the first {LAYOUT_LIMIT} clusters"
        )
    })
}

/// One change, and whether it is a refcount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// What changed, old → new.
    pub text: String,
    /// The host cluster it is about (refcount changes).
    pub cluster: Option<u64>,
    /// The active L1 entry (and L2 entry behind it) it is about.
    pub entry: Option<(usize, Option<usize>)>,
}

/// Where Enter on a change goes: a refcount change to that refcount entry in
/// Refcounts, an L1 or L2 entry to that entry in Tables.
pub fn follow(c: &Change) -> Option<super::ctx::Effect> {
    use super::ctx::Effect;
    match (c.cluster, c.entry) {
        (Some(k), _) => Some(Effect::Refcount(k)),
        (None, Some((i, Some(j)))) => Some(Effect::Table(Some((i, j)))),
        (None, Some((i, None))) => Some(Effect::L1Entry(i)),
        (None, None) => None,
    }
}

fn roles_of(s: &State, c: usize) -> Option<u16> {
    s.roles.get(c).copied().filter(|b| *b != 0)
}

/// Everything that differs from `old` to `new`: refcounts, then L1 and L2
/// entries, then snapshot table entries.
pub fn compare(old: &State, new: &State, geo: &qinspect::types::Geometry) -> Vec<Change> {
    let mut out = Vec::new();
    for c in 0..old.refcounts.len().max(new.refcounts.len()) {
        let a = old.refcounts.get(c).copied().unwrap_or(0);
        let b = new.refcounts.get(c).copied().unwrap_or(0);
        if a != b {
            let bits = roles_of(new, c).or_else(|| roles_of(old, c)).unwrap_or(0);
            let role = if bits == 0 {
                "free".to_string()
            } else {
                super::panes::layout::role_names(bits).join(", ")
            };
            out.push(Change {
                text: format!("cluster {c} ({role}): {a}→{b}"),
                cluster: Some(c as u64),
                entry: None,
            });
        }
    }
    for i in 0..old.l1.len().max(new.l1.len()) {
        let a = old.l1.get(i).copied().unwrap_or_default();
        let b = new.l1.get(i).copied().unwrap_or_default();
        if a != b {
            out.push(Change {
                text: format!("active L1[{i}]: {:#x}→{:#x}", a.0, b.0),
                cluster: None,
                entry: Some((i, None)),
            });
        }
        let ta = old.l2.get(i).and_then(|t| t.as_ref());
        let tb = new.l2.get(i).and_then(|t| t.as_ref());
        if ta.is_none() && tb.is_none() {
            continue;
        }
        let n = ta.map_or(0, |t| t.len()).max(tb.map_or(0, |t| t.len()));
        for j in 0..n {
            let x = ta.and_then(|t| t.get(j)).copied().unwrap_or(0);
            let y = tb.and_then(|t| t.get(j)).copied().unwrap_or(0);
            if x != y {
                let g = geo.guest_offset(i as u64, j as u64, 0).map_or(0, |g| g.0);
                out.push(Change {
                    text: format!("active L1[{i}] → L2[{j}] (guest {g:#x}): {x:#x}→{y:#x}"),
                    cluster: None,
                    entry: Some((i, Some(j))),
                });
            }
        }
    }
    for (id, d) in &old.snapshots {
        match new.snapshots.iter().find(|(i, _)| i == id) {
            None => out.push(Change {
                text: format!("snapshot {id} deleted: was {d}"),
                cluster: None,
                entry: None,
            }),
            Some((_, e)) if e != d => out.push(Change {
                text: format!("snapshot {id}: {d} → {e}"),
                cluster: None,
                entry: None,
            }),
            Some(_) => {}
        }
    }
    for (id, d) in &new.snapshots {
        if !old.snapshots.iter().any(|(i, _)| i == id) {
            out.push(Change {
                text: format!("snapshot {id} created: {d}"),
                cluster: None,
                entry: None,
            });
        }
    }
    out
}

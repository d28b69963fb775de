//! Which snapshot the active state is closest to: every snapshot compared
//! with the active state by mapping, and ranked.

use super::{Options, Side, compare};
use crate::error::{Error, Result};
use crate::image::Qcow2;
use serde::Serialize;

/// One snapshot's distance from the active state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Distance {
    /// The snapshot's ID.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Guest clusters the active state maps differently.
    pub differing: u64,
}

/// Compare the active state with every snapshot (mappings only, no bytes) and
/// rank them, fewest differing clusters first (ties in snapshot-table order).
/// `progress` gets (guest clusters compared, guest clusters to compare in all
/// the comparisons) and stops the ranking when it returns false.
pub fn closest(
    img: &Qcow2,
    progress: Option<&(dyn Fn(u64, u64) -> bool + Sync)>,
) -> Result<Vec<Distance>> {
    if let Some(e) = &img.snapshots.error {
        return Err(Error::Request(format!(
            "cannot rank the snapshots of {}: {e}",
            img.src.name().display()
        )));
    }
    let active = Side::active(img);
    let total = img.snapshots.snapshots.len() as u64;
    let mut out = Vec::new();
    for (k, s) in img.snapshots.snapshots.iter().enumerate() {
        let view = img.view_of(s.clone())?;
        let side = Side {
            name: format!("snapshot {} '{}'", s.id, s.name),
            img,
            view,
        };
        let k = k as u64;
        let inner = |done: u64, clusters: u64| match progress {
            Some(p) => p(
                k.saturating_mul(clusters).saturating_add(done),
                total.saturating_mul(clusters),
            ),
            None => true,
        };
        let c = compare(
            &active,
            &side,
            &Options {
                contents: false,
                max_rows: 0,
                progress: Some(&inner),
            },
        )?;
        out.push(Distance {
            id: s.id.clone(),
            name: s.name.clone(),
            differing: c.differing,
        });
    }
    out.sort_by_key(|d| d.differing);
    Ok(out)
}

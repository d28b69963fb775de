//! What each host cluster is, for `qinspect clusters` and the layout view.

use super::report::{Referrer, Role};
use super::visit::{Ctx, Visitor};
use super::walk::Walk;
use crate::image::{Qcow2, RefcountReader};
use crate::types::HostOffset;
use serde::Serialize;
use std::collections::BTreeMap;

/// Every role and referrer of each host cluster in `first..=last`, with stored and
/// computed refcounts (what `qinspect clusters` prints).
#[derive(Clone, Debug, Serialize)]
pub struct ClusterInfo {
    /// Host cluster index.
    pub cluster: u64,
    /// Host offset.
    pub offset: HostOffset,
    /// Roles, deduplicated (empty when nothing read names the cluster).
    pub roles: Vec<Role>,
    /// Stored refcount (`None` if unreadable).
    pub refcount: Option<u64>,
    /// Computed references, counted as `qemu-img check` counts them (none for a
    /// cluster past the end of the file, whose `referrers` are still listed).
    pub reference: u64,
    /// Who points here.
    pub referrers: Vec<Referrer>,
}

/// Describe host clusters `first..=last` (bounded by the caller).
pub fn clusters(img: &Qcow2, first: u64, last: u64) -> Vec<ClusterInfo> {
    let mut out = Vec::new();
    let _ = for_each_cluster(img, first, last, |c| {
        out.push(c);
        Ok::<(), std::convert::Infallible>(())
    });
    out
}

/// How many clusters of a range get a slot in [`RangeOwners`]'s vector (the rest
/// of a larger range is kept in a map).
const DIRECT_SLOTS: u64 = 1 << 22;

/// Collects the referrers of every cluster in `first..=last`. Most clusters have
/// one referrer: it is kept in a flat slot, and only further ones in a map, so a
/// listing of a million clusters costs tens of megabytes, not a list each.
struct RangeOwners {
    first: u64,
    last: u64,
    /// The first referrer of `first + i`, for the first [`DIRECT_SLOTS`] clusters.
    one: Vec<Option<(Ctx, u64)>>,
    /// Every referrer after the first (and all of those past the slots).
    rest: BTreeMap<u64, Vec<(Ctx, u64)>>,
}

impl RangeOwners {
    fn new(first: u64, last: u64) -> Self {
        let n = last
            .saturating_sub(first)
            .saturating_add(1)
            .min(DIRECT_SLOTS);
        RangeOwners {
            first,
            last,
            one: vec![None; n as usize],
            rest: BTreeMap::new(),
        }
    }

    fn add(&mut self, c: u64, r: (Ctx, u64)) {
        if c < self.first || c > self.last {
            return;
        }
        let slot = usize::try_from(c.saturating_sub(self.first))
            .ok()
            .and_then(|i| self.one.get_mut(i));
        if let Some(s @ None) = slot {
            *s = Some(r);
            return;
        }
        // The slot counts as one of the at most MAX_REFERRERS.
        let cap = if slot.is_some() {
            super::MAX_REFERRERS.saturating_sub(1)
        } else {
            super::MAX_REFERRERS
        };
        let v = self.rest.entry(c).or_default();
        if v.len() < cap {
            v.push(r);
        }
    }

    fn take(&mut self, c: u64) -> Vec<(Ctx, u64)> {
        let mut out = Vec::new();
        if let Some(r) = c
            .checked_sub(self.first)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.one.get_mut(i))
            .and_then(Option::take)
        {
            out.push(r);
        }
        if let Some(more) = self.rest.remove(&c) {
            out.extend(more);
        }
        out
    }
}

impl Visitor for RangeOwners {
    fn visit(&mut self, first: u64, last: u64, w: u64, ctx: Ctx) -> u64 {
        // Only the part of first..=last inside the range is looked at.
        for c in first.max(self.first)..=last.min(self.last) {
            self.add(c, (ctx, w));
        }
        0
    }
    fn visit_run(&mut self, first: u64, n: u64, w: u64, ctx: Ctx) -> u64 {
        let Some(end) = n.checked_sub(1).map(|k| first.saturating_add(k)) else {
            return 0;
        };
        let lo = first.max(self.first);
        for c in lo..=end.min(self.last) {
            let ctx = match ctx {
                Ctx::Entry { l2, index, role } => Ctx::Entry {
                    l2,
                    index: index.saturating_add(c.saturating_sub(first)),
                    role,
                },
                other => other,
            };
            self.visit(c, c, w, ctx);
        }
        0
    }
}

/// Describe host clusters `first..=last` one at a time, in order, handing each
/// to `f` (which may stop the listing with an error): memory and work grow with
/// the clusters described, and nothing is kept once `f` has it.
pub fn for_each_cluster<E>(
    img: &Qcow2,
    first: u64,
    last: u64,
    mut f: impl FnMut(ClusterInfo) -> Result<(), E>,
) -> Result<(), E> {
    let mut owners = RangeOwners::new(first, last);
    let mut walk = Walk::new(img, false);
    walk.listing = true;
    walk.calculate(&mut owners);
    let mut stored = RefcountReader::new(img);
    let cs = walk.cs;
    for c in first..=last {
        let list = owners.take(c);
        let reference = list
            .iter()
            .map(|(ctx, w)| match ctx {
                Ctx::Entry { l2, .. } => walk.l2_refs.get(l2).map(|v| v.len() as u64).unwrap_or(*w),
                _ => *w,
            })
            .fold(0u64, u64::saturating_add);
        // qemu-img check counts no reference to a cluster past the end of the
        // file (it reports the region instead); the listing still names who makes it.
        let offset = HostOffset(c.saturating_mul(cs));
        let reference = if offset.get() >= walk.file_len {
            0
        } else {
            reference
        };
        let referrers = walk.referrers(&list);
        let mut roles: Vec<Role> = referrers.iter().map(|r| r.role).collect();
        roles.sort();
        roles.dedup();
        f(ClusterInfo {
            cluster: c,
            offset,
            roles,
            refcount: stored.get(c).ok(),
            reference,
            referrers,
        })?;
    }
    Ok(())
}

/// Bit `1 << role as u16` for each role of each host cluster in `first..=last`
/// (0 for a free cluster): a light version of [`clusters`] for whole-file views.
pub fn role_map(img: &Qcow2, first: u64, last: u64) -> Vec<u16> {
    struct Roles {
        first: u64,
        bits: Vec<u16>,
    }
    impl Visitor for Roles {
        fn visit(&mut self, first: u64, last: u64, _w: u64, ctx: Ctx) -> u64 {
            let bit = 1u16 << (ctx.role() as u16);
            for c in first..=last {
                if let Some(b) = c
                    .checked_sub(self.first)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| self.bits.get_mut(i))
                {
                    *b |= bit;
                }
            }
            0
        }
        fn visit_run(&mut self, first: u64, n: u64, w: u64, ctx: Ctx) -> u64 {
            if let Some(rest) = n.checked_sub(1) {
                self.visit(first, first.saturating_add(rest), w, ctx);
            }
            0
        }
    }
    let len = last.saturating_sub(first).saturating_add(1).min(1 << 26) as usize;
    let mut v = Roles {
        first,
        bits: vec![0u16; len],
    };
    let mut walk = Walk::new(img, false);
    walk.calculate(&mut v);
    v.bits
}

/// Every role, in bit order of [`role_map`].
pub const ROLES: [Role; 13] = [
    Role::Header,
    Role::L1Table,
    Role::L2Table,
    Role::Data,
    Role::Compressed,
    Role::SnapshotTable,
    Role::RefcountTable,
    Role::RefcountBlock,
    Role::CryptoHeader,
    Role::BitmapDirectory,
    Role::BitmapTable,
    Role::BitmapData,
    Role::VmState,
];

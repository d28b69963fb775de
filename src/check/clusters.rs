//! What each host cluster is, for `qinspect clusters` and the layout view.

use super::report::{Referrer, Role};
use super::visit::{Ctx, Owners, Visitor};
use super::walk::Walk;
use crate::image::{Qcow2, RefcountReader};
use serde::Serialize;
use std::collections::BTreeMap;

/// Every role and referrer of each host cluster in `first..=last`, with stored and
/// computed refcounts (what `qinspect clusters` prints).
#[derive(Clone, Debug, Serialize)]
pub struct ClusterInfo {
    /// Host cluster index.
    pub cluster: u64,
    /// Host offset.
    pub offset: u64,
    /// Roles, deduplicated ("free" when none).
    pub roles: Vec<Role>,
    /// Stored refcount (`None` if unreadable).
    pub refcount: Option<u64>,
    /// Computed references.
    pub reference: u64,
    /// Who points here.
    pub referrers: Vec<Referrer>,
}

/// Describe host clusters `first..=last` (bounded by the caller).
pub fn clusters(img: &Qcow2, first: u64, last: u64) -> Vec<ClusterInfo> {
    let want = |c: u64| c >= first && c <= last;
    let mut owners = Owners {
        want: &want,
        found: BTreeMap::new(),
    };
    let mut walk = Walk::new(img, false);
    walk.calculate(&mut owners);
    let mut stored = RefcountReader::new(img);
    let cs = walk.cs;
    (first..=last)
        .map(|c| {
            let list = owners.found.get(&c).cloned().unwrap_or_default();
            let reference = list
                .iter()
                .map(|(ctx, w)| match ctx {
                    Ctx::Entry { l2, .. } => {
                        walk.l2_refs.get(l2).map(|v| v.len() as u64).unwrap_or(*w)
                    }
                    _ => *w,
                })
                .fold(0u64, u64::saturating_add);
            let referrers = walk.referrers(&list);
            let mut roles: Vec<Role> = referrers.iter().map(|r| r.role).collect();
            roles.sort();
            roles.dedup();
            ClusterInfo {
                cluster: c,
                offset: c.saturating_mul(cs),
                roles,
                refcount: stored.get(c).ok(),
                reference,
                referrers,
            }
        })
        .collect()
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

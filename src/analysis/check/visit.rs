//! Visitors: what is done with each reference the walk finds.

use super::imrt::Imrt;
use super::report::{L1Id, Role};
use crate::types::HostOffset;
use std::collections::BTreeMap;

/// Where a reference comes from, cheaply.
#[derive(Clone, Copy, Debug)]
pub(super) enum Ctx {
    Header,
    L1Table(L1Id),
    L2Table(L1Id, u64),
    Entry {
        l2: HostOffset,
        index: u64,
        role: Role,
    },
    SnapshotTable,
    RefcountTable,
    RefcountBlock(u64),
    Crypto,
    BitmapDirectory,
    BitmapTable(usize),
    BitmapData(usize, u64),
}

impl Ctx {
    pub(super) fn role(&self) -> Role {
        match self {
            Ctx::Header => Role::Header,
            Ctx::L1Table(_) => Role::L1Table,
            Ctx::L2Table(..) => Role::L2Table,
            Ctx::Entry { role, .. } => *role,
            Ctx::SnapshotTable => Role::SnapshotTable,
            Ctx::RefcountTable => Role::RefcountTable,
            Ctx::RefcountBlock(_) => Role::RefcountBlock,
            Ctx::Crypto => Role::CryptoHeader,
            Ctx::BitmapDirectory => Role::BitmapDirectory,
            Ctx::BitmapTable(_) => Role::BitmapTable,
            Ctx::BitmapData(..) => Role::BitmapData,
        }
    }
}

/// Receives every reference the walk finds.
pub(super) trait Visitor {
    /// `len` bytes at `off`, referenced `w` times, by `ctx`. Returns how many of the
    /// `w` references overflowed (for the counting visitor).
    fn visit(&mut self, first: u64, last: u64, w: u64, ctx: Ctx) -> u64;
    /// `n` data clusters from `first` on, named by consecutive entries of one L2
    /// table starting at the entry in `ctx`, each referenced `w` times.
    fn visit_run(&mut self, first: u64, n: u64, w: u64, ctx: Ctx) -> u64 {
        let mut over = 0u64;
        for k in 0..n {
            let ctx = match ctx {
                Ctx::Entry { l2, index, role } => Ctx::Entry {
                    l2,
                    index: index.saturating_add(k),
                    role,
                },
                other => other,
            };
            let c = first.saturating_add(k);
            over = over.saturating_add(self.visit(c, c, w, ctx));
        }
        over
    }
    /// The refcount so far of a cluster (for the refblock check).
    fn count(&self, _c: u64) -> u64 {
        0
    }
}

/// Counts references into the IMRT.
pub(super) struct Counter {
    pub(super) imrt: Imrt,
    pub(super) max: u64,
}

impl Visitor for Counter {
    fn visit(&mut self, first: u64, last: u64, w: u64, ctx: Ctx) -> u64 {
        // L2 tables are shared by snapshots just like data, so for overlap
        // detection they count with data; other metadata is never shared.
        let role = ctx.role();
        let meta = role.is_metadata() && role != Role::L2Table;
        let mut over = 0u64;
        for c in first..=last {
            over = over.saturating_add(self.imrt.add(c, w, self.max, meta));
        }
        over
    }
    fn visit_run(&mut self, first: u64, n: u64, w: u64, _ctx: Ctx) -> u64 {
        self.imrt.add_run(first, n, w, self.max)
    }
    fn count(&self, c: u64) -> u64 {
        self.imrt.get(c)
    }
}

/// Collects referrers for a set of clusters.
pub(super) struct Owners<'a> {
    pub(super) want: &'a dyn Fn(u64) -> bool,
    pub(super) found: BTreeMap<u64, Vec<(Ctx, u64)>>,
}

impl Visitor for Owners<'_> {
    fn visit(&mut self, first: u64, last: u64, w: u64, ctx: Ctx) -> u64 {
        for c in first..=last {
            if (self.want)(c) {
                let v = self.found.entry(c).or_default();
                if v.len() < 64 {
                    v.push((ctx, w));
                }
            }
        }
        0
    }
}

//! What each list's rows show, for `/`, `}`/`{` and `u` (see [`crate::tui::find`]):
//! the words of a row, the numbers it names (offsets, raw values, cluster numbers)
//! and the ranges it covers. Each provider reads the pane's own data one row at a
//! time; none builds the whole list.

use super::map::kind;
use crate::tui::ctx::Ctx;
use crate::tui::find::{Row, Rows};
use qinspect::check::{Finding, FindingKind};
use qinspect::image::View;
use qinspect::map::MapEntry;
use qinspect::refcount::{RefTableEntry, get_refcount};
use qinspect::snapshot::Snapshot;
use qinspect::tables::{ClusterType, L1Entry, L2Entry};
use qinspect::types::Geometry;
use std::sync::Arc;

/// Every number written in `text` (hex with 0x, or decimal), as values of the row.
pub fn numbers_in(text: &str, out: &mut Row) {
    for w in text.split(|c: char| !c.is_ascii_alphanumeric()) {
        let n = match w.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => w.parse::<u64>().ok(),
        };
        if let Some(n) = n {
            out.value(n);
        }
    }
}

/// The L1 table of the view.
pub struct L1Rows {
    /// The entries.
    pub l1: Arc<Vec<L1Entry>>,
    /// Where the table is.
    pub at: u64,
    /// The geometry.
    pub geo: Geometry,
    /// Whether the table is the active L1 (not a snapshot's).
    pub active: bool,
}

impl Rows for L1Rows {
    fn id(&self) -> u64 {
        self.at
    }
    fn len(&self) -> usize {
        self.l1.len()
    }
    fn row(&self, i: usize, text: bool, out: &mut Row) {
        let Some(e) = self.l1.get(i) else { return };
        out.value(e.0);
        out.value(self.at.saturating_add((i as u64).saturating_mul(8)));
        if let Some(o) = e.l2_offset() {
            out.value(o.0);
            out.range(o.0, self.geo.cluster_size());
        }
        if text {
            out.write(format_args!("{:#018x}", e.0));
            if e.copied() {
                out.words("COPIED");
            }
            out.words(&e.describe(&self.geo, self.active));
        }
    }
    fn matters(&self, i: usize) -> bool {
        self.l1.get(i).is_some_and(|e| e.l2_offset().is_some())
    }
    fn matters_what(&self) -> Option<&'static str> {
        Some("allocated L1 entry")
    }
    fn empty(&self, i: usize) -> bool {
        self.l1.get(i).is_some_and(|e| e.0 == 0)
    }
    fn empty_what(&self) -> Option<&'static str> {
        Some("unallocated")
    }
}

/// One L2 table.
pub struct L2Rows {
    /// The entries.
    pub table: Arc<Vec<L2Entry>>,
    /// Where the table is.
    pub at: u64,
    /// Its L1 index.
    pub l1_index: u64,
    /// The geometry.
    pub geo: Geometry,
    /// Whether the image has an external data file.
    pub has_data_file: bool,
}

impl Rows for L2Rows {
    fn id(&self) -> u64 {
        self.at
    }
    fn len(&self) -> usize {
        self.table.len()
    }
    fn row(&self, j: usize, text: bool, out: &mut Row) {
        let Some(e) = self.table.get(j) else { return };
        let geo = &self.geo;
        let cs = geo.cluster_size();
        out.value(e.raw);
        out.value(
            self.at
                .saturating_add((j as u64).saturating_mul(geo.l2_entry_size())),
        );
        if let Some(g) = geo.guest_offset(self.l1_index, j as u64, 0) {
            out.range(g.0, cs);
        }
        let ct = e.cluster_type(geo, self.has_data_file);
        match ct {
            ClusterType::Compressed => {
                if let Some(d) = e.compressed_descriptor(geo) {
                    let (a, b) = d.range();
                    out.value(a);
                    out.range(a, b.saturating_sub(a));
                }
            }
            _ if e.host_offset().0 != 0 => {
                out.value(e.host_offset().0);
                out.range(e.host_offset().0, cs);
            }
            _ => {}
        }
        if text {
            out.write(format_args!("{:#018x}", e.raw));
            if e.copied() {
                out.words("COPIED");
            }
            out.words(&e.describe(geo, self.has_data_file));
        }
    }
    fn matters(&self, j: usize) -> bool {
        self.table.get(j).is_some_and(|e| {
            e.bitmap != 0
                || e.cluster_type(&self.geo, self.has_data_file) != ClusterType::Unallocated
        })
    }
    fn matters_what(&self) -> Option<&'static str> {
        Some("allocated L2 entry")
    }
    fn empty(&self, j: usize) -> bool {
        self.table
            .get(j)
            .is_some_and(|e| e.raw == 0 && e.bitmap == 0)
    }
    fn empty_what(&self) -> Option<&'static str> {
        Some("unallocated")
    }
}

/// The refcount table.
pub struct RefTableRows {
    /// The entries.
    pub table: Arc<Vec<RefTableEntry>>,
    /// Where it is.
    pub at: u64,
    /// Refcounts per block.
    pub per: u64,
    /// The cluster size.
    pub cs: u64,
}

impl Rows for RefTableRows {
    fn len(&self) -> usize {
        self.table.len()
    }
    fn row(&self, i: usize, text: bool, out: &mut Row) {
        let Some(e) = self.table.get(i) else { return };
        out.value(e.0);
        out.value(self.at.saturating_add((i as u64).saturating_mul(8)));
        let first = (i as u64).saturating_mul(self.per);
        // The host bytes whose refcounts the block holds.
        out.range(
            first.saturating_mul(self.cs),
            self.per.saturating_mul(self.cs),
        );
        if let Some(o) = e.block_offset() {
            out.value(o.0);
        }
        if text {
            match e.block_offset() {
                Some(o) => out.write(format_args!("refcount block at {o}")),
                None => out.words("no block"),
            }
        }
    }
    fn matters(&self, i: usize) -> bool {
        self.table
            .get(i)
            .is_some_and(|e| e.block_offset().is_some())
    }
    fn matters_what(&self) -> Option<&'static str> {
        Some("refcount block")
    }
    fn empty(&self, i: usize) -> bool {
        self.table.get(i).is_some_and(|e| e.0 == 0)
    }
    fn empty_what(&self) -> Option<&'static str> {
        Some("without a block")
    }
}

/// One refcount block, beside the references the check counted.
pub struct BlockRows<'a> {
    /// The block's bytes.
    pub block: Arc<Vec<u8>>,
    /// Its refcount table index.
    pub index: u64,
    /// Refcounts per block.
    pub per: u64,
    /// log2 of the refcount width.
    pub order: u32,
    /// The cluster size.
    pub cs: u64,
    /// The check's reference counts, once it is done.
    pub ctx: &'a Ctx,
}

impl BlockRows<'_> {
    fn cluster(&self, j: usize) -> u64 {
        self.index.saturating_mul(self.per).saturating_add(j as u64)
    }
    fn stored(&self, j: usize) -> u64 {
        get_refcount(&self.block, self.order, j as u64)
    }
}

impl Rows for BlockRows<'_> {
    fn id(&self) -> u64 {
        self.index
    }
    fn len(&self) -> usize {
        usize::try_from(self.per).unwrap_or(0)
    }
    fn row(&self, j: usize, text: bool, out: &mut Row) {
        let c = self.cluster(j);
        let stored = self.stored(j);
        out.value(c);
        out.value(stored);
        out.range(c.saturating_mul(self.cs), self.cs);
        if text {
            out.write(format_args!("cluster {c} stored {stored}"));
            match self.ctx.counted(c) {
                Some(k) if stored < k => out.words("ERROR: fewer than its references (corruption)"),
                Some(k) if stored > k => out.words("leaked: more than its references"),
                Some(_) if stored > 0 => out.words("ok"),
                _ => {}
            }
        }
    }
    fn matters(&self, j: usize) -> bool {
        self.ctx
            .counted(self.cluster(j))
            .is_some_and(|k| k != self.stored(j))
    }
    fn matters_what(&self) -> Option<&'static str> {
        Some("refcount mismatch (stored ≠ counted)")
    }
    fn empty(&self, j: usize) -> bool {
        self.stored(j) == 0 && self.ctx.counted(self.cluster(j)).is_none_or(|k| k == 0)
    }
    fn empty_what(&self) -> Option<&'static str> {
        Some("with refcount 0")
    }
}

/// The snapshot table.
pub struct SnapshotRows<'a> {
    /// The snapshots.
    pub list: &'a [Snapshot],
}

impl Rows for SnapshotRows<'_> {
    fn len(&self) -> usize {
        self.list.len()
    }
    fn row(&self, i: usize, text: bool, out: &mut Row) {
        let Some(s) = self.list.get(i) else { return };
        if let Ok(id) = s.id.parse::<u64>() {
            out.value(id);
        }
        if let Ok(n) = s.name.parse::<u64>() {
            out.value(n);
        }
        out.value(s.entry_offset.get());
        out.value(s.l1_table_offset.get());
        out.range(
            s.l1_table_offset.get(),
            u64::from(s.l1_size).saturating_mul(8),
        );
        if text {
            out.write(format_args!("{} {}", s.id, s.name));
        }
    }
}

/// The check's findings.
pub struct FindingRows<'a> {
    /// The findings.
    pub list: &'a [Finding],
    /// The cluster size.
    pub cs: u64,
}

impl Rows for FindingRows<'_> {
    fn len(&self) -> usize {
        self.list.len()
    }
    fn row(&self, i: usize, text: bool, out: &mut Row) {
        let Some(f) = self.list.get(i) else { return };
        if let Some(c) = f.cluster {
            out.value(c);
            out.range(c.saturating_mul(self.cs), self.cs);
        }
        if let Some(o) = f.offset {
            out.value(o.get());
        }
        numbers_in(&f.message, out);
        if text {
            out.write(format_args!("{:?}", f.kind));
            out.words(&f.message);
        }
    }
    fn matters(&self, i: usize) -> bool {
        self.list
            .get(i)
            .is_some_and(|f| matches!(f.kind, FindingKind::Corruption | FindingKind::CheckError))
    }
    fn matters_what(&self) -> Option<&'static str> {
        Some("corruption or check error")
    }
}

/// Lines of text (the simulation's changes): their words and the numbers in them.
pub struct TextRows {
    /// The lines.
    pub lines: Vec<String>,
}

impl Rows for TextRows {
    fn len(&self) -> usize {
        self.lines.len()
    }
    fn row(&self, i: usize, text: bool, out: &mut Row) {
        let Some(l) = self.lines.get(i) else { return };
        numbers_in(l, out);
        if text {
            out.words(l);
        }
    }
}

/// The Map's extents mapped so far.
pub struct MapRows<'a> {
    /// The extents.
    pub list: &'a [MapEntry],
    /// Where the list starts (`g` starts it elsewhere).
    pub base: u64,
    /// For the words of each extent.
    pub ctx: &'a Ctx,
}

impl Rows for MapRows<'_> {
    fn id(&self) -> u64 {
        self.base
    }
    fn len(&self) -> usize {
        self.list.len()
    }
    fn row(&self, i: usize, text: bool, out: &mut Row) {
        let Some(e) = self.list.get(i) else { return };
        out.value(e.start.get());
        out.range(e.start.get(), e.length);
        if let Some(o) = e.offset {
            out.value(o.get());
            out.range(o.get(), e.length);
        }
        if text {
            out.words(&kind(e, self.ctx).0);
        }
    }
    fn matters(&self, i: usize) -> bool {
        self.list.get(i).is_some_and(|e| e.data || e.compressed)
    }
    fn matters_what(&self) -> Option<&'static str> {
        Some("extent of guest data")
    }
    fn empty(&self, i: usize) -> bool {
        self.list
            .get(i)
            .is_some_and(|e| !e.data && !e.compressed && !e.present)
    }
    fn empty_what(&self) -> Option<&'static str> {
        Some("unallocated")
    }
}

/// The rows of Tables as it is now: the L1 table, or the L2 table shown.
pub fn tables<'a>(st: &super::tables::State, ctx: &'a Ctx) -> Option<Box<dyn Rows + 'a>> {
    let img = ctx.img.as_ref()?;
    let view: View = ctx.view()?;
    let geo = img.geometry();
    match st.level {
        super::tables::Level::L1 => Some(Box::new(L1Rows {
            l1: view.l1.clone(),
            at: view.l1_offset.get(),
            geo,
            active: view.snapshot.is_none(),
        })),
        super::tables::Level::L2(i) => {
            let off = view.l1.get(i).and_then(|e| e.l2_offset())?;
            let table = img.l2_table(off).ok()?;
            Some(Box::new(L2Rows {
                table,
                at: off.0,
                l1_index: i as u64,
                geo,
                has_data_file: img.header.has_data_file(),
            }))
        }
    }
}

/// The rows of Refcounts as it is now: the table, or the block shown.
pub fn refcounts<'a>(st: &super::refcounts::State, ctx: &'a Ctx) -> Option<Box<dyn Rows + 'a>> {
    let img = ctx.img.as_ref()?;
    let rg = img.refcount_geometry();
    let table = img.refcount_table().ok()?;
    let cs = img.geometry().cluster_size();
    match st.level {
        super::refcounts::Level::Table => Some(Box::new(RefTableRows {
            table,
            at: img.header.refcount_table_offset.get(),
            per: rg.entries_per_block(),
            cs,
        })),
        super::refcounts::Level::Block(ti) => {
            let off = table.get(ti).and_then(|e| e.block_offset())?;
            let block = img.refcount_block(off).ok()?;
            Some(Box::new(BlockRows {
                block,
                index: ti as u64,
                per: rg.entries_per_block(),
                order: rg.order,
                cs,
                ctx,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_text_are_read_in_hex_and_decimal() {
        let mut r = Row::default();
        numbers_in(
            "active L1[0] → L2[12] (guest 0x30000): 0x8000000000050000→0x50000, cluster 7 (data): 1→2",
            &mut r,
        );
        assert_eq!(
            r.values,
            [0, 12, 0x30000, 0x8000000000050000, 0x50000, 7, 1, 2],
            "L1 and L2 are names, not numbers"
        );
    }
}

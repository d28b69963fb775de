//! Which metadata structure a host offset of an image file belongs to, and what
//! the bytes there mean: the header field, the header extension, the backing file
//! name, an L1/L2 entry, a refcount-table or refcount-block entry, a field of a
//! snapshot-table entry or of a bitmap directory entry.
//!
//! [`Structures::of`] lists where every structure is, from the header and the
//! tables the image already decodes (the same places the checker walks). It reads
//! snapshot L1 tables but no L2 table, so it is cheap to build once per load.
//! [`Structures::decode`] then names the field under one offset.

use crate::header::ExtensionKind;
use crate::image::Qcow2;
use crate::tables::L1Entry;
use crate::types::HostOffset;
use std::collections::HashSet;

mod bitmaps_luks;
mod decode;
use decode::decode_in;

/// Regions listed at most (L2 tables and refcount blocks of a hostile image can
/// be many; past this the rest are not named).
pub const MAX_REGIONS: usize = 1 << 20;

/// What a region of the file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The header (up to `header_length`).
    Header,
    /// A header extension (index in [`Qcow2::extensions`]).
    Extension(usize),
    /// The backing file name.
    BackingName,
    /// An L1 table: the active one (None) or a snapshot's (index in the table).
    L1(Option<usize>),
    /// An L2 table named by entry `l1_index` of an L1 table.
    L2 {
        /// The L1 table: None for the active one, or a snapshot index.
        snapshot: Option<usize>,
        /// The L1 entry that names it.
        l1_index: u64,
    },
    /// The refcount table.
    RefcountTable,
    /// A refcount block, named by this refcount-table entry.
    RefcountBlock(u64),
    /// A snapshot table entry (index).
    Snapshot(usize),
    /// A bitmap directory entry (index).
    BitmapEntry(usize),
    /// A bitmap's table (index of the bitmap in the directory).
    BitmapTable(usize),
    /// A cluster of bitmap data, named by entry `entry` of bitmap `bitmap`'s table.
    BitmapData {
        /// The bitmap (index in the directory).
        bitmap: usize,
        /// The bitmap table entry that names it.
        entry: u64,
    },
    /// The LUKS header and key material the crypto header extension reserves.
    Luks,
}

/// One structure and the bytes it spans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub start: HostOffset,
    /// One past the last byte.
    pub end: HostOffset,
    /// What it is.
    pub kind: Kind,
}

/// The decoded meaning of the bytes under one host offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The structure ("header", "active L1 table at 0x30000", ...).
    pub structure: String,
    /// The field or entry ("l1_size", "entry 5").
    pub item: String,
    /// The bytes of that field or entry.
    pub start: HostOffset,
    /// One past its last byte.
    pub end: HostOffset,
    /// The raw value (big-endian), when it is a number.
    pub raw: Option<u64>,
    /// What it means here.
    pub meaning: String,
}

/// Where every metadata structure of one image is.
#[derive(Clone, Debug, Default)]
pub struct Structures {
    /// Regions, sorted by start.
    pub regions: Vec<Region>,
    /// Whether [`MAX_REGIONS`] cut the list short.
    pub truncated: bool,
    /// The length of the longest region: a region holding an offset starts
    /// at most this far before it, which bounds the look-up.
    longest: u64,
}

impl Structures {
    /// Where the structures of `img` are.
    pub fn of(img: &Qcow2) -> Structures {
        let h = &img.header;
        let cs = img.geometry().cluster_size();
        let mut s = Structures::default();
        let mut seen = HashSet::new();
        s.push(
            HostOffset(0),
            HostOffset(u64::from(h.header_length.max(72))),
            Kind::Header,
        );
        for (i, e) in img.extensions.iter().enumerate() {
            let len = crate::bytes::align8(u64::from(e.length)).saturating_add(8);
            s.push(e.offset, e.offset.saturating_add(len), Kind::Extension(i));
        }
        if let Some(name) = h.backing_file_name() {
            s.push(
                name,
                name.saturating_add(u64::from(h.backing_file_size)),
                Kind::BackingName,
            );
        }
        s.l1(img, h.l1_table_offset, &img.l1, None, &mut seen);
        // Snapshot L1 tables are read (L2 tables are not); a table of hostile
        // size stops the reading at a budget.
        let mut budget: u64 = 1 << 22;
        for (i, sn) in img.snapshots.snapshots.iter().enumerate() {
            s.push(
                sn.entry_offset,
                sn.entry_offset.saturating_add(sn.entry_len),
                Kind::Snapshot(i),
            );
            budget = match budget.checked_sub(u64::from(sn.l1_size)) {
                Some(b) => b,
                None => {
                    s.truncated = true;
                    continue;
                }
            };
            if let Ok(l1) = img.snapshot_l1(sn) {
                s.l1(img, sn.l1_table_offset, &l1, Some(i), &mut seen);
            }
        }
        let rt_len = u64::from(h.refcount_table_clusters).saturating_mul(cs);
        s.push(
            h.refcount_table_offset,
            h.refcount_table_offset.saturating_add(rt_len),
            Kind::RefcountTable,
        );
        if let Ok(rt) = img.refcount_table() {
            for (i, e) in rt.iter().enumerate() {
                if let Some(o) = e.block_offset() {
                    s.push(o, o.saturating_add(cs), Kind::RefcountBlock(i as u64));
                }
            }
        }
        if let Some(Ok(dir)) = &img.bitmaps {
            for (i, b) in dir.iter().enumerate() {
                let len = 24u64
                    .saturating_add(u64::from(b.extra_data_size))
                    .saturating_add(b.name.len() as u64);
                s.push(
                    b.entry_offset,
                    b.entry_offset.saturating_add(len),
                    Kind::BitmapEntry(i),
                );
            }
        }
        if let Some(Ok(dir)) = &img.bitmaps {
            s.bitmap_tables(img, dir, cs);
        }
        for e in &img.extensions {
            if let ExtensionKind::Crypto { offset, length } = e.kind {
                s.push(offset, offset.saturating_add(length), Kind::Luks);
            }
        }
        s.regions.sort_by_key(|r| (r.start, r.end));
        s.longest = s
            .regions
            .iter()
            .map(|r| r.end.saturating_sub(r.start))
            .max()
            .unwrap_or(0);
        s
    }

    /// Each bitmap's table (as the open read it), and the data clusters its
    /// entries name. Every table's entries count against [`MAX_REGIONS`]
    /// whether or not they name a cluster, so many entries naming one large
    /// table of zeros cannot make this go through it again and again.
    fn bitmap_tables(&mut self, img: &Qcow2, dir: &[crate::bitmap::BitmapEntry], cs: u64) {
        let mut budget = MAX_REGIONS as u64;
        for (i, b) in dir.iter().enumerate() {
            let len = u64::from(b.table_size).saturating_mul(8);
            self.push(
                b.table_offset,
                b.table_offset.saturating_add(len),
                Kind::BitmapTable(i),
            );
            let Ok(t) = img.bitmap_tables.table(i) else {
                continue;
            };
            // Entries past the end of the file read as zeros: no cluster.
            let stored = t.stored_len();
            budget = match budget.checked_sub(stored) {
                Some(left) if self.regions.len().saturating_add(stored as usize) <= MAX_REGIONS => {
                    left
                }
                _ => {
                    self.truncated = true;
                    continue;
                }
            };
            for (j, e) in t.stored().enumerate() {
                if let Some(o) = e.data_offset() {
                    self.push(
                        o,
                        o.saturating_add(cs),
                        Kind::BitmapData {
                            bitmap: i,
                            entry: j as u64,
                        },
                    );
                }
            }
        }
    }

    fn push(&mut self, start: HostOffset, end: HostOffset, kind: Kind) {
        if end <= start {
            return;
        }
        if self.regions.len() >= MAX_REGIONS {
            self.truncated = true;
            return;
        }
        self.regions.push(Region { start, end, kind });
    }

    fn l1(
        &mut self,
        img: &Qcow2,
        offset: HostOffset,
        l1: &[L1Entry],
        snap: Option<usize>,
        seen: &mut HashSet<HostOffset>,
    ) {
        let cs = img.geometry().cluster_size();
        if offset != HostOffset(0) {
            let len = (l1.len() as u64).saturating_mul(8);
            self.push(offset, offset.saturating_add(len), Kind::L1(snap));
        }
        for (i, e) in l1.iter().enumerate() {
            let Some(o) = e.l2_offset() else { continue };
            // An L2 table shared with the active L1 (or an earlier snapshot) is
            // listed once, under the first L1 table that names it.
            if seen.insert(o) {
                self.push(
                    o,
                    o.saturating_add(cs),
                    Kind::L2 {
                        snapshot: snap,
                        l1_index: i as u64,
                    },
                );
            }
        }
    }

    /// The regions that hold `offset`, the smallest first.
    pub fn at(&self, offset: HostOffset) -> Vec<&Region> {
        let upto = self.regions.partition_point(|r| r.start <= offset);
        let lowest = HostOffset(offset.get().saturating_sub(self.longest));
        let from = self.regions.partition_point(|r| r.start < lowest);
        let mut v: Vec<&Region> = self
            .regions
            .get(from..upto)
            .unwrap_or(&[])
            .iter()
            .filter(|r| offset < r.end)
            .collect();
        v.sort_by_key(|r| r.end.saturating_sub(r.start));
        v
    }

    /// What the bytes at `offset` are, in the smallest structure that holds them
    /// (None: no metadata structure: guest data, free space or past every table).
    pub fn decode(&self, img: &Qcow2, offset: HostOffset) -> Option<Decoded> {
        self.at(offset)
            .into_iter()
            .find_map(|r| decode_in(img, r, offset))
    }
}

//! Persistent dirty bitmaps: the bitmap directory and bitmap tables.
//!
//! The bitmaps header extension points at a directory of variable-length entries
//! (each padded to 8 bytes):
//!
//! ```text
//!  0 bitmap_table_offset(8)  8 bitmap_table_size(4)  12 flags(4)
//! 16 type(1)=1 (dirty tracking)  17 granularity_bits(1)  18 name_size(2)
//! 20 extra_data_size(4)  24 extra data, then the name
//! flags: bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible
//! ```
//!
//! Each bitmap table entry is a u64: bits 9..55 the offset of a cluster of bitmap
//! data, or 0 with bit 0 saying whether the whole cluster reads as all ones.
//! QEMU only trusts the directory while autoclear bit 0 is set.

use crate::bytes::{align8, be16, be32, be64, c_text, slice, u8_at};
use crate::error::{CorruptKind, Error, Result};
use crate::io::{Source, ends_past_limit, read_as_qemu, read_exact};
use crate::types::HostOffset;
use serde::Serialize;

mod entry;
pub use entry::DirEntryProblem;

/// QEMU accepts at most 65535 bitmaps.
pub const MAX_BITMAPS: u64 = 65535;
/// Largest directory QEMU accepts.
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS;
/// Largest bitmap table QEMU accepts, in entries.
pub const MAX_TABLE_ENTRIES: u64 = 0x0800_0000;

/// QEMU's limit on the bytes a bitmap covers in its table's data clusters
/// (table entries times the cluster size, 512 MiB): a directory entry over it
/// fails QEMU's directory check before any table is read.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Fewest granularity bits QEMU accepts (one bit per 512 bytes).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Most granularity bits QEMU accepts (one bit per 2 GiB).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name QEMU accepts, in bytes.
pub const MAX_NAME_SIZE: u16 = 1023;
/// The flag bits QEMU knows (in use, auto); any other set bit is reserved.
pub const KNOWN_FLAGS: u32 = FLAG_IN_USE | FLAG_AUTO;
/// Flag bit 0: the bitmap is being modified and its data is not consistent.
pub const FLAG_IN_USE: u32 = 1;
/// Flag bit 1: QEMU tracks writes in this bitmap automatically.
pub const FLAG_AUTO: u32 = 2;
/// Flag bit 2: the extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 4;

/// One entry of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BitmapEntry {
    /// Where the entry starts.
    pub entry_offset: HostOffset,
    /// The bitmap table.
    pub table_offset: HostOffset,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Raw flags.
    pub flags: u32,
    /// Type (1 = dirty tracking).
    pub bitmap_type: u8,
    /// One bit covers `1 << granularity_bits` guest bytes.
    pub granularity_bits: u8,
    /// Extra data bytes.
    pub extra_data_size: u32,
    /// The bitmap's name (UTF-8, unique in the image), to its first NUL byte
    /// as QEMU reads it.
    pub name: String,
    /// The name's length in bytes, as stored.
    #[serde(skip)]
    pub name_size: u16,
}

impl BitmapEntry {
    /// Flag names as `qemu-img info` prints them ("in-use", "auto").
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            v.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            v.push("auto");
        }
        v
    }
    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1u64.checked_shl(u32::from(self.granularity_bits))
            .unwrap_or(0)
    }
}

/// Bits 9..55 of a bitmap table entry: the offset of the cluster of bitmap data.
pub const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 1..8 and 56..63 of a bitmap table entry, which must be zero.
pub const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bit 0 of a bitmap table entry without a data cluster: the cluster reads as all
/// ones (reserved, and so zero, when there is one).
pub const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;

/// One bitmap table entry, as stored.
///
/// ```text
///  bit 0      with offset 0: 0 = the cluster reads as all zeros, 1 = all ones;
///             with an offset: reserved (must be 0)
///  bits 1..8  reserved (must be 0)
///  bits 9..55 host offset of the cluster holding this part of the bitmap
///             (cluster aligned; 0 = no cluster)
///  bits 56..63 reserved (must be 0)
/// ```
///
/// [`mapping`](Self::mapping) decodes it, [`problem`](Self::problem) says why QEMU
/// would refuse it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BitmapTableEntry(pub u64);

/// What a bitmap table entry says about its cluster's worth of bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BitmapMapping {
    /// No data cluster, bit 0 clear: every bit reads as 0 (nothing dirty).
    AllZeros,
    /// No data cluster, bit 0 set: every bit reads as 1 (all dirty).
    AllOnes,
    /// The bits are stored in the host cluster at this offset.
    Data {
        /// Where the cluster is.
        offset: HostOffset,
    },
}

/// Why QEMU refuses a bitmap table entry (`check_table_entry` in
/// `block/qcow2-bitmap.c`); the first that applies, in QEMU's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BitmapEntryProblem {
    /// Some of bits 1..8 or 56..63 are set (the set bits).
    ReservedBits(u64),
    /// Bit 0 is set although the entry names a data cluster.
    AllOnesWithData,
    /// The data cluster's offset is not a multiple of the cluster size.
    Unaligned,
}

impl std::fmt::Display for BitmapEntryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BitmapEntryProblem::ReservedBits(bits) => write!(f, "reserved bits {bits:#x} are set"),
            BitmapEntryProblem::AllOnesWithData => {
                write!(f, "bit 0 (all ones) is set with a data cluster")
            }
            BitmapEntryProblem::Unaligned => write!(f, "the data cluster is not cluster aligned"),
        }
    }
}

/// The first entry of a bitmap table that QEMU refuses, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidTableEntry {
    /// Its index in the table.
    pub index: u64,
    /// Where it is in the file.
    pub at: HostOffset,
    /// The entry as stored.
    pub entry: BitmapTableEntry,
    /// Why QEMU refuses it.
    pub problem: BitmapEntryProblem,
}

impl BitmapTableEntry {
    /// An entry naming a data cluster at `offset` (cluster aligned and below 2^56
    /// for a valid entry; other bits would be reserved bits, which
    /// [`problem`](Self::problem) reports).
    pub fn data(offset: HostOffset) -> Self {
        BitmapTableEntry(offset.get())
    }

    /// The decoded entry: bits 9..55 first, then bit 0 when they are zero (the
    /// reserved bits do not change it; [`problem`](Self::problem) reports them).
    pub fn mapping(self) -> BitmapMapping {
        match self.0 & BME_TABLE_ENTRY_OFFSET_MASK {
            0 if self.0 & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 => BitmapMapping::AllOnes,
            0 => BitmapMapping::AllZeros,
            o => BitmapMapping::Data {
                offset: HostOffset(o),
            },
        }
    }

    /// The reserved bits that are set (bits 1..8 and 56..63; 0 if none).
    pub fn reserved_bits(self) -> u64 {
        self.0 & BME_TABLE_ENTRY_RESERVED_MASK
    }

    /// Why QEMU would refuse this entry in an image with clusters of
    /// `cluster_size` bytes, or `None` if it is valid.
    pub fn problem(self, cluster_size: u64) -> Option<BitmapEntryProblem> {
        if self.reserved_bits() != 0 {
            return Some(BitmapEntryProblem::ReservedBits(self.reserved_bits()));
        }
        match self.mapping() {
            BitmapMapping::Data { .. } if self.0 & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 => {
                Some(BitmapEntryProblem::AllOnesWithData)
            }
            BitmapMapping::Data { offset } if !offset.get().is_multiple_of(cluster_size) => {
                Some(BitmapEntryProblem::Unaligned)
            }
            _ => None,
        }
    }

    /// The data cluster, if any.
    pub fn data_offset(self) -> Option<HostOffset> {
        match self.mapping() {
            BitmapMapping::Data { offset } => Some(offset),
            BitmapMapping::AllZeros | BitmapMapping::AllOnes => None,
        }
    }

    /// With no data cluster: whether the cluster's bits all read as one.
    pub fn all_ones(self) -> bool {
        self.mapping() == BitmapMapping::AllOnes
    }
}

/// Read the bitmap directory (`size` bytes at `offset`, `count` entries), as
/// QEMU reads it: bytes past the end of the file read as zeros, as long as the
/// directory ends below [`BDRV_MAX_LENGTH`](crate::types::BDRV_MAX_LENGTH)
/// (past it QEMU's read fails: "Failed to read bitmap directory").
pub fn read_directory(
    src: &dyn Source,
    directory: HostOffset,
    size: u64,
    count: u32,
) -> Result<Vec<BitmapEntry>> {
    let d = read_directory_parts(src, directory, size, count)?;
    match d.error {
        Some(e) => Err(e),
        None => Ok(d.entries),
    }
}

/// A bitmap directory as QEMU walks it: the entries it parsed, in order, and
/// the error that ended the walk, if any (an entry that does not fit, more or
/// fewer entries than the extension counts). QEMU checks each entry as it
/// meets it, so a refused entry in `entries` comes before `error`.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    /// The entries parsed before the walk ended.
    pub entries: Vec<BitmapEntry>,
    /// What ended the walk early, or `None` if the directory is whole.
    pub error: Option<Error>,
    /// How many of the directory's bytes lie past the end of the file (and
    /// read as zeros).
    pub past_eof: u64,
}

/// [`read_directory`], keeping the entries met before a structural error.
/// `Err` is a directory QEMU does not read at all (over its limits, ending
/// past `BDRV_MAX_LENGTH`) or a failed read.
pub fn read_directory_parts(
    src: &dyn Source,
    directory: HostOffset,
    size: u64,
    count: u32,
) -> Result<Directory> {
    let offset = directory;
    if size > MAX_DIRECTORY_BYTES || u64::from(count) > MAX_BITMAPS {
        return Err(Error::invalid(
            "bitmap directory",
            offset,
            format!("{count} bitmaps in {size} bytes exceeds QEMU's limits"),
        ));
    }
    if ends_past_limit(offset, size) {
        return Err(Error::corrupt(
            CorruptKind::BitmapDirectoryUnreadable,
            offset,
            format!(
                "its {size} bytes end past {:#x}, the largest offset QEMU reads",
                crate::types::BDRV_MAX_LENGTH
            ),
        ));
    }
    // At most MAX_DIRECTORY_BYTES, checked above.
    let buf = read_as_qemu(src, "bitmap directory", offset, size)?;
    let past_eof = size.min(offset.get().saturating_add(size).saturating_sub(src.len()));
    let (entries, error) = parse_directory(&buf, directory, size, count);
    Ok(Directory {
        entries,
        error,
        past_eof,
    })
}

/// Walk the directory's bytes `buf` (`size` of them, at `directory`) for
/// `count` entries.
fn parse_directory(
    buf: &[u8],
    directory: HostOffset,
    size: u64,
    count: u32,
) -> (Vec<BitmapEntry>, Option<Error>) {
    let offset = directory;
    let mut out = Vec::new();
    let mut pos = 0u64;
    for i in 0..count {
        if pos.saturating_add(24) > size {
            // At the directory's end exactly, QEMU finds too few entries;
            // short of it, an entry that does not fit.
            let (kind, why) = if pos >= size {
                (
                    CorruptKind::BitmapDirectoryShort,
                    format!(
                        "the directory ({size} bytes) ends before entry {i} of the {count} the extension counts"
                    ),
                )
            } else {
                (
                    CorruptKind::BitmapDirectoryBroken,
                    format!("entry {i} runs past the end of the directory ({size} bytes)"),
                )
            };
            return (
                out,
                Some(Error::corrupt(kind, offset.saturating_add(pos), why)),
            );
        }
        // The entry's bytes: field offsets below are constants into this slice.
        let e = usize::try_from(pos)
            .ok()
            .and_then(|p| buf.get(p..))
            .unwrap_or(&[]);
        let name_size = u64::from(be16(e, 18));
        let extra = u64::from(be32(e, 20));
        let len = 24u64.saturating_add(extra).saturating_add(name_size);
        if pos.saturating_add(len) > size {
            let e = Error::corrupt(
                CorruptKind::BitmapDirectoryBroken,
                offset.saturating_add(pos),
                format!("entry {i} runs past the end of the directory ({size} bytes)"),
            );
            return (out, Some(e));
        }
        out.push(BitmapEntry {
            entry_offset: directory.saturating_add(pos),
            table_offset: HostOffset(be64(e, 0)),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            bitmap_type: u8_at(e, 16),
            granularity_bits: u8_at(e, 17),
            extra_data_size: extra as u32,
            name: c_text(slice(
                e,
                (extra as usize).saturating_add(24),
                name_size as usize,
            )),
            name_size: be16(e, 18),
        });
        pos = align8(pos.saturating_add(len));
    }
    // QEMU walks the directory to its end: bytes left after the counted
    // entries are one entry more (or, too few for an entry's fixed part, or
    // the last entry's padding past the end, a directory that does not fit).
    if pos != size {
        let (kind, why) = if pos < size && size.saturating_sub(pos) >= 24 {
            (
                CorruptKind::BitmapDirectoryLong,
                format!(
                    "{} bytes follow the {count} entries the extension counts",
                    size.saturating_sub(pos)
                ),
            )
        } else {
            (
                CorruptKind::BitmapDirectoryBroken,
                format!(
                    "the {count} entries end at byte {pos}, not at the end of the directory ({size} bytes)"
                ),
            )
        };
        let e = Error::corrupt(kind, offset.saturating_add(pos.min(size)), why);
        return (out, Some(e));
    }
    (out, None)
}

/// The entries of a bitmap table stored as `bytes` (a last partial entry is
/// left out).
pub fn decode_table(bytes: &[u8]) -> impl Iterator<Item = BitmapTableEntry> + '_ {
    bytes.chunks_exact(8).map(|c| BitmapTableEntry(be64(c, 0)))
}

/// Read one bitmap's table, as QEMU reads it: the part past the end of the
/// file reads as zeros, as long as the table ends below
/// [`BDRV_MAX_LENGTH`](crate::types::BDRV_MAX_LENGTH) (past it QEMU's read
/// fails) and holds no more entries than QEMU's largest table
/// ([`MAX_PHYS_SIZE`] bits a cluster of 512 bytes can map; no larger buffer is
/// made up of zeros).
pub fn read_table(src: &dyn Source, entry: &BitmapEntry) -> Result<Vec<BitmapTableEntry>> {
    let what = format!("bitmap '{}' table", entry.name);
    let n = u64::from(entry.table_size);
    if n > MAX_TABLE_ENTRIES {
        return Err(Error::invalid(
            what,
            entry.table_offset,
            format!("{} entries is more than QEMU allows", entry.table_size),
        ));
    }
    let len = n.saturating_mul(8);
    let file_len = src.len();
    let past_eof = entry.table_offset.get().saturating_add(len) > file_len;
    if past_eof && !ends_past_limit(entry.table_offset, len) && n > MAX_PHYS_SIZE / 512 {
        return Err(Error::Truncated {
            what,
            offset: entry.table_offset,
            len,
            file_len,
        });
    }
    let buf = read_as_qemu(src, &what, entry.table_offset, len)?;
    Ok(decode_table(&buf).collect())
}

/// Entries read at a time by [`first_invalid_entry`].
const SCAN_ENTRIES: u64 = 8192;

/// The first entry of `entry`'s table that QEMU's `bitmap_table_load` refuses
/// (see [`BitmapTableEntry::problem`]), in an image of `cluster_size`-byte clusters.
/// QEMU loads the table of every bitmap not marked in use when it opens the image,
/// and fails the open on such an entry. The table is read a piece at a time, so
/// one of QEMU's largest size is never held whole; a table over
/// [`MAX_PHYS_SIZE`] is not read (QEMU fails on its directory entry first).
pub fn first_invalid_entry(
    src: &dyn Source,
    entry: &BitmapEntry,
    cluster_size: u64,
) -> Result<Option<InvalidTableEntry>> {
    let what = format!("bitmap '{}' table", entry.name);
    let total = u64::from(entry.table_size);
    if total > MAX_TABLE_ENTRIES {
        return Err(Error::invalid(
            what,
            entry.table_offset,
            format!("{total} entries is more than QEMU allows"),
        ));
    }
    if total.saturating_mul(cluster_size) > MAX_PHYS_SIZE {
        // QEMU refuses the directory entry itself and never loads this table.
        return Ok(None);
    }
    let mut done = 0u64;
    while done < total {
        let n = total.saturating_sub(done).min(SCAN_ENTRIES);
        let start = entry.table_offset.saturating_add(done.saturating_mul(8));
        let buf = read_exact(src, &what, start, n.saturating_mul(8))?;
        for (k, c) in (0u64..).zip(buf.chunks_exact(8)) {
            let e = BitmapTableEntry(be64(c, 0));
            if let Some(problem) = e.problem(cluster_size) {
                return Ok(Some(InvalidTableEntry {
                    index: done.saturating_add(k),
                    at: start.saturating_add(k.saturating_mul(8)),
                    entry: e,
                    problem,
                }));
            }
        }
        done = done.saturating_add(n);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemSource;

    #[test]
    fn reads_directory() {
        let mut b = vec![0u8; 24];
        b[0..8].copy_from_slice(&0x70000u64.to_be_bytes());
        b[8..12].copy_from_slice(&1u32.to_be_bytes());
        b[12..16].copy_from_slice(&(FLAG_AUTO).to_be_bytes());
        b[16] = 1;
        b[17] = 16;
        b[18..20].copy_from_slice(&3u16.to_be_bytes());
        b.extend_from_slice(b"bm0");
        b.resize(32, 0);
        let len = b.len() as u64;
        let src = MemSource::new("x", b);
        let d = read_directory(&src, HostOffset(0), len, 1).unwrap();
        assert_eq!(d[0].name, "bm0");
        assert_eq!(d[0].granularity(), 65536);
        assert_eq!(d[0].flag_names(), vec!["auto"]);
        assert!(read_directory(&src, HostOffset(0), len, 2).is_err());
        assert!(BitmapTableEntry(1).all_ones());
        assert_eq!(
            BitmapTableEntry(0x50000).data_offset(),
            Some(HostOffset(0x50000))
        );
    }

    /// A table whose bitmap would cover more than QEMU's 512 MiB is not read
    /// (QEMU refuses its directory entry first); one just inside is.
    #[test]
    fn tables_over_qemus_physical_size_are_not_scanned() {
        // Table at 0: one invalid entry (reserved bit 1 set), then nothing.
        let src = MemSource::new("x", 2u64.to_be_bytes().to_vec());
        let mut b = BitmapEntry {
            entry_offset: HostOffset(0),
            table_offset: HostOffset(0),
            table_size: 1,
            flags: 0,
            bitmap_type: 1,
            granularity_bits: 16,
            extra_data_size: 0,
            name: "b".into(),
            name_size: 1,
        };
        // 1 entry of 64 KiB clusters: scanned, and the entry is refused.
        let bad = first_invalid_entry(&src, &b, 65536).unwrap().unwrap();
        assert_eq!((bad.index, bad.entry.0), (0, 2));
        // 8193 entries of 64 KiB clusters: 0x20010000 bytes, over 0x20000000;
        // the 8 bytes in the source would make a read of the table fail.
        b.table_size = 8193;
        assert!(first_invalid_entry(&src, &b, 65536).unwrap().is_none());
    }

    /// Entries worked out by hand from the layout in docs/interop/qcow2.txt
    /// ("Bitmap table"): bit 0 all-ones flag, bits 1..8 reserved, bits 9..55 the
    /// data cluster's offset, bits 56..63 reserved.
    #[test]
    fn bitmap_table_entries_decode_as_the_spec_lays_them_out() {
        let cs = 65536;
        // Offset 0, bit 0 clear / set: the whole cluster reads as zeros / ones.
        assert_eq!(BitmapTableEntry(0).mapping(), BitmapMapping::AllZeros);
        assert_eq!(BitmapTableEntry(1).mapping(), BitmapMapping::AllOnes);
        assert_eq!(BitmapTableEntry(0).problem(cs), None);
        assert_eq!(BitmapTableEntry(1).problem(cs), None);
        // A data cluster at 0x30000 (host cluster 3 of 64 KiB).
        let data = BitmapTableEntry(0x0000_0000_0003_0000);
        assert_eq!(
            data.mapping(),
            BitmapMapping::Data {
                offset: HostOffset(0x30000)
            }
        );
        assert_eq!(data.problem(cs), None);
        // The highest offset bits 9..55 can hold: 2^56 - 512.
        assert_eq!(
            BitmapTableEntry(0x00ff_ffff_ffff_fe00).data_offset(),
            Some(HostOffset(0x00ff_ffff_ffff_fe00))
        );
        // Bit 0 is reserved when there is an offset.
        assert_eq!(
            BitmapTableEntry(0x0000_0000_0003_0001).problem(cs),
            Some(BitmapEntryProblem::AllOnesWithData)
        );
        // 0x30200 is 512-byte aligned (bits 9..55 can say it) but not 64 KiB aligned.
        let odd = BitmapTableEntry(0x0000_0000_0003_0200);
        assert_eq!(odd.data_offset(), Some(HostOffset(0x30200)));
        assert_eq!(odd.problem(cs), Some(BitmapEntryProblem::Unaligned));
        assert_eq!(odd.problem(512), None);
        // Bits 1..8 (0x1fe) and bits 56..63 (0xff00...) are reserved.
        for raw in [0x2, 0x100, 0x0100_0000_0000_0000, 0x8000_0000_0000_0000] {
            let e = BitmapTableEntry(raw);
            assert_eq!(e.reserved_bits(), raw, "{raw:#x}");
            assert_eq!(
                e.problem(cs),
                Some(BitmapEntryProblem::ReservedBits(raw)),
                "{raw:#x}"
            );
        }
        // The reserved bits do not change what the entry maps: bit 63 with 0x30000
        // still names that cluster, bit 8 with offset 0 still reads as zeros.
        assert_eq!(
            BitmapTableEntry(0x8000_0000_0003_0000).data_offset(),
            Some(HostOffset(0x30000))
        );
        assert_eq!(BitmapTableEntry(0x100).mapping(), BitmapMapping::AllZeros);
        // Building an entry for a data cluster gives the stored form back.
        assert_eq!(
            BitmapTableEntry::data(HostOffset(0x30000)),
            BitmapTableEntry(0x30000)
        );
    }
}

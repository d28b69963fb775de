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

use crate::bytes::{align8, be16, be32, be64, slice, text, u8_at};
use crate::error::{Error, Result};
use crate::io::{Source, read_exact};
use crate::types::HostOffset;
use serde::Serialize;

/// QEMU accepts at most 65535 bitmaps.
pub const MAX_BITMAPS: u64 = 65535;
/// Largest directory QEMU accepts.
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS;
/// Largest bitmap table QEMU accepts, in entries.
pub const MAX_TABLE_ENTRIES: u64 = 0x0800_0000;
/// Flag bit 0: the bitmap is being modified and its data is not consistent.
pub const FLAG_IN_USE: u32 = 1;
/// Flag bit 1: QEMU tracks writes in this bitmap automatically.
pub const FLAG_AUTO: u32 = 2;
/// Flag bit 2: the extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 4;
/// Offset bits of a bitmap table entry.
pub const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// One entry of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BitmapEntry {
    /// Where the entry starts.
    pub entry_offset: u64,
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
    /// The bitmap's name (UTF-8, unique in the image).
    pub name: String,
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

/// One bitmap table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BitmapTableEntry(pub u64);

impl BitmapTableEntry {
    /// The data cluster, if any.
    pub fn data_offset(&self) -> Option<u64> {
        let o = self.0 & BME_TABLE_ENTRY_OFFSET_MASK;
        (o != 0).then_some(o)
    }
    /// With no data cluster: whether the cluster's bits all read as one.
    pub fn all_ones(&self) -> bool {
        self.data_offset().is_none() && self.0 & 1 != 0
    }
}

/// Read the bitmap directory (`size` bytes at `offset`, `count` entries).
pub fn read_directory(
    src: &dyn Source,
    offset: u64,
    size: u64,
    count: u32,
) -> Result<Vec<BitmapEntry>> {
    if size > MAX_DIRECTORY_BYTES || u64::from(count) > MAX_BITMAPS {
        return Err(Error::invalid(
            "bitmap directory",
            offset,
            format!("{count} bitmaps in {size} bytes exceeds QEMU's limits"),
        ));
    }
    let buf = read_exact(src, "bitmap directory", offset, size)?;
    let mut out = Vec::new();
    let mut pos = 0u64;
    for i in 0..count {
        if pos.saturating_add(24) > size {
            return Err(Error::invalid(
                "bitmap directory",
                offset.saturating_add(pos),
                format!("entry {i} runs past the end of the directory ({size} bytes)"),
            ));
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
            return Err(Error::invalid(
                "bitmap directory",
                offset.saturating_add(pos),
                format!("entry {i} runs past the end of the directory ({size} bytes)"),
            ));
        }
        out.push(BitmapEntry {
            entry_offset: offset.saturating_add(pos),
            table_offset: HostOffset(be64(e, 0)),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            bitmap_type: u8_at(e, 16),
            granularity_bits: u8_at(e, 17),
            extra_data_size: extra as u32,
            name: text(slice(
                e,
                (extra as usize).saturating_add(24),
                name_size as usize,
            )),
        });
        pos = align8(pos.saturating_add(len));
    }
    Ok(out)
}

/// Read one bitmap's table.
pub fn read_table(src: &dyn Source, entry: &BitmapEntry) -> Result<Vec<BitmapTableEntry>> {
    if u64::from(entry.table_size) > MAX_TABLE_ENTRIES {
        return Err(Error::invalid(
            format!("bitmap '{}' table", entry.name),
            entry.table_offset.get(),
            format!("{} entries is more than QEMU allows", entry.table_size),
        ));
    }
    let buf = read_exact(
        src,
        &format!("bitmap '{}' table", entry.name),
        entry.table_offset.get(),
        u64::from(entry.table_size) * 8,
    )?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| BitmapTableEntry(be64(c, 0)))
        .collect())
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
        let d = read_directory(&src, 0, len, 1).unwrap();
        assert_eq!(d[0].name, "bm0");
        assert_eq!(d[0].granularity(), 65536);
        assert_eq!(d[0].flag_names(), vec!["auto"]);
        assert!(read_directory(&src, 0, len, 2).is_err());
        assert!(BitmapTableEntry(1).all_ones());
        assert_eq!(BitmapTableEntry(0x50000).data_offset(), Some(0x50000));
    }
}

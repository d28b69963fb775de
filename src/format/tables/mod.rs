//! L1 and L2 entries: the two-level table that maps guest clusters to host clusters.
//!
//! Each entry keeps its raw 64-bit value; `mapping()` decodes it. Nothing is lost, so a
//! corrupt entry can be shown exactly as stored next to what QEMU would make of it.
//!
//! ```text
//! L1 entry:  63 COPIED | 62..56 reserved | 55..9 L2 table offset | 8..0 reserved
//! L2 entry:  63 COPIED | 62 compressed | 61..56 reserved | 55..9 host offset | 8..1 reserved | 0 zero
//!            (compressed: 61..x sector count - 1, x-1..0 byte offset; see CompressedDescriptor)
//! extended L2 adds a second word: bit i = subcluster i allocated, bit 32+i = reads as zero
//! ```
//!
//! The parts: `l1` (L1 entries and their [`L1Mapping`]), `l2` (L2 entries, their
//! [`L2Mapping`] and the cluster and subcluster types), `compressed` (the
//! descriptor of a compressed cluster).

mod compressed;
mod l1;
mod l2;
#[cfg(test)]
mod tests;

pub use compressed::CompressedDescriptor;
pub use l1::{L1Entry, L1Mapping};
pub use l2::{ClusterType, L2Entry, L2Mapping, SubclusterType, Subclusters, Surroundings};

use crate::types::Geometry;

/// Bit 63 of L1 and L2 entries: the refcount of the cluster is exactly 1, so it
/// may be written in place (only meaningful in the active tables).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// The subcluster bitmap of an extended L2 entry that reads as zeros all through
/// (`QCOW_L2_BITMAP_ALL_ZEROES`): every zero bit (32..63), no allocation bit.
pub const L2_BITMAP_ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Offset bits of L1 entries.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of L2 entries.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard (not compressed) L2 entry.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// The largest L1 table QEMU accepts, in bytes (32 MiB = 4 Mi entries).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest L1 table QEMU accepts, in entries.
pub const MAX_L1_ENTRIES: u64 = MAX_L1_BYTES / 8;
/// Compressed data is counted in 512-byte sectors.
pub const COMPRESSED_SECTOR: u64 = 512;

/// Decode an L2 table (one cluster of bytes).
pub fn decode_l2(buf: &[u8], geo: &Geometry) -> Vec<L2Entry> {
    let word = |c: &[u8]| c.try_into().map(u64::from_be_bytes).unwrap_or(0);
    if geo.extended_l2 {
        buf.chunks_exact(16)
            .map(|c| L2Entry {
                raw: word(c.get(..8).unwrap_or(&[])),
                bitmap: word(c.get(8..).unwrap_or(&[])),
            })
            .collect()
    } else {
        buf.chunks_exact(8)
            .map(|c| L2Entry {
                raw: word(c),
                bitmap: 0,
            })
            .collect()
    }
}

/// Decode an L1 table.
pub fn decode_l1(buf: &[u8]) -> Vec<L1Entry> {
    buf.chunks_exact(8)
        .map(|c| L1Entry(crate::bytes::be64(c, 0)))
        .collect()
}

//! L1 and L2 entries: the two-level table that maps guest clusters to host clusters.
//!
//! Each entry keeps its raw 64-bit value; methods decode it. Nothing is lost, so a
//! corrupt entry can be shown exactly as stored next to what QEMU would make of it.
//!
//! ```text
//! L1 entry:  63 COPIED | 62..56 reserved | 55..9 L2 table offset | 8..0 reserved
//! L2 entry:  63 COPIED | 62 compressed | 61..56 reserved | 55..9 host offset | 8..1 reserved | 0 zero
//!            (compressed: 61..x sector count - 1, x-1..0 byte offset; see CompressedDescriptor)
//! extended L2 adds a second word: bit i = subcluster i allocated, bit 32+i = reads as zero
//! ```

use crate::types::{Geometry, HostOffset, low_mask};
use serde::Serialize;

/// Bit 63 of L1 and L2 entries: the refcount of the cluster is exactly 1, so it
/// may be written in place (only meaningful in the active tables).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
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

/// One L1 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Offset of the L2 table, or `None` if the entry has none (unallocated).
    pub fn l2_offset(&self) -> Option<HostOffset> {
        let off = self.0 & L1E_OFFSET_MASK;
        (off != 0).then_some(HostOffset(off))
    }
    /// Bit 63.
    pub fn copied(&self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }
    /// Reserved bits that are set (should be 0).
    pub fn reserved_bits(&self) -> u64 {
        self.0 & L1E_RESERVED_MASK
    }
    /// One-line description.
    pub fn describe(&self, geo: &Geometry) -> String {
        let mut s = match self.l2_offset() {
            None => "no L2 table: the whole range is unallocated in this layer".to_string(),
            Some(off) if !geo.is_cluster_aligned(off.0) => {
                format!(
                    "L2 table at {off}, which is not cluster-aligned (QEMU fails reads with EIO)"
                )
            }
            Some(off) => format!(
                "L2 table at {off} (host cluster {})",
                off.0 >> geo.cluster_bits
            ),
        };
        if self.copied() {
            s.push_str(", COPIED (refcount 1: may be written in place)");
        } else if self.l2_offset().is_some() {
            s.push_str(", not COPIED (shared or unknown: a write copies it first)");
        }
        if self.reserved_bits() != 0 {
            s.push_str(&format!(", reserved bits {:#x} set", self.reserved_bits()));
        }
        s
    }
}

/// What kind of cluster an L2 entry describes (QEMU's `QCow2ClusterType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterType {
    /// No data here: read the backing file (or zeros without one).
    Unallocated,
    /// Reads as zeros; no host cluster.
    ZeroPlain,
    /// Reads as zeros; a host cluster is kept allocated for later writes.
    ZeroAlloc,
    /// Data at a host offset.
    Normal,
    /// Compressed data at an unaligned host byte offset.
    Compressed,
}

/// The state of one subcluster (QEMU's `QCow2SubclusterType`). Without extended L2
/// the whole cluster is one subcluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubclusterType {
    /// Data in the host cluster.
    Normal,
    /// Part of a compressed cluster.
    Compressed,
    /// Zeros; no host cluster.
    ZeroPlain,
    /// Zeros; a host cluster exists.
    ZeroAlloc,
    /// Not allocated here, no host cluster: read the layer below.
    UnallocatedPlain,
    /// Not allocated here, but the cluster has a host cluster: read the layer below.
    UnallocatedAlloc,
    /// Contradictory bits: QEMU fails reads with EIO.
    Invalid,
}

impl SubclusterType {
    /// Whether the data comes from a host cluster of this layer.
    pub fn has_host_cluster(&self) -> bool {
        matches!(
            self,
            SubclusterType::Normal | SubclusterType::ZeroAlloc | SubclusterType::UnallocatedAlloc
        )
    }
    /// Reads fall through to the next layer.
    pub fn is_unallocated(&self) -> bool {
        matches!(
            self,
            SubclusterType::UnallocatedPlain | SubclusterType::UnallocatedAlloc
        )
    }
    /// Reads return zeros without looking further.
    pub fn is_zero(&self) -> bool {
        matches!(self, SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc)
    }
    /// Short lowercase name.
    pub fn name(&self) -> &'static str {
        match self {
            SubclusterType::Normal => "normal",
            SubclusterType::Compressed => "compressed",
            SubclusterType::ZeroPlain => "zero",
            SubclusterType::ZeroAlloc => "zero (allocated)",
            SubclusterType::UnallocatedPlain => "unallocated",
            SubclusterType::UnallocatedAlloc => "unallocated (host cluster kept)",
            SubclusterType::Invalid => "invalid",
        }
    }
}

/// Where the bytes of a compressed cluster are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CompressedDescriptor {
    /// Byte offset of the compressed data (not aligned).
    pub offset: HostOffset,
    /// Number of 512-byte sectors the data touches, as stored (value + 1).
    pub sectors: u64,
    /// Bytes to read from `offset`: sectors * 512 - (offset % 512).
    pub size: u64,
}

impl CompressedDescriptor {
    /// Decode the descriptor bits of a compressed L2 entry.
    ///
    /// With `x = 62 - (cluster_bits - 8)`, the low `x` bits are the byte offset and
    /// the `cluster_bits - 8` bits above them are the sector count minus one.
    pub fn decode(raw: u64, geo: &Geometry) -> Self {
        // cluster_bits is 9..=21, so count_bits is 1..=13 and shift 49..=61;
        // sectors is at most 2^13, and sectors * 512 exceeds offset % 512.
        let count_bits = geo.cluster_bits.saturating_sub(8);
        let shift = 62u32.saturating_sub(count_bits);
        let offset = raw & low_mask(shift);
        let sectors = ((raw >> shift) & low_mask(count_bits)).saturating_add(1);
        let size = sectors
            .saturating_mul(COMPRESSED_SECTOR)
            .saturating_sub(offset % COMPRESSED_SECTOR);
        CompressedDescriptor {
            offset: HostOffset(offset),
            sectors,
            size,
        }
    }

    /// Encode a descriptor (for tests and simulations). `sectors` must be 1..=2^(cluster_bits-8).
    pub fn encode(offset: u64, sectors: u64, geo: &Geometry) -> u64 {
        let count_bits = geo.cluster_bits.saturating_sub(8);
        let shift = 62u32.saturating_sub(count_bits);
        OFLAG_COMPRESSED
            | (offset & low_mask(shift))
            | ((sectors.saturating_sub(1) & low_mask(count_bits)) << shift)
    }

    /// The host byte range the data occupies.
    pub fn range(&self) -> (u64, u64) {
        (self.offset.0, self.offset.0.saturating_add(self.size))
    }
}

/// One L2 entry: the standard word and, with extended L2, the subcluster bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct L2Entry {
    /// The first (or only) 64-bit word.
    pub raw: u64,
    /// The subcluster bitmap (extended L2 only; 0 otherwise).
    pub bitmap: u64,
}

impl L2Entry {
    /// Bit 63.
    pub fn copied(&self) -> bool {
        self.raw & OFLAG_COPIED != 0
    }
    /// Bit 62.
    pub fn compressed(&self) -> bool {
        self.raw & OFLAG_COMPRESSED != 0
    }
    /// Offset bits (meaningless for compressed entries).
    pub fn host_offset(&self) -> HostOffset {
        HostOffset(self.raw & L2E_OFFSET_MASK)
    }
    /// Reserved bits that are set, for a non-compressed entry (bit 0 is reserved
    /// with extended L2, where the zero flag moves into the bitmap).
    pub fn reserved_bits(&self, geo: &Geometry) -> u64 {
        if self.compressed() {
            return 0;
        }
        let mut mask = L2E_STD_RESERVED_MASK;
        if geo.extended_l2 {
            mask |= OFLAG_ZERO;
        }
        self.raw & mask
    }

    /// QEMU's cluster type. `has_data_file`: with an external data file, offset 0
    /// plus COPIED means "data at guest offset" rather than "unallocated".
    pub fn cluster_type(&self, geo: &Geometry, has_data_file: bool) -> ClusterType {
        if self.compressed() {
            ClusterType::Compressed
        } else if self.raw & OFLAG_ZERO != 0 && !geo.extended_l2 {
            if self.raw & L2E_OFFSET_MASK != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if self.raw & L2E_OFFSET_MASK == 0 {
            if has_data_file && self.copied() {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// The type of subcluster `sc` (0..32; always 0 without extended L2).
    pub fn subcluster_type(&self, geo: &Geometry, has_data_file: bool, sc: u32) -> SubclusterType {
        let ct = self.cluster_type(geo, has_data_file);
        let sc = sc & 31;
        if !geo.extended_l2 {
            return match ct {
                ClusterType::Compressed => SubclusterType::Compressed,
                ClusterType::ZeroPlain => SubclusterType::ZeroPlain,
                ClusterType::ZeroAlloc => SubclusterType::ZeroAlloc,
                ClusterType::Normal => SubclusterType::Normal,
                ClusterType::Unallocated => SubclusterType::UnallocatedPlain,
            };
        }
        let alloc = self.bitmap & 0xffff_ffff;
        let zero = self.bitmap >> 32;
        match ct {
            ClusterType::Compressed => SubclusterType::Compressed,
            ClusterType::Normal => {
                if alloc & zero != 0 {
                    SubclusterType::Invalid
                } else if zero & (1 << sc) != 0 {
                    SubclusterType::ZeroAlloc
                } else if alloc & (1 << sc) != 0 {
                    SubclusterType::Normal
                } else {
                    SubclusterType::UnallocatedAlloc
                }
            }
            // Without extended L2 these are the only other types; with it the zero
            // flag is ignored, so Unallocated is all that is left.
            ClusterType::Unallocated | ClusterType::ZeroPlain | ClusterType::ZeroAlloc => {
                if alloc != 0 {
                    SubclusterType::Invalid
                } else if zero & (1 << sc) != 0 {
                    SubclusterType::ZeroPlain
                } else {
                    SubclusterType::UnallocatedPlain
                }
            }
        }
    }

    /// How many subclusters from `sc` on have the same type as `sc` (QEMU's
    /// `qcow2_get_subcluster_range_type`); `None` for an invalid entry.
    pub fn subcluster_run(
        &self,
        geo: &Geometry,
        has_data_file: bool,
        sc: u32,
    ) -> Option<(SubclusterType, u32)> {
        let t = self.subcluster_type(geo, has_data_file, sc);
        let sc = sc & 31;
        if t == SubclusterType::Invalid {
            return None;
        }
        if !geo.extended_l2 || t == SubclusterType::Compressed {
            let per: u32 = if geo.extended_l2 { 32 } else { 1 };
            return Some((t, per.saturating_sub(sc.min(per.saturating_sub(1)))));
        }
        let below = low_mask(sc);
        let count = match t {
            SubclusterType::Normal => {
                let val = (self.bitmap & 0xffff_ffff) | below;
                (!(val as u32)).trailing_zeros()
            }
            SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc => {
                let val = (self.bitmap >> 32) | below;
                (!(val as u32)).trailing_zeros()
            }
            _ => {
                let val = ((self.bitmap >> 32) | self.bitmap) & 0xffff_ffff & !below;
                (val as u32).trailing_zeros()
            }
        };
        Some((t, count.saturating_sub(sc)))
    }

    /// The compressed descriptor, for compressed entries.
    pub fn compressed_descriptor(&self, geo: &Geometry) -> Option<CompressedDescriptor> {
        self.compressed()
            .then(|| CompressedDescriptor::decode(self.raw, geo))
    }

    /// One-line description of the whole entry.
    pub fn describe(&self, geo: &Geometry, has_data_file: bool) -> String {
        let ct = self.cluster_type(geo, has_data_file);
        let mut s = match ct {
            ClusterType::Compressed => {
                let d = CompressedDescriptor::decode(self.raw, geo);
                format!(
                    "compressed: {} bytes at {} ({} sector(s))",
                    d.size, d.offset, d.sectors
                )
            }
            ClusterType::ZeroPlain => "reads as zeros, no host cluster".to_string(),
            ClusterType::ZeroAlloc => format!(
                "reads as zeros, host cluster {} kept allocated",
                self.host_offset()
            ),
            ClusterType::Unallocated if geo.extended_l2 => {
                "no host cluster; subclusters follow the bitmap".to_string()
            }
            ClusterType::Unallocated => {
                "unallocated: reads fall through to the backing file".to_string()
            }
            ClusterType::Normal => {
                let off = self.host_offset();
                if geo.is_cluster_aligned(off.0) {
                    format!("data at host offset {off}")
                } else {
                    format!(
                        "data at host offset {off}, NOT cluster-aligned (QEMU fails reads with EIO)"
                    )
                }
            }
        };
        if self.copied() {
            s.push_str(if ct == ClusterType::Compressed {
                ", COPIED set on a compressed cluster (a corruption)"
            } else {
                ", COPIED"
            });
        }
        let r = self.reserved_bits(geo);
        if r != 0 {
            s.push_str(&format!(", reserved bits {r:#x} set"));
        }
        if geo.extended_l2 {
            s.push_str(&format!(
                ", alloc bitmap {:#010x}, zero bitmap {:#010x}",
                self.bitmap & 0xffff_ffff,
                self.bitmap >> 32
            ));
        }
        s
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_for_every_cluster_size() {
        for bits in 9..=21u32 {
            let g = Geometry::new(bits, false);
            let max_sectors = 1u64 << (bits - 8);
            for (off, sectors) in [
                (0x1234_5678u64, 1u64),
                (0x50200, 2),
                (0x10_0000, max_sectors),
            ] {
                let raw = CompressedDescriptor::encode(off, sectors, &g);
                let d = CompressedDescriptor::decode(raw, &g);
                assert_eq!(d.offset.0, off, "bits {bits}");
                assert_eq!(d.sectors, sectors, "bits {bits}");
                assert_eq!(d.size, sectors * 512 - (off & 511));
                let e = L2Entry { raw, bitmap: 0 };
                assert_eq!(e.cluster_type(&g, false), ClusterType::Compressed);
            }
        }
        // 64 KiB clusters: the count sits in bits 54..61.
        let g = Geometry::new(16, false);
        let d = CompressedDescriptor::decode(0x4000_0000_0000_0000 | (2u64 << 54) | 0x70010, &g);
        assert_eq!((d.offset.0, d.sectors, d.size), (0x70010, 3, 1536 - 16));
    }

    #[test]
    fn cluster_types_follow_qemu() {
        let g = Geometry::new(16, false);
        let e = |raw| L2Entry { raw, bitmap: 0 };
        assert_eq!(e(0).cluster_type(&g, false), ClusterType::Unallocated);
        assert_eq!(e(1).cluster_type(&g, false), ClusterType::ZeroPlain);
        assert_eq!(e(0x50001).cluster_type(&g, false), ClusterType::ZeroAlloc);
        assert_eq!(
            e(0x8000000000050000).cluster_type(&g, false),
            ClusterType::Normal
        );
        assert_eq!(
            e(OFLAG_COPIED).cluster_type(&g, false),
            ClusterType::Unallocated
        );
        assert_eq!(e(OFLAG_COPIED).cluster_type(&g, true), ClusterType::Normal);
        assert_eq!(e(1 << 56 | 0x50000).reserved_bits(&g), 1 << 56);
        assert_eq!(
            L1Entry(0x8000000000040200).reserved_bits(),
            0x200 & L1E_RESERVED_MASK
        );
        assert_eq!(L1Entry(0x8000000000000000).l2_offset(), None);
    }

    #[test]
    fn extended_l2_subclusters() {
        let g = Geometry::new(16, true);
        // allocated subclusters 2..=3, zero subcluster 5
        let e = L2Entry {
            raw: 0x8000000000050000,
            bitmap: (1 << (32 + 5)) | 0b1100,
        };
        assert_eq!(
            e.subcluster_type(&g, false, 0),
            SubclusterType::UnallocatedAlloc
        );
        assert_eq!(
            e.subcluster_run(&g, false, 0),
            Some((SubclusterType::UnallocatedAlloc, 2))
        );
        assert_eq!(
            e.subcluster_run(&g, false, 2),
            Some((SubclusterType::Normal, 2))
        );
        assert_eq!(
            e.subcluster_run(&g, false, 5),
            Some((SubclusterType::ZeroAlloc, 1))
        );
        assert_eq!(
            e.subcluster_run(&g, false, 6),
            Some((SubclusterType::UnallocatedAlloc, 26))
        );
        let bad = L2Entry {
            raw: 0x50000,
            bitmap: (1 << 33) | 0b10,
        };
        assert_eq!(bad.subcluster_type(&g, false, 9), SubclusterType::Invalid);
        let unalloc_with_alloc_bits = L2Entry { raw: 0, bitmap: 1 };
        assert_eq!(
            unalloc_with_alloc_bits.subcluster_type(&g, false, 3),
            SubclusterType::Invalid
        );
        let zero_plain = L2Entry {
            raw: 0,
            bitmap: 0xffff_ffff << 32,
        };
        assert_eq!(
            zero_plain.subcluster_run(&g, false, 7),
            Some((SubclusterType::ZeroPlain, 25))
        );
        // bit 0 is reserved with extended L2
        assert_eq!(L2Entry { raw: 1, bitmap: 0 }.reserved_bits(&g), 1);
    }
}

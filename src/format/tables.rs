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

/// One L1 entry as stored: the raw 64-bit word. [`L1Entry::mapping`] decodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct L1Entry(pub u64);

/// What an L1 entry says, decoded from its raw word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum L1Mapping {
    /// No L2 table (offset bits 0): every cluster the entry covers is unallocated
    /// in this layer.
    Unallocated {
        /// Reserved bits that are set (bits 62..56 and 8..0; should be 0).
        reserved: u64,
    },
    /// An L2 table at `offset`.
    L2Table {
        /// Where the L2 table is (bits 55..9; QEMU fails reads if it is not
        /// cluster-aligned).
        offset: HostOffset,
        /// Bit 63: the L2 table's refcount is exactly 1, so it may be written in place.
        copied: bool,
        /// Reserved bits that are set (should be 0).
        reserved: u64,
    },
}

impl L1Mapping {
    /// The L2 table's offset, if there is one.
    pub fn l2_offset(&self) -> Option<HostOffset> {
        match *self {
            L1Mapping::Unallocated { .. } => None,
            L1Mapping::L2Table { offset, .. } => Some(offset),
        }
    }
}

impl L1Entry {
    /// Decode the entry.
    pub fn mapping(&self) -> L1Mapping {
        let off = self.0 & L1E_OFFSET_MASK;
        let reserved = self.0 & L1E_RESERVED_MASK;
        if off == 0 {
            L1Mapping::Unallocated { reserved }
        } else {
            L1Mapping::L2Table {
                offset: HostOffset(off),
                copied: self.0 & OFLAG_COPIED != 0,
                reserved,
            }
        }
    }
    /// Offset of the L2 table, or `None` if the entry has none (unallocated).
    pub fn l2_offset(&self) -> Option<HostOffset> {
        self.mapping().l2_offset()
    }
    /// Bit 63, as stored (see [`L1Mapping::L2Table`]).
    pub fn copied(&self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }
    /// Reserved bits that are set (should be 0).
    pub fn reserved_bits(&self) -> u64 {
        match self.mapping() {
            L1Mapping::Unallocated { reserved } | L1Mapping::L2Table { reserved, .. } => reserved,
        }
    }
    /// One-line description.
    pub fn describe(&self, geo: &Geometry) -> String {
        let mut s = match self.mapping().l2_offset() {
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

/// The extended-L2 subcluster bitmap: the second word of an extended L2 entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Subclusters {
    /// Bit `i`: subcluster `i` is allocated (reads come from the host cluster).
    pub alloc: u32,
    /// Bit `i`: subcluster `i` reads as zeros.
    pub zero: u32,
}

impl Subclusters {
    /// Split the bitmap word: allocation bits 31..0, zero bits 63..32.
    pub fn from_word(word: u64) -> Self {
        Subclusters {
            alloc: (word & 0xffff_ffff) as u32,
            zero: (word >> 32) as u32,
        }
    }

    /// The bitmap word as stored.
    pub fn word(&self) -> u64 {
        (u64::from(self.zero) << 32) | u64::from(self.alloc)
    }

    /// Whether subcluster `sc` (taken mod 32) has its allocation bit.
    pub fn allocated(&self, sc: u32) -> bool {
        self.alloc & (1 << (sc & 31)) != 0
    }

    /// Whether subcluster `sc` (taken mod 32) has its zero bit.
    pub fn zeroed(&self, sc: u32) -> bool {
        self.zero & (1 << (sc & 31)) != 0
    }
}

/// What an L2 entry says about its guest cluster, decoded from the raw words and
/// carrying its data (the way imago's `L2Mapping` does). [`L2Entry::mapping`]
/// produces it; [`ClusterType`] is its kind without the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum L2Mapping {
    /// No host cluster: reads fall through to the backing file (zeros without one).
    /// With extended L2, the bitmap may still mark subclusters as zero (or, wrongly,
    /// as allocated: QEMU fails such reads with EIO).
    Unallocated {
        /// The subcluster bitmap (extended L2 only).
        subclusters: Option<Subclusters>,
    },
    /// Reads as zeros (bit 0 of a standard L2 entry).
    Zero {
        /// The host cluster kept allocated for later writes, if the offset bits
        /// are not 0 (QEMU's `QCOW2_CLUSTER_ZERO_ALLOC`).
        preallocated: Option<HostOffset>,
        /// Bit 63.
        copied: bool,
    },
    /// Guest data in a host cluster.
    Data {
        /// Where the cluster is (bits 55..9). With an external data file, 0 plus
        /// COPIED means "at the guest offset in the data file".
        host: HostOffset,
        /// Bit 63: the host cluster's refcount is exactly 1.
        copied: bool,
        /// The subcluster bitmap (extended L2 only).
        subclusters: Option<Subclusters>,
    },
    /// Guest data compressed, at an unaligned host byte offset.
    Compressed {
        /// Where the compressed bytes are and how many.
        descriptor: CompressedDescriptor,
        /// Bit 63, which must not be set on a compressed entry (a corruption).
        copied: bool,
    },
}

impl L2Mapping {
    /// The kind of cluster, without its data (QEMU's `QCow2ClusterType`).
    pub fn cluster_type(&self) -> ClusterType {
        match self {
            L2Mapping::Unallocated { .. } => ClusterType::Unallocated,
            L2Mapping::Zero {
                preallocated: None, ..
            } => ClusterType::ZeroPlain,
            L2Mapping::Zero { .. } => ClusterType::ZeroAlloc,
            L2Mapping::Data { .. } => ClusterType::Normal,
            L2Mapping::Compressed { .. } => ClusterType::Compressed,
        }
    }

    /// The host cluster this entry keeps allocated: the data cluster or a
    /// preallocated zero cluster (`None` for unallocated and compressed entries,
    /// and for data at offset 0 in an external data file).
    pub fn host_cluster(&self) -> Option<HostOffset> {
        match *self {
            L2Mapping::Data { host, .. } if host.0 != 0 => Some(host),
            L2Mapping::Zero { preallocated, .. } => preallocated,
            _ => None,
        }
    }

    /// The offset bits of a data or preallocated zero entry, as stored (0 for data
    /// at the guest offset of an external data file); `None` for the other kinds.
    pub fn host_offset(&self) -> Option<HostOffset> {
        match *self {
            L2Mapping::Data { host, .. } => Some(host),
            L2Mapping::Zero { preallocated, .. } => preallocated,
            L2Mapping::Unallocated { .. } | L2Mapping::Compressed { .. } => None,
        }
    }

    /// Bit 63 as stored.
    pub fn copied(&self) -> bool {
        match *self {
            L2Mapping::Unallocated { .. } => false,
            L2Mapping::Zero { copied, .. }
            | L2Mapping::Data { copied, .. }
            | L2Mapping::Compressed { copied, .. } => copied,
        }
    }

    /// The state of subcluster `sc` (0..32; the whole cluster without extended L2).
    pub fn subcluster_type(&self, sc: u32) -> SubclusterType {
        match *self {
            L2Mapping::Compressed { .. } => SubclusterType::Compressed,
            L2Mapping::Zero {
                preallocated: None, ..
            } => SubclusterType::ZeroPlain,
            L2Mapping::Zero { .. } => SubclusterType::ZeroAlloc,
            L2Mapping::Data {
                subclusters: None, ..
            } => SubclusterType::Normal,
            L2Mapping::Unallocated { subclusters: None } => SubclusterType::UnallocatedPlain,
            L2Mapping::Data {
                subclusters: Some(b),
                ..
            } => {
                if b.alloc & b.zero != 0 {
                    SubclusterType::Invalid
                } else if b.zeroed(sc) {
                    SubclusterType::ZeroAlloc
                } else if b.allocated(sc) {
                    SubclusterType::Normal
                } else {
                    SubclusterType::UnallocatedAlloc
                }
            }
            L2Mapping::Unallocated {
                subclusters: Some(b),
            } => {
                if b.alloc != 0 {
                    SubclusterType::Invalid
                } else if b.zeroed(sc) {
                    SubclusterType::ZeroPlain
                } else {
                    SubclusterType::UnallocatedPlain
                }
            }
        }
    }
}

/// One L2 entry as stored: the standard word and, with extended L2, the subcluster
/// bitmap. [`L2Entry::mapping`] decodes it.
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

    /// Decode the entry. `has_data_file`: with an external data file, offset 0 plus
    /// COPIED means "data at the guest offset" rather than "unallocated".
    pub fn mapping(&self, geo: &Geometry, has_data_file: bool) -> L2Mapping {
        let copied = self.copied();
        let offset = self.raw & L2E_OFFSET_MASK;
        let subclusters = geo.extended_l2.then(|| Subclusters::from_word(self.bitmap));
        if self.compressed() {
            L2Mapping::Compressed {
                descriptor: CompressedDescriptor::decode(self.raw, geo),
                copied,
            }
        } else if self.raw & OFLAG_ZERO != 0 && !geo.extended_l2 {
            // With extended L2, bit 0 is reserved and the zero bits are in the bitmap.
            L2Mapping::Zero {
                preallocated: (offset != 0).then_some(HostOffset(offset)),
                copied,
            }
        } else if offset == 0 && !(has_data_file && copied) {
            L2Mapping::Unallocated { subclusters }
        } else {
            L2Mapping::Data {
                host: HostOffset(offset),
                copied,
                subclusters,
            }
        }
    }

    /// QEMU's cluster type (the kind of [`L2Entry::mapping`]).
    pub fn cluster_type(&self, geo: &Geometry, has_data_file: bool) -> ClusterType {
        self.mapping(geo, has_data_file).cluster_type()
    }

    /// The type of subcluster `sc` (0..32; always 0 without extended L2).
    pub fn subcluster_type(&self, geo: &Geometry, has_data_file: bool, sc: u32) -> SubclusterType {
        self.mapping(geo, has_data_file).subcluster_type(sc)
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
        let m = self.mapping(geo, has_data_file);
        let mut s = match m {
            L2Mapping::Compressed { descriptor: d, .. } => format!(
                "compressed: {} bytes at {} ({} sector(s))",
                d.size, d.offset, d.sectors
            ),
            L2Mapping::Zero {
                preallocated: None, ..
            } => "reads as zeros, no host cluster".to_string(),
            L2Mapping::Zero {
                preallocated: Some(host),
                ..
            } => format!("reads as zeros, host cluster {host} kept allocated"),
            L2Mapping::Unallocated {
                subclusters: Some(_),
            } => "no host cluster; subclusters follow the bitmap".to_string(),
            L2Mapping::Unallocated { subclusters: None } => {
                "unallocated: reads fall through to the backing file".to_string()
            }
            L2Mapping::Data { host, .. } if geo.is_cluster_aligned(host.0) => {
                format!("data at host offset {host}")
            }
            L2Mapping::Data { host, .. } => format!(
                "data at host offset {host}, NOT cluster-aligned (QEMU fails reads with EIO)"
            ),
        };
        let ct = m.cluster_type();
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
            let b = Subclusters::from_word(self.bitmap);
            s.push_str(&format!(
                ", alloc bitmap {:#010x}, zero bitmap {:#010x}",
                b.alloc, b.zero
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
    fn compressed_descriptors_decode_as_the_spec_says() {
        // (cluster_bits, raw entry, offset, sectors, size), worked out by hand from
        // docs/interop/qcow2.rst: x = 62 - (cluster_bits - 8); offset = low x bits;
        // sectors = next (cluster_bits - 8) bits + 1; size = sectors * 512 - offset % 512.
        let cases: [(u32, u64, u64, u64, u64); 4] = [
            // 512-byte clusters: x = 61, a 1-bit count (bit 61).
            (9, 0x6000_0000_1234_5678, 0x1234_5678, 2, 904),
            // 4 KiB: x = 58, count 0xf in bits 58..62.
            (12, 0x7c00_0000_0005_0200, 0x5_0200, 16, 8192),
            // 64 KiB: x = 54, count 2 in bits 54..62.
            (16, 0x4080_0000_0007_0010, 0x7_0010, 3, 1520),
            // 2 MiB: x = 49, count 0x1fff in bits 49..62.
            (21, 0x7ffe_0001_2345_6789, 0x1_2345_6789, 8192, 4_193_911),
        ];
        for (bits, raw, offset, sectors, size) in cases {
            let g = Geometry::new(bits, false);
            let d = CompressedDescriptor::decode(raw, &g);
            assert_eq!(
                (d.offset.0, d.sectors, d.size),
                (offset, sectors, size),
                "bits {bits}"
            );
            assert_eq!(
                CompressedDescriptor::encode(offset, sectors, &g),
                raw,
                "bits {bits}"
            );
            let e = L2Entry { raw, bitmap: 0 };
            assert_eq!(e.cluster_type(&g, false), ClusterType::Compressed);
            assert_eq!(
                e.mapping(&g, false),
                L2Mapping::Compressed {
                    descriptor: d,
                    copied: false
                }
            );
        }
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
        // Bit 9 belongs to the offset, bits 0 and 56 are reserved (0x7f000000000001ff).
        assert_eq!(L1Entry(0x8000_0000_0004_0200).reserved_bits(), 0);
        assert_eq!(
            L1Entry(0x8000_0000_0004_0200).mapping(),
            L1Mapping::L2Table {
                offset: HostOffset(0x4_0200),
                copied: true,
                reserved: 0
            }
        );
        assert_eq!(
            L1Entry(0x0100_0000_0003_0001).reserved_bits(),
            0x0100_0000_0000_0001
        );
        assert_eq!(L1Entry(0x8000000000000000).l2_offset(), None);
        assert_eq!(
            L1Entry(0x8000_0000_0000_0000).mapping(),
            L1Mapping::Unallocated { reserved: 0 }
        );
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

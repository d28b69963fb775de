//! The descriptor of a compressed cluster: an unaligned host byte offset and a
//! count of 512-byte sectors, packed into the L2 entry's offset bits.

use super::{COMPRESSED_SECTOR, OFLAG_COMPRESSED};
use crate::types::{Geometry, HostOffset, low_mask};
use serde::Serialize;

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

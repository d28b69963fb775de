//! Refcounts: how many references each host cluster has.
//!
//! Like guest lookups, refcounts are found through two levels: the **refcount
//! table** (at `refcount_table_offset`, `refcount_table_clusters` clusters long)
//! holds offsets of **refcount blocks**; each block is one cluster of packed
//! refcounts, `1 << refcount_order` bits each.
//!
//! ```text
//! host cluster c:  table index = c >> (cluster_bits + 3 - refcount_order)
//!                  block index = c & (entries_per_block - 1)
//! ```
//!
//! A table entry of 0, or a cluster past the end of the table, means refcount 0.
//! Sub-byte refcounts (1, 2 and 4 bits) are packed starting at the least
//! significant bit of each byte; wider ones are big-endian.

use crate::bytes::{be16, be32, be64, u8_at};
use crate::types::{Geometry, HostCluster, HostOffset, low_mask};
use serde::Serialize;

/// QEMU refuses refcount tables larger than 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Offset bits of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// The refcount layout of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RefcountGeometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the refcount width (0..=6).
    pub order: u32,
}

impl RefcountGeometry {
    /// Layout for a cluster size and refcount order (order clamped to 0..=6).
    pub fn new(geo: &Geometry, order: u32) -> Self {
        RefcountGeometry {
            cluster_bits: geo.cluster_bits,
            order: order.min(6),
        }
    }
    /// Bits per refcount.
    pub fn bits(&self) -> u32 {
        1 << self.order
    }
    /// The largest refcount that fits.
    pub fn max(&self) -> u64 {
        if self.order >= 6 {
            u64::MAX
        } else {
            low_mask(self.bits())
        }
    }
    /// log2 of refcounts per block.
    pub fn block_bits(&self) -> u32 {
        self.cluster_bits
            .saturating_add(3)
            .saturating_sub(self.order)
    }
    /// Refcounts per block.
    pub fn entries_per_block(&self) -> u64 {
        1u64 << self.block_bits()
    }
    /// Which table entry covers a host cluster.
    pub fn table_index(&self, c: HostCluster) -> u64 {
        c.0 >> self.block_bits()
    }
    /// Which refcount inside its block.
    pub fn block_index(&self, c: HostCluster) -> u64 {
        c.0 & low_mask(self.block_bits())
    }
}

/// One refcount table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RefTableEntry(pub u64);

impl RefTableEntry {
    /// Offset of the refcount block, or `None` if there is none.
    pub fn block_offset(&self) -> Option<HostOffset> {
        let o = self.0 & REFT_OFFSET_MASK;
        (o != 0).then_some(HostOffset(o))
    }
    /// Reserved bits that are set.
    pub fn reserved_bits(&self) -> u64 {
        self.0 & REFT_RESERVED_MASK
    }
}

/// Read refcount `index` from a refcount block buffer.
#[inline]
pub fn get_refcount(block: &[u8], order: u32, index: u64) -> u64 {
    let Ok(i) = usize::try_from(index) else {
        return 0;
    };
    match order.min(6) {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i.saturating_mul(bits);
            let byte = u8_at(block, bit / 8);
            // bits is 1, 2 or 4: !(0xff << bits) keeps the low `bits` bits.
            u64::from((byte >> (bit % 8)) & !(u8::MAX << bits))
        }
        3 => u64::from(u8_at(block, i)),
        4 => u64::from(be16(block, i.saturating_mul(2))),
        5 => u64::from(be32(block, i.saturating_mul(4))),
        _ => be64(block, i.saturating_mul(8)),
    }
}

/// Store refcount `value` at `index` in a refcount block buffer (used by the
/// in-memory simulator; values wider than the refcount are truncated).
pub fn set_refcount(block: &mut [u8], order: u32, index: u64, value: u64) {
    let Ok(i) = usize::try_from(index) else {
        return;
    };
    match order.min(6) {
        o @ 0..=2 => {
            let bits = 1usize << o;
            let bit = i.saturating_mul(bits);
            let mask = !(u8::MAX << bits) << (bit % 8);
            if let Some(b) = block.get_mut(bit / 8) {
                *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
            }
        }
        3 => {
            if let Some(b) = block.get_mut(i) {
                *b = value as u8;
            }
        }
        o => {
            let width = 1usize << o.saturating_sub(3);
            let bytes = value.to_be_bytes();
            let src = bytes.get(8usize.saturating_sub(width)..).unwrap_or(&[]);
            if let Some(dst) = block
                .get_mut(i.saturating_mul(width)..i.saturating_mul(width).saturating_add(width))
            {
                dst.copy_from_slice(src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6u32 {
            let g = RefcountGeometry::new(&Geometry::new(9, false), order);
            let mut block = vec![0u8; 512];
            let n = g.entries_per_block();
            assert_eq!(n * u64::from(g.bits()), 4096);
            for i in 0..n {
                set_refcount(&mut block, order, i, (i * 7 + 1) & g.max());
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&block, order, i),
                    (i * 7 + 1) & g.max(),
                    "order {order} i {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_refcounts_pack_lsb_first() {
        // order 2 (4-bit): entry 0 is the low nibble of byte 0.
        let block = [0x21u8, 0x03];
        assert_eq!(get_refcount(&block, 2, 0), 1);
        assert_eq!(get_refcount(&block, 2, 1), 2);
        assert_eq!(get_refcount(&block, 2, 2), 3);
        // order 0 (1-bit)
        assert_eq!(get_refcount(&[0b0000_0100], 0, 2), 1);
        assert_eq!(get_refcount(&[0, 5], 4, 0), 5);
    }

    #[test]
    fn indexes() {
        let g = RefcountGeometry::new(&Geometry::new(16, false), 4);
        assert_eq!(g.entries_per_block(), 32768);
        assert_eq!(g.table_index(HostCluster(32768 * 3 + 5)), 3);
        assert_eq!(g.block_index(HostCluster(32768 * 3 + 5)), 5);
        assert_eq!(g.max(), 65535);
        assert_eq!(
            RefcountGeometry::new(&Geometry::new(16, false), 6).max(),
            u64::MAX
        );
    }
}

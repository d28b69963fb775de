//! L1 entries: the raw word and what it says (an L2 table, or nothing).

use super::{L1E_OFFSET_MASK, L1E_RESERVED_MASK, OFLAG_COPIED};
use crate::types::{Geometry, HostOffset};
use serde::Serialize;

/// One L1 entry as stored: the raw 64-bit word. [`L1Entry::mapping`] decodes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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
    /// The entry of 0: no L2 table, no flags.
    pub const UNALLOCATED: L1Entry = L1Entry(0);
    /// An entry naming the L2 table at `offset`, with bit 63 set if `copied`
    /// (no reserved bits).
    pub fn l2_table(offset: HostOffset, copied: bool) -> L1Entry {
        L1Entry(offset.0 & L1E_OFFSET_MASK).with_copied(copied)
    }
    /// The same word with bit 63 set or cleared; every other bit kept.
    pub fn with_copied(self, copied: bool) -> L1Entry {
        if copied {
            L1Entry(self.0 | OFLAG_COPIED)
        } else {
            L1Entry(self.0 & !OFLAG_COPIED)
        }
    }
    /// The word as stored on disk (big-endian).
    pub fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }
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
    /// One-line description; `active`: whether the entry is in the active L1 table
    /// (COPIED means something only there, not in a snapshot's L1).
    pub fn describe(&self, geo: &Geometry, active: bool) -> String {
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
        if !active {
            if self.copied() {
                s.push_str(", COPIED (a flag with no meaning in a snapshot's L1: only the active L1 uses it)");
            } else if self.l2_offset().is_some() {
                s.push_str(", not COPIED (a flag with no meaning in a snapshot's L1: only the active L1 uses it)");
            }
        } else if self.copied() {
            s.push_str(", COPIED (claims refcount 1: QEMU writes it in place)");
        } else if self.l2_offset().is_some() {
            s.push_str(", not COPIED (shared or unknown: QEMU copies it before a write)");
        }
        if self.reserved_bits() != 0 {
            s.push_str(&format!(", reserved bits {:#x} set", self.reserved_bits()));
        }
        s
    }
}

//! Offsets and the cluster geometry.
//!
//! qcow2 has two address spaces that are easy to mix up:
//!
//! * the **guest** address space: the virtual disk the VM sees, `0..virtual_size`;
//! * the **host** address space: byte offsets inside the `.qcow2` file (or inside its
//!   external data file).
//!
//! Both are cut into clusters of `1 << cluster_bits` bytes. A guest offset is found
//! through a two-level table: the top bits index the L1 table, whose entry names an
//! L2 table; the middle bits index that L2 table, whose entry names the host cluster;
//! the low bits are the offset inside the cluster.
//!
//! ```text
//!  guest offset:  | L1 index | L2 index | offset in cluster |
//!                            <- l2_bits -><-- cluster_bits --->
//! ```
//!
//! Separate types for guest and host offsets make it impossible to pass one where the
//! other is meant.

use serde::Serialize;
use std::fmt;

macro_rules! offset_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        /// The raw number in hex, with the formatter's flags (`{:#x}`, `{:08x}`).
        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }

        impl $name {
            /// The raw number.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + n`, or `None` past 2^64 (values read from a file can be anything).
            pub fn checked_add(self, n: u64) -> Option<Self> {
                self.0.checked_add(n).map($name)
            }

            /// `self + n`, stopping at 2^64 - 1.
            pub fn saturating_add(self, n: u64) -> Self {
                $name(self.0.saturating_add(n))
            }

            /// How far `self` is past `base` (0 if it is before it).
            pub fn saturating_sub(self, base: Self) -> u64 {
                self.0.saturating_sub(base.0)
            }

            /// Where entry `index` of a table of `entry_size`-byte entries starting
            /// at `self` is, or `None` past 2^64.
            pub fn checked_entry(self, index: u64, entry_size: u64) -> Option<Self> {
                index.checked_mul(entry_size).and_then(|d| self.checked_add(d))
            }

            /// Entry `index` of a table of `entry_size`-byte entries at `self`,
            /// stopping at 2^64 - 1 (for labels of values read from a file).
            pub fn saturating_entry(self, index: u64, entry_size: u64) -> Self {
                self.saturating_add(index.saturating_mul(entry_size))
            }

            /// Whether `self` is a multiple of `n` (`n` 0: only 0 is).
            pub const fn is_multiple_of(self, n: u64) -> bool {
                self.0.is_multiple_of(n)
            }

            /// `self` rounded up to a multiple of 8 (tables whose entries start on
            /// 8-byte boundaries), stopping at the last multiple below 2^64.
            pub fn align8_up(self) -> Self {
                $name(crate::bytes::align8(self.0))
            }
        }

        impl From<$name> for u64 {
            fn from(o: $name) -> u64 {
                o.0
            }
        }
    };
}

offset_type!(
    /// A byte offset in the guest's virtual disk.
    GuestOffset
);
offset_type!(
    /// A byte offset in a host file (the image or its data file).
    HostOffset
);
offset_type!(
    /// The index of a cluster in the guest's virtual disk.
    GuestCluster
);
offset_type!(
    /// The index of a cluster in a host file: host offset >> cluster_bits.
    HostCluster
);

/// Serialises a host offset as the hex string its `Display` writes (`"0x30000"`),
/// for fields whose JSON has always spelled it so (`trace`'s steps):
/// `#[serde(serialize_with = "crate::types::hex_string")]`.
pub fn hex_string<S: serde::Serializer>(o: &HostOffset, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(o)
}

/// [`hex_string`] for an optional host offset: `None` is `null` (or, with
/// `skip_serializing_if`, no field at all).
pub fn hex_string_opt<S: serde::Serializer>(
    o: &Option<HostOffset>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match o {
        Some(o) => s.serialize_some(&o.to_string()),
        None => s.serialize_none(),
    }
}

/// QEMU's `BDRV_MAX_LENGTH`: `INT64_MAX` rounded down to 1 GiB. The block layer
/// fails every request that reaches past it (EIO), whatever the file's size;
/// below it, a read past the end of the file returns zeros.
pub const BDRV_MAX_LENGTH: u64 = 0x7fff_ffff_c000_0000;

/// Smallest cluster size QEMU accepts: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU accepts: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// An extended L2 entry describes 32 subclusters.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;

/// `2^bits - 1`, the mask of the low `bits` bits, without overflow: all ones
/// from 64 bits on.
#[inline]
pub fn low_mask(bits: u32) -> u64 {
    u64::MAX.checked_shl(bits).map_or(u64::MAX, |m| !m)
}

/// How guest offsets map onto tables for one image.
///
/// Built only from a validated `cluster_bits` (9..=21), so every shift below is in range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Whether L2 entries are 16 bytes with a subcluster bitmap (incompatible bit 4).
    pub extended_l2: bool,
}

impl Geometry {
    /// A geometry for `cluster_bits` (clamped to QEMU's 9..=21 so shifts never overflow).
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Self {
        Geometry {
            cluster_bits: cluster_bits.clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS),
            extended_l2,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Size of one L2 entry: 8 bytes, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }

    /// log2 of the number of entries in one L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits
            .saturating_sub(if self.extended_l2 { 4 } else { 3 })
    }

    /// Entries in one L2 table (one cluster's worth).
    pub fn l2_entries(&self) -> u64 {
        1u64 << self.l2_bits()
    }

    /// Guest bytes covered by one L2 table (and so by one L1 entry).
    pub fn l2_coverage(&self) -> u64 {
        1u64 << self.cluster_bits.saturating_add(self.l2_bits())
    }

    /// log2 of the subcluster size (equal to cluster_bits without extended L2).
    pub fn subcluster_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits.saturating_sub(5)
        } else {
            self.cluster_bits
        }
    }

    /// Subcluster size in bytes (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        1u64 << self.subcluster_bits()
    }

    /// Which L1 entry covers a guest offset.
    pub fn l1_index(&self, guest: GuestOffset) -> u64 {
        guest.0 >> self.cluster_bits.saturating_add(self.l2_bits())
    }

    /// Which entry of its L2 table covers a guest offset.
    pub fn l2_index(&self, guest: GuestOffset) -> u64 {
        (guest.0 >> self.cluster_bits) & low_mask(self.l2_bits())
    }

    /// Offset of a guest byte inside its cluster.
    pub fn in_cluster(&self, guest: GuestOffset) -> u64 {
        guest.0 & low_mask(self.cluster_bits)
    }

    /// Which of the 32 subclusters a guest offset falls in (0 without extended L2).
    pub fn subcluster_index(&self, guest: GuestOffset) -> u32 {
        if self.extended_l2 {
            ((guest.0 >> self.subcluster_bits()) & 31) as u32
        } else {
            0
        }
    }

    /// The guest cluster holding a guest offset.
    pub fn guest_cluster(&self, guest: GuestOffset) -> GuestCluster {
        GuestCluster(guest.0 >> self.cluster_bits)
    }

    /// The host cluster holding a host offset.
    pub fn host_cluster(&self, host: HostOffset) -> HostCluster {
        HostCluster(host.0 >> self.cluster_bits)
    }

    /// First byte of a host cluster, or `None` if it would not fit in 64 bits.
    pub fn host_cluster_start(&self, cluster: HostCluster) -> Option<HostOffset> {
        cluster.0.checked_mul(self.cluster_size()).map(HostOffset)
    }

    /// Reassemble a guest offset from its L1 index, L2 index and offset in the
    /// cluster; the inverse of [`l1_index`](Self::l1_index),
    /// [`l2_index`](Self::l2_index) and [`in_cluster`](Self::in_cluster).
    /// `None` if the result does not fit in 64 bits.
    pub fn guest_offset(
        &self,
        l1_index: u64,
        l2_index: u64,
        in_cluster: u64,
    ) -> Option<GuestOffset> {
        let base = l1_index.checked_mul(self.l2_coverage())?;
        let within = l2_index
            .checked_mul(self.cluster_size())?
            .checked_add(in_cluster)?;
        base.checked_add(within).map(GuestOffset)
    }

    /// Is a host offset a multiple of the cluster size?
    pub fn is_cluster_aligned(&self, offset: u64) -> bool {
        offset & low_mask(self.cluster_bits) == 0
    }

    /// The cluster number of byte `off` (`off / cluster_size`), in either address
    /// space; the typed forms are [`guest_cluster`](Self::guest_cluster) and
    /// [`host_cluster`](Self::host_cluster).
    pub fn cluster_of(&self, off: u64) -> u64 {
        off >> self.cluster_bits
    }

    /// Where byte `off` sits in its cluster (`off % cluster_size`).
    pub fn within(&self, off: u64) -> u64 {
        off & low_mask(self.cluster_bits)
    }

    /// The first byte of cluster `c` (saturating: a cluster number read from disk
    /// cannot wrap).
    pub fn cluster_start(&self, c: u64) -> u64 {
        c.saturating_mul(self.cluster_size())
    }

    /// One past the last byte of cluster `c` (saturating).
    pub fn cluster_end(&self, c: u64) -> u64 {
        self.cluster_start(c).saturating_add(self.cluster_size())
    }

    /// `n` clusters in bytes (saturating).
    pub fn clusters_bytes(&self, n: u64) -> u64 {
        n.saturating_mul(self.cluster_size())
    }

    /// `off` rounded down to its cluster's start.
    pub fn align_down(&self, off: u64) -> u64 {
        off & !low_mask(self.cluster_bits)
    }

    /// `off` rounded up to a cluster boundary (saturating at the last boundary
    /// below 2^64).
    pub fn align_up(&self, off: u64) -> u64 {
        self.align_down(off.saturating_add(low_mask(self.cluster_bits)))
    }

    /// The clusters a byte range `[start, start + len)` touches, as a range of
    /// cluster numbers (empty for `len` 0; the end saturates).
    pub fn clusters_in(&self, start: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            let c = self.cluster_of(start);
            return c..c;
        }
        let last = start.saturating_add(len).saturating_sub(1);
        self.cluster_of(start)..self.cluster_of(last).saturating_add(1)
    }

    /// How many clusters the byte range `[start, start + len)` touches.
    pub fn cluster_count(&self, start: u64, len: u64) -> u64 {
        let r = self.clusters_in(start, len);
        r.end.saturating_sub(r.start)
    }

    /// The host cluster holding a host offset, and the offset in it.
    pub fn split_host(&self, host: HostOffset) -> (HostCluster, u64) {
        (self.host_cluster(host), self.within(host.0))
    }

    /// Number of clusters needed to hold `bytes` bytes (rounded up).
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// Number of L1 entries needed for a virtual disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }
}

/// Format a byte count the way people read it: `64 KiB`, `1 GiB`, `1.5 MiB`, `100 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0usize;
    let mut whole = bytes;
    // `unit` stays below UNITS.len(), so the increments cannot overflow.
    while whole >= 1024 && whole.is_multiple_of(1024) && unit.saturating_add(1) < UNITS.len() {
        whole /= 1024;
        unit = unit.saturating_add(1);
    }
    if whole < 1024 || unit.saturating_add(1) >= UNITS.len() {
        return format!("{whole} {}", UNITS.get(unit).copied().unwrap_or("B"));
    }
    // Not a round number: show one decimal in the largest unit that fits.
    let mut value = bytes as f64;
    let mut unit = 0usize;
    while value >= 1024.0 && unit.saturating_add(1) < UNITS.len() {
        value /= 1024.0;
        unit = unit.saturating_add(1);
    }
    format!("{value:.1} {}", UNITS.get(unit).copied().unwrap_or("B"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_geometry_splits_offsets() {
        let g = Geometry::new(16, false);
        assert_eq!(g.cluster_size(), 65536);
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        let o = GuestOffset((3 << 29) + (5 << 16) + 77);
        assert_eq!(g.l1_index(o), 3);
        assert_eq!(g.l2_index(o), 5);
        assert_eq!(g.in_cluster(o), 77);
    }

    #[test]
    fn extended_l2_has_half_the_entries_and_32_subclusters() {
        let g = Geometry::new(16, true);
        assert_eq!(g.l2_entries(), 4096);
        assert_eq!(g.subcluster_size(), 2048);
        assert_eq!(g.subcluster_index(GuestOffset(65536 + 4096)), 2);
    }

    #[test]
    fn cluster_arithmetic_on_64k_clusters() {
        let g = Geometry::new(16, false);
        assert_eq!(g.cluster_of(0x3_0010), 3);
        assert_eq!(g.within(0x3_0010), 0x10);
        assert_eq!((g.cluster_start(3), g.cluster_end(3)), (0x3_0000, 0x4_0000));
        assert_eq!(g.cluster_start(u64::MAX), u64::MAX, "saturates");
        assert_eq!(
            (g.align_down(0x3_0010), g.align_up(0x3_0010)),
            (0x3_0000, 0x4_0000)
        );
        assert_eq!(g.align_up(0x4_0000), 0x4_0000);
        // 64 KiB from 0x1_8000 touches clusters 1 and 2; 1 byte at 0x2_0000 only 2.
        assert_eq!(g.clusters_in(0x1_8000, 0x1_0000), 1..3);
        assert_eq!(g.cluster_count(0x1_8000, 0x1_0000), 2);
        assert_eq!(g.cluster_count(0x2_0000, 1), 1);
        assert_eq!(g.cluster_count(0x2_0000, 0), 0);
        assert_eq!(g.cluster_count(u64::MAX - 1, 10), 1, "the end saturates");
        assert_eq!(g.split_host(HostOffset(0x5_0200)), (HostCluster(5), 0x200));
        assert_eq!(HostOffset(u64::MAX).checked_add(1), None);
        assert_eq!(GuestOffset(7).saturating_sub(GuestOffset(9)), 0);
    }

    #[test]
    fn table_entries_and_alignment_on_host_offsets() {
        // L1 entries are 8 bytes: entry 3 of an L1 table at 0x30000 is at 0x30018.
        let l1 = HostOffset(0x3_0000);
        assert_eq!(l1.checked_entry(3, 8), Some(HostOffset(0x3_0018)));
        assert_eq!(l1.saturating_entry(3, 8), HostOffset(0x3_0018));
        // Extended L2 entries are 16 bytes: entry 5 of a table at 0x50000 is at 0x50050.
        let g = Geometry::new(16, true);
        assert_eq!(
            HostOffset(0x5_0000).checked_entry(5, g.l2_entry_size()),
            Some(HostOffset(0x5_0050))
        );
        // Past 2^64: checked says so, saturating stops at the top.
        let top = HostOffset(u64::MAX - 7);
        assert_eq!(top.checked_entry(1, 16), None);
        assert_eq!(top.checked_entry(u64::MAX, 2), None);
        assert_eq!(top.saturating_entry(1, 16), HostOffset(u64::MAX));
        assert_eq!(top.checked_entry(0, 16), Some(top));
        // Snapshot table entries start on 8-byte boundaries: an entry of 40 + 1 + 5
        // bytes at 0x10000 ends at 0x1002e, so the next one starts at 0x10030.
        assert_eq!(HostOffset(0x1_002e).align8_up(), HostOffset(0x1_0030));
        assert_eq!(HostOffset(0x1_0030).align8_up(), HostOffset(0x1_0030));
        assert_eq!(HostOffset(u64::MAX).align8_up(), HostOffset(u64::MAX - 7));
        assert_eq!(u64::from(HostOffset(0x3_0018)), 0x3_0018);
        assert_eq!(format!("{:>#9x}", HostOffset(0x3_0018)), "  0x30018");
    }

    #[test]
    fn hex_string_serialises_a_host_offset_as_its_hex_text() {
        #[derive(Serialize)]
        struct S {
            #[serde(serialize_with = "hex_string")]
            at: HostOffset,
            #[serde(serialize_with = "hex_string_opt")]
            maybe: Option<HostOffset>,
            #[serde(
                serialize_with = "hex_string_opt",
                skip_serializing_if = "Option::is_none"
            )]
            skipped: Option<HostOffset>,
            plain: HostOffset,
        }
        let v = |maybe| S {
            at: HostOffset(0x3_0000),
            maybe,
            skipped: None,
            plain: HostOffset(0x3_0000),
        };
        assert_eq!(
            serde_json::to_string(&v(Some(HostOffset(u64::MAX))))
                .ok()
                .as_deref(),
            Some(r#"{"at":"0x30000","maybe":"0xffffffffffffffff","plain":196608}"#)
        );
        assert_eq!(
            serde_json::to_string(&v(None)).ok().as_deref(),
            Some(r#"{"at":"0x30000","maybe":null,"plain":196608}"#)
        );
        assert_eq!(
            serde_json::to_string(&v(Some(HostOffset(0))))
                .ok()
                .as_deref(),
            Some(r#"{"at":"0x30000","maybe":"0x0","plain":196608}"#)
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(65536), "64 KiB");
        assert_eq!(human_size(1 << 40), "1 TiB");
        assert_eq!(human_size(1536 * 1024), "1.5 MiB");
        assert_eq!(human_size(1000), "1000 B");
    }

    proptest! {
        /// guest offset -> (L1 index, L2 index, in-cluster) -> guest offset is the
        /// identity, for every cluster size, with and without extended L2.
        #[test]
        fn split_and_join_is_identity(
            bits in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS,
            ext in any::<bool>(),
            off in any::<u64>(),
        ) {
            let ext = ext && bits >= 14;
            let g = Geometry::new(bits, ext);
            let o = GuestOffset(off);
            let back = g.guest_offset(g.l1_index(o), g.l2_index(o), g.in_cluster(o));
            prop_assert_eq!(back, Some(o));
            prop_assert!(g.l2_index(o) < g.l2_entries());
            prop_assert!(g.in_cluster(o) < g.cluster_size());
        }
    }
}

//! L2 entries: the raw words, the decoded [`L2Mapping`], and QEMU's cluster and
//! subcluster types.

use super::{
    CompressedDescriptor, L2_BITMAP_ALL_ZEROES, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK,
    OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use crate::types::{Geometry, GuestOffset, HostOffset, SUBCLUSTERS_PER_CLUSTER, low_mask};
use serde::Serialize;

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
    /// An entry from its standard word alone (no subcluster bitmap).
    pub const fn from_word(raw: u64) -> Self {
        L2Entry { raw, bitmap: 0 }
    }
    /// Bit 63.
    pub fn copied(&self) -> bool {
        self.raw & OFLAG_COPIED != 0
    }
    /// The same entry with bit 63 set or cleared; every other bit (and the
    /// bitmap) kept.
    pub fn with_copied(self, copied: bool) -> Self {
        let raw = if copied {
            self.raw | OFLAG_COPIED
        } else {
            self.raw & !OFLAG_COPIED
        };
        L2Entry { raw, ..self }
    }
    /// The entry made to read as zeros, its host cluster (if any) kept: with
    /// standard entries bit 0 set; with extended L2 the bitmap replaced by
    /// `QCOW_L2_BITMAP_ALL_ZEROES` (every zero bit 32..63, no allocation bit),
    /// the standard word kept.
    pub fn with_zero(self, geo: &Geometry) -> Self {
        if geo.extended_l2 {
            L2Entry {
                bitmap: L2_BITMAP_ALL_ZEROES,
                ..self
            }
        } else {
            L2Entry {
                raw: self.raw | OFLAG_ZERO,
                ..self
            }
        }
    }
    /// An entry with no host cluster that reads as zeros: what a v3 discard
    /// leaves ([`with_zero`](Self::with_zero) of an unallocated entry).
    pub fn zeroed(geo: &Geometry) -> Self {
        L2Entry::from_word(0).with_zero(geo)
    }
    /// Extended L2: subclusters `first..first + count` (cut at 32) made to
    /// read as zeros: their zero bits (32 + n) set, their allocation bits (n)
    /// cleared; the standard word and other subclusters kept.
    pub fn with_subclusters_zeroed(self, first: u64, count: u64) -> Self {
        let all = u64::from(SUBCLUSTERS_PER_CLUSTER);
        let end = first.saturating_add(count).min(all);
        // first < end <= 32, or the mask is empty.
        let n = u32::try_from(end.saturating_sub(first)).unwrap_or(0);
        let mask = u32::try_from(first)
            .ok()
            .and_then(|f| low_mask(n).checked_shl(f))
            .unwrap_or(0);
        L2Entry {
            bitmap: (self.bitmap | (mask << SUBCLUSTERS_PER_CLUSTER)) & !mask,
            ..self
        }
    }
    /// Bit 0 as stored: the zero flag of a standard L2 entry (reserved with
    /// extended L2, where the bitmap says which subclusters read as zeros).
    pub fn zero_flag(&self) -> bool {
        self.raw & OFLAG_ZERO != 0
    }
    /// Bits of the standard reserved mask (61..56 and 8..1) that are set, whatever
    /// the entry's kind. `qemu-img check` tests this mask alone, also with
    /// extended L2; [`L2Entry::reserved_bits`] is what a read rejects.
    pub fn std_reserved_bits(&self) -> u64 {
        self.raw & L2E_STD_RESERVED_MASK
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
        self.words(&self.mapping(geo, has_data_file), geo, None, true)
    }

    /// [`describe`](Self::describe) for the entry that maps `guest` on a disk of
    /// `disk_size` bytes. No guest read reaches an entry at or past the end of the
    /// disk, and the description says so (for an unallocated one, in place of what
    /// a read would do there).
    pub fn describe_at(
        &self,
        geo: &Geometry,
        has_data_file: bool,
        guest: GuestOffset,
        disk_size: u64,
    ) -> String {
        let around = Surroundings {
            data_file: None,
            backing: true,
            disk_size,
        };
        self.describe_in(&self.mapping(geo, has_data_file), geo, guest, &around)
    }

    /// [`describe_at`](Self::describe_at) in the words of the image around the
    /// table: a host cluster in the external data file is said to be in it (by
    /// the name `around` gives), and with no backing file an unallocated entry
    /// reads as zeros. `m` is this entry's [`mapping`](Self::mapping) with
    /// `has_data_file` set when `around` names a data file (taken rather than
    /// worked out again, for callers that have it at hand).
    pub fn describe_in(
        &self,
        m: &L2Mapping,
        geo: &Geometry,
        guest: GuestOffset,
        around: &Surroundings<'_>,
    ) -> String {
        let words = || self.words(m, geo, around.data_file, around.backing);
        if guest.get() < around.disk_size {
            words()
        } else if self.raw == 0 && self.bitmap == 0 {
            "past disk end: never read".to_string()
        } else {
            format!("{}; past disk end: never read", words())
        }
    }

    /// The entry described: `m` is its mapping, `data_file` the data file the
    /// host clusters it names are in (None: in the image), `backing` whether
    /// an unallocated entry's reads fall through to a backing file.
    fn words(
        &self,
        m: &L2Mapping,
        geo: &Geometry,
        data_file: Option<&str>,
        backing: bool,
    ) -> String {
        let at = |host: HostOffset| match data_file {
            Some(name) => format!("{host} in {name}"),
            None => host.to_string(),
        };
        let mut s = match *m {
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
            } => format!("reads as zeros, host cluster {} kept allocated", at(host)),
            L2Mapping::Unallocated {
                subclusters: Some(_),
            } => "no host cluster; subclusters follow the bitmap".to_string(),
            L2Mapping::Unallocated { subclusters: None } if backing => {
                "unallocated: reads fall through to the backing file".to_string()
            }
            L2Mapping::Unallocated { subclusters: None } => {
                "unallocated: reads as zeros: no backing file".to_string()
            }
            L2Mapping::Data { host, .. } if geo.is_cluster_aligned(host.0) => {
                format!("data at host offset {}", at(host))
            }
            L2Mapping::Data { host, .. } => format!(
                "data at host offset {}, NOT cluster-aligned (QEMU fails reads with EIO)",
                at(host)
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

/// The image around an L2 table, as the words for one of its entries name it
/// ([`L2Entry::describe_in`]).
#[derive(Clone, Copy, Debug)]
pub struct Surroundings<'a> {
    /// The external data file the host clusters of the entries are in, by the
    /// words that name it, when the image has one.
    pub data_file: Option<&'a str>,
    /// Whether the image names a backing file, for an unallocated entry's
    /// reads to fall through to (without one they read as zeros).
    pub backing: bool,
    /// The size of the disk the table maps (a snapshot's own, for its tables).
    pub disk_size: u64,
}

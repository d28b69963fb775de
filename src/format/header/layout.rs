//! The header's field layout, written once: every field's name, offset, size and
//! what the specification says it holds, in on-disk order.
//!
//! [`Header::parse`] reads the fields at these offsets, [`Header::fields`] lists them
//! with their meaning for one image, and errors about a field name its offset from
//! here, so `qinspect::header::Field::L1TableOffset.offset()` is the one place that
//! says the active L1 table's offset sits at byte 40.

use super::{
    CompressionType, CryptMethod, FeatureGroup, Header, QCOW2_MAGIC, V3_MIN_HEADER_LEN,
    features::describe_bits,
};
use crate::bytes::{be32, be64, u8_at};
use crate::types::{HostOffset, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use serde::Serialize;

/// One field of the qcow2 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// `magic`, bytes 0..4: "QFI\xfb".
    Magic,
    /// `version`, bytes 4..8: 2 or 3.
    Version,
    /// `backing_file_offset`, bytes 8..16: where the backing file name is (0: none).
    BackingFileOffset,
    /// `backing_file_size`, bytes 16..20: the backing file name's length.
    BackingFileSize,
    /// `cluster_bits`, bytes 20..24: log2 of the cluster size.
    ClusterBits,
    /// `size`, bytes 24..32: the virtual disk size in bytes.
    Size,
    /// `crypt_method`, bytes 32..36: 0 none, 1 AES, 2 LUKS.
    CryptMethod,
    /// `l1_size`, bytes 36..40: entries in the active L1 table.
    L1Size,
    /// `l1_table_offset`, bytes 40..48: where the active L1 table is.
    L1TableOffset,
    /// `refcount_table_offset`, bytes 48..56: where the refcount table is.
    RefcountTableOffset,
    /// `refcount_table_clusters`, bytes 56..60: the refcount table's length in clusters.
    RefcountTableClusters,
    /// `nb_snapshots`, bytes 60..64: the number of internal snapshots.
    NbSnapshots,
    /// `snapshots_offset`, bytes 64..72: where the snapshot table is.
    SnapshotsOffset,
    /// `incompatible_features`, bytes 72..80 (version 3).
    IncompatibleFeatures,
    /// `compatible_features`, bytes 80..88 (version 3).
    CompatibleFeatures,
    /// `autoclear_features`, bytes 88..96 (version 3).
    AutoclearFeatures,
    /// `refcount_order`, bytes 96..100 (version 3): log2 of the refcount width in bits.
    RefcountOrder,
    /// `header_length`, bytes 100..104 (version 3): where the extensions start.
    HeaderLength,
    /// `compression_type`, byte 104 (version 3, when `header_length` > 104).
    CompressionType,
}

/// Every header field, in on-disk order.
pub const FIELDS: [Field; 19] = [
    Field::Magic,
    Field::Version,
    Field::BackingFileOffset,
    Field::BackingFileSize,
    Field::ClusterBits,
    Field::Size,
    Field::CryptMethod,
    Field::L1Size,
    Field::L1TableOffset,
    Field::RefcountTableOffset,
    Field::RefcountTableClusters,
    Field::NbSnapshots,
    Field::SnapshotsOffset,
    Field::IncompatibleFeatures,
    Field::CompatibleFeatures,
    Field::AutoclearFeatures,
    Field::RefcountOrder,
    Field::HeaderLength,
    Field::CompressionType,
];

impl Field {
    /// The field's name in the specification (`docs/interop/qcow2.rst`).
    pub const fn name(self) -> &'static str {
        self.layout().0
    }

    /// The field's byte offset in the header.
    pub const fn offset(self) -> u64 {
        self.layout().1
    }

    /// The field's width in bytes (1, 4 or 8; all big-endian).
    pub const fn size(self) -> u64 {
        self.layout().2
    }

    /// The first header version that has the field (2 or 3).
    pub const fn since_version(self) -> u32 {
        self.layout().3
    }

    /// The byte offset just past the field.
    pub const fn end(self) -> u64 {
        // At most 104 + 8: no overflow.
        self.offset().saturating_add(self.size())
    }

    /// (name, offset, size, first version), the one table of the layout.
    const fn layout(self) -> (&'static str, u64, u64, u32) {
        match self {
            Field::Magic => ("magic", 0, 4, 2),
            Field::Version => ("version", 4, 4, 2),
            Field::BackingFileOffset => ("backing_file_offset", 8, 8, 2),
            Field::BackingFileSize => ("backing_file_size", 16, 4, 2),
            Field::ClusterBits => ("cluster_bits", 20, 4, 2),
            Field::Size => ("size", 24, 8, 2),
            Field::CryptMethod => ("crypt_method", 32, 4, 2),
            Field::L1Size => ("l1_size", 36, 4, 2),
            Field::L1TableOffset => ("l1_table_offset", 40, 8, 2),
            Field::RefcountTableOffset => ("refcount_table_offset", 48, 8, 2),
            Field::RefcountTableClusters => ("refcount_table_clusters", 56, 4, 2),
            Field::NbSnapshots => ("nb_snapshots", 60, 4, 2),
            Field::SnapshotsOffset => ("snapshots_offset", 64, 8, 2),
            Field::IncompatibleFeatures => ("incompatible_features", 72, 8, 3),
            Field::CompatibleFeatures => ("compatible_features", 80, 8, 3),
            Field::AutoclearFeatures => ("autoclear_features", 88, 8, 3),
            Field::RefcountOrder => ("refcount_order", 96, 4, 3),
            Field::HeaderLength => ("header_length", 100, 4, 3),
            Field::CompressionType => ("compression_type", 104, 1, 3),
        }
    }

    /// The field's offset as an index into a buffer holding the header.
    fn at(self) -> usize {
        // Offsets are below 105.
        usize::from(u8::try_from(self.offset()).unwrap_or(u8::MAX))
    }

    /// Read the field from `buf` (the header's bytes) as an unsigned number; bytes
    /// past the end of `buf` read as zero.
    pub fn read(self, buf: &[u8]) -> u64 {
        match self.size() {
            1 => u64::from(u8_at(buf, self.at())),
            4 => u64::from(be32(buf, self.at())),
            _ => be64(buf, self.at()),
        }
    }

    /// Store `v` into the field in `buf` (the header's bytes), big-endian, in the
    /// field's own width (the high bytes of `v` that do not fit are dropped); a
    /// field past the end of `buf` is not written.
    pub fn write(self, buf: &mut [u8], v: u64) {
        let width = usize::try_from(self.size()).unwrap_or(8).min(8);
        let bytes = v.to_be_bytes();
        let from = 8usize.saturating_sub(width);
        if let (Some(dst), Some(src)) = (
            buf.get_mut(self.at()..self.at().saturating_add(width)),
            bytes.get(from..),
        ) {
            dst.copy_from_slice(src);
        }
    }

    /// Read a 4-byte field as stored (for the 1- and 8-byte fields use [`Field::read`]).
    pub(super) fn read32(self, buf: &[u8]) -> u32 {
        be32(buf, self.at())
    }

    /// This field's stored value in `h`.
    pub fn value(self, h: &Header) -> u64 {
        match self {
            Field::Magic => u64::from(h.magic),
            Field::Version => u64::from(h.version),
            Field::BackingFileOffset => h.backing_file_offset.get(),
            Field::BackingFileSize => u64::from(h.backing_file_size),
            Field::ClusterBits => u64::from(h.cluster_bits),
            Field::Size => h.size,
            Field::CryptMethod => u64::from(h.crypt_method),
            Field::L1Size => u64::from(h.l1_size),
            Field::L1TableOffset => h.l1_table_offset.get(),
            Field::RefcountTableOffset => h.refcount_table_offset.get(),
            Field::RefcountTableClusters => u64::from(h.refcount_table_clusters),
            Field::NbSnapshots => u64::from(h.nb_snapshots),
            Field::SnapshotsOffset => h.snapshots_offset.get(),
            Field::IncompatibleFeatures => h.incompatible_features,
            Field::CompatibleFeatures => h.compatible_features,
            Field::AutoclearFeatures => h.autoclear_features,
            Field::RefcountOrder => u64::from(h.refcount_order),
            Field::HeaderLength => u64::from(h.header_length),
            Field::CompressionType => u64::from(h.compression_type_raw),
        }
    }

    /// Whether `h` stores this field: version 3 fields only in version 3 headers,
    /// `compression_type` only when `header_length` is past it.
    pub fn present_in(self, h: &Header) -> bool {
        match self {
            Field::CompressionType => h.version >= 3 && h.header_length > V3_MIN_HEADER_LEN,
            f => h.version >= f.since_version(),
        }
    }

    /// What the field's value means for this header, in words.
    pub fn meaning(self, h: &Header) -> String {
        // Host cluster numbers: a shift by the clamped cluster_bits, no division.
        let bits = h.geometry().cluster_bits;
        let human = crate::types::human_size;
        // A cluster size QEMU does not support has no geometry to speak of: the
        // fields that depend on it are given in bytes and entries only.
        let supported = (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits);
        match self {
            Field::ClusterBits if !supported => format!(
                "clusters of {} bytes, a size QEMU does not support (2^{MIN_CLUSTER_BITS} to 2^{MAX_CLUSTER_BITS})",
                1u128 << h.cluster_bits.min(127)
            ),
            Field::L1Size if !supported => {
                format!("the active L1 table has {} entries", h.l1_size)
            }
            Field::L1TableOffset if !supported => {
                format!("active L1 table at byte {}", h.l1_table_offset)
            }
            Field::RefcountTableOffset if !supported => {
                format!("refcount table at byte {}", h.refcount_table_offset)
            }
            Field::SnapshotsOffset if !supported && h.nb_snapshots != 0 => {
                format!("snapshot table at byte {}", h.snapshots_offset)
            }
            Field::Magic if h.magic == QCOW2_MAGIC => "\"QFI\\xfb\": a qcow2 image".into(),
            Field::Magic => "not the qcow2 magic".into(),
            Field::Version => match h.version {
                2 => "qcow2 version 2 (compat=0.10)".into(),
                3 => "qcow2 version 3 (compat=1.1)".into(),
                v => format!("unknown version {v}"),
            },
            Field::BackingFileOffset if h.backing_file_offset.get() == 0 => {
                "no backing file".into()
            }
            Field::BackingFileOffset => {
                format!("backing file name stored at {}", h.backing_file_offset)
            }
            Field::BackingFileSize => {
                format!("backing file name is {} bytes long", h.backing_file_size)
            }
            Field::ClusterBits => {
                format!("clusters of {} bytes", 1u128 << h.cluster_bits.min(127))
            }
            Field::Size => format!("the guest sees a {} disk", human(h.size)),
            Field::CryptMethod => match h.crypt() {
                CryptMethod::None => "not encrypted".into(),
                CryptMethod::Aes => "legacy AES encryption".into(),
                CryptMethod::Luks => "LUKS encryption".into(),
                CryptMethod::Unknown(n) => format!("unknown encryption method {n}"),
            },
            Field::L1Size => format!(
                "the active L1 table has {} entries, each covering {}",
                h.l1_size,
                human(h.geometry().l2_coverage())
            ),
            Field::L1TableOffset => format!(
                "active L1 table at host cluster {}",
                h.l1_table_offset.get() >> bits
            ),
            Field::RefcountTableOffset => format!(
                "refcount table at host cluster {}",
                h.refcount_table_offset.get() >> bits
            ),
            Field::RefcountTableClusters => format!(
                "the refcount table fills {} cluster(s)",
                h.refcount_table_clusters
            ),
            Field::NbSnapshots => format!("{} internal snapshot(s)", h.nb_snapshots),
            Field::SnapshotsOffset if h.nb_snapshots == 0 => "no snapshot table".into(),
            Field::SnapshotsOffset => format!(
                "snapshot table at host cluster {}",
                h.snapshots_offset.get() >> bits
            ),
            Field::IncompatibleFeatures => {
                describe_bits(h.incompatible_features, FeatureGroup::Incompatible)
            }
            Field::CompatibleFeatures => {
                describe_bits(h.compatible_features, FeatureGroup::Compatible)
            }
            Field::AutoclearFeatures => {
                describe_bits(h.autoclear_features, FeatureGroup::Autoclear)
            }
            Field::RefcountOrder => format!(
                "refcounts are {} bit(s) wide",
                1u128 << h.refcount_order.min(127)
            ),
            Field::HeaderLength => format!("extensions start at byte {}", h.header_length),
            Field::CompressionType => match h.compression_type() {
                CompressionType::Deflate => "compressed clusters use deflate".into(),
                CompressionType::Zstd => "compressed clusters use zstd".into(),
                CompressionType::Unknown(n) => format!("unknown compression type {n}"),
            },
        }
    }
}

/// One field of the header, for the dump and the TUI.
#[derive(Clone, Debug, Serialize)]
pub struct HeaderField {
    /// Which field.
    #[serde(skip)]
    pub field: Field,
    /// Field name as in the specification.
    pub name: &'static str,
    /// Byte offset of the field in the file (the header starts at 0).
    pub offset: HostOffset,
    /// Size in bytes.
    pub size: u64,
    /// The value.
    pub value: u64,
    /// What it means.
    pub meaning: String,
}

impl Header {
    /// Every field this header stores, with its offset, size, value and meaning, in
    /// on-disk order (the layout is [`FIELDS`]).
    pub fn fields(&self) -> Vec<HeaderField> {
        FIELDS
            .iter()
            .filter(|f| f.present_in(self))
            .map(|&field| HeaderField {
                field,
                name: field.name(),
                offset: HostOffset(field.offset()),
                size: field.size(),
                value: field.value(self),
                meaning: field.meaning(self),
            })
            .collect()
    }
}

//! The qcow2 header (byte 0 of the file) and the header extensions after it.
//!
//! ```text
//!  0 magic "QFI\xfb"     4 version (2|3)      8 backing_file_offset  16 backing_file_size
//! 20 cluster_bits       24 size (virtual)    32 crypt_method         36 l1_size
//! 40 l1_table_offset    48 refcount_table_offset                     56 refcount_table_clusters
//! 60 nb_snapshots       64 snapshots_offset
//! version 3 only:
//! 72 incompatible_features  80 compatible_features  88 autoclear_features
//! 96 refcount_order        100 header_length       104 compression_type (if length > 104)
//! ```
//!
//! A version 2 header is 72 bytes and always has 16-bit refcounts. After the header
//! (at `header_length`) come the header extensions: `type:u32 length:u32 data`,
//! each padded to 8 bytes, ending with type 0. The backing file name, if any, is
//! stored elsewhere in cluster 0, at `backing_file_offset`, without a terminating NUL.
//!
//! The parts:
//!
//! * [`layout`] — the field layout, written once ([`Field`], [`FIELDS`]): each
//!   field's name, offset, size and meaning. Parsing, [`Header::fields`] and the
//!   simulations all read it.
//! * `parse` — decoding the header and judging it the way QEMU's open does.
//! * `extensions` — the header extensions after the header.
//! * `features` — the feature bits and their names.

mod extensions;
mod features;
pub mod layout;
mod parse;
#[cfg(test)]
mod tests;

pub use extensions::{Extension, ExtensionKind, parse_extensions};
pub use features::{BUILTIN_FEATURE_NAMES, Feature, FeatureGroup, FeatureName, named_features};
pub use layout::{FIELDS, Field, HeaderField};
pub use parse::OpenMode;

use crate::types::{Geometry, HostOffset};
use serde::Serialize;

/// "QFI\xfb".
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Size of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The version-3 header QEMU writes: the fields through `compression_type`
/// padded to a multiple of 8 (`sizeof(QCowHeader)`).
pub const V3_QEMU_HEADER_LEN: u32 = 112;

/// Extension type: name of the backing file's format.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension type: names of feature bits.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Extension type: persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Extension type: full-disk encryption (LUKS) header location.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found corruption and marked the image.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries with subclusters.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible bits QEMU 10 knows.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is a valid raw image by itself.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Compression used for compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    /// Raw deflate (zlib without header), type 0. QEMU calls it "zlib".
    Deflate,
    /// Zstandard frames, type 1.
    Zstd,
    /// Any other value (QEMU refuses the image).
    Unknown(u8),
}

impl CompressionType {
    /// The name `qemu-img info` uses.
    pub fn qemu_name(&self) -> String {
        match self {
            CompressionType::Deflate => "zlib".into(),
            CompressionType::Zstd => "zstd".into(),
            CompressionType::Unknown(n) => format!("unknown ({n})"),
        }
    }
}

/// Encryption method (header field `crypt_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CryptMethod {
    /// 0: not encrypted.
    None,
    /// 1: legacy AES-CBC (QEMU only opens it for conversion).
    Aes,
    /// 2: LUKS; the LUKS header sits where the crypto extension says.
    Luks,
    /// Anything else.
    Unknown(u32),
}

/// Every field of the header, as stored, plus what is implied for version 2.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Header {
    /// Must be [`QCOW2_MAGIC`].
    pub magic: u32,
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is (0 = no backing file).
    pub backing_file_offset: HostOffset,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Raw encryption method.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Where the active L1 table is.
    pub l1_table_offset: HostOffset,
    /// Where the refcount table is.
    pub refcount_table_offset: HostOffset,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table is.
    pub snapshots_offset: HostOffset,
    /// Incompatible feature bits (0 for version 2).
    pub incompatible_features: u64,
    /// Compatible feature bits (0 for version 2).
    pub compatible_features: u64,
    /// Autoclear feature bits (0 for version 2).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for version 2).
    pub refcount_order: u32,
    /// Length of the header; extensions start here (72 for version 2).
    pub header_length: u32,
    /// Compression type byte (0 unless header_length > 104).
    pub compression_type_raw: u8,
}

impl Header {
    /// Where the backing file name is, or `None` without a backing file.
    pub fn backing_file_name(&self) -> Option<HostOffset> {
        (self.backing_file_offset.get() != 0).then_some(self.backing_file_offset)
    }

    /// Cluster and L2 geometry (cluster_bits clamped to 9..=21; see [`Header::validate`]).
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.cluster_bits, self.extended_l2())
    }

    /// Cluster size in bytes (cluster_bits clamped to 9..=21).
    pub fn cluster_size(&self) -> u64 {
        self.geometry().cluster_size()
    }

    /// Incompatible bit 4.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Incompatible bit 2.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// Autoclear bit 1.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }

    /// Incompatible bit 0.
    pub fn dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Incompatible bit 1.
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Compatible bit 0.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (order clamped to 6).
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order.min(6)
    }

    /// The compression type.
    pub fn compression_type(&self) -> CompressionType {
        match self.compression_type_raw {
            0 => CompressionType::Deflate,
            1 => CompressionType::Zstd,
            n => CompressionType::Unknown(n),
        }
    }

    /// The encryption method.
    pub fn crypt(&self) -> CryptMethod {
        match self.crypt_method {
            0 => CryptMethod::None,
            1 => CryptMethod::Aes,
            2 => CryptMethod::Luks,
            n => CryptMethod::Unknown(n),
        }
    }

    /// Where the extension area ends: the backing file name, or the end of cluster 0.
    pub fn extensions_end(&self) -> u64 {
        let cs = self.cluster_size();
        let name = self.backing_file_offset.get();
        if name != 0 && name <= cs { name } else { cs }
    }
}

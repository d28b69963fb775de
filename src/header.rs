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

use crate::bytes::{align8, be32, be64, slice, text, u8_at};
use crate::error::{Error, Result};
use crate::types::{Geometry, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use serde::Serialize;

/// "QFI\xfb".
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Size of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;

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

/// Which of the three feature bitfields a bit belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureGroup {
    /// A reader that does not know the bit must refuse the image.
    Incompatible,
    /// A reader may ignore the bit.
    Compatible,
    /// A writer that does not know the bit must clear it.
    Autoclear,
}

impl FeatureGroup {
    /// The group's number in the feature-name table.
    pub fn from_table_type(t: u8) -> Option<Self> {
        match t {
            0 => Some(FeatureGroup::Incompatible),
            1 => Some(FeatureGroup::Compatible),
            2 => Some(FeatureGroup::Autoclear),
            _ => None,
        }
    }
}

/// The names QEMU gives feature bits, used when the image has no feature table.
pub const BUILTIN_FEATURE_NAMES: &[(FeatureGroup, u8, &str)] = &[
    (FeatureGroup::Incompatible, 0, "dirty bit"),
    (FeatureGroup::Incompatible, 1, "corrupt bit"),
    (FeatureGroup::Incompatible, 2, "external data file"),
    (FeatureGroup::Incompatible, 3, "compression type"),
    (FeatureGroup::Incompatible, 4, "extended L2 entries"),
    (FeatureGroup::Compatible, 0, "lazy refcounts"),
    (FeatureGroup::Autoclear, 0, "bitmaps"),
    (FeatureGroup::Autoclear, 1, "raw external data"),
];

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
    pub backing_file_offset: u64,
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
    pub l1_table_offset: u64,
    /// Where the refcount table is.
    pub refcount_table_offset: u64,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table is.
    pub snapshots_offset: u64,
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

/// One field of the header, for the dump and the TUI.
#[derive(Clone, Debug, Serialize)]
pub struct HeaderField {
    /// Field name as in the specification.
    pub name: &'static str,
    /// Byte offset of the field.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// The value.
    pub value: u64,
    /// What it means.
    pub meaning: String,
}

/// One of QEMU's `qcow2_validate_table` calls at open time.
struct TableCheck {
    /// The structure, for the error's `what`.
    field: &'static str,
    /// QEMU's name for it, which starts its messages.
    what: &'static str,
    /// Header offset of the field holding the table's offset.
    field_off: u64,
    /// The table's offset.
    off: u64,
    /// Its size (bytes, or entries for the snapshot table).
    size: u64,
    /// QEMU's limit for `size`.
    max: u64,
    /// The unit of `size`, for messages.
    unit: &'static str,
    /// Whether the check runs in this open mode.
    applies: bool,
}

/// How QEMU opens an image, which decides what it checks while opening.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OpenMode {
    /// An ordinary open (`qemu-img info`, `map`, `convert`, qemu-io, a VM).
    #[default]
    Normal,
    /// `qemu-img check` (`BDRV_O_CHECK`).
    Check,
}

impl Header {
    /// Decode a header from the first bytes of a file.
    ///
    /// Fails only if the magic is wrong or the buffer is shorter than the header the
    /// version requires; everything else is decoded as stored and judged by
    /// [`Header::validate`].
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < 8 {
            return Err(Error::Truncated {
                what: "qcow2 header".into(),
                offset: 0,
                len: u64::from(V2_HEADER_LEN),
                file_len: buf.len() as u64,
            });
        }
        let magic = be32(buf, 0);
        if magic != QCOW2_MAGIC {
            return Err(Error::invalid(
                "qcow2 header magic",
                0,
                format!("Image is not in qcow2 format (magic {magic:#010x}, expected 0x514649fb)"),
            ));
        }
        let version = be32(buf, 4);
        let need = if version >= 3 {
            u64::from(V3_MIN_HEADER_LEN)
        } else {
            u64::from(V2_HEADER_LEN)
        };
        if (buf.len() as u64) < need {
            return Err(Error::Truncated {
                what: format!("qcow2 version {version} header"),
                offset: 0,
                len: need,
                file_len: buf.len() as u64,
            });
        }
        let mut h = Header {
            magic,
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type_raw: 0,
        };
        if version >= 3 {
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length > V3_MIN_HEADER_LEN {
                h.compression_type_raw = u8_at(buf, 104);
            }
        }
        Ok(h)
    }

    /// The reasons QEMU 10 would refuse to open an image with this header, in the
    /// order `qcow2_do_open` checks them, with QEMU's wording. `file_len` is the
    /// length of the image file. Empty when QEMU accepts the header.
    pub fn validate(&self, file_len: u64) -> Vec<Error> {
        self.validate_for(file_len, OpenMode::Normal)
    }

    /// [`Header::validate`] as QEMU's open in `mode` sees it: `qemu-img check`
    /// (`BDRV_O_CHECK`) opens images without a refcount table and does not look at
    /// the snapshot table's offset and count while opening.
    pub fn validate_for(&self, file_len: u64, mode: OpenMode) -> Vec<Error> {
        let check = mode == OpenMode::Check;
        let mut out = Vec::new();
        let bad = |field: &str, off: u64, msg: String| Error::invalid(field, off, msg);
        if self.version != 2 && self.version != 3 {
            out.push(bad(
                "header version",
                4,
                format!("Unsupported qcow2 version {}", self.version),
            ));
            return out;
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            out.push(bad(
                "header cluster_bits",
                20,
                format!("Unsupported cluster size: 2^{}", self.cluster_bits),
            ));
            return out;
        }
        let cs = 1u64 << self.cluster_bits;
        if self.version >= 3 {
            if self.header_length < V3_MIN_HEADER_LEN {
                out.push(bad(
                    "header header_length",
                    100,
                    format!("qcow2 header too short ({} bytes)", self.header_length),
                ));
            }
            if u64::from(self.header_length) > cs {
                out.push(bad(
                    "header header_length",
                    100,
                    format!(
                        "qcow2 header exceeds cluster size ({} > {cs})",
                        self.header_length
                    ),
                ));
            }
        }
        if self.backing_file_offset > cs {
            out.push(bad(
                "header backing_file_offset",
                8,
                format!(
                    "Invalid backing file offset {:#x}",
                    self.backing_file_offset
                ),
            ));
        }
        let compression_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match self.compression_type_raw {
            0 if compression_bit => out.push(bad(
                "header compression_type",
                104,
                "qcow2: Compression type incompatible feature bit must not be set (compression type 0, deflate, with incompatible bit 3)".into(),
            )),
            1 if !compression_bit => out.push(bad(
                "header compression_type",
                104,
                "qcow2: Compression type incompatible feature bit must be set (compression type 1, zstd, without incompatible bit 3)".into(),
            )),
            0 | 1 => {}
            n => out.push(bad(
                "header compression_type",
                104,
                format!("qcow2: unknown compression type: {n}"),
            )),
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            out.push(bad(
                "header incompatible_features",
                72,
                format!("Unsupported qcow2 feature(s): bits {}", bit_list(unknown)),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            out.push(bad(
                "header cluster_bits",
                20,
                format!(
                    "Unsupported subcluster size: {} bytes (extended L2 needs clusters of at least 16 KiB)",
                    cs / 32
                ),
            ));
        }
        if self.refcount_order > 6 {
            out.push(bad(
                "header refcount_order",
                96,
                format!(
                    "Reference count entry width too large; may not exceed 64 bits (order {})",
                    self.refcount_order
                ),
            ));
        }
        if self.crypt_method > 2 {
            out.push(bad(
                "header crypt_method",
                32,
                format!("Unsupported encryption method {}", self.crypt_method),
            ));
        }
        let geo = self.geometry();
        // QEMU's open, in its order: no refcount table (not in check mode), then
        // qcow2_validate_table for the refcount table, the snapshot table (not in
        // check mode) and the L1 table. The offset must be cluster-aligned even
        // when the table is empty.
        if self.refcount_table_clusters == 0 && !check {
            out.push(bad(
                "refcount table",
                56,
                "Image does not contain a reference count table".into(),
            ));
        }
        let table_checks = [
            TableCheck {
                field: "refcount table",
                what: "Reference count table",
                field_off: 48,
                off: self.refcount_table_offset,
                size: u64::from(self.refcount_table_clusters).saturating_mul(cs),
                max: crate::refcount::MAX_REFTABLE_BYTES,
                unit: " bytes",
                applies: true,
            },
            TableCheck {
                field: "snapshot table",
                what: "Snapshot table",
                field_off: 64,
                off: self.snapshots_offset,
                size: u64::from(self.nb_snapshots),
                max: crate::snapshot::MAX_SNAPSHOTS,
                unit: " entries",
                applies: !check,
            },
            TableCheck {
                field: "L1 table",
                what: "Active L1 table",
                field_off: 40,
                off: self.l1_table_offset,
                size: u64::from(self.l1_size).saturating_mul(8),
                max: crate::tables::MAX_L1_BYTES,
                unit: " bytes",
                applies: true,
            },
        ];
        for TableCheck {
            field,
            what,
            field_off,
            off,
            size,
            max,
            unit,
            applies,
        } in table_checks
        {
            if !applies {
                continue;
            }
            if size > max {
                out.push(bad(
                    field,
                    field_off,
                    format!("{what} too large ({size}{unit}, limit {max})"),
                ));
            } else if off.checked_add(size).is_none_or(|e| e > i64::MAX as u64) {
                out.push(bad(
                    field,
                    field_off,
                    format!("{what} offset invalid ({off:#x} plus the table's size passes 2^63)"),
                ));
            } else if !geo.is_cluster_aligned(off) {
                out.push(bad(
                    field,
                    field_off,
                    format!("{what} offset invalid ({off:#x} is not aligned to a cluster)"),
                ));
            }
        }
        let needed_l1 = geo.l1_entries_for(self.size);
        if needed_l1 > i32::MAX as u64 {
            out.push(bad(
                "header size",
                24,
                format!("Image is too big ({} bytes)", self.size),
            ));
        } else if u64::from(self.l1_size) < needed_l1 {
            out.push(bad(
                "header l1_size",
                36,
                format!(
                    "L1 table is too small ({} entries, {needed_l1} needed for {} bytes)",
                    self.l1_size, self.size
                ),
            ));
        }
        let _ = file_len;
        out
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
        if self.backing_file_offset != 0 && self.backing_file_offset <= cs {
            self.backing_file_offset
        } else {
            cs
        }
    }

    /// Every field with its offset, size and meaning, in on-disk order.
    pub fn fields(&self) -> Vec<HeaderField> {
        // Host cluster numbers: a shift by the clamped cluster_bits, no division.
        let bits = self.geometry().cluster_bits;
        let mut v = vec![
            f(
                "magic",
                0,
                4,
                u64::from(self.magic),
                if self.magic == QCOW2_MAGIC {
                    "\"QFI\\xfb\": a qcow2 image".into()
                } else {
                    "not the qcow2 magic".into()
                },
            ),
            f(
                "version",
                4,
                4,
                u64::from(self.version),
                match self.version {
                    2 => "qcow2 version 2 (compat=0.10)".into(),
                    3 => "qcow2 version 3 (compat=1.1)".into(),
                    v => format!("unknown version {v}"),
                },
            ),
            f(
                "backing_file_offset",
                8,
                8,
                self.backing_file_offset,
                if self.backing_file_offset == 0 {
                    "no backing file".into()
                } else {
                    format!(
                        "backing file name stored at {:#x}",
                        self.backing_file_offset
                    )
                },
            ),
            f(
                "backing_file_size",
                16,
                4,
                u64::from(self.backing_file_size),
                format!("backing file name is {} bytes long", self.backing_file_size),
            ),
            f(
                "cluster_bits",
                20,
                4,
                u64::from(self.cluster_bits),
                format!("clusters of {} bytes", 1u128 << self.cluster_bits.min(127)),
            ),
            f(
                "size",
                24,
                8,
                self.size,
                format!(
                    "the guest sees a {} disk",
                    crate::types::human_size(self.size)
                ),
            ),
            f(
                "crypt_method",
                32,
                4,
                u64::from(self.crypt_method),
                match self.crypt() {
                    CryptMethod::None => "not encrypted".into(),
                    CryptMethod::Aes => "legacy AES encryption".into(),
                    CryptMethod::Luks => "LUKS encryption".into(),
                    CryptMethod::Unknown(n) => format!("unknown encryption method {n}"),
                },
            ),
            f(
                "l1_size",
                36,
                4,
                u64::from(self.l1_size),
                format!(
                    "the active L1 table has {} entries, each covering {}",
                    self.l1_size,
                    crate::types::human_size(self.geometry().l2_coverage())
                ),
            ),
            f(
                "l1_table_offset",
                40,
                8,
                self.l1_table_offset,
                format!(
                    "active L1 table at host cluster {}",
                    self.l1_table_offset >> bits
                ),
            ),
            f(
                "refcount_table_offset",
                48,
                8,
                self.refcount_table_offset,
                format!(
                    "refcount table at host cluster {}",
                    self.refcount_table_offset >> bits
                ),
            ),
            f(
                "refcount_table_clusters",
                56,
                4,
                u64::from(self.refcount_table_clusters),
                format!(
                    "the refcount table fills {} cluster(s)",
                    self.refcount_table_clusters
                ),
            ),
            f(
                "nb_snapshots",
                60,
                4,
                u64::from(self.nb_snapshots),
                format!("{} internal snapshot(s)", self.nb_snapshots),
            ),
            f(
                "snapshots_offset",
                64,
                8,
                self.snapshots_offset,
                if self.nb_snapshots == 0 {
                    "no snapshot table".into()
                } else {
                    format!(
                        "snapshot table at host cluster {}",
                        self.snapshots_offset >> bits
                    )
                },
            ),
        ];
        if self.version >= 3 {
            v.push(f(
                "incompatible_features",
                72,
                8,
                self.incompatible_features,
                describe_bits(self.incompatible_features, FeatureGroup::Incompatible),
            ));
            v.push(f(
                "compatible_features",
                80,
                8,
                self.compatible_features,
                describe_bits(self.compatible_features, FeatureGroup::Compatible),
            ));
            v.push(f(
                "autoclear_features",
                88,
                8,
                self.autoclear_features,
                describe_bits(self.autoclear_features, FeatureGroup::Autoclear),
            ));
            v.push(f(
                "refcount_order",
                96,
                4,
                u64::from(self.refcount_order),
                format!(
                    "refcounts are {} bit(s) wide",
                    1u128 << self.refcount_order.min(127)
                ),
            ));
            v.push(f(
                "header_length",
                100,
                4,
                u64::from(self.header_length),
                format!("extensions start at byte {}", self.header_length),
            ));
            if self.header_length > V3_MIN_HEADER_LEN {
                v.push(f(
                    "compression_type",
                    104,
                    1,
                    u64::from(self.compression_type_raw),
                    match self.compression_type() {
                        CompressionType::Deflate => "compressed clusters use deflate".into(),
                        CompressionType::Zstd => "compressed clusters use zstd".into(),
                        CompressionType::Unknown(n) => format!("unknown compression type {n}"),
                    },
                ));
            }
        }
        v
    }
}

fn f(name: &'static str, offset: u64, size: u64, value: u64, meaning: String) -> HeaderField {
    HeaderField {
        name,
        offset,
        size,
        value,
        meaning,
    }
}

fn bit_list(bits: u64) -> String {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_bits(bits: u64, group: FeatureGroup) -> String {
    if bits == 0 {
        return "none set".into();
    }
    (0..64u8)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| {
            BUILTIN_FEATURE_NAMES
                .iter()
                .find(|(g, bit, _)| *g == group && *bit == b)
                .map(|(_, _, n)| (*n).to_string())
                .unwrap_or_else(|| format!("unknown bit {b}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One entry of the feature-name table extension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FeatureName {
    /// Group (None if the type byte is not 0, 1 or 2).
    pub group: Option<FeatureGroup>,
    /// Raw type byte.
    pub group_raw: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (up to 46 bytes, NUL-padded on disk).
    pub name: String,
}

/// A set feature bit, named.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Feature {
    /// Which bitfield.
    pub group: FeatureGroup,
    /// Bit number.
    pub bit: u8,
    /// Name from the image's feature table, QEMU's built-in name, or "unknown".
    pub name: String,
    /// Whether QEMU 10 knows this bit.
    pub known: bool,
}

/// Decoded meaning of a header extension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExtensionKind {
    /// The backing file's format name ("raw", "qcow2", ...).
    BackingFormat {
        /// The name.
        format: String,
    },
    /// Names of feature bits.
    FeatureTable {
        /// The entries.
        names: Vec<FeatureName>,
    },
    /// Where the bitmap directory is.
    Bitmaps {
        /// Number of bitmaps.
        nb_bitmaps: u32,
        /// Must be 0.
        reserved: u32,
        /// Directory size in bytes.
        directory_size: u64,
        /// Directory offset.
        directory_offset: u64,
    },
    /// Where the LUKS header is.
    Crypto {
        /// Offset of the LUKS header.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// The external data file's name.
    DataFile {
        /// The name as stored.
        name: String,
    },
    /// A type qinspect does not know (kept as raw bytes).
    Unknown,
}

/// One header extension, where it sits and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Extension {
    /// Offset of the extension's type field in the file.
    pub offset: u64,
    /// Raw type.
    pub ext_type: u32,
    /// Length of the data.
    pub length: u32,
    /// The data bytes.
    #[serde(skip)]
    pub data: Vec<u8>,
    /// Decoded meaning.
    #[serde(flatten)]
    pub kind: ExtensionKind,
}

impl Extension {
    /// A short name for the type.
    pub fn type_name(&self) -> &'static str {
        match self.ext_type {
            EXT_BACKING_FORMAT => "backing format",
            EXT_FEATURE_TABLE => "feature name table",
            EXT_BITMAPS => "bitmaps",
            EXT_CRYPTO => "full disk encryption header",
            EXT_DATA_FILE => "external data file",
            _ => "unknown",
        }
    }
}

/// Read the header extensions from cluster 0 (`buf` holds at least the first
/// `extensions_end()` bytes, or the whole file if shorter).
///
/// Returns the extensions found and, if the area is malformed, the error that
/// stopped the walk (QEMU refuses such an image: "Header extension too large" etc.).
pub fn parse_extensions(h: &Header, buf: &[u8]) -> (Vec<Extension>, Option<Error>) {
    let mut out = Vec::new();
    if h.version < 3 {
        // Version 2 images may carry extensions too, right after the 72-byte header.
    }
    let end = h.extensions_end();
    let mut off = u64::from(h.header_length);
    loop {
        if off >= end {
            break;
        }
        if off.saturating_add(8) > end {
            return (
                out,
                Some(Error::invalid(
                    "header extension",
                    off,
                    format!("Header extension too large (header ends at {end:#x})"),
                )),
            );
        }
        let Ok(o) = usize::try_from(off) else { break };
        if o.saturating_add(8) > buf.len() {
            return (
                out,
                Some(Error::Truncated {
                    what: "header extension".into(),
                    offset: off,
                    len: 8,
                    file_len: buf.len() as u64,
                }),
            );
        }
        let ext_type = be32(buf, o);
        let length = be32(buf, o.saturating_add(4));
        if ext_type == 0 {
            break;
        }
        let data_off = off.saturating_add(8);
        if data_off.saturating_add(u64::from(length)) > end {
            return (
                out,
                Some(Error::invalid(
                    "header extension",
                    off,
                    format!(
                        "Header extension too large (type {ext_type:#010x}, {length} bytes, area ends at {end:#x})"
                    ),
                )),
            );
        }
        let data = slice(buf, o.saturating_add(8), length as usize).to_vec();
        let kind = decode_extension(ext_type, &data);
        out.push(Extension {
            offset: off,
            ext_type,
            length,
            data,
            kind,
        });
        off = data_off.saturating_add(align8(u64::from(length)));
    }
    (out, None)
}

fn nul_trimmed(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    text(b.get(..end).unwrap_or(b))
}

fn decode_extension(ext_type: u32, data: &[u8]) -> ExtensionKind {
    match ext_type {
        EXT_BACKING_FORMAT => ExtensionKind::BackingFormat {
            format: nul_trimmed(data),
        },
        EXT_FEATURE_TABLE => ExtensionKind::FeatureTable {
            names: data
                .chunks_exact(48)
                .map(|e| {
                    let t = u8_at(e, 0);
                    FeatureName {
                        group: FeatureGroup::from_table_type(t),
                        group_raw: t,
                        bit: u8_at(e, 1),
                        name: nul_trimmed(slice(e, 2, 46)),
                    }
                })
                .collect(),
        },
        EXT_BITMAPS => ExtensionKind::Bitmaps {
            nb_bitmaps: be32(data, 0),
            reserved: be32(data, 4),
            directory_size: be64(data, 8),
            directory_offset: be64(data, 16),
        },
        EXT_CRYPTO => ExtensionKind::Crypto {
            offset: be64(data, 0),
            length: be64(data, 8),
        },
        EXT_DATA_FILE => ExtensionKind::DataFile {
            name: nul_trimmed(data),
        },
        _ => ExtensionKind::Unknown,
    }
}

/// Every set feature bit of the header with its name.
pub fn named_features(h: &Header, exts: &[Extension]) -> Vec<Feature> {
    let table: Vec<&FeatureName> = exts
        .iter()
        .filter_map(|e| match &e.kind {
            ExtensionKind::FeatureTable { names } => Some(names.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let mut out = Vec::new();
    for (group, bits, known_mask) in [
        (
            FeatureGroup::Incompatible,
            h.incompatible_features,
            INCOMPAT_KNOWN,
        ),
        (
            FeatureGroup::Compatible,
            h.compatible_features,
            COMPAT_LAZY_REFCOUNTS,
        ),
        (
            FeatureGroup::Autoclear,
            h.autoclear_features,
            AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW,
        ),
    ] {
        for bit in 0..64u8 {
            if bits & (1u64 << bit) == 0 {
                continue;
            }
            let from_table = table
                .iter()
                .find(|n| n.group == Some(group) && n.bit == bit)
                .map(|n| n.name.clone());
            let builtin = BUILTIN_FEATURE_NAMES
                .iter()
                .find(|(g, b, _)| *g == group && *b == bit)
                .map(|(_, _, n)| (*n).to_string());
            out.push(Feature {
                group,
                bit,
                name: from_table
                    .or(builtin)
                    .unwrap_or_else(|| format!("unknown {group:?} bit {bit}").to_lowercase()),
                known: known_mask & (1u64 << bit) != 0,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3_header() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn parses_v3_fields() {
        let h = Header::parse(&v3_header()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.compression_type(), CompressionType::Deflate);
        assert!(h.validate(1 << 20).is_empty(), "{:?}", h.validate(1 << 20));
    }

    #[test]
    fn v2_implies_refcount_order_4() {
        let mut b = v3_header();
        b[4..8].copy_from_slice(&2u32.to_be_bytes());
        b[96..100].copy_from_slice(&6u32.to_be_bytes());
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.header_length, 72);
        assert_eq!(h.incompatible_features, 0);
    }

    #[test]
    fn rejects_bad_magic_and_short_buffers() {
        let mut b = v3_header();
        b[0] = 0;
        assert!(
            Header::parse(&b)
                .unwrap_err()
                .to_string()
                .contains("not in qcow2 format")
        );
        assert!(matches!(
            Header::parse(&v3_header()[..50]),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn validate_uses_qemu_messages() {
        let mut b = v3_header();
        b[20..24].copy_from_slice(&8u32.to_be_bytes());
        let e = Header::parse(&b).unwrap().validate(0);
        assert!(e[0].to_string().contains("Unsupported cluster size: 2^8"));
        let mut b = v3_header();
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        b[96..100].copy_from_slice(&7u32.to_be_bytes());
        b[32..36].copy_from_slice(&9u32.to_be_bytes());
        let e: Vec<String> = Header::parse(&b)
            .unwrap()
            .validate(0)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert!(
            e.iter()
                .any(|m| m.contains("Unsupported qcow2 feature(s): bits 9")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|m| m.contains("Reference count entry width too large"))
        );
        assert!(
            e.iter()
                .any(|m| m.contains("Unsupported encryption method 9"))
        );
        let mut b = v3_header();
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let e = Header::parse(&b).unwrap().validate(0);
        assert!(e[0].to_string().contains("L1 table is too small"));
    }

    #[test]
    fn walks_extensions_and_names_features() {
        let mut b = v3_header();
        // backing format "raw"
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&3u32.to_be_bytes());
        b[120..123].copy_from_slice(b"raw");
        // feature table with one entry naming incompatible bit 0
        b[128..132].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b[132..136].copy_from_slice(&48u32.to_be_bytes());
        b[136] = 0;
        b[137] = 0;
        b[138..143].copy_from_slice(b"dirty");
        b[72..80].copy_from_slice(&(1u64 | 1 << 40).to_be_bytes());
        let h = Header::parse(&b).unwrap();
        let (exts, err) = parse_extensions(&h, &b);
        assert!(err.is_none());
        assert_eq!(exts.len(), 2);
        assert_eq!(
            exts[0].kind,
            ExtensionKind::BackingFormat {
                format: "raw".into()
            }
        );
        let feats = named_features(&h, &exts);
        assert_eq!(feats[0].name, "dirty");
        assert!(!feats[1].known);
        assert!(feats[1].name.contains("unknown"));
    }

    #[test]
    fn oversized_extension_is_reported() {
        let mut b = v3_header();
        b[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        b[116..120].copy_from_slice(&0x10_0000u32.to_be_bytes());
        let h = Header::parse(&b).unwrap();
        let (exts, err) = parse_extensions(&h, &b);
        assert!(exts.is_empty());
        assert!(
            err.unwrap()
                .to_string()
                .contains("Header extension too large")
        );
    }
}

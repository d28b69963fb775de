//! Decoding the header from bytes, and judging it the way QEMU's `qcow2_do_open` does.

use super::{
    Field, Header, INCOMPAT_COMPRESSION, INCOMPAT_KNOWN, QCOW2_MAGIC, V2_HEADER_LEN,
    V3_MIN_HEADER_LEN, features::bit_list,
};
use crate::error::{CorruptKind, Error, Result};
use crate::types::{Geometry, HostOffset, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

/// One of QEMU's `qcow2_validate_table` calls at open time.
struct TableCheck {
    /// The structure, for the error.
    field: CorruptKind,
    /// QEMU's name for it, which starts its messages.
    what: &'static str,
    /// The header field holding the table's offset (named when the offset is
    /// wrong), with its name in words.
    off_field: (Field, &'static str),
    /// The header field holding the table's size (named when the size is too
    /// large), with its name in words.
    size_field: (Field, &'static str),
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
                offset: HostOffset(0),
                len: u64::from(V2_HEADER_LEN),
                file_len: buf.len() as u64,
            });
        }
        let magic = Field::Magic.read32(buf);
        if magic != QCOW2_MAGIC {
            return Err(Error::corrupt(
                CorruptKind::HeaderMagic,
                HostOffset(Field::Magic.offset()),
                format!("Image is not in qcow2 format (magic {magic:#010x}, expected 0x514649fb)"),
            ));
        }
        let version = Field::Version.read32(buf);
        let need = if version >= 3 {
            u64::from(V3_MIN_HEADER_LEN)
        } else {
            u64::from(V2_HEADER_LEN)
        };
        if (buf.len() as u64) < need {
            return Err(Error::Truncated {
                what: format!("qcow2 version {version} header"),
                offset: HostOffset(0),
                len: need,
                file_len: buf.len() as u64,
            });
        }
        let mut h = Header {
            magic,
            version,
            backing_file_offset: HostOffset(Field::BackingFileOffset.read(buf)),
            backing_file_size: Field::BackingFileSize.read32(buf),
            cluster_bits: Field::ClusterBits.read32(buf),
            size: Field::Size.read(buf),
            crypt_method: Field::CryptMethod.read32(buf),
            l1_size: Field::L1Size.read32(buf),
            l1_table_offset: HostOffset(Field::L1TableOffset.read(buf)),
            refcount_table_offset: HostOffset(Field::RefcountTableOffset.read(buf)),
            refcount_table_clusters: Field::RefcountTableClusters.read32(buf),
            nb_snapshots: Field::NbSnapshots.read32(buf),
            snapshots_offset: HostOffset(Field::SnapshotsOffset.read(buf)),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type_raw: 0,
        };
        if version >= 3 {
            h.incompatible_features = Field::IncompatibleFeatures.read(buf);
            h.compatible_features = Field::CompatibleFeatures.read(buf);
            h.autoclear_features = Field::AutoclearFeatures.read(buf);
            h.refcount_order = Field::RefcountOrder.read32(buf);
            h.header_length = Field::HeaderLength.read32(buf);
            if h.header_length > V3_MIN_HEADER_LEN {
                h.compression_type_raw =
                    u8::try_from(Field::CompressionType.read(buf)).unwrap_or(u8::MAX);
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
        if self.version != 2 && self.version != 3 {
            out.push(Error::header_field(
                Field::Version,
                format!("Unsupported qcow2 version {}", self.version),
            ));
            return out;
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            out.push(Error::header_field(
                Field::ClusterBits,
                format!("Unsupported cluster size: 2^{}", self.cluster_bits),
            ));
            return out;
        }
        let cs = 1u64 << self.cluster_bits;
        if self.version >= 3 {
            if self.header_length < V3_MIN_HEADER_LEN {
                out.push(Error::header_field(
                    Field::HeaderLength,
                    format!("qcow2 header too short ({} bytes)", self.header_length),
                ));
            }
            if u64::from(self.header_length) > cs {
                out.push(Error::header_field(
                    Field::HeaderLength,
                    format!(
                        "qcow2 header exceeds cluster size ({} > {cs})",
                        self.header_length
                    ),
                ));
            }
        }
        if self.backing_file_offset.get() > cs {
            out.push(Error::header_field(
                Field::BackingFileOffset,
                format!("Invalid backing file offset {}", self.backing_file_offset),
            ));
        }
        let compression_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match self.compression_type_raw {
            0 if compression_bit => out.push(Error::header_field(
                Field::CompressionType,
                "qcow2: Compression type incompatible feature bit must not be set (compression type 0, deflate, with incompatible bit 3)",
            )),
            1 if !compression_bit => out.push(Error::header_field(
                Field::CompressionType,
                "qcow2: Compression type incompatible feature bit must be set (compression type 1, zstd, without incompatible bit 3)",
            )),
            0 | 1 => {}
            n => out.push(Error::header_field(
                Field::CompressionType,
                format!("qcow2: unknown compression type: {n}"),
            )),
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            out.push(Error::header_field(
                Field::IncompatibleFeatures,
                format!("Unsupported qcow2 feature(s): bits {}", bit_list(unknown)),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            out.push(Error::header_field(
                Field::ClusterBits,
                format!(
                    "Unsupported subcluster size: {} bytes (extended L2 needs clusters of at least 16 KiB)",
                    cs / 32
                ),
            ));
        }
        if self.refcount_order > 6 {
            out.push(Error::header_field(
                Field::RefcountOrder,
                format!(
                    "Reference count entry width too large; may not exceed 64 bits (order {})",
                    self.refcount_order
                ),
            ));
        }
        if self.crypt_method > 2 {
            out.push(Error::header_field(
                Field::CryptMethod,
                format!("Unsupported encryption method {}", self.crypt_method),
            ));
        }
        let geo = self.geometry();
        // QEMU's open, in its order: no refcount table (not in check mode), then
        // qcow2_validate_table for the refcount table, the snapshot table (not in
        // check mode) and the L1 table. The offset must be cluster-aligned even
        // when the table is empty.
        if self.refcount_table_clusters == 0 && !check {
            out.push(Error::corrupt(
                CorruptKind::RefcountTable,
                HostOffset(Field::RefcountTableClusters.offset()),
                "Image does not contain a reference count table",
            ));
        }
        out.extend(self.table_errors(&geo, check));
        let needed_l1 = geo.l1_entries_for(self.size);
        if needed_l1 > i32::MAX as u64 {
            out.push(Error::header_field(
                Field::Size,
                format!("Image is too big ({} bytes)", self.size),
            ));
        } else if u64::from(self.l1_size) < needed_l1 {
            out.push(Error::header_field(
                Field::L1Size,
                format!(
                    "L1 table is too small ({} entries, {needed_l1} needed for {} bytes)",
                    self.l1_size, self.size
                ),
            ));
        }
        let _ = file_len;
        out
    }

    /// QEMU's `qcow2_validate_table` for the refcount table, the snapshot table (not
    /// in check mode) and the active L1 table, in that order: a size over QEMU's limit,
    /// an end past 2^63, an offset not aligned to a cluster.
    fn table_errors(&self, geo: &Geometry, check: bool) -> Vec<Error> {
        let cs = geo.cluster_size();
        // The header field is what holds the wrong value, so the error names it and
        // its offset; the kind stays the table's, for code to match on.
        let bad = |kind: CorruptKind, (f, words): (Field, &str), msg: String| Error::Invalid {
            kind,
            what: format!("{words} in the header"),
            offset: HostOffset(f.offset()),
            reason: msg,
        };
        let mut out = Vec::new();
        let table_checks = [
            TableCheck {
                field: CorruptKind::RefcountTable,
                what: "Reference count table",
                off_field: (Field::RefcountTableOffset, "refcount table offset"),
                size_field: (Field::RefcountTableClusters, "refcount table size"),
                off: self.refcount_table_offset.get(),
                size: u64::from(self.refcount_table_clusters).saturating_mul(cs),
                max: crate::refcount::MAX_REFTABLE_BYTES,
                unit: " bytes",
                applies: true,
            },
            TableCheck {
                field: CorruptKind::SnapshotTable,
                what: "Snapshot table",
                off_field: (Field::SnapshotsOffset, "snapshot table offset"),
                size_field: (Field::NbSnapshots, "snapshot count"),
                off: self.snapshots_offset.get(),
                size: u64::from(self.nb_snapshots),
                max: crate::snapshot::MAX_SNAPSHOTS,
                unit: " entries",
                applies: !check,
            },
            TableCheck {
                field: CorruptKind::L1Table,
                what: "Active L1 table",
                off_field: (Field::L1TableOffset, "L1 table offset"),
                size_field: (Field::L1Size, "L1 table size"),
                off: self.l1_table_offset.get(),
                size: u64::from(self.l1_size).saturating_mul(8),
                max: crate::tables::MAX_L1_BYTES,
                unit: " bytes",
                applies: true,
            },
        ];
        for TableCheck {
            field,
            what,
            off_field,
            size_field,
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
                    size_field,
                    format!("{what} too large ({size}{unit}, limit {max})"),
                ));
            } else if off.checked_add(size).is_none_or(|e| e > i64::MAX as u64) {
                out.push(bad(
                    field,
                    off_field,
                    format!("{what} offset invalid ({off:#x} plus the table's size passes 2^63)"),
                ));
            } else if !geo.is_cluster_aligned(off) {
                out.push(bad(
                    field,
                    off_field,
                    format!("{what} offset invalid ({off:#x} is not aligned to a cluster)"),
                ));
            }
        }
        out
    }
}

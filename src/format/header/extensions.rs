//! The header extensions: `type:u32 length:u32 data`, each padded to 8 bytes, from
//! `header_length` to the backing file name (or the end of cluster 0), ending with type 0.

use super::{
    EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, EXT_FEATURE_TABLE, FeatureGroup,
    FeatureName, Header,
};
use crate::bytes::{align8, be32, be64, c_text, slice, u8_at};
use crate::error::{CorruptKind, Error};
use crate::types::HostOffset;
use serde::Serialize;

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
        directory_offset: HostOffset,
    },
    /// Where the LUKS header is.
    Crypto {
        /// Offset of the LUKS header.
        offset: HostOffset,
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
    pub offset: HostOffset,
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
                Some(Error::corrupt(
                    CorruptKind::HeaderExtension,
                    HostOffset(off),
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
                    offset: HostOffset(off),
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
                Some(Error::corrupt(
                    CorruptKind::HeaderExtension,
                    HostOffset(off),
                    format!(
                        "Header extension too large (type {ext_type:#010x}, {length} bytes, area ends at {end:#x})"
                    ),
                )),
            );
        }
        let data = slice(buf, o.saturating_add(8), length as usize).to_vec();
        let kind = decode_extension(ext_type, &data);
        out.push(Extension {
            offset: HostOffset(off),
            ext_type,
            length,
            data,
            kind,
        });
        off = data_off.saturating_add(align8(u64::from(length)));
    }
    (out, None)
}

fn decode_extension(ext_type: u32, data: &[u8]) -> ExtensionKind {
    match ext_type {
        EXT_BACKING_FORMAT => ExtensionKind::BackingFormat {
            format: c_text(data),
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
                        name: c_text(slice(e, 2, 46)),
                    }
                })
                .collect(),
        },
        EXT_BITMAPS => ExtensionKind::Bitmaps {
            nb_bitmaps: be32(data, 0),
            reserved: be32(data, 4),
            directory_size: be64(data, 8),
            directory_offset: HostOffset(be64(data, 16)),
        },
        EXT_CRYPTO => ExtensionKind::Crypto {
            offset: HostOffset(be64(data, 0)),
            length: be64(data, 8),
        },
        EXT_DATA_FILE => ExtensionKind::DataFile { name: c_text(data) },
        _ => ExtensionKind::Unknown,
    }
}

//! The three feature bitfields (incompatible, compatible, autoclear) and the names
//! of their bits.

use super::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, Extension, ExtensionKind,
    Header, INCOMPAT_KNOWN,
};
use serde::Serialize;

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

    /// The group's number in the feature-name table (the inverse of
    /// [`FeatureGroup::from_table_type`]).
    pub fn table_type(self) -> u8 {
        match self {
            FeatureGroup::Incompatible => 0,
            FeatureGroup::Compatible => 1,
            FeatureGroup::Autoclear => 2,
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

pub(super) fn bit_list(bits: u64) -> String {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn describe_bits(bits: u64, group: FeatureGroup) -> String {
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
    use super::FeatureGroup;

    #[test]
    fn feature_groups_have_the_table_types_of_the_specification() {
        // qcow2.txt: "0 for incompatible feature, 1 for compatible feature,
        // 2 for autoclear feature"
        let groups = [
            (FeatureGroup::Incompatible, 0),
            (FeatureGroup::Compatible, 1),
            (FeatureGroup::Autoclear, 2),
        ];
        for (g, t) in groups {
            assert_eq!(g.table_type(), t);
            assert_eq!(FeatureGroup::from_table_type(t), Some(g));
        }
        assert_eq!(FeatureGroup::from_table_type(3), None);
    }
}

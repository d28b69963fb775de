//! QEMU's constraints on a bitmap directory entry, checked when it opens the
//! image, before it reads any table.

use super::{
    BitmapEntry, FLAG_IN_USE, KNOWN_FLAGS, MAX_GRANULARITY_BITS, MAX_NAME_SIZE, MAX_PHYS_SIZE,
    MAX_TABLE_ENTRIES, MIN_GRANULARITY_BITS,
};
use serde::Serialize;

/// Why QEMU's open refuses a bitmap directory entry (`bitmap_list_load` and its
/// `check_dir_entry` in `block/qcow2-bitmap.c`), before it reads any table; the
/// first that applies, in QEMU's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DirEntryProblem {
    /// The entry has extra data (QEMU supports none).
    ExtraData,
    /// The table has no entries.
    EmptyTable,
    /// The table offset is 0.
    NoTable,
    /// The table offset is not a multiple of the cluster size.
    UnalignedTable,
    /// More table entries than QEMU's 0x8000000.
    TooManyEntries,
    /// Granularity bits outside 9..=31.
    Granularity,
    /// Flag bits QEMU does not know are set (the set bits).
    ReservedFlags(u32),
    /// The name is longer than 1023 bytes.
    NameTooLong,
    /// A type other than 1 (dirty tracking).
    Type,
    /// The table's clusters of bits (entries times the cluster size) exceed
    /// [`MAX_PHYS_SIZE`].
    PhysSize,
    /// A bitmap not in use whose table covers less than the disk.
    TableTooSmall,
}

impl DirEntryProblem {
    /// QEMU's message for the entry of bitmap `name`.
    pub fn qemu_message(&self, name: &str) -> String {
        match self {
            DirEntryProblem::ExtraData => "Bitmap extra data is not supported".into(),
            _ => format!("Bitmap '{name}' doesn't satisfy the constraints"),
        }
    }
}

impl std::fmt::Display for DirEntryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirEntryProblem::ExtraData => write!(f, "the entry has extra data"),
            DirEntryProblem::EmptyTable => write!(f, "the table has no entries"),
            DirEntryProblem::NoTable => write!(f, "the table offset is 0"),
            DirEntryProblem::UnalignedTable => write!(f, "the table is not cluster aligned"),
            DirEntryProblem::TooManyEntries => {
                write!(f, "the table has more than {MAX_TABLE_ENTRIES:#x} entries")
            }
            DirEntryProblem::Granularity => write!(
                f,
                "granularity bits outside {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}"
            ),
            DirEntryProblem::ReservedFlags(bits) => {
                write!(f, "flags {bits:#x}: bits QEMU does not know")
            }
            DirEntryProblem::NameTooLong => write!(f, "the name is over {MAX_NAME_SIZE} bytes"),
            DirEntryProblem::Type => write!(f, "type is not 1 (dirty tracking)"),
            DirEntryProblem::PhysSize => write!(
                f,
                "the table's entries times the cluster size exceed {MAX_PHYS_SIZE:#x} bytes"
            ),
            DirEntryProblem::TableTooSmall => {
                write!(
                    f,
                    "the table covers less than the disk and the bitmap is not in use"
                )
            }
        }
    }
}

impl BitmapEntry {
    /// The bitmap table's length in bytes (8 a table entry).
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size).saturating_mul(8)
    }

    /// Whether the bitmap table would end past `BDRV_MAX_LENGTH`, the
    /// largest offset QEMU reads: its read of the table fails.
    pub fn table_ends_past_limit(&self) -> bool {
        crate::io::ends_past_limit(self.table_offset, self.table_bytes())
    }

    /// Why QEMU's open refuses this entry in an image of `cluster_size`-byte
    /// clusters and a disk of `disk_size` bytes, or `None` if it accepts it.
    pub fn problem(&self, cluster_size: u64, disk_size: u64) -> Option<DirEntryProblem> {
        let size = u64::from(self.table_size);
        let p = if self.extra_data_size != 0 {
            DirEntryProblem::ExtraData
        } else if size == 0 {
            DirEntryProblem::EmptyTable
        } else if self.table_offset.get() == 0 {
            DirEntryProblem::NoTable
        } else if cluster_size == 0 || !self.table_offset.get().is_multiple_of(cluster_size) {
            DirEntryProblem::UnalignedTable
        } else if size > MAX_TABLE_ENTRIES {
            DirEntryProblem::TooManyEntries
        } else if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            DirEntryProblem::Granularity
        } else if self.flags & !KNOWN_FLAGS != 0 {
            DirEntryProblem::ReservedFlags(self.flags & !KNOWN_FLAGS)
        } else if self.name_size > MAX_NAME_SIZE {
            DirEntryProblem::NameTooLong
        } else if self.bitmap_type != 1 {
            DirEntryProblem::Type
        } else if size.saturating_mul(cluster_size) > MAX_PHYS_SIZE {
            DirEntryProblem::PhysSize
        } else if self.flags & FLAG_IN_USE == 0
            && disk_size
                > size
                    .saturating_mul(cluster_size)
                    .saturating_mul(8)
                    .checked_shl(u32::from(self.granularity_bits))
                    .unwrap_or(u64::MAX)
        {
            // At most 2^29 * 8 << 31 = 2^63: no bits are lost in the shift.
            DirEntryProblem::TableTooSmall
        } else {
            return None;
        };
        Some(p)
    }

    /// The table size QEMU expects when it loads this bitmap's data for a disk
    /// of `disk_size` bytes (`load_bitmap_data`): the bits in 64-bit words, the
    /// words in clusters of `cluster_size` bytes.
    pub fn table_size_needed(&self, cluster_size: u64, disk_size: u64) -> u64 {
        let bits = disk_size.div_ceil(self.granularity().max(1));
        bits.div_ceil(64)
            .saturating_mul(8)
            .div_ceil(cluster_size.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::HostOffset;

    /// A healthy entry: 64 KiB granularity, one table entry at 0x50000.
    fn entry() -> BitmapEntry {
        BitmapEntry {
            entry_offset: HostOffset(0x60000),
            table_offset: HostOffset(0x50000),
            table_size: 1,
            flags: super::super::FLAG_AUTO,
            bitmap_type: 1,
            granularity_bits: 16,
            extra_data_size: 0,
            name: "b0".into(),
            name_size: 2,
        }
    }

    /// Each of QEMU's constraints (block/qcow2-bitmap.c, check_dir_entry), one
    /// field off at a time, on a 64 MiB disk of 64 KiB clusters.
    #[test]
    fn each_constraint_refuses_its_entry() {
        let (cs, disk) = (65536, 64 << 20);
        assert_eq!(entry().problem(cs, disk), None);
        type Change = fn(&mut BitmapEntry);
        let cases: Vec<(Change, DirEntryProblem)> = vec![
            (|e| e.extra_data_size = 8, DirEntryProblem::ExtraData),
            (|e| e.table_size = 0, DirEntryProblem::EmptyTable),
            (|e| e.table_offset = HostOffset(0), DirEntryProblem::NoTable),
            (
                |e| e.table_offset = HostOffset(0x50200),
                DirEntryProblem::UnalignedTable,
            ),
            (
                |e| e.table_size = 0x0800_0001,
                DirEntryProblem::TooManyEntries,
            ),
            (|e| e.granularity_bits = 8, DirEntryProblem::Granularity),
            (|e| e.granularity_bits = 32, DirEntryProblem::Granularity),
            (|e| e.flags = 0xa, DirEntryProblem::ReservedFlags(8)),
            (|e| e.name_size = 1024, DirEntryProblem::NameTooLong),
            (|e| e.bitmap_type = 2, DirEntryProblem::Type),
            // 8193 entries of 64 KiB: 0x20010000 bytes of bits.
            (|e| e.table_size = 8193, DirEntryProblem::PhysSize),
            // One entry at 512 bytes a bit covers 64 KiB * 8 * 512 = 256 MiB.
            (|e| e.granularity_bits = 9, DirEntryProblem::TableTooSmall),
        ];
        for (i, (change, want)) in cases.into_iter().enumerate() {
            let mut e = entry();
            change(&mut e);
            let disk = if want == DirEntryProblem::TableTooSmall {
                1 << 30
            } else {
                disk
            };
            assert_eq!(e.problem(cs, disk), Some(want), "case {i}");
        }
        // Exactly 0x20000000 bytes of bits is allowed.
        let mut e = entry();
        e.table_size = 8192;
        assert_eq!(e.problem(cs, disk), None);
        // A bitmap in use may cover less than the disk.
        let mut e = entry();
        e.granularity_bits = 9;
        e.flags |= FLAG_IN_USE;
        assert_eq!(e.problem(cs, 1 << 30), None);
    }

    /// The table size QEMU's load_bitmap_data expects: the disk's bits in
    /// 64-bit words, the words' bytes in clusters (worked out by hand).
    #[test]
    fn table_size_needed_counts_words_of_bits_in_clusters() {
        let mut e = entry();
        // 64 MiB at 64 KiB a bit: 1024 bits, 16 words, 128 bytes: one cluster.
        assert_eq!(e.table_size_needed(65536, 64 << 20), 1);
        // 2 TiB at 512 bytes a bit: 2^32 bits, 2^26 words, 2^29 bytes: 8192
        // clusters of 64 KiB, 2^20 of 512 bytes.
        e.granularity_bits = 9;
        assert_eq!(e.table_size_needed(65536, 2 << 40), 8192);
        assert_eq!(e.table_size_needed(512, 2 << 40), 1 << 20);
        // 64 bits and one more: two words, 16 bytes, still one cluster.
        assert_eq!(e.table_size_needed(512, 65 * 512), 1);
        // 4097 words: 32776 bytes, 65 clusters of 512 bytes.
        assert_eq!(e.table_size_needed(512, 4097 * 64 * 512), 65);
        assert_eq!(e.table_size_needed(512, 0), 0);
    }
}

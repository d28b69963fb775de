//! The internal snapshot table.
//!
//! An internal snapshot is a frozen copy of the active L1 table (plus, optionally,
//! VM state). Taking one copies the L1 table and adds 1 to the refcount of every L2
//! table and data cluster it reaches, so they become shared; a later write to a
//! shared cluster copies it first.
//!
//! The table holds `nb_snapshots` variable-length entries, each starting on an
//! 8-byte boundary:
//!
//! ```text
//!  0 l1_table_offset(8)  8 l1_size(4)  12 id_str_size(2)  14 name_size(2)
//! 16 date_sec(4)  20 date_nsec(4)  24 vm_clock_nsec(8)  32 vm_state_size(4)
//! 36 extra_data_size(4)  40 extra data  then id string, then name (no NULs)
//! extra data: 0 vm_state_size_large(8)  8 disk_size(8)  16 icount(8)  then unknown bytes
//! ```

use crate::bytes::{be16, be32, be64, c_text, slice};
use crate::error::{Error, Result};
use crate::io::{Source, read_into};
use crate::types::HostOffset;
use serde::Serialize;
use std::sync::Arc;

/// QEMU refuses more than 65536 snapshots.
pub const MAX_SNAPSHOTS: u64 = 65536;
/// QEMU refuses more than 1024 bytes of extra data per entry.
pub const MAX_EXTRA_DATA: u64 = 1024;
/// QEMU refuses snapshot tables over 64 MiB.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Bytes of the fixed part of an entry.
pub const ENTRY_HEADER_LEN: u64 = 40;

/// One snapshot table entry, every field as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Position in the table (0-based).
    pub index: usize,
    /// Where the entry starts in the file.
    pub entry_offset: HostOffset,
    /// The snapshot's L1 table.
    pub l1_table_offset: HostOffset,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// The ID string (QEMU numbers them "1", "2", ...).
    pub id: String,
    /// The name given by the user.
    pub name: String,
    /// Seconds since the epoch when it was taken.
    pub date_sec: u32,
    /// Nanoseconds part of the date.
    pub date_nsec: u32,
    /// Guest clock when it was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The 32-bit VM state size field.
    pub vm_state_size_32: u32,
    /// Size of the saved VM state (the 64-bit extra field when present).
    pub vm_state_size: u64,
    /// Bytes of extra data.
    pub extra_data_size: u32,
    /// Virtual disk size when taken (extra data; `None` if not stored).
    pub disk_size: Option<u64>,
    /// Instruction count for record/replay (extra data; `None` if not stored, or -1).
    pub icount: Option<u64>,
    /// Extra data bytes beyond the three known fields.
    pub unknown_extra: Vec<u8>,
    /// Total bytes of this entry before padding.
    pub entry_len: u64,
}

impl Snapshot {
    /// The disk size this snapshot describes (the current size if not stored).
    pub fn effective_disk_size(&self, current: u64) -> u64 {
        self.disk_size.unwrap_or(current)
    }
}

/// The snapshot table as read, with where reading stopped if it could not finish.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SnapshotTable {
    /// Entries read.
    pub snapshots: Vec<Snapshot>,
    /// Bytes used, up to the end of the last name (QEMU's `snapshots_size`).
    pub size: u64,
    /// Why the table could not be read completely, if it could not.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::error::serialize_message"
    )]
    pub error: Option<Arc<Error>>,
    /// The table runs past the end of the file (QEMU reads zeros there).
    pub past_eof: bool,
}

impl SnapshotTable {
    /// Find a snapshot by ID or name, like `qemu-img snapshot -a`: an exact ID match
    /// first, then the first entry with that name.
    pub fn find(&self, id_or_name: &str) -> Option<&Snapshot> {
        self.snapshots
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().find(|s| s.name == id_or_name))
    }

    /// Find the snapshot a [`Selector`] names.
    pub fn select(&self, sel: &Selector) -> Option<&Snapshot> {
        match sel {
            Selector::IdOrName(s) => self.find(s),
            Selector::Exact { id, name } => self.snapshots.iter().find(|s| {
                id.as_ref().is_none_or(|i| *i == s.id) && name.as_ref().is_none_or(|n| *n == s.name)
            }),
        }
    }
}

/// How a command names a snapshot, as `qemu-img convert -l` takes it.
///
/// A bare word is tried as an ID first and then as a name
/// (`bdrv_snapshot_load_tmp_by_id_or_name`). The option form
/// `snapshot.id=ID,snapshot.name=NAME` (either key, or both) matches exactly what it
/// names, so `snapshot.name=1` finds the snapshot *called* "1" even when another
/// snapshot has ID 1. As in QEMU's option syntax, `,,` stands for a comma in a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// ID first, then name.
    IdOrName(String),
    /// Both given parts must match.
    Exact {
        /// `snapshot.id=`.
        id: Option<String>,
        /// `snapshot.name=`.
        name: Option<String>,
    },
}

impl Selector {
    /// Parse a command-line snapshot argument.
    pub fn parse(arg: &str) -> std::result::Result<Selector, String> {
        if !arg.starts_with("snapshot.") {
            return Ok(Selector::IdOrName(arg.to_string()));
        }
        let (mut id, mut name) = (None, None);
        for part in split_opts(arg) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("'{part}': expected snapshot.id=ID or snapshot.name=NAME")
            })?;
            match k {
                "snapshot.id" => id = Some(v.to_string()),
                "snapshot.name" => name = Some(v.to_string()),
                other => {
                    return Err(format!(
                        "Invalid parameter '{other}' (snapshot.id and snapshot.name are the only keys)"
                    ));
                }
            }
        }
        Ok(Selector::Exact { id, name })
    }
}

/// Split QEMU option text at single commas; `,,` is a literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = out.last_mut() {
                    last.push(',');
                }
            } else {
                out.push(String::new());
            }
        } else if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}

/// Read `count` snapshot entries starting at `offset`. `version` decides whether
/// short extra data is acceptable (version 3 requires at least 16 bytes).
pub fn read_table(src: &dyn Source, offset: HostOffset, count: u32) -> SnapshotTable {
    read_entries(src, offset, count, false, &mut Vec::new())
}

/// [`read_table`] as `qemu-img check -r all` reads it: an entry with more
/// than [`MAX_EXTRA_DATA`] bytes of extra data keeps only the first
/// [`MAX_EXTRA_DATA`] of them (the rest is skipped, its ID and name read
/// after all of it). Also the entries so cut: index and the extra data size
/// they stored.
pub fn read_table_discarding(
    src: &dyn Source,
    offset: HostOffset,
    count: u32,
) -> (SnapshotTable, Vec<(usize, u64)>) {
    let mut dropped = Vec::new();
    let table = read_entries(src, offset, count, true, &mut dropped);
    (table, dropped)
}

fn read_entries(
    src: &dyn Source,
    offset: HostOffset,
    count: u32,
    discard: bool,
    dropped: &mut Vec<(usize, u64)>,
) -> SnapshotTable {
    let mut table = SnapshotTable::default();
    if count == 0 {
        return table;
    }
    if u64::from(count) > MAX_SNAPSHOTS {
        table.error = Some(Arc::new(Error::invalid(
            "snapshot table",
            offset,
            format!(
                "{count} snapshots is more than QEMU's limit of {MAX_SNAPSHOTS} (File too large)"
            ),
        )));
        return table;
    }
    let mut pos = offset;
    for index in 0..count as usize {
        if pos.saturating_add(ENTRY_HEADER_LEN).get() > src.len() {
            table.past_eof = true;
        }
        match read_entry(src, pos, index, discard) {
            Ok(sn) => {
                if let Some(stored) = sn.1 {
                    dropped.push((index, stored));
                }
                let sn = sn.0;
                let end = pos.saturating_add(sn.entry_len);
                if end.get() > src.len() {
                    table.past_eof = true;
                }
                table.size = end.saturating_sub(offset);
                if table.size > MAX_TABLE_BYTES {
                    table.error = Some(Arc::new(Error::unsupported(
                        format!(
                            "snapshot table at {offset:#x} is larger than 64 MiB at entry {index}"
                        ),
                        "Snapshot table is too big",
                    )));
                    return table;
                }
                table.snapshots.push(sn);
                pos = end.align8_up();
            }
            Err(e) => {
                table.error = Some(Arc::new(e));
                return table;
            }
        }
    }
    table
}

/// Read `len` bytes (at most 132 KiB here), zeros past the end of the file, as QEMU does.
fn read_zero_filled(src: &dyn Source, what: &str, pos: HostOffset, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    read_into(src, what, pos, &mut buf)?;
    Ok(buf)
}

/// One entry, and (when `discard` cut its extra data) the extra data size
/// it stored.
fn read_entry(
    src: &dyn Source,
    entry: HostOffset,
    index: usize,
    discard: bool,
) -> Result<(Snapshot, Option<u64>)> {
    let what = format!("snapshot table entry {index}");
    let pos = entry;
    let h = read_zero_filled(src, &what, pos, ENTRY_HEADER_LEN)?;
    let id_len = u64::from(be16(&h, 12));
    let name_len = u64::from(be16(&h, 14));
    let stored_extra = u64::from(be32(&h, 36));
    let cut = discard && stored_extra > MAX_EXTRA_DATA;
    let extra_len = if cut { MAX_EXTRA_DATA } else { stored_extra };
    if extra_len > MAX_EXTRA_DATA {
        return Err(Error::invalid(
            what,
            pos,
            format!(
                "Too much extra metadata in snapshot table entry {index} ({extra_len} > {MAX_EXTRA_DATA} bytes)"
            ),
        ));
    }
    // At most 1024 + 2 * 65535 bytes: bounded by the checks above.
    let names_len = id_len.saturating_add(name_len);
    let extra_at = pos.saturating_add(ENTRY_HEADER_LEN);
    let rest = if cut {
        // The ID and the name follow all the extra data stored.
        let mut rest = read_zero_filled(src, &what, extra_at, extra_len)?;
        let names_at = extra_at.saturating_add(stored_extra);
        rest.extend(read_zero_filled(src, &what, names_at, names_len)?);
        rest
    } else {
        read_zero_filled(src, &what, extra_at, extra_len.saturating_add(names_len))?
    };
    let extra = slice(&rest, 0, extra_len as usize);
    let vm_state_size_32 = be32(&h, 32);
    let vm_state_size = if extra_len >= 8 {
        be64(extra, 0)
    } else {
        u64::from(vm_state_size_32)
    };
    let disk_size = (extra_len >= 16).then(|| be64(extra, 8));
    let icount = (extra_len >= 24)
        .then(|| be64(extra, 16))
        .filter(|&v| v != u64::MAX);
    let entry_len = ENTRY_HEADER_LEN
        .saturating_add(stored_extra)
        .saturating_add(id_len)
        .saturating_add(name_len);
    let sn = Snapshot {
        index,
        entry_offset: entry,
        l1_table_offset: HostOffset(be64(&h, 0)),
        l1_size: be32(&h, 8),
        id: c_text(slice(&rest, extra_len as usize, id_len as usize)),
        name: c_text(slice(
            &rest,
            extra_len.saturating_add(id_len) as usize,
            name_len as usize,
        )),
        date_sec: be32(&h, 16),
        date_nsec: be32(&h, 20),
        vm_clock_nsec: be64(&h, 24),
        vm_state_size_32,
        vm_state_size,
        extra_data_size: extra_len as u32,
        disk_size,
        icount,
        unknown_extra: slice(extra, 24, usize::MAX).to_vec(),
        entry_len,
    };
    Ok((sn, cut.then_some(stored_extra)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::align8;
    use crate::io::MemSource;

    fn entry(id: &str, name: &str, extra: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x90000u64.to_be_bytes());
        e[8..12].copy_from_slice(&2u32.to_be_bytes());
        e[12..14].copy_from_slice(&(id.len() as u16).to_be_bytes());
        e[14..16].copy_from_slice(&(name.len() as u16).to_be_bytes());
        e[16..20].copy_from_slice(&1_700_000_000u32.to_be_bytes());
        e[24..32].copy_from_slice(&1_500_000_000u64.to_be_bytes());
        e[32..36].copy_from_slice(&7u32.to_be_bytes());
        e[36..40].copy_from_slice(&(extra.len() as u32).to_be_bytes());
        e.extend_from_slice(extra);
        e.extend_from_slice(id.as_bytes());
        e.extend_from_slice(name.as_bytes());
        e
    }

    #[test]
    fn reads_entries_with_and_without_extra_data() {
        let mut extra = vec![0u8; 24];
        extra[0..8].copy_from_slice(&(5u64 << 32).to_be_bytes());
        extra[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        extra[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        let mut buf = entry("1", "first", &extra);
        let first_len = buf.len() as u64;
        while !buf.len().is_multiple_of(8) {
            buf.push(0);
        }
        buf.extend(entry("2", "b", &[]));
        let src = MemSource::new("t", buf);
        let t = read_table(&src, HostOffset(0), 2);
        assert!(t.error.is_none(), "{:?}", t.error);
        let a = &t.snapshots[0];
        assert_eq!((a.id.as_str(), a.name.as_str()), ("1", "first"));
        assert_eq!(a.vm_state_size, 5 << 32);
        assert_eq!(a.disk_size, Some(1 << 30));
        assert_eq!(a.icount, None);
        assert_eq!(a.entry_len, first_len);
        let b = &t.snapshots[1];
        assert_eq!(b.vm_state_size, 7);
        assert_eq!(b.disk_size, None);
        assert_eq!(b.entry_offset, HostOffset(align8(first_len)));
        assert_eq!(t.size, align8(first_len) + 40 + 2);
        assert_eq!(t.find("b").map(|s| s.index), Some(1));
        assert_eq!(t.find("1").map(|s| s.index), Some(0));
    }

    #[test]
    fn rejects_oversized_extra_and_truncation() {
        let src = MemSource::new("t", entry("1", "x", &vec![0u8; 2000]));
        let t = read_table(&src, HostOffset(0), 1);
        assert!(
            t.error
                .is_some_and(|e| e.to_string().contains("Too much extra metadata"))
        );
        // Past the end of the file, QEMU reads zeros: an empty entry.
        let src = MemSource::new("t", entry("1", "x", &[])[..30].to_vec());
        let t = read_table(&src, HostOffset(0), 1);
        assert!(t.error.is_none() && t.past_eof);
        assert_eq!(t.snapshots[0].name, "");
        let src = MemSource::new("t", vec![]);
        // The error is a value now; its message is the one shown before.
        assert_eq!(
            read_table(&src, HostOffset(0), u32::MAX)
                .error
                .map(|e| e.to_string())
                .as_deref(),
            Some(
                "snapshot table at 0x0: 4294967295 snapshots is more than QEMU's limit of 65536 (File too large)"
            )
        );
    }
}

//! The bitmap directory and the bitmap tables, read once when the image is
//! opened; `check`, `locate` and the viewer use the tables read here.
//!
//! A hostile directory can hold 65535 entries that all name one table, or
//! tables that overlap, each up to QEMU's largest size. The open reads every
//! byte of the union of the tables' ranges once (a table shared by several
//! entries, or the part two tables share, is read once) and at most
//! [`TABLE_READ_BUDGET`] bytes over the whole directory; a table past the budget
//! is not read and says so.

use super::{BDRV_MAX_LENGTH, Strictness, refuse};
use crate::bitmap::{
    self, BitmapEntry, BitmapTableEntry, InvalidTableEntry, MAX_PHYS_SIZE, MAX_TABLE_ENTRIES,
};
use crate::bytes::be64;
use crate::error::{CorruptKind, Error, Result};
use crate::header::{self, Extension, ExtensionKind, Header};
use crate::io::{Source, read_as_qemu, within_limit};
use crate::types::HostOffset;

/// The most bytes of bitmap tables an open reads, over the whole directory.
/// QEMU's own largest table is 8 MiB (512-byte clusters); a directory of
/// healthy bitmaps needs far less.
pub const TABLE_READ_BUDGET: u64 = 64 << 20;

/// Bytes of the file read in one piece: one table, or tables that overlap.
#[derive(Debug)]
struct Run {
    bytes: Vec<u8>,
    /// File offsets of the entries in this run QEMU refuses, ascending.
    invalid: Vec<u64>,
}

/// Where one directory entry's table is.
#[derive(Debug)]
enum Slot {
    /// The table of `entries` entries at `offset`: its first `len` bytes
    /// (those inside the file) from `from` in run `run` (`len` 0: no run),
    /// the rest zeros past the end of the file.
    Held {
        run: usize,
        from: usize,
        len: usize,
        offset: u64,
        entries: u64,
    },
    /// Not read, and why.
    NotRead(Error),
}

/// Every bitmap table of the directory, as the open read it.
#[derive(Debug, Default)]
pub struct BitmapTables {
    runs: Vec<Run>,
    slots: Vec<Slot>,
    cluster_size: u64,
    bytes_read: u64,
}

/// One bitmap's table.
#[derive(Clone, Copy, Debug)]
pub struct BitmapTable<'a> {
    /// Where the table is.
    pub offset: HostOffset,
    /// The entries inside the file (an entry the end of the file cuts
    /// padded with zeros).
    bytes: &'a [u8],
    entries: u64,
    invalid: &'a [u64],
    cluster_size: u64,
}

impl<'a> BitmapTable<'a> {
    /// Entries in the table, those past the end of the file included.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The entries, in order: those read from the file, then those past its
    /// end, which read as zeros.
    pub fn entries(&self) -> impl Iterator<Item = BitmapTableEntry> + 'a {
        let past = usize::try_from(self.past_eof()).unwrap_or(usize::MAX);
        self.stored()
            .chain(std::iter::repeat_n(BitmapTableEntry(0), past))
    }

    /// The entries read from the file (those past its end read as zeros and
    /// name no cluster).
    pub fn stored(&self) -> impl Iterator<Item = BitmapTableEntry> + 'a {
        bitmap::decode_table(self.bytes)
    }

    /// Entries read from the file ([`stored`](Self::stored)).
    pub fn stored_len(&self) -> u64 {
        (self.bytes.len() / 8) as u64
    }

    /// Entries past the end of the file: QEMU reads them as zeros.
    pub fn past_eof(&self) -> u64 {
        self.entries.saturating_sub(self.stored_len())
    }

    /// The first entry QEMU's `bitmap_table_load` refuses (see
    /// [`BitmapTableEntry::problem`]), found without going through the table.
    pub fn first_invalid(&self) -> Option<InvalidTableEntry> {
        let start = self.offset.get();
        let end = start.saturating_add(self.bytes.len() as u64);
        let i = self.invalid.partition_point(|&o| o < start);
        let at = *self.invalid.get(i).filter(|&&o| o < end)?;
        let index = at.saturating_sub(start) / 8;
        let pos = usize::try_from(index.saturating_mul(8)).ok()?;
        let entry = BitmapTableEntry(be64(self.bytes.get(pos..)?, 0));
        Some(InvalidTableEntry {
            index,
            at: HostOffset(at),
            entry,
            problem: entry.problem(self.cluster_size)?,
        })
    }
}

impl BitmapTables {
    /// Read the tables of `dir` from `src`, in an image of `cluster_size`-byte
    /// clusters.
    pub fn read(src: &dyn Source, dir: &[BitmapEntry], cluster_size: u64) -> BitmapTables {
        let file_len = src.len();
        let mut slots: Vec<Option<Slot>> = Vec::with_capacity(dir.len());
        // (start, end, directory index) of every table to read.
        let mut wanted: Vec<(u64, u64, usize)> = Vec::new();
        for (i, b) in dir.iter().enumerate() {
            let what = format!("bitmap '{}' table", b.name);
            let off = b.table_offset.get();
            let n = u64::from(b.table_size);
            let len = n.saturating_mul(8);
            let slot = if n > MAX_TABLE_ENTRIES {
                Some(Slot::NotRead(Error::invalid(
                    what,
                    HostOffset(off),
                    format!("{n} entries is more than QEMU allows"),
                )))
            } else if n.saturating_mul(cluster_size) > MAX_PHYS_SIZE {
                Some(Slot::NotRead(Error::invalid(
                    what,
                    HostOffset(off),
                    format!(
                        "not read: {n} entries of {cluster_size}-byte clusters exceed QEMU's {MAX_PHYS_SIZE:#x} bytes, so QEMU refuses the directory entry and reads no table"
                    ),
                )))
            } else if let Err(e) = within_limit(&what, HostOffset(off), len) {
                // QEMU's block layer fails the read (EIO).
                Some(Slot::NotRead(e))
            } else if len == 0 || off >= file_len {
                // Nothing of it inside the file: zeros, as QEMU reads them.
                Some(Slot::Held {
                    run: 0,
                    from: 0,
                    len: 0,
                    offset: off,
                    entries: n,
                })
            } else {
                // The part inside the file, to a whole entry.
                let end = off.saturating_add(len).min(file_len);
                let end = off.saturating_add(crate::bytes::align8(end.saturating_sub(off)));
                wanted.push((off, end, i));
                None
            };
            slots.push(slot);
        }
        wanted.sort_unstable();
        let mut t = BitmapTables {
            cluster_size,
            ..BitmapTables::default()
        };
        let mut k = 0;
        while let Some(&(start, first_end, _)) = wanted.get(k) {
            // The tables from k on that overlap this one (or an overlapping one).
            let mut end = first_end;
            let mut n = k.saturating_add(1);
            while let Some(&(_, e, _)) = wanted.get(n).filter(|w| w.0 < end) {
                end = end.max(e);
                n = n.saturating_add(1);
            }
            let group = wanted.get(k..n).unwrap_or(&[]);
            k = n;
            let len = end.saturating_sub(start);
            let over = t.bytes_read.saturating_add(len) > TABLE_READ_BUDGET;
            let read = if over {
                Err(Error::unsupported(
                    format!("bitmap tables at {start:#x}..{end:#x}"),
                    format!(
                        "not read: the bitmap tables of this image take more than the {} MiB qinspect reads of them",
                        TABLE_READ_BUDGET >> 20
                    ),
                ))
            } else {
                read_as_qemu(src, "bitmap tables", HostOffset(start), len)
            };
            match read {
                Ok(bytes) => {
                    t.bytes_read = t.bytes_read.saturating_add(len);
                    let invalid = (0u64..)
                        .zip(bitmap::decode_table(&bytes))
                        .filter(|(_, e)| e.problem(cluster_size).is_some())
                        .map(|(j, _)| start.saturating_add(j.saturating_mul(8)))
                        .collect();
                    let run = t.runs.len();
                    for &(s, e, i) in group {
                        if let Some(slot) = slots.get_mut(i) {
                            *slot = Some(Slot::Held {
                                run,
                                from: s.saturating_sub(start) as usize,
                                len: e.saturating_sub(s) as usize,
                                offset: s,
                                entries: dir.get(i).map_or(0, |b| u64::from(b.table_size)),
                            });
                        }
                    }
                    t.runs.push(Run { bytes, invalid });
                }
                Err(e) => {
                    for &(_, _, i) in group {
                        if let Some(slot) = slots.get_mut(i) {
                            *slot = Some(Slot::NotRead(e.clone()));
                        }
                    }
                }
            }
        }
        t.slots = slots
            .into_iter()
            .map(|s| {
                s.unwrap_or_else(|| {
                    Slot::NotRead(Error::invalid("bitmap table", HostOffset(0), "not read"))
                })
            })
            .collect();
        t
    }

    /// The table of directory entry `i`, or why it was not read.
    pub fn table(&self, i: usize) -> Result<BitmapTable<'_>> {
        let Some(slot) = self.slots.get(i) else {
            return Err(Error::Request(format!(
                "there is no bitmap {i} ({} bitmaps)",
                self.slots.len()
            )));
        };
        match slot {
            Slot::NotRead(e) => Err(e.clone()),
            Slot::Held {
                run,
                from,
                len,
                offset,
                entries,
            } => {
                let (bytes, invalid) = match self.runs.get(*run) {
                    Some(r) if *len > 0 => (
                        r.bytes.get(*from..from.saturating_add(*len)).unwrap_or(&[]),
                        r.invalid.as_slice(),
                    ),
                    _ => (&[][..], &[][..]),
                };
                Ok(BitmapTable {
                    offset: HostOffset(*offset),
                    bytes,
                    entries: *entries,
                    invalid,
                    cluster_size: self.cluster_size,
                })
            }
        }
    }

    /// Bytes read from the file for all the tables together.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}

/// QEMU's refusal to open an image whose bitmap directory failed to read as
/// `e`: its entries do not fit it ("Broken bitmap directory"), go on past the
/// count the extension gives, end, filling it, before that count, or end past
/// the largest offset QEMU reads; `None` for other failures.
fn directory_refusal(e: &Error) -> Option<Error> {
    let Error::Invalid {
        kind,
        what,
        offset,
        reason,
    } = e
    else {
        return None;
    };
    let qemu = match kind {
        CorruptKind::BitmapDirectoryBroken => "Broken bitmap directory",
        CorruptKind::BitmapDirectoryShort => {
            "Less bitmaps found than specified in header extension"
        }
        CorruptKind::BitmapDirectoryLong => "More bitmaps found than specified in header extension",
        CorruptKind::BitmapDirectoryUnreadable => {
            "Failed to read bitmap directory: Input/output error"
        }
        _ => return None,
    };
    Some(Error::Invalid {
        kind: *kind,
        what: what.clone(),
        offset: *offset,
        reason: format!("{qemu} ({reason})"),
    })
}

/// QEMU's refusal of the first entry of `list` it does not accept, in an
/// image of `cs`-byte clusters and a disk of `disk` bytes, read from a file
/// of `file_len` bytes (an entry past its end was read as zeros).
fn entry_refusal(list: &[BitmapEntry], cs: u64, disk: u64, file_len: u64) -> Option<Error> {
    list.iter().enumerate().find_map(|(i, b)| {
        let p = b.problem(cs, disk)?;
        let zeros = if b.entry_offset.get().saturating_add(24) > file_len {
            format!(
                "; the entry lies past the end of the file ({file_len} bytes), and QEMU reads zeros there"
            )
        } else {
            String::new()
        };
        Some(Error::Invalid {
            kind: CorruptKind::BitmapDirectoryEntry,
            what: format!("bitmap directory entry {i} '{}'", b.name),
            offset: b.entry_offset,
            reason: format!("{} ({p}{zeros})", p.qemu_message(&b.name)),
        })
    })
}

/// The bitmap directory and its tables, if the header has a bitmaps extension.
/// QEMU's open checks every directory entry, then loads the table of every
/// bitmap not marked in use, and fails on an entry it does not accept.
pub(super) fn read_bitmaps(
    src: &dyn Source,
    h: &Header,
    extensions: &[Extension],
    strict: Strictness,
    problems: &mut Vec<Error>,
    check_refusal: &mut Option<Error>,
    notes: &mut Vec<String>,
) -> Result<(Option<Result<Vec<BitmapEntry>>>, BitmapTables)> {
    let directory = extensions.iter().find_map(|e| match e.kind {
        ExtensionKind::Bitmaps {
            nb_bitmaps,
            directory_size,
            directory_offset,
            ..
        } => Some(bitmap::read_directory_parts(
            src,
            directory_offset,
            directory_size,
            nb_bitmaps,
        )),
        _ => None,
    });
    let cs = h.cluster_size();
    // QEMU's disk length is in whole sectors.
    let disk = h.size & !511;
    let loaded = h.autoclear_features & header::AUTOCLEAR_BITMAPS != 0;
    let bitmaps = match directory {
        None => None,
        Some(Err(e)) => {
            if loaded && let Some(r) = directory_refusal(&e) {
                refuse(problems, check_refusal, strict, r)?;
            }
            Some(Err(e))
        }
        Some(Ok(d)) => {
            if d.past_eof > 0 {
                notes.push(format!(
                    "the last {} bytes of the bitmap directory lie past the end of the file ({} bytes) and read as zeros, as QEMU reads them",
                    d.past_eof,
                    src.len()
                ));
            }
            match d.error {
                Some(e) => {
                    // QEMU checks each entry as it walks the directory: a
                    // refused entry before the walk's end is what it reports.
                    if loaded {
                        let r = entry_refusal(&d.entries, cs, disk, src.len())
                            .or_else(|| directory_refusal(&e));
                        if let Some(r) = r {
                            refuse(problems, check_refusal, strict, r)?;
                        }
                    }
                    Some(Err(e))
                }
                None => Some(Ok(d.entries)),
            }
        }
    };
    let Some(Ok(list)) = &bitmaps else {
        return Ok((bitmaps, BitmapTables::default()));
    };
    let tables = BitmapTables::read(src, list, cs);
    if h.autoclear_features & header::AUTOCLEAR_BITMAPS == 0 {
        return Ok((bitmaps, tables));
    }
    // Every entry is checked before any table is loaded.
    if let Some(e) = entry_refusal(list, cs, disk, src.len()) {
        refuse(problems, check_refusal, strict, e)?;
        return Ok((bitmaps, tables));
    }
    for (i, b) in list.iter().enumerate() {
        if b.flags & bitmap::FLAG_IN_USE != 0 {
            continue;
        }
        match tables.table(i) {
            Ok(t) => {
                if let Some(bad) = t.first_invalid() {
                    let e = Error::invalid(
                        format!("bitmap '{}' table entry {}", b.name, bad.index),
                        bad.at,
                        format!(
                            "Could not read bitmap_table table from image for bitmap '{}': Invalid argument ({:#x}: {})",
                            b.name, bad.entry.0, bad.problem
                        ),
                    );
                    refuse(problems, check_refusal, strict, e)?;
                    break;
                }
                let need = b.table_size_needed(cs, disk);
                if u64::from(b.table_size) != need {
                    let e = Error::Invalid {
                        kind: CorruptKind::BitmapDirectoryEntry,
                        what: format!("bitmap directory entry {i} '{}' bitmap_table_size", b.name),
                        offset: b.entry_offset.saturating_add(8),
                        reason: format!(
                            "Could not read bitmap '{}' from image: Invalid argument ({} table entries; the disk of {disk} bytes at {} bytes a bit needs {need})",
                            b.name,
                            b.table_size,
                            b.granularity()
                        ),
                    };
                    refuse(problems, check_refusal, strict, e)?;
                    break;
                }
            }
            Err(e @ Error::Unsupported { .. }) => {
                // Past the budget: what QEMU makes of this table and the ones
                // after it is not known.
                notes.push(format!(
                    "{e}; QEMU reads the table of bitmap '{}' and of the bitmaps after it when it opens the image, and would refuse the open for an entry it does not accept",
                    b.name
                ));
                break;
            }
            // A table ending past BDRV_MAX_LENGTH: QEMU's read of it fails,
            // and so does the open.
            Err(_) if b.table_ends_past_limit() => {
                let e = Error::invalid(
                    format!("bitmap '{}' table", b.name),
                    b.table_offset,
                    format!(
                        "Could not read bitmap_table table from image for bitmap '{}': Input/output error (it would end past {BDRV_MAX_LENGTH:#x}, the largest offset QEMU reads)",
                        b.name
                    ),
                );
                refuse(problems, check_refusal, strict, e)?;
                break;
            }
            // Refused with the directory entry above.
            Err(_) => {}
        }
    }
    Ok((bitmaps, tables))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use crate::io::MemSource;

    fn entry(at: u64, size: u32) -> BitmapEntry {
        BitmapEntry {
            entry_offset: HostOffset(0),
            table_offset: HostOffset(at),
            table_size: size,
            flags: 0,
            bitmap_type: 1,
            granularity_bits: 16,
            extra_data_size: 0,
            name: "b".into(),
            name_size: 1,
        }
    }

    /// A file of 0x10004 bytes: the table at 0x10000-8 has its first entry
    /// inside, its second cut by the end (4 bytes inside, the rest zeros),
    /// its third past the end; one wholly past the end reads as zeros with
    /// nothing read; one ending past `BDRV_MAX_LENGTH` is not read.
    #[test]
    fn tables_past_the_end_read_as_zeros() {
        let mut bytes = vec![0u8; 0x1_0004];
        bytes[0xfff8..0x1_0000].copy_from_slice(&0x2_0000u64.to_be_bytes());
        bytes[0x1_0000..].copy_from_slice(&[0x00, 0x00, 0x00, 0x01]);
        let src = MemSource::new("m", bytes);
        let dir = [
            entry(0xfff8, 3),
            entry(1 << 40, 4),
            entry(BDRV_MAX_LENGTH - 8, 2),
        ];
        let t = BitmapTables::read(&src, &dir, 0x1_0000);
        let a = t.table(0).unwrap();
        assert_eq!((a.len(), a.stored_len(), a.past_eof()), (3, 2, 1));
        let e: Vec<u64> = a.entries().map(|e| e.0).collect();
        assert_eq!(e, [0x2_0000, 0x1_0000_0000, 0]);
        let b = t.table(1).unwrap();
        assert_eq!(b.offset, HostOffset(1 << 40));
        assert_eq!((b.len(), b.stored_len(), b.past_eof()), (4, 0, 4));
        assert!(b.entries().all(|e| e.0 == 0));
        assert!(t.table(2).is_err());
        // Only the part inside the file (to a whole entry) was read.
        assert_eq!(t.bytes_read(), 16);
    }
}

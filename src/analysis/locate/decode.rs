//! What the bytes at one offset mean, structure by structure: the header's
//! field table, the entry decoders of `tables`, `refcount`, `snapshot`,
//! `bitmap` and `crypto::luks`, named as the specification names them.

use super::bitmaps_luks::{bitmap_data, bitmap_table_entry, luks};
use super::{Decoded, Kind, Region};
use crate::bytes::be32;
use crate::header::{Extension, ExtensionKind};
use crate::image::Qcow2;
use crate::io::read_into;
use crate::refcount::get_refcount;
use crate::tables::L1Entry;
use crate::types::HostOffset;
/// Snapshot-table entry fields: offset in the entry, size, name.
const SNAPSHOT_FIELDS: &[(u64, u64, &str)] = &[
    (0, 8, "l1_table_offset"),
    (8, 4, "l1_size"),
    (12, 2, "id_str_size"),
    (14, 2, "name_size"),
    (16, 4, "date_sec"),
    (20, 4, "date_nsec"),
    (24, 8, "vm_clock_nsec"),
    (32, 4, "vm_state_size"),
    (36, 4, "extra_data_size"),
];

/// Extra data of a snapshot-table entry: offset after the fixed part, size, name.
const SNAPSHOT_EXTRA: &[(u64, u64, &str)] = &[
    (0, 8, "vm_state_size_large"),
    (8, 8, "disk_size"),
    (16, 8, "icount"),
];

/// Bitmap directory entry fields: offset in the entry, size, name.
const BITMAP_FIELDS: &[(u64, u64, &str)] = &[
    (0, 8, "bitmap_table_offset"),
    (8, 4, "bitmap_table_size"),
    (12, 4, "flags"),
    (16, 1, "type"),
    (17, 1, "granularity_bits"),
    (18, 2, "name_size"),
    (20, 4, "extra_data_size"),
];

fn field_at(fields: &[(u64, u64, &'static str)], rel: u64) -> Option<(u64, u64, &'static str)> {
    fields
        .iter()
        .copied()
        .find(|(o, n, _)| rel >= *o && rel < o.saturating_add(*n))
}
pub(super) fn read_be(img: &Qcow2, at: HostOffset, size: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    let n = usize::try_from(size).ok().filter(|n| *n <= 8)?;
    let dst = b.get_mut(8usize.saturating_sub(n)..)?;
    let got = read_into(img.src.as_ref(), "field", at, dst).ok()?;
    (got == n).then(|| u64::from_be_bytes(b))
}

/// What the byte at `offset`, inside region `r`, is: the entry or field there.
pub(super) fn decode_in(img: &Qcow2, r: &Region, offset: HostOffset) -> Option<Decoded> {
    let rel = offset.get().checked_sub(r.start.get())?;
    let d = match &r.kind {
        Kind::Header => header_field(img, offset),
        Kind::Extension(i) => {
            let e = img.extensions.get(*i)?;
            extension(e, r, rel)
        }
        Kind::BackingName => Decoded {
            structure: "backing file name".into(),
            item: "name".into(),
            start: r.start,
            end: r.end,
            raw: None,
            meaning: format!(
                "the backing file is \"{}\" ({}; backing_file_size {} bytes)",
                img.backing_name.as_deref().unwrap_or(""),
                backing_name_end(img, r),
                img.header.backing_file_size
            ),
        },
        Kind::L1(s) => l1_entry(img, r, rel, s)?,
        Kind::L2 { snapshot, l1_index } => l2_entry(img, r, rel, snapshot, *l1_index)?,
        Kind::RefcountTable => refcount_table_entry(img, r, rel)?,
        Kind::RefcountBlock(ti) => refcount_block_entry(img, r, rel, *ti)?,
        Kind::Snapshot(i) => snapshot_field(img, r, rel, *i)?,
        Kind::BitmapEntry(i) => bitmap_entry_field(img, r, rel, *i)?,
        Kind::BitmapTable(i) => bitmap_table_entry(img, *i, r, rel)?,
        Kind::BitmapData { bitmap, entry } => bitmap_data(img, *bitmap, *entry, r, rel)?,
        Kind::Luks => luks(img, r, offset)?,
    };
    Some(d)
}

/// How the backing file name in `r` ends: where QEMU stops reading it.
fn backing_name_end(img: &Qcow2, r: &Region) -> String {
    // No more than QEMU reads of a name (1023 bytes).
    let len = r.end.get().saturating_sub(r.start.get()).min(1023);
    let nul = crate::io::read_exact(&*img.src, "backing file name", r.start, len)
        .ok()
        .and_then(|b| b.iter().position(|&c| c == 0));
    match nul {
        Some(at) => format!("QEMU reads it to the NUL byte at {at} of its bytes"),
        None => "not NUL-terminated".into(),
    }
}

/// The name of an L1 table: the active one (`None`) or snapshot `i`'s.
fn l1_name(img: &Qcow2, i: &Option<usize>) -> String {
    match i {
        None => "active L1 table".to_string(),
        Some(i) => img
            .snapshots
            .snapshots
            .get(*i)
            .map_or("a snapshot's L1 table".into(), |s| {
                format!("L1 table of snapshot {} '{}'", s.id, s.name)
            }),
    }
}

/// The header field at `offset`, or the padding after the last one.
fn header_field(img: &Qcow2, offset: HostOffset) -> Decoded {
    let fields = img.header.fields();
    match fields
        .iter()
        .find(|f| offset >= f.offset && offset < f.offset.saturating_add(f.size))
    {
        Some(f) => Decoded {
            structure: "header".into(),
            item: f.name.into(),
            start: f.offset,
            end: f.offset.saturating_add(f.size),
            raw: Some(f.value),
            meaning: f.meaning.clone(),
        },
        None => Decoded {
            structure: "header".into(),
            item: "padding".into(),
            start: offset,
            end: offset.saturating_add(1),
            raw: None,
            meaning: "bytes after the last field, inside header_length".into(),
        },
    }
}

/// Entry `rel / 8` of an L1 table (`s`: whose, as in [`Kind::L1`]).
fn l1_entry(img: &Qcow2, r: &Region, rel: u64, s: &Option<usize>) -> Option<Decoded> {
    let geo = img.geometry();
    let i = rel / 8;
    let start = r.start.saturating_entry(i, 8);
    let raw = read_be(img, start, 8)?;
    Some(Decoded {
        structure: format!("{} at {:#x}", l1_name(img, s), r.start),
        item: format!("entry {i}"),
        start,
        end: start.saturating_add(8),
        raw: Some(raw),
        meaning: L1Entry(raw).describe(&geo, s.is_none()),
    })
}

/// The L2 entry at `rel` of the table that entry `l1_index` of L1 table `snapshot` names.
fn l2_entry(
    img: &Qcow2,
    r: &Region,
    rel: u64,
    snapshot: &Option<usize>,
    l1_index: u64,
) -> Option<Decoded> {
    let geo = img.geometry();
    let es = geo.l2_entry_size();
    let j = rel.checked_div(es)?;
    let start = r.start.saturating_entry(j, es);
    let t = img.l2_table(r.start).ok()?;
    let e = t.get(usize::try_from(j).ok()?)?;
    let guest = geo
        .guest_offset(l1_index, j, 0)
        .map_or("past the addressable disk".into(), |g| {
            format!("guest {:#x}", g.0)
        });
    Some(Decoded {
        structure: format!(
            "L2 table at {:#x} ({}[{l1_index}])",
            r.start,
            l1_name(img, snapshot)
        ),
        item: format!("entry {j} ({guest})"),
        start,
        end: start.saturating_add(es),
        raw: Some(e.raw),
        meaning: e.describe(&geo, img.header.has_data_file()),
    })
}

/// Entry `rel / 8` of the refcount table.
fn refcount_table_entry(img: &Qcow2, r: &Region, rel: u64) -> Option<Decoded> {
    let i = rel / 8;
    let start = r.start.saturating_entry(i, 8);
    let raw = read_be(img, start, 8)?;
    let rg = img.refcount_geometry();
    let first = i.checked_shl(rg.block_bits()).unwrap_or(u64::MAX);
    let per = rg.entries_per_block();
    let meaning = match crate::refcount::RefTableEntry(raw).block_offset() {
        Some(o) => format!(
            "refcount block at {:#x}, counting host clusters {first} to {}",
            o.0,
            first.saturating_add(per.saturating_sub(1))
        ),
        None if raw == 0 => format!(
            "no refcount block: host clusters {first} to {} have refcount 0",
            first.saturating_add(per.saturating_sub(1))
        ),
        None => "reserved bits set and no block offset".into(),
    };
    Some(Decoded {
        structure: format!("refcount table at {:#x}", r.start),
        item: format!("entry {i}"),
        start,
        end: start.saturating_add(8),
        raw: Some(raw),
        meaning,
    })
}

/// The refcount at `rel` in the block named by refcount table entry `ti`.
fn refcount_block_entry(img: &Qcow2, r: &Region, rel: u64, ti: u64) -> Option<Decoded> {
    let geo = img.geometry();
    let order = img.header.refcount_order.min(6);
    let bits = 1u64 << order;
    let index = rel.saturating_mul(8) >> order;
    let block = img.refcount_block(r.start).ok()?;
    let value = get_refcount(&block, order, index);
    let rg = img.refcount_geometry();
    let cluster = ti
        .checked_shl(rg.block_bits())
        .and_then(|c| c.checked_add(index));
    let start = r.start.saturating_add(index.saturating_mul(bits) / 8);
    let end = r
        .start
        .saturating_add(index.saturating_add(1).saturating_mul(bits).div_ceil(8));
    Some(Decoded {
        structure: format!(
            "refcount block at {:#x} (refcount table entry {ti})",
            r.start
        ),
        item: format!("entry {index} ({bits}-bit)"),
        start,
        end,
        raw: Some(value),
        meaning: match cluster {
            Some(c) => format!(
                "host cluster {c} (offset {:#x}) has refcount {value}",
                c.saturating_mul(geo.cluster_size())
            ),
            None => format!("refcount {value} of a cluster past 2^64"),
        },
    })
}

/// The field at `rel` of snapshot table entry `i`.
fn snapshot_field(img: &Qcow2, r: &Region, rel: u64, i: usize) -> Option<Decoded> {
    let sn = img.snapshots.snapshots.get(i)?;
    let structure = format!(
        "snapshot table entry {i} (ID {} '{}') at {:#x}",
        sn.id, sn.name, r.start
    );
    let extra = u64::from(sn.extra_data_size);
    let id_len = sn.id.len() as u64;
    let (start, size, item, meaning) = if let Some((o, n, name)) = field_at(SNAPSHOT_FIELDS, rel) {
        let meaning = match name {
            "l1_table_offset" => {
                format!("the snapshot's L1 table is at {:#x}", sn.l1_table_offset)
            }
            "l1_size" => format!("{} L1 entries", sn.l1_size),
            "id_str_size" => format!("the ID \"{}\" is {id_len} bytes", sn.id),
            "name_size" => format!("the name \"{}\" is {} bytes", sn.name, sn.name.len()),
            "date_sec" => "seconds since the epoch when it was taken".into(),
            "date_nsec" => "nanoseconds of that date".into(),
            "vm_clock_nsec" => "the guest clock when it was taken, in nanoseconds".into(),
            "vm_state_size" => "saved VM state size (32-bit field)".into(),
            _ => format!("{extra} bytes of extra data follow"),
        };
        (o, n, name.to_string(), meaning)
    } else if rel < 40u64.saturating_add(extra) {
        let x = rel.saturating_sub(40);
        match field_at(SNAPSHOT_EXTRA, x) {
            Some((o, n, name)) if o.saturating_add(n) <= extra => {
                let meaning = match name {
                    "vm_state_size_large" => {
                        format!("saved VM state: {} bytes", sn.vm_state_size)
                    }
                    "disk_size" => sn
                        .disk_size
                        .map_or("-".into(), |d| format!("the virtual disk was {d} bytes")),
                    _ => sn.icount.map_or("no instruction count (-1)".into(), |c| {
                        format!("instruction count {c}")
                    }),
                };
                (
                    40u64.saturating_add(o),
                    n,
                    format!("extra data: {name}"),
                    meaning,
                )
            }
            _ => (
                rel,
                1,
                "extra data".into(),
                "extra data qinspect does not know".into(),
            ),
        }
    } else if rel < 40u64.saturating_add(extra).saturating_add(id_len) {
        (
            40u64.saturating_add(extra),
            id_len,
            "id_str".into(),
            format!("the ID \"{}\"", sn.id),
        )
    } else {
        let at = 40u64.saturating_add(extra).saturating_add(id_len);
        (
            at,
            sn.entry_len.saturating_sub(at),
            "name".into(),
            format!("the name \"{}\"", sn.name),
        )
    };
    let s = r.start.saturating_add(start);
    Some(Decoded {
        structure,
        item,
        start: s,
        end: s.saturating_add(size.max(1)),
        raw: (size <= 8 && start < 40u64.saturating_add(extra))
            .then(|| read_be(img, s, size))
            .flatten(),
        meaning,
    })
}

/// Where bitmap `i`'s table is, and how much of it lies past the end of the
/// file (QEMU reads zeros there, or fails past `BDRV_MAX_LENGTH`).
fn table_offset_meaning(img: &Qcow2, i: usize, b: &crate::bitmap::BitmapEntry) -> String {
    let at = format!("the bitmap table is at {:#x}", b.table_offset);
    let len = b.table_bytes();
    if b.table_offset.get().saturating_add(len) <= img.file_len() {
        return at;
    }
    if b.table_ends_past_limit() {
        return format!(
            "{at}, ending past {:#x}, the largest offset QEMU reads: its read of the table fails",
            crate::types::BDRV_MAX_LENGTH
        );
    }
    match img.bitmap_tables.table(i) {
        Ok(t) if t.stored_len() == 0 => {
            format!("{at}, past the end of the file: QEMU reads the whole table as zeros")
        }
        Ok(t) => format!(
            "{at}; its last {} of {} entries lie past the end of the file and read as zeros",
            t.past_eof(),
            t.len()
        ),
        Err(_) => format!("{at}, past the end of the file"),
    }
}

/// The field at `rel` of bitmap directory entry `i`.
fn bitmap_entry_field(img: &Qcow2, r: &Region, rel: u64, i: usize) -> Option<Decoded> {
    let dir = img.bitmaps.as_ref()?.as_ref().ok()?;
    let b = dir.get(i)?;
    let extra = u64::from(b.extra_data_size);
    let (start, size, item, meaning) = match field_at(BITMAP_FIELDS, rel) {
        Some((o, n, name)) => {
            let meaning = match name {
                "bitmap_table_offset" => table_offset_meaning(img, i, b),
                "bitmap_table_size" => format!("{} bitmap table entries", b.table_size),
                "flags" => match b.flag_names() {
                    v if v.is_empty() => "no flags".into(),
                    v => v.join(", "),
                },
                "type" => {
                    if b.bitmap_type == 1 {
                        "dirty tracking bitmap".into()
                    } else {
                        format!("type {} (QEMU knows only 1)", b.bitmap_type)
                    }
                }
                "granularity_bits" => {
                    format!("one bit covers {} guest bytes", b.granularity())
                }
                "name_size" => format!("the name \"{}\" is {} bytes", b.name, b.name.len()),
                _ => format!("{extra} bytes of extra data follow"),
            };
            (o, n, name.to_string(), meaning)
        }
        None if rel < 24u64.saturating_add(extra) => {
            (24, extra, "extra data".into(), "extra data".into())
        }
        None => {
            let at = 24u64.saturating_add(extra);
            (
                at,
                b.name.len() as u64,
                "name".into(),
                format!("the name \"{}\"", b.name),
            )
        }
    };
    let s = r.start.saturating_add(start);
    Some(Decoded {
        structure: format!("bitmap directory entry {i} '{}' at {:#x}", b.name, r.start),
        item,
        start: s,
        end: s.saturating_add(size.max(1)),
        raw: (start < 24).then(|| read_be(img, s, size)).flatten(),
        meaning,
    })
}

fn extension(e: &Extension, r: &Region, rel: u64) -> Decoded {
    let structure = format!("header extension '{}' at {:#x}", e.type_name(), r.start);
    let at = |o: u64, n: u64| {
        (
            r.start.saturating_add(o),
            r.start.saturating_add(o).saturating_add(n),
        )
    };
    let (item, (start, end), raw, meaning) = match rel {
        0..4 => (
            "type".to_string(),
            at(0, 4),
            Some(u64::from(e.ext_type)),
            format!("{:#010x}: {}", e.ext_type, e.type_name()),
        ),
        4..8 => (
            "length".into(),
            at(4, 4),
            Some(u64::from(e.length)),
            format!("{} bytes of data, padded to 8", e.length),
        ),
        _ if rel >= u64::from(e.length).saturating_add(8) => (
            "padding".into(),
            (
                r.start.saturating_add(rel),
                r.start.saturating_add(rel).saturating_add(1),
            ),
            None,
            "padding to a multiple of 8".into(),
        ),
        _ => {
            let x = rel.saturating_sub(8);
            match &e.kind {
                ExtensionKind::BackingFormat { format } => (
                    "data".into(),
                    at(8, u64::from(e.length)),
                    None,
                    format!("the backing file's format is \"{format}\""),
                ),
                ExtensionKind::DataFile { name } => (
                    "data".into(),
                    at(8, u64::from(e.length)),
                    None,
                    format!("the external data file is \"{name}\""),
                ),
                ExtensionKind::FeatureTable { names } => {
                    let k = x / 48;
                    let n = names.get(usize::try_from(k).unwrap_or(usize::MAX));
                    (
                        format!("entry {k}"),
                        at(8u64.saturating_add(k.saturating_mul(48)), 48),
                        None,
                        n.map_or("a feature name".into(), |n| {
                            format!("type {} bit {}: \"{}\"", n.group_raw, n.bit, n.name)
                        }),
                    )
                }
                ExtensionKind::Bitmaps {
                    nb_bitmaps,
                    directory_size,
                    directory_offset,
                    ..
                } => {
                    let (o, n, name, v, m) = match x {
                        0..4 => (
                            0,
                            4,
                            "nb_bitmaps",
                            u64::from(*nb_bitmaps),
                            format!("{nb_bitmaps} bitmaps"),
                        ),
                        4..8 => (4, 4, "reserved", 0, "must be 0".into()),
                        8..16 => (
                            8,
                            8,
                            "bitmap_directory_size",
                            *directory_size,
                            format!("{directory_size} bytes"),
                        ),
                        _ => (
                            16,
                            8,
                            "bitmap_directory_offset",
                            directory_offset.get(),
                            format!("the bitmap directory is at {directory_offset}"),
                        ),
                    };
                    let v = if name == "reserved" {
                        be32(&e.data, 4).into()
                    } else {
                        v
                    };
                    (name.into(), at(8u64.saturating_add(o), n), Some(v), m)
                }
                ExtensionKind::Crypto { offset, length } => {
                    if x < 8 {
                        (
                            "offset".into(),
                            at(8, 8),
                            Some(offset.get()),
                            format!("the LUKS header is at {offset}"),
                        )
                    } else {
                        (
                            "length".into(),
                            at(16, 8),
                            Some(*length),
                            format!("{length} bytes"),
                        )
                    }
                }
                ExtensionKind::Unknown => (
                    "data".into(),
                    at(8, u64::from(e.length)),
                    None,
                    "data of an extension type QEMU ignores".into(),
                ),
            }
        }
    };
    Decoded {
        structure,
        item,
        start,
        end,
        raw,
        meaning,
    }
}

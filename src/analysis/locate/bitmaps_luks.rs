//! Bitmap tables, the bitmap data clusters they name, and the LUKS header
//! region: what a byte there means.

use super::decode::read_be;
use super::{Decoded, Region};
use crate::image::Qcow2;
use crate::types::HostOffset;

/// Guest bytes one bitmap table entry covers: a cluster of bits, each bit
/// `granularity` bytes.
fn bytes_per_table_entry(img: &Qcow2, b: &crate::bitmap::BitmapEntry) -> u64 {
    img.geometry()
        .cluster_size()
        .saturating_mul(8)
        .saturating_mul(b.granularity())
}

pub(super) fn bitmap_table_entry(img: &Qcow2, i: usize, r: &Region, rel: u64) -> Option<Decoded> {
    let b = img.bitmaps.as_ref()?.as_ref().ok()?.get(i)?;
    let j = rel / 8;
    let start = r.start.saturating_entry(j, 8);
    let raw = read_be(img, start, 8)?;
    let e = crate::bitmap::BitmapTableEntry(raw);
    let per = bytes_per_table_entry(img, b);
    let first = j.saturating_mul(per);
    let range = format!("guest {first:#x}..{:#x}", first.saturating_add(per));
    let meaning = match e.data_offset() {
        Some(o) => format!("the bits for {range} are in the data cluster at {o:#x}"),
        None if e.all_ones() => format!("no data cluster: every bit for {range} is set"),
        None => format!("no data cluster: every bit for {range} is clear"),
    };
    Some(Decoded {
        structure: format!("table of bitmap '{}' at {:#x}", b.name, r.start),
        item: format!("entry {j}"),
        start,
        end: start.saturating_add(8),
        raw: Some(raw),
        meaning,
    })
}

pub(super) fn bitmap_data(
    img: &Qcow2,
    i: usize,
    entry: u64,
    r: &Region,
    rel: u64,
) -> Option<Decoded> {
    let b = img.bitmaps.as_ref()?.as_ref().ok()?.get(i)?;
    let g = b.granularity();
    let byte = read_be(img, r.start.saturating_add(rel), 1)?;
    let first = entry
        .saturating_mul(bytes_per_table_entry(img, b))
        .saturating_add(rel.saturating_mul(8).saturating_mul(g));
    let end = first.saturating_add(g.saturating_mul(8));
    Some(Decoded {
        structure: format!(
            "data of bitmap '{}' at {:#x} (table entry {entry})",
            b.name, r.start
        ),
        item: format!("byte {rel}"),
        start: r.start.saturating_add(rel),
        end: r.start.saturating_add(rel).saturating_add(1),
        raw: Some(byte),
        meaning: format!(
            "{} of 8 bits set: each bit is {g} guest bytes of {first:#x}..{end:#x}, the lowest bit first",
            byte.count_ones()
        ),
    })
}

pub(super) fn luks(img: &Qcow2, r: &Region, offset: HostOffset) -> Option<Decoded> {
    let structure = format!("LUKS header at {:#x}", r.start);
    // The region is the crypto extension's, so this is the header it names.
    let Some(Ok(h)) = crate::crypto::luks_header(img) else {
        return Some(Decoded {
            structure,
            item: "unreadable".into(),
            start: offset,
            end: offset.saturating_add(1),
            raw: None,
            meaning: "the region the crypto header extension reserves; its header cannot be read"
                .into(),
        });
    };
    if let Some(f) = h
        .fields()
        .into_iter()
        .find(|f| offset >= f.offset && offset < f.offset.saturating_add(f.len))
    {
        return Some(Decoded {
            structure,
            item: f.name,
            start: f.offset,
            end: f.offset.saturating_add(f.len),
            raw: None,
            meaning: format!("{} ({})", f.meaning, f.value),
        });
    }
    let rel = offset.saturating_sub(r.start);
    for slot in &h.slots {
        let from = slot.key_offset();
        let to = from.saturating_add(slot.material_len(h.key_bytes));
        if (from..to).contains(&rel) {
            return Some(Decoded {
                structure,
                item: format!("key material of slot {}", slot.index),
                start: r.start.saturating_add(from),
                end: r.start.saturating_add(to),
                raw: None,
                meaning: format!(
                    "the master key split into {} stripes and encrypted with the passphrase of slot {}{}",
                    slot.stripes,
                    slot.index,
                    if slot.active() {
                        ""
                    } else {
                        " (the slot is not in use)"
                    }
                ),
            });
        }
    }
    Some(Decoded {
        structure,
        item: "unused".into(),
        start: offset,
        end: offset.saturating_add(1),
        raw: None,
        meaning: "space the crypto header extension reserves that no key slot uses".into(),
    })
}

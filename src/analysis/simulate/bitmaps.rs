//! Persistent dirty bitmaps across a read-write open (`block/qcow2-bitmap.c`).
//!
//! Every qemu-img or qemu-io command that opens an image read-write loads its
//! persistent bitmaps, marks them in use (in place: no cluster moves), records
//! the guest writes and discards of the command in every enabled bitmap, and on
//! close stores them again (`qcow2_store_persistent_dirty_bitmaps`):
//!
//! 1. for each bitmap in directory order, a new cluster for every chunk of the
//!    bitmap with a set bit (first fit), then a new bitmap table;
//! 2. a new directory, the header extension repointed, the old directory freed;
//! 3. the old tables and their data clusters freed, the last bitmap's
//!    first, each table read again at that moment.
//!
//! The old clusters stay in use until the new ones are written, so the tables
//! move on every command, even one that fails.

use super::alloc::Discard;
use super::{Sim, SimResult};
use crate::bitmap::{BitmapMapping, BitmapTableEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::bytes::align8;
use crate::error::Error;
use crate::header::ExtensionKind;
use crate::image::Qcow2;
use crate::types::{GuestOffset, HostOffset};

/// One persistent bitmap as the simulator keeps it.
#[derive(Clone, Debug)]
pub(super) struct SimBitmap {
    /// The name as text, for messages (bytes that are not UTF-8 shown as
    /// U+FFFD).
    name: String,
    /// The name's bytes as stored, to the first NUL: QEMU's open keeps the
    /// name so (`g_strndup`), and its store writes these bytes and their
    /// count, whatever they are.
    name_bytes: Vec<u8>,
    flags: u32,
    bitmap_type: u8,
    granularity_bits: u8,
    table_offset: HostOffset,
    table_size: u32,
}

/// The bitmaps of the image and where their directory is.
#[derive(Clone, Debug, Default)]
pub(super) struct Bitmaps {
    list: Vec<SimBitmap>,
    /// Offset of the bitmaps header extension's type field.
    pub(super) ext_offset: HostOffset,
    dir_offset: HostOffset,
    dir_size: u64,
    /// Guest byte ranges written or discarded by the current command.
    pub(super) dirty: Vec<(u64, u64)>,
    /// Every bitmap is marked in use (inconsistent): QEMU neither marks nor
    /// stores them, so they stay where they are.
    frozen: bool,
    /// The autoclear bit for bitmaps is clear: QEMU ignores the bitmaps and
    /// its read-write open rewrites the header without the extension
    /// ([`Sim::drop_ignored_bitmaps`]); `list` is empty.
    drop_extension: bool,
    /// The directory QEMU's open writes in place, marking the bitmaps in use,
    /// has another size than the one in the file (names with a NUL inside,
    /// which QEMU keeps to the NUL): the open fails
    /// ([`Sim::drop_ignored_bitmaps`]).
    in_place_fails: bool,
}

/// QEMU's own refusal to open `img` at all (read-only too) for its
/// bitmap directory, in the block layer's words (each command puts its own
/// before them): a directory whose entries do not fit it ("Broken bitmap
/// directory", [`CorruptKind::BitmapDirectoryBroken`](crate::error::CorruptKind::BitmapDirectoryBroken)) or end before the
/// count the extension gives ([`CorruptKind::BitmapDirectoryShort`](crate::error::CorruptKind::BitmapDirectoryShort)) or go on
/// past it ([`CorruptKind::BitmapDirectoryLong`](crate::error::CorruptKind::BitmapDirectoryLong)), an
/// entry with extra data ("Bitmap extra data is not supported", whatever its
/// flags), or one that fails QEMU's constraints (flags it does not know, a
/// table over its size limit, ...: [`CorruptKind::BitmapDirectoryEntry`](crate::error::CorruptKind::BitmapDirectoryEntry)).
/// The open found it; with the autoclear bit for bitmaps clear QEMU ignores
/// the extension, and the open does not look.
pub(super) fn open_fails(img: &Qcow2) -> Option<String> {
    img.problems.iter().find_map(|e| match e {
        Error::Invalid { kind, reason, .. } if kind.is_bitmap_directory() => Some(reason.clone()),
        _ => None,
    })
}

/// The bitmap directory `bitmap_list_store` writes for `list`.
fn directory(list: &[SimBitmap]) -> Vec<u8> {
    let mut dir = Vec::new();
    for bm in list {
        dir.extend_from_slice(&bm.table_offset.get().to_be_bytes());
        dir.extend_from_slice(&bm.table_size.to_be_bytes());
        dir.extend_from_slice(&bm.flags.to_be_bytes());
        dir.push(bm.bitmap_type);
        dir.push(bm.granularity_bits);
        dir.extend_from_slice(&(bm.name_bytes.len() as u16).to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(&bm.name_bytes);
        dir.resize(align8(dir.len() as u64) as usize, 0);
    }
    dir
}

/// Read the bitmaps of `img`: `Ok(None)` without any, `Err` with the reason the
/// simulator cannot follow what QEMU would do with them.
pub(super) fn load(img: &Qcow2) -> std::result::Result<Option<Bitmaps>, String> {
    let Some(ext) = img
        .extensions
        .iter()
        .find(|e| matches!(e.kind, ExtensionKind::Bitmaps { .. }))
    else {
        return Ok(None);
    };
    let ExtensionKind::Bitmaps {
        directory_offset,
        directory_size,
        ..
    } = ext.kind
    else {
        return Ok(None);
    };
    if img.header.autoclear_features & crate::header::AUTOCLEAR_BITMAPS == 0 {
        // A program without bitmap support changed the image: QEMU ignores
        // the bitmaps and drops the extension on the first read-write open.
        return Ok(Some(Bitmaps {
            ext_offset: ext.offset,
            dir_offset: directory_offset,
            dir_size: directory_size,
            drop_extension: true,
            ..Bitmaps::default()
        }));
    }
    let entries = match &img.bitmaps {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(format!("the bitmap directory cannot be read: {e}")),
        None => return Ok(None),
    };
    let mut list = Vec::new();
    // Bitmaps marked in use were not stored cleanly: QEMU loads them as
    // inconsistent and never stores them again (they keep their table and
    // their directory entry). When every bitmap is so, nothing of them
    // changes on the open or the close.
    let frozen = !entries.is_empty() && entries.iter().all(|e| e.flags & FLAG_IN_USE != 0);
    // The directory QEMU's open writes in place: each entry's 24 bytes and
    // its name to the first NUL, padded to 8 bytes.
    let mut in_place = 0u64;
    for e in entries {
        let at = e
            .entry_offset
            .get()
            .saturating_add(24)
            .saturating_add(u64::from(e.extra_data_size));
        let raw = crate::io::read_exact(
            &*img.src,
            "a bitmap name",
            HostOffset(at),
            u64::from(e.name_size),
        )
        .map_err(|e| e.to_string())?;
        let name_bytes = crate::bytes::c_string(&raw).to_vec();
        in_place = in_place.saturating_add(align8(24u64.saturating_add(name_bytes.len() as u64)));
        if !(9..=31).contains(&e.granularity_bits) {
            return Err(format!(
                "bitmap '{}' has granularity bits {}, outside what QEMU loads (9..31)",
                e.name, e.granularity_bits
            ));
        }
        list.push(SimBitmap {
            name: e.name.clone(),
            name_bytes,
            flags: e.flags,
            bitmap_type: e.bitmap_type,
            granularity_bits: e.granularity_bits,
            table_offset: e.table_offset,
            table_size: e.table_size,
        });
    }
    Ok(Some(Bitmaps {
        list,
        ext_offset: ext.offset,
        dir_offset: directory_offset,
        dir_size: directory_size,
        dirty: Vec::new(),
        frozen,
        drop_extension: false,
        in_place_fails: !frozen && in_place != directory_size,
    }))
}

impl Sim {
    /// QEMU's read-write open of an image whose bitmaps extension it ignores
    /// (autoclear bit 0 clear, as a program without bitmap support leaves it):
    /// `qcow2_update_header` writes cluster 0 again from what the open read
    /// ([`Sim::qemu_header_cluster`]), without the extension. The directory, tables and data clusters stay allocated,
    /// named by nothing: leaks for `qemu-img check`.
    ///
    /// The open whose bitmaps QEMU cannot mark in use in place
    /// (`update_ext_header_and_dir_in_place`: the directory of their names,
    /// each to its first NUL, has another size than the file's) clears that
    /// bit instead and fails.
    ///
    /// Any other open writes the header again where it marks bitmaps in use
    /// or clears autoclear bits QEMU does not know
    /// ([`Sim::open_header_update`]), then the marked directory in place.
    ///
    /// All of them write the header with `qcow2_update_header`: where what it
    /// writes does not fit the cluster, it writes nothing and fails (ENOSPC),
    /// and so does the open, of this command and of every later one
    /// ([`Sim::header_does_not_fit`]).
    pub(super) fn drop_ignored_bitmaps(&mut self, op: &super::Op) -> SimResult<()> {
        let dropping = self.bitmaps.as_ref().is_some_and(|b| b.drop_extension);
        let rewrites = dropping || self.marks_bitmaps() || self.unknown_autoclear() != 0;
        if rewrites && self.qemu_header_cluster()?.is_none() {
            return Err(self.header_does_not_fit(op, dropping));
        }
        if self.bitmaps.as_ref().is_some_and(|b| b.in_place_fails) {
            return self.in_place_marking_fails(op);
        }
        if !dropping {
            self.open_header_update()?;
            return self.mark_bitmaps_in_use();
        }
        let Some(out) = self.qemu_header_cluster()? else {
            return Ok(());
        };
        let why = if self.version < 3 {
            "the image is version 2, which has no autoclear bits, so QEMU cannot tell whether a program without bitmap support changed it (it warns so)"
        } else {
            "a program without bitmap support changed the image (autoclear bit 0 is clear)"
        };
        self.note(format!("{why}: QEMU ignores its bitmaps and writes the header again without the bitmaps extension; the bitmap directory, tables and data stay allocated as leaks"));
        self.why("the header is written again without the bitmaps extension");
        self.write_bytes(HostOffset(0), &out)?;
        self.bitmaps = None;
        Ok(())
    }

    /// The open's header update (`dropping` the bitmaps extension, or else
    /// clearing autoclear bit 0 to mark them in use, or else clearing the
    /// autoclear bits QEMU does not know) that does not
    /// fit the header cluster: nothing is written, the open fails, and every
    /// later open fails the same way before it loads the bitmaps (the file
    /// is as it was), so they are not stored on any close.
    fn header_does_not_fit(&mut self, op: &super::Op, dropping: bool) -> super::SimError {
        let (what, words) = if dropping {
            (
                "drops the ignored bitmaps extension",
                "Could not update qcow2 header",
            )
        } else if self.marks_bitmaps() {
            (
                "clears autoclear bit 0 to mark the bitmaps in use",
                "Can't update bitmap directory",
            )
        } else {
            (
                "clears the autoclear bits it does not know",
                "Could not update qcow2 header",
            )
        };
        let no_space = super::update_header::NO_SPACE;
        self.note(format!(
            "QEMU's open {what} by writing the header cluster again (qcow2_update_header), but what it writes does not fit the cluster: it writes nothing and the open fails ({no_space}), as every later one does"
        ));
        let reason = format!("{words}: {no_space}");
        let e = super::SimError::Qemu(super::backing::open_words(op, &self.path, &reason));
        self.open_fails = Some(reason);
        self.bitmaps = None;
        e
    }

    /// The open's failed marking of the bitmaps in use (see
    /// [`Sim::drop_ignored_bitmaps`]): the header written again, the
    /// extension kept (QEMU still counts the bitmaps) and autoclear bit 0
    /// clear; then the open fails. The next open ignores the bitmaps.
    fn in_place_marking_fails(&mut self, op: &super::Op) -> SimResult<()> {
        self.note("QEMU's open marks the bitmaps in use by writing their directory in place, but the directory of their names (each to its first NUL byte, as QEMU reads them) has another size than the file's: it has cleared autoclear bit 0 first, writing the header again, and the open fails; the next open ignores the bitmaps".into());
        self.why("the open clears autoclear bit 0 before it writes the bitmap directory");
        if let Some(out) = self.qemu_header_cluster()? {
            self.write_bytes(HostOffset(0), &out)?;
        }
        let autoclear = self.header_field(crate::header::Field::AutoclearFeatures);
        self.set_header(
            crate::header::Field::AutoclearFeatures,
            autoclear & !crate::header::AUTOCLEAR_BITMAPS,
        )?;
        if let Some(b) = self.bitmaps.as_mut() {
            b.list.clear();
            b.in_place_fails = false;
            b.drop_extension = true;
        }
        Err(super::SimError::Qemu(super::backing::open_words(
            op,
            &self.path,
            "Can't update bitmap directory: Invalid argument",
        )))
    }

    /// The open marks every bitmap in use (`update_ext_header_and_dir_in_place`)
    /// by writing their directory again where it is, each entry with the
    /// in-use flag set: a program that stops before the close leaves them
    /// so, and the next open takes them as inconsistent. The close stores a
    /// new directory and frees this one, whose cluster keeps these bytes;
    /// a close stopped by a corruption does not store them, and the marking
    /// stays in the directory in use.
    fn mark_bitmaps_in_use(&mut self) -> SimResult<()> {
        if !self.marks_bitmaps() {
            return Ok(());
        }
        let Some(b) = self.bitmaps.clone() else {
            return Ok(());
        };
        let mut list = b.list.clone();
        for bm in &mut list {
            bm.flags |= FLAG_IN_USE;
        }
        let dir = directory(&list);
        if dir == self.read_bytes(b.dir_offset, dir.len() as u64) {
            return Ok(());
        }
        let saved = self.reason.clone();
        self.note("QEMU's open marks the bitmaps in use in their directory, in place".into());
        self.why("the bitmaps marked in use by the open");
        let r = self.write_bytes(b.dir_offset, &dir);
        self.reason = saved;
        r
    }

    /// Whether the image has persistent bitmaps (`qemu-img snapshot -a` refuses).
    pub(super) fn has_bitmaps(&self) -> bool {
        self.bitmaps.as_ref().is_some_and(|b| !b.list.is_empty())
    }

    /// Whether a read-write open marks bitmaps in use (rewriting the header):
    /// not when every one of them is already marked.
    pub(super) fn marks_bitmaps(&self) -> bool {
        self.bitmaps
            .as_ref()
            .is_some_and(|b| !b.list.is_empty() && !b.frozen)
    }

    /// The first bitmap marked in use (inconsistent), which QEMU refuses to
    /// resize (`qcow2_truncate_bitmaps_check`).
    pub(super) fn inconsistent_bitmap(&self) -> Option<String> {
        self.bitmaps.as_ref().and_then(|b| {
            b.list
                .iter()
                .find(|bm| bm.flags & FLAG_IN_USE != 0)
                .map(|bm| bm.name.clone())
        })
    }

    /// The block layer marks a written or discarded range in every bitmap.
    pub(super) fn mark_dirty(&mut self, offset: GuestOffset, length: u64) {
        if let Some(b) = self.bitmaps.as_mut()
            && length > 0
        {
            b.dirty.push((offset.get(), length));
        }
    }

    /// The close of a read-write open: store every bitmap again.
    pub(super) fn store_bitmaps(&mut self) -> SimResult<()> {
        let Some(b) = self.bitmaps.clone() else {
            return Ok(());
        };
        if b.list.is_empty() || b.frozen {
            return Ok(());
        }
        let saved = self.reason.clone();
        self.note(
            "closing the image: QEMU stores every persistent bitmap again, in new clusters".into(),
        );
        let mut new_list = Vec::with_capacity(b.list.len());
        let mut drop_tables: Vec<(String, HostOffset, u32)> = Vec::new();
        for bm in &b.list {
            if bm.flags & FLAG_IN_USE != 0 {
                // Inconsistent: not stored; its entry and table stay as they are.
                new_list.push(bm.clone());
                continue;
            }
            let old = self.bitmap_table(bm.table_offset, bm.table_size);
            let table = self.store_bitmap(bm, &old, &b.dirty)?;
            self.why(format!("the new table of bitmap '{}'", bm.name));
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.0.to_be_bytes()).collect();
            let off = self.alloc_clusters(
                bytes.len() as u64,
                &format!("the table of bitmap '{}'", bm.name),
            )?;
            self.write_bytes(off, &bytes)?;
            drop_tables.push((bm.name.clone(), bm.table_offset, bm.table_size));
            let mut n = bm.clone();
            n.table_offset = off;
            n.table_size = table.len() as u32;
            // bm->flags on store: enabled or not; in_use cleared.
            n.flags = bm.flags & FLAG_AUTO;
            new_list.push(n);
        }
        // bitmap_list_store, not in place: a new directory.
        let dir = directory(&new_list);
        let dir_size = dir.len() as u64;
        let dir_off = self.alloc_clusters(dir_size, "the bitmap directory")?;
        self.write_bytes(dir_off, &dir)?;
        self.why("the bitmaps extension points at the new directory");
        let at = b.ext_offset.saturating_add(8);
        self.set_extension_u64(at.saturating_add(8), "bitmap_directory_size", dir_size)?;
        self.set_extension_u64(
            at.saturating_add(16),
            "bitmap_directory_offset",
            dir_off.get(),
        )?;
        self.free_clusters(
            b.dir_offset,
            b.dir_size,
            "the old bitmap directory",
            Discard::Other,
        );
        // The old tables go in the order of the block layer's list of dirty
        // bitmaps, where each loaded bitmap went in first: the last of the
        // directory first (it matters when a free fails on the way).
        for (name, table_off, size) in drop_tables.into_iter().rev() {
            // free_bitmap_clusters reads the old table again, now: a new
            // table or data cluster may have been written over it (a table
            // whose clusters were free, past the end of the file in part).
            // It frees nothing of a table with an entry it refuses.
            let old = self.bitmap_table(table_off, size);
            if let Some((j, e)) = (0u64..)
                .zip(&old)
                .find(|(_, e)| e.problem(self.cs).is_some())
            {
                self.note(format!(
                    "the old table of bitmap '{name}' now holds an entry QEMU refuses (entry {j}: {:#x}): it is not freed, nor the clusters it names",
                    e.0
                ));
                continue;
            }
            for e in &old {
                if let Some(data) = e.data_offset() {
                    // `clear_bitmap_table`: a data cluster that reaches 0 is
                    // punched, which shows when the new table names it too
                    // (it was allocated again from a cluster the old table
                    // named).
                    self.free_clusters(
                        data,
                        self.cs,
                        &format!("an old data cluster of bitmap '{name}'"),
                        Discard::Always,
                    );
                }
            }
            let len = (old.len() as u64).saturating_mul(8);
            self.free_clusters(
                table_off,
                len,
                &format!("the old table of bitmap '{name}'"),
                Discard::Other,
            );
        }
        if let Some(bs) = self.bitmaps.as_mut() {
            bs.list = new_list;
            bs.dir_offset = dir_off;
            bs.dir_size = dir_size;
            bs.dirty.clear();
        }
        self.reason = saved;
        Ok(())
    }

    /// The bitmap table of `size` entries at `off`, as the file holds it now
    /// (zeros past its end). `store_bitmaps` reads each old table twice, as
    /// QEMU does: once to store the bitmap, and again when it frees the
    /// table, by when a new table or data cluster may have been written over
    /// it.
    fn bitmap_table(&mut self, off: HostOffset, size: u32) -> Vec<BitmapTableEntry> {
        let bytes = self.read_bytes(off, u64::from(size).saturating_mul(8));
        crate::bitmap::decode_table(&bytes).collect()
    }

    /// `store_bitmap`: a new cluster for every chunk with a set bit, in order.
    fn store_bitmap(
        &mut self,
        bm: &SimBitmap,
        old: &[BitmapTableEntry],
        dirty: &[(u64, u64)],
    ) -> SimResult<Vec<BitmapTableEntry>> {
        let cs = self.cs;
        let g_bits = u32::from(bm.granularity_bits);
        let bits_per_cluster = cs.saturating_mul(8);
        // The bitmap covers the disk: one bit per granule, rounded up.
        let total_bits = self.size.div_ceil(1u64 << g_bits);
        let enabled = bm.flags & FLAG_AUTO != 0;
        // The table covers the disk as it is now (a resize changes it).
        let table_size = total_bits.div_ceil(bits_per_cluster);
        let mut table = vec![BitmapTableEntry(0); table_size as usize];
        for (k, slot) in table.iter_mut().enumerate() {
            let k = k as u64;
            let first_bit = k.saturating_mul(bits_per_cluster);
            if first_bit >= total_bits {
                break;
            }
            let nbits = total_bits.saturating_sub(first_bit).min(bits_per_cluster);
            let e = old.get(k as usize).copied().unwrap_or(BitmapTableEntry(0));
            let mut data = match e.mapping() {
                BitmapMapping::AllOnes => vec![0xffu8; cs as usize],
                BitmapMapping::AllZeros => vec![0u8; cs as usize],
                BitmapMapping::Data { offset } => self.read_bytes(offset, cs),
            };
            if enabled {
                for &(off, len) in dirty {
                    let from = off >> g_bits;
                    let to = off.saturating_add(len).div_ceil(1u64 << g_bits);
                    let lo = from.max(first_bit);
                    let hi = to.min(first_bit.saturating_add(nbits));
                    for bit in lo..hi {
                        let i = bit.saturating_sub(first_bit);
                        if let Some(byte) = data.get_mut((i / 8) as usize) {
                            *byte |= 1 << (i % 8);
                        }
                    }
                }
            }
            // Bits past the end of the disk are not part of the bitmap.
            for i in nbits..bits_per_cluster {
                if let Some(byte) = data.get_mut((i / 8) as usize) {
                    *byte &= !(1u8 << (i % 8));
                }
            }
            if data.iter().all(|&x| x == 0) {
                continue;
            }
            let purpose = format!("data of bitmap '{}' (table entry {k})", bm.name);
            self.why(purpose.clone());
            let off = self.alloc_clusters(cs, &purpose)?;
            self.write_bytes(off, &data)?;
            *slot = BitmapTableEntry::data(off);
        }
        Ok(table)
    }

    /// Where the bitmap tables and directory are now, for people.
    pub fn bitmap_locations(&self) -> Vec<(String, HostOffset)> {
        let mut v = Vec::new();
        if let Some(b) = &self.bitmaps {
            for bm in &b.list {
                v.push((format!("table of bitmap '{}'", bm.name), bm.table_offset));
            }
            v.push(("bitmap directory".into(), b.dir_offset));
        }
        v
    }
}

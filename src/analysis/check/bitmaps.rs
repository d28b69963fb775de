//! The bitmaps' part of the walk: the directory, each table and the data
//! clusters it names (`qcow2_check_bitmaps_refcounts`), from what the open read.

use super::detail::FindingDetail;
use super::refusal::Refusal;
use super::report::{Category, FindingKind};
use super::visit::{Ctx, Visitor};
use super::walk::Walk;
use crate::error::Error;
use crate::header::{AUTOCLEAR_BITMAPS, ExtensionKind};
use std::collections::{HashMap, HashSet};

/// Bitmap table entries the check goes through at most, over the distinct
/// tables of the directory: tables that overlap can name far more entries
/// than the open reads bytes of them.
pub(super) const MAX_BITMAP_ENTRIES_WALKED: u64 = 1 << 26;

impl Walk<'_> {
    /// `qcow2_check_bitmaps_refcounts`; false if the check must stop.
    pub(super) fn walk_bitmaps(&mut self, v: &mut dyn Visitor) -> bool {
        let img = self.img;
        if img.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return true;
        }
        let Some((count, size, off)) = img.extensions.iter().find_map(|e| match e.kind {
            ExtensionKind::Bitmaps {
                nb_bitmaps,
                directory_size,
                directory_offset,
                ..
            } => Some((nb_bitmaps, directory_size, directory_offset)),
            _ => None,
        }) else {
            return true;
        };
        if count == 0 {
            return true;
        }
        self.inc(v, off, size, 1, Ctx::BitmapDirectory);
        // The open read the directory and the tables, from the same extension.
        let list = match &img.bitmaps {
            Some(Ok(l)) => l,
            Some(Err(e)) => {
                let msg = format!("bitmap directory cannot be loaded: {e}");
                self.find(
                    FindingKind::Corruption,
                    Category::Bitmaps,
                    FindingDetail::BitmapDirectory,
                    msg,
                    1,
                );
                self.report.aborted = Some(Refusal::BitmapDirectory {
                    offset: off,
                    error: e.clone(),
                });
                return false;
            }
            None => return true,
        };
        // A table named by several entries is gone through once; its data
        // clusters count once for each entry that names it.
        let mut weight: HashMap<(u64, u32), u64> = HashMap::new();
        for b in list {
            let n = weight
                .entry((b.table_offset.get(), b.table_size))
                .or_insert(0);
            *n = n.saturating_add(1);
        }
        let mut done: HashSet<(u64, u32)> = HashSet::new();
        let mut walked = 0u64;
        for (bi, b) in list.iter().enumerate() {
            self.inc(
                v,
                b.table_offset,
                u64::from(b.table_size) * 8,
                1,
                Ctx::BitmapTable(bi),
            );
            let table = match img.bitmap_tables.table(bi) {
                Ok(t) => t,
                Err(e @ Error::Unsupported { .. }) => {
                    self.report.aborted = Some(Refusal::BitmapTablesNotRead {
                        name: b.name.clone(),
                        offset: b.table_offset,
                        error: e,
                    });
                    return false;
                }
                Err(e) => {
                    let msg = format!("bitmap '{}' table cannot be loaded: {e}", b.name);
                    self.find(
                        FindingKind::Corruption,
                        Category::Bitmaps,
                        FindingDetail::BitmapTable,
                        msg,
                        1,
                    );
                    self.report.aborted = Some(Refusal::BitmapTable {
                        name: b.name.clone(),
                        offset: b.table_offset,
                        error: e,
                    });
                    return false;
                }
            };
            // QEMU's bitmap_table_load refuses the whole table for one invalid
            // entry, and the check fails (Invalid argument).
            if let Some(bad) = table.first_invalid() {
                let (j, problem) = (bad.index, bad.problem);
                let msg = format!(
                    "ERROR bitmap '{}' table entry {j} is invalid: {:#x} ({problem})",
                    b.name, bad.entry.0
                );
                if let Some(f) = self.find(
                    FindingKind::Corruption,
                    Category::Bitmaps,
                    FindingDetail::BitmapTableEntry,
                    msg,
                    1,
                ) {
                    f.offset = Some(bad.at);
                }
                self.report.aborted = Some(Refusal::BitmapTableEntry {
                    name: b.name.clone(),
                    offset: bad.at,
                    entry: j,
                });
                return false;
            }
            let key = (b.table_offset.get(), b.table_size);
            if !done.insert(key) {
                continue;
            }
            // Entries past the end of the file read as zeros (QEMU's read
            // there returns zeros): they name no cluster.
            walked = walked.saturating_add(table.stored_len());
            if walked > MAX_BITMAP_ENTRIES_WALKED {
                self.report.aborted = Some(Refusal::BitmapTablesNotRead {
                    name: b.name.clone(),
                    offset: b.table_offset,
                    error: Error::unsupported(
                        format!("bitmap '{}' table at {}", b.name, b.table_offset),
                        format!(
                            "not gone through: the bitmap tables hold more than {MAX_BITMAP_ENTRIES_WALKED} entries in all"
                        ),
                    ),
                });
                return false;
            }
            let w = weight.get(&key).copied().unwrap_or(1);
            for (j, e) in table.stored().enumerate() {
                if let Some(offset) = e.data_offset() {
                    self.inc(v, offset, self.cs, w, Ctx::BitmapData(bi, j as u64));
                }
            }
        }
        true
    }
}

//! The bitmaps' part of the walk: the directory, each table and the data
//! clusters it names (`qcow2_check_bitmaps_refcounts`), from what the open read.

use super::refusal::Refusal;
use super::report::{Category, FindingKind};
use super::visit::{Ctx, Visitor};
use super::walk::Walk;
use crate::header::{AUTOCLEAR_BITMAPS, ExtensionKind};
use crate::types::HostOffset;

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
            } => Some((nb_bitmaps, directory_size, directory_offset.get())),
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
                self.find(FindingKind::Corruption, Category::Bitmaps, msg, 1);
                self.report.aborted = Some(Refusal::BitmapDirectory {
                    offset: HostOffset(off),
                    error: e.clone(),
                });
                return false;
            }
            None => return true,
        };
        for (bi, b) in list.iter().enumerate() {
            self.inc(
                v,
                b.table_offset.get(),
                u64::from(b.table_size) * 8,
                1,
                Ctx::BitmapTable(bi),
            );
            let table = match img.bitmap_tables.table(bi) {
                Ok(t) => t,
                Err(e @ crate::error::Error::Unsupported { .. }) => {
                    self.report.aborted = Some(Refusal::BitmapTablesNotRead {
                        name: b.name.clone(),
                        offset: b.table_offset,
                        error: e,
                    });
                    return false;
                }
                Err(e) => {
                    let msg = format!("bitmap '{}' table cannot be loaded: {e}", b.name);
                    self.find(FindingKind::Corruption, Category::Bitmaps, msg, 1);
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
                if let Some(f) = self.find(FindingKind::Corruption, Category::Bitmaps, msg, 1) {
                    f.offset = Some(bad.at.get());
                }
                self.report.aborted = Some(Refusal::BitmapTableEntry {
                    name: b.name.clone(),
                    offset: bad.at,
                    entry: j,
                });
                return false;
            }
            for (j, e) in table.entries().enumerate() {
                if let Some(offset) = e.data_offset() {
                    self.inc(v, offset.get(), self.cs, 1, Ctx::BitmapData(bi, j as u64));
                }
            }
        }
        true
    }
}

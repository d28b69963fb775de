//! `qinspect dump`: the raw tables, entry by entry.

use super::{CmdResult, print_json, style};
use color_eyre::eyre::{bail, eyre};
use qinspect::bitmap;
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, SharedSource};
use qinspect::tables::{L1Entry, L1Mapping, L2Entry, L2Mapping};
use qinspect::types::{GuestOffset, HostOffset};
use serde::Serialize;
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

mod header;
mod refcount_block;
#[cfg(test)]
mod tests;

/// Which table to dump.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum Table {
    /// Every header field with its offset and meaning.
    Header,
    /// The header extensions.
    Extensions,
    /// The L1 table (active, or a snapshot's with --snapshot).
    L1,
    /// The L2 table behind L1 entry INDEX.
    L2,
    /// The refcount table.
    RefcountTable,
    /// The refcount block behind refcount table entry INDEX.
    RefcountBlock,
    /// The snapshot table, every field.
    Snapshots,
    /// The bitmap directory; with INDEX, that bitmap's table.
    Bitmaps,
    /// The LUKS header of an encrypted image: every field and key slot.
    Luks,
}

/// Arguments of `qinspect dump`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Every entry is shown with its position in the file, its raw value \
and what it means. Readable output leaves out all-zero entries of L2 tables, refcount blocks \
and bitmap tables (say --all to see them); --json always lists every entry.\n\n\
Examples:\n  qinspect dump l1 disk.qcow2\n  qinspect dump l2 disk.qcow2 0 --snapshot snap1\n  \
qinspect dump refcount-block disk.qcow2 0 --json"
)]
pub struct Args {
    /// Which table.
    #[arg(value_enum)]
    pub table: Table,
    /// The image file.
    pub image: PathBuf,
    /// For l2: the L1 index; for refcount-block: the refcount table index; for bitmaps: which bitmap.
    pub index: Option<u64>,
    /// Use this internal snapshot's L1 table (ID or name) for l1 and l2.
    ///
    /// A bare ID_OR_NAME is tried as an ID, then as a name; `snapshot.name=NAME`,
    /// `snapshot.id=ID` (or both, comma-separated) match exactly, as in
    /// `qemu-img convert -l`.
    #[arg(long, short = 's')]
    pub snapshot: Option<String>,
    /// Show all-zero entries too.
    #[arg(long)]
    pub all: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    index: u64,
    file_offset: HostOffset,
    raw: String,
    #[serde(flatten)]
    decoded: Value,
    meaning: String,
}

/// A table's title and its rows.
type Rows = color_eyre::Result<(String, Vec<Row>)>;

/// Run `qinspect dump`.
pub fn run(a: Args) -> CmdResult {
    let src: SharedSource = Arc::new(FileSource::open(&a.image)?);
    let img = match Qcow2::open(src.clone(), Strictness::Lenient) {
        Ok(img) => img,
        Err(e) if a.table == Table::Header => return header::refused(&a, src.as_ref(), e),
        Err(e) => return Err(e.into()),
    };
    let (title, rows) = match a.table {
        Table::Header => header::rows(&img.header)?,
        Table::Luks => luks_rows(&a, &img)?,
        Table::Extensions => extension_rows(&img)?,
        Table::L1 => l1_rows(&a, &img)?,
        Table::L2 => l2_rows(&a, &img)?,
        Table::RefcountTable => refcount_table_rows(&a, &img)?,
        Table::RefcountBlock => return refcount_block::run(&a, &img),
        Table::Snapshots => snapshot_rows(&img)?,
        Table::Bitmaps => match &img.bitmaps {
            None => bail!("{} has no bitmaps extension", a.image.display()),
            Some(Err(e)) => bail!("the bitmap directory cannot be read: {e}"),
            Some(Ok(list)) => match a.index {
                None => bitmap_directory_rows(list),
                Some(i) => bitmap_table_rows(&a, &img, list, i)?,
            },
        },
    };
    print_rows(&a, &img, &title, &rows)
}

/// Why the active L1 table `dump l1` and `dump l2` would show was not read, in
/// words (`None` for a snapshot's table, or when it was read).
fn active_l1_unread(a: &Args, img: &Qcow2) -> Option<String> {
    if a.snapshot.is_some() {
        return None;
    }
    img.l1_unread()
        .map(|e| format!("{e}; QEMU refuses to open the image and does not read the table"))
}

/// Print a table's rows (JSON with `--json`), then what QEMU would object to.
fn print_rows(a: &Args, img: &Qcow2, title: &str, rows: &[Row]) -> CmdResult {
    let unread = match a.table {
        Table::L1 => active_l1_unread(a, img),
        _ => None,
    };
    if a.json {
        let v = match &unread {
            Some(why) => json!({"table": title, "entries": rows, "not_read": why}),
            None => json!({"table": title, "entries": rows}),
        };
        print_json(&v)?;
        return Ok(0);
    }
    // What an empty list means: a table that lists every entry has none; the
    // others leave out their all-zero entries unless --all.
    let empty = match a.table {
        Table::Extensions => "(no header extensions)",
        Table::Snapshots => "(no snapshots)",
        Table::Bitmaps if a.index.is_none() => "(no bitmaps)",
        _ if a.all => "(no entries)",
        _ => "(no non-zero entries)",
    };
    write_rows(title, rows, unread.as_deref(), empty)?;
    let mut out = super::buffered_stdout();
    // The reason the table was not read is printed once, above, not again here.
    let said = unread.as_ref().and_then(|_| img.l1_unread());
    for p in img
        .problems
        .iter()
        .filter(|p| !said.is_some_and(|s| std::ptr::eq(*p, s)))
    {
        writeln!(out, "{}warning:{:#} {p}", style::BAD, style::BAD)?;
    }
    Ok(0)
}

/// A table's title, heading and rows as text; `unread`: why the table was not read;
/// `empty`: what to say when there are no rows.
fn write_rows(
    title: &str,
    rows: &[Row],
    unread: Option<&str>,
    empty: &str,
) -> color_eyre::Result<()> {
    let mut out = super::buffered_stdout();
    let (hd, dim) = (style::HEAD, style::DIM);
    writeln!(out, "{hd}{title}{hd:#}")?;
    writeln!(
        out,
        "{dim}{:>6}  {:>12}  {:>18}  meaning{dim:#}",
        "index", "file offset", "raw"
    )?;
    if let Some(why) = unread {
        writeln!(out, "  (not read: {why})")?;
    } else if rows.is_empty() {
        writeln!(out, "  {empty}")?;
    }
    for r in rows {
        writeln!(
            out,
            "{:>6}  {:>#12x}  {:>18}  {}",
            r.index, r.file_offset, r.raw, r.meaning
        )?;
    }
    out.flush()?;
    Ok(())
}

/// The LUKS header's fields and key slots.
fn luks_rows(a: &Args, img: &Qcow2) -> Rows {
    let h = qinspect::crypto::luks_header(img).ok_or_else(|| {
        eyre!(
            "{} has no LUKS header (crypt_method {}, no full disk encryption header extension)",
            a.image.display(),
            img.header.crypt_method
        )
    })??;
    let verdict = match h.check() {
        Ok(_) => "QEMU accepts it".to_string(),
        Err(e) => format!("QEMU refuses it: {e}"),
    };
    let rows = h
        .fields()
        .into_iter()
        .enumerate()
        .map(|(i, f)| Row {
            index: i as u64,
            file_offset: f.offset,
            raw: if f.value.chars().count() > 18 {
                format!("{}…", f.value.chars().take(17).collect::<String>())
            } else {
                f.value.clone()
            },
            decoded: json!({"field": f.name, "size": f.len, "value": f.value}),
            meaning: format!("{} = {}: {}", f.name, f.value, f.meaning),
        })
        .collect();
    Ok((
        format!(
            "LUKS header at {:#x} ({} bytes reserved); {verdict}",
            h.offset, h.length
        ),
        rows,
    ))
}

/// The header extensions, in file order.
fn extension_rows(img: &Qcow2) -> Rows {
    let rows = img
        .extensions
        .iter()
        .enumerate()
        .map(|(i, e)| Row {
            index: i as u64,
            file_offset: e.offset,
            raw: format!("{:#010x}", e.ext_type),
            decoded: serde_json::to_value(e).unwrap_or(Value::Null),
            meaning: format!(
                "{} ({} bytes): {}",
                e.type_name(),
                e.length,
                describe_ext(e)
            ),
        })
        .collect();
    Ok(("header extensions".into(), rows))
}

/// The L1 table (the active one, or `--snapshot`'s).
fn l1_rows(a: &Args, img: &Qcow2) -> Rows {
    let geo = img.geometry();
    let view = match &a.snapshot {
        Some(s) => img.snapshot_view(s)?,
        None => img.active_view(),
    };
    if active_l1_unread(a, img).is_some() {
        return Ok((
            format!(
                "{} at {:#x} ({} entries in the header): not read",
                view.label(),
                view.l1_offset,
                img.header.l1_size
            ),
            Vec::new(),
        ));
    }
    let cov = geo.l2_coverage();
    let rows = view
        .l1
        .iter()
        .enumerate()
        .filter(|(_, e)| a.all || a.json || e.0 != 0)
        .map(|(i, e)| {
            l1_row(
                i as u64,
                view.l1_offset,
                *e,
                cov,
                &geo,
                view.snapshot.is_none(),
            )
        })
        .collect();
    Ok((
        format!(
            "{} at {:#x} ({} entries)",
            view.label(),
            view.l1_offset,
            view.l1.len()
        ),
        rows,
    ))
}

/// The L2 table behind L1 entry INDEX.
fn l2_rows(a: &Args, img: &Qcow2) -> Rows {
    let geo = img.geometry();
    let view = match &a.snapshot {
        Some(s) => img.snapshot_view(s)?,
        None => img.active_view(),
    };
    let i = a.index.ok_or_else(|| {
        eyre!("dump l2 needs INDEX: the L1 index whose L2 table to show (see `qinspect dump l1`)")
    })?;
    if let Some(why) = active_l1_unread(a, img) {
        bail!("the {} table is not read: {why}", view.label());
    }
    let e = view.l1.get(i as usize).copied().ok_or_else(|| {
        eyre!(
            "L1 index {i} is past the end of the {} ({} entries)",
            view.label(),
            view.l1.len()
        )
    })?;
    let L1Mapping::L2Table { offset: l2_off, .. } = e.mapping() else {
        bail!(
            "{} entry {i} is {:#x}: no L2 table (the range is unallocated)",
            view.label(),
            e.0
        );
    };
    let table = img.l2_table(l2_off)?;
    let has_df = img.header.has_data_file();
    let rows = table
        .iter()
        .enumerate()
        .filter(|(_, e)| a.all || a.json || e.raw != 0 || e.bitmap != 0)
        .map(|(j, e)| l2_row(i, j as u64, l2_off, *e, img, (has_df, view.size)))
        .collect();
    Ok((
        format!(
            "L2 table at {l2_off} (from {} entry {i}, guest {:#x}..{:#x})",
            view.label(),
            i * geo.l2_coverage(),
            (i + 1) * geo.l2_coverage()
        ),
        rows,
    ))
}

/// The refcount table.
fn refcount_table_rows(a: &Args, img: &Qcow2) -> Rows {
    let t = img.refcount_table()?;
    let rg = img.refcount_geometry();
    let per = rg.entries_per_block();
    let rows = t
        .iter()
        .enumerate()
        .filter(|(_, e)| a.all || a.json || e.0 != 0)
        .map(|(i, e)| Row {
            index: i as u64,
            file_offset: img.header.refcount_table_offset.saturating_entry(i as u64, 8),
            raw: format!("{:#018x}", e.0),
            decoded: json!({"block_offset": e.block_offset().map(|o| o.0), "reserved": e.reserved_bits(), "first_cluster": i as u64 * per}),
            meaning: match e.block_offset() {
                None => format!("no refcount block: clusters {}..{} have refcount 0", i as u64 * per, (i as u64 + 1) * per),
                Some(o) => format!(
                    "refcount block at {o} for host clusters {}..{}{}",
                    i as u64 * per,
                    (i as u64 + 1) * per,
                    if e.reserved_bits() != 0 { format!(", reserved bits {:#x} set", e.reserved_bits()) } else { String::new() }
                ),
            },
        })
        .collect();
    Ok((
        format!(
            "refcount table at {:#x} ({} entries)",
            img.header.refcount_table_offset,
            t.len()
        ),
        rows,
    ))
}

/// The snapshot table, one row per snapshot.
fn snapshot_rows(img: &Qcow2) -> Rows {
    let rows = img
        .snapshots
        .snapshots
        .iter()
        .map(|s| Row {
            index: s.index as u64,
            file_offset: s.entry_offset,
            raw: format!("id {}", s.id),
            decoded: serde_json::to_value(s).unwrap_or(Value::Null),
            meaning: format!(
                "'{}': L1 table of {} entries at {:#x}, disk size {}, vm state {} bytes, taken {}{}",
                s.name,
                s.l1_size,
                s.l1_table_offset,
                s.disk_size.map(|d| d.to_string()).unwrap_or_else(|| "not stored".into()),
                s.vm_state_size,
                super::info::format_date(s.date_sec),
                if s.unknown_extra.is_empty() { String::new() } else { format!(", {} unknown extra bytes", s.unknown_extra.len()) }
            ),
        })
        .collect();
    let mut title = format!(
        "snapshot table at {:#x} ({} entries, {} bytes)",
        img.header.snapshots_offset, img.header.nb_snapshots, img.snapshots.size
    );
    if let Some(e) = &img.snapshots.error {
        title.push_str(&format!(" — could not be read completely: {e}"));
    }
    Ok((title, rows))
}

/// The bitmap directory, one row per bitmap.
fn bitmap_directory_rows(list: &[bitmap::BitmapEntry]) -> (String, Vec<Row>) {
    let rows = list
        .iter()
        .enumerate()
        .map(|(i, b)| Row {
            index: i as u64,
            file_offset: b.entry_offset,
            raw: format!("flags {:#x}", b.flags),
            decoded: serde_json::to_value(b).unwrap_or(Value::Null),
            meaning: format!(
                "'{}': granularity {}, flags [{}], table of {} entries at {:#x}",
                b.name,
                b.granularity(),
                b.flag_names().join(", "),
                b.table_size,
                b.table_offset
            ),
        })
        .collect();
    ("bitmap directory".into(), rows)
}

/// Bitmap `i`'s table.
fn bitmap_table_rows(a: &Args, img: &Qcow2, list: &[bitmap::BitmapEntry], i: u64) -> Rows {
    let geo = img.geometry();
    let b = list
        .get(i as usize)
        .ok_or_else(|| eyre!("there is no bitmap {i} ({} bitmaps)", list.len()))?;
    // The open read every table it could (each byte once); only one it did not
    // read is read here, as it always was.
    let t: Vec<bitmap::BitmapTableEntry> = match img.bitmap_tables.table(i as usize) {
        Ok(t) => t.entries().collect(),
        Err(_) => bitmap::read_table(img.src.as_ref(), b)?,
    };
    let cover = b.granularity().saturating_mul(geo.cluster_size() * 8);
    // Entries from this one on lie (at least in part) past the end of the
    // file, where QEMU reads zeros.
    let file_len = img.file_len();
    let past_from = file_len.saturating_sub(b.table_offset.get()) / 8;
    let rows = t
        .iter()
        .enumerate()
        .filter(|(_, e)| a.all || a.json || e.0 != 0)
        .map(|(j, e)| Row {
            index: j as u64,
            file_offset: b.table_offset.saturating_entry(j as u64, 8),
            raw: format!("{:#018x}", e.0),
            decoded: json!({"data_offset": e.data_offset(), "all_ones": e.all_ones()}),
            meaning: match e.data_offset() {
                Some(o) => {
                    let start = (j as u64).saturating_mul(cover);
                    let end = start.saturating_add(cover).min(img.header.size);
                    format!("bits for guest {start:#x}..{end:#x} stored at {o:#x}")
                }
                None if e.all_ones() => "every bit set (all dirty)".into(),
                None if j as u64 >= past_from => {
                    "past the end of the file: reads as zeros (every bit clear)".into()
                }
                None => "every bit clear".into(),
            },
        })
        .collect();
    let mut title = format!("bitmap '{}' table at {:#x}", b.name, b.table_offset);
    let last = (t.len() as u64).saturating_sub(1);
    if past_from < t.len() as u64 {
        let which = if past_from == last {
            format!("entry {last} lies past the end of the file ({file_len} bytes) and reads")
        } else {
            format!(
                "entries {past_from} to {last} lie past the end of the file ({file_len} bytes) and read"
            )
        };
        title.push_str(&format!(" — {which} as zeros, as QEMU reads them"));
    }
    Ok((title, rows))
}

fn describe_ext(e: &qinspect::header::Extension) -> String {
    use qinspect::header::ExtensionKind as K;
    match &e.kind {
        K::BackingFormat { format } => format!("backing file format \"{format}\""),
        K::FeatureTable { names } => names
            .iter()
            .map(|n| format!("{}:{}={}", n.group_raw, n.bit, n.name))
            .collect::<Vec<_>>()
            .join(", "),
        K::Bitmaps {
            nb_bitmaps,
            reserved,
            directory_size,
            directory_offset,
        } => format!(
            "{nb_bitmaps} bitmaps, directory {directory_size} bytes at {directory_offset:#x}{}",
            if *reserved != 0 {
                format!(", reserved {reserved:#x}")
            } else {
                String::new()
            }
        ),
        K::Crypto { offset, length } => format!("LUKS header at {offset:#x}, {length} bytes"),
        K::DataFile { name } => format!("data file \"{name}\""),
        K::Unknown => e.data.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// One L1 entry's row; `active`: whether the table is the active L1.
fn l1_row(
    i: u64,
    table: HostOffset,
    e: L1Entry,
    cov: u64,
    geo: &qinspect::types::Geometry,
    active: bool,
) -> Row {
    Row {
        index: i,
        file_offset: table.saturating_entry(i, 8),
        raw: format!("{:#018x}", e.0),
        decoded: json!({
            "l2_offset": e.l2_offset().map(|o| o.0),
            "copied": e.copied(),
            "reserved": e.reserved_bits(),
            "guest_start": i.saturating_mul(cov),
            "guest_end": i.saturating_add(1).saturating_mul(cov),
        }),
        meaning: format!(
            "guest {:#x}..{:#x}: {}",
            i.saturating_mul(cov),
            i.saturating_add(1).saturating_mul(cov),
            e.describe(geo, active)
        ),
    }
}

/// One L2 entry's row; `(has_df, disk_size)`: whether the image has a data file,
/// and the size of the disk the table belongs to.
fn l2_row(
    l1i: u64,
    j: u64,
    l2_off: HostOffset,
    e: L2Entry,
    img: &Qcow2,
    (has_df, disk_size): (bool, u64),
) -> Row {
    let geo = img.geometry();
    let guest = geo.guest_offset(l1i, j, 0).unwrap_or(GuestOffset(0));
    let m = e.mapping(&geo, has_df);
    let descriptor = match m {
        L2Mapping::Compressed { descriptor, .. } => Some(descriptor),
        _ => None,
    };
    // With a data file, a host cluster an entry names is in that file, not in
    // the image.
    let data_file = m.host_offset().and(img.data_file_words()).map(String::from);
    let mut row = Row {
        index: j,
        file_offset: l2_off.saturating_entry(j, geo.l2_entry_size()),
        raw: if geo.extended_l2 {
            format!("{:#018x}/{:#018x}", e.raw, e.bitmap)
        } else {
            format!("{:#018x}", e.raw)
        },
        decoded: json!({
            "guest_offset": guest.0,
            "type": format!("{:?}", m.cluster_type()).to_lowercase(),
            "host_offset": descriptor.is_none().then_some(e.host_offset().0),
            "copied": e.copied(),
            "compressed": descriptor,
            "reserved": e.reserved_bits(&geo),
            "bitmap": geo.extended_l2.then_some(e.bitmap),
            "subclusters": geo.extended_l2.then(|| (0..32).map(|s| m.subcluster_type(s).name()).collect::<Vec<_>>()),
        }),
        meaning: format!(
            "guest {guest}: {}",
            e.describe_in(&m, &geo, guest, &img.surroundings(disk_size))
        ),
    };
    // Only rows whose host cluster is in the data file carry its name.
    if let (Some(name), Value::Object(o)) = (data_file, &mut row.decoded) {
        o.insert("data_file".into(), Value::String(name));
    }
    row
}

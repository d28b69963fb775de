//! `qinspect info`: what `qemu-img info` says, and more.

use super::{CmdResult, print_json, style};
use qinspect::chain::{Chain, Format, OpenOptions};
use qinspect::image::{Qcow2, Strictness};
use qinspect::info::{extra_info, qemu_info_qcow2, qemu_info_raw};
use qinspect::io::{FileSource, SharedSource};
use qinspect::types::{HostOffset, human_size};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `qinspect info`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "With --json, every key `qemu-img info --output=json IMAGE` prints (except \
`children`) appears with the same name and value, plus qinspect's own: `header` (every raw \
field with its offset and meaning), `extensions`, `features`, `file-length`, `problems` (what QEMU refuses) and `notes` (oddities QEMU accepts).\n\n\
Like qemu-img, only the image itself is read for the JSON keys; the readable output also \
walks the backing chain and says if a layer is missing.\n\n\
Several images: each is summarised in turn; with --json each is one line of JSON (NDJSON), \
the object `info --json IMAGE` prints, and an image that cannot be read is \
{\"filename\", \"error\"}. One unreadable image does not stop the others; the exit code \
is then 1."
)]
pub struct Args {
    /// The image files.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// Print JSON instead of text (one line per image when there are several).
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// Arguments for a plain summary of `image`.
    pub fn for_image(image: PathBuf) -> Self {
        Args {
            images: vec![image],
            json: false,
        }
    }
}

/// Run `qinspect info`.
pub fn run(a: Args) -> CmdResult {
    if let [one] = a.images.as_slice() {
        return run_one(one, a.json.then_some(Json::Pretty));
    }
    let mut code = 0;
    for (i, image) in a.images.iter().enumerate() {
        if i > 0 && !a.json {
            writeln!(std::io::stdout())?;
        }
        let json = a.json.then_some(Json::Line);
        if let Err(e) = run_one(image, json) {
            if super::is_broken_pipe(&e) {
                return Err(e);
            }
            code = 1;
            if a.json {
                let v = serde_json::json!({
                    "filename": image.to_string_lossy(),
                    "error": e.to_string(),
                });
                emit(&v, Json::Line)?;
            } else {
                super::report_error(&e);
            }
        }
    }
    Ok(code)
}

/// How JSON is printed: pretty for one image, one line each for several.
#[derive(Clone, Copy)]
enum Json {
    Pretty,
    Line,
}

fn emit(v: &impl serde::Serialize, how: Json) -> color_eyre::Result<()> {
    match how {
        Json::Pretty => print_json(v),
        Json::Line => {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, v)?;
            writeln!(out)?;
            Ok(())
        }
    }
}

fn run_one(image: &std::path::Path, json: Option<Json>) -> CmdResult {
    let filename = image.to_string_lossy().into_owned();
    let src: SharedSource = Arc::new(FileSource::open(image)?);
    let format = Format::probe(src.as_ref());
    if format == Format::Raw {
        let m = qemu_info_raw(src.as_ref(), &filename);
        if let Some(how) = json {
            emit(&m, how)?;
        } else {
            let mut out = anstream::stdout();
            let h = style::HEAD;
            writeln!(out, "{h}image:{h:#} {filename}")?;
            writeln!(
                out,
                "format: raw (no qcow2 magic: guest offset = file offset)"
            )?;
            writeln!(
                out,
                "virtual size: {} ({} bytes)",
                human_size(src.len()),
                src.len()
            )?;
            writeln!(out, "disk size: {}", human_size(src.allocated_size()))?;
        }
        return Ok(0);
    }
    let img = Qcow2::open(src.clone(), Strictness::Qemu)?;
    if let Some(how) = json {
        let mut m = qemu_info_qcow2(&img, &filename);
        m.extend(extra_info(&img));
        emit(&m, how)?;
        return Ok(0);
    }
    print_readable(&img, image, &filename)?;
    Ok(0)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn print_readable(img: &Qcow2, path: &std::path::Path, filename: &str) -> color_eyre::Result<()> {
    let mut out = anstream::stdout();
    print_summary(&mut out, img, filename)?;
    print_backing(&mut out, img, path, filename)?;
    print_fields(&mut out, img)?;
    print_extensions(&mut out, img)?;
    print_snapshots(&mut out, img)?;
    print_bitmaps(&mut out, img)?;
    print_notes(&mut out, img)?;
    Ok(())
}

/// The image's shape: format, sizes, geometry, flags, encryption, data file.
fn print_summary(out: &mut impl Write, img: &Qcow2, filename: &str) -> color_eyre::Result<()> {
    let h = &img.header;
    let hd = style::HEAD;
    writeln!(out, "{hd}image:{hd:#} {filename}")?;
    writeln!(
        out,
        "format: qcow2 version {} (compat={})",
        h.version,
        if h.version >= 3 { "1.1" } else { "0.10" }
    )?;
    writeln!(
        out,
        "virtual size: {} ({} bytes)",
        human_size(h.size),
        h.size
    )?;
    writeln!(
        out,
        "file size: {} ({} bytes), {} allocated on disk",
        human_size(img.file_len()),
        img.file_len(),
        human_size(img.src.allocated_size())
    )?;
    let geo = img.geometry();
    writeln!(
        out,
        "cluster size: {}{}",
        human_size(geo.cluster_size()),
        if geo.extended_l2 {
            format!(
                " (extended L2: 32 subclusters of {})",
                human_size(geo.subcluster_size())
            )
        } else {
            String::new()
        }
    )?;
    writeln!(
        out,
        "refcount bits: {} (max refcount {})",
        h.refcount_bits(),
        img.refcount_geometry().max()
    )?;
    writeln!(out, "compression: {}", h.compression_type().qemu_name())?;
    writeln!(
        out,
        "L1 table: {} entries at {:#x}, each covering {}",
        h.l1_size,
        h.l1_table_offset,
        human_size(geo.l2_coverage())
    )?;
    writeln!(
        out,
        "refcount table: {} cluster(s) at {:#x}",
        h.refcount_table_clusters, h.refcount_table_offset
    )?;
    writeln!(
        out,
        "dirty: {}  corrupt: {}  lazy refcounts: {}",
        yes(h.dirty()),
        yes(h.corrupt()),
        yes(h.lazy_refcounts())
    )?;
    if h.crypt_method != 0 {
        print_encryption(&mut *out, img)?;
    }
    if let Some(df) = &img.data_file_name {
        writeln!(
            out,
            "data file: {df}{}",
            if h.data_file_raw() {
                " (raw: valid on its own)"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

/// The backing chain, opened for real so a missing layer shows up here.
fn print_backing(
    out: &mut impl Write,
    img: &Qcow2,
    path: &std::path::Path,
    filename: &str,
) -> color_eyre::Result<()> {
    let h = &img.header;
    let (hd, bad) = (style::HEAD, style::BAD);
    if let Some(b) = &img.backing_name {
        writeln!(out, "\n{hd}backing chain:{hd:#}")?;
        match Chain::open(path, &OpenOptions::default()) {
            Ok(chain) => {
                for (i, l) in chain.layers.iter().enumerate() {
                    writeln!(
                        out,
                        "  {i}  {}  {}  {}",
                        l.path.display(),
                        l.format().name(),
                        human_size(l.size())
                    )?;
                }
            }
            Err(e) => {
                writeln!(out, "  0  {filename}  qcow2  {}", human_size(h.size))?;
                writeln!(
                    out,
                    "  1  {b}  {}  {bad}cannot be followed:{bad:#} {e}",
                    img.backing_format.as_deref().unwrap_or("format probed")
                )?;
            }
        }
    }
    Ok(())
}

/// Every header field, then the feature bits that are set.
fn print_fields(out: &mut impl Write, img: &Qcow2) -> color_eyre::Result<()> {
    let h = &img.header;
    let (hd, dim, bad) = (style::HEAD, style::DIM, style::BAD);
    writeln!(out, "\n{hd}header fields:{hd:#}")?;
    for f in h.fields() {
        writeln!(
            out,
            "  {dim}{:>4}{dim:#}  {:<24} {:>#20x}  {}",
            f.offset.get(),
            f.name,
            f.value,
            f.meaning
        )?;
    }
    if !img.features.is_empty() {
        writeln!(out, "\n{hd}feature bits set:{hd:#}")?;
        for f in &img.features {
            let warn = if f.known {
                String::new()
            } else {
                format!("  {bad}(unknown to QEMU 10){bad:#}")
            };
            writeln!(
                out,
                "  {:<12} bit {:>2}  {}{warn}",
                format!("{:?}", f.group).to_lowercase(),
                f.bit,
                f.name
            )?;
        }
    }
    Ok(())
}

/// The header extensions.
fn print_extensions(out: &mut impl Write, img: &Qcow2) -> color_eyre::Result<()> {
    let hd = style::HEAD;
    writeln!(out, "\n{hd}header extensions:{hd:#}")?;
    if img.extensions.is_empty() {
        writeln!(out, "  none")?;
    }
    for e in &img.extensions {
        let detail = match &e.kind {
            qinspect::header::ExtensionKind::BackingFormat { format } => format!("\"{format}\""),
            qinspect::header::ExtensionKind::FeatureTable { names } => {
                format!("{} named bits", names.len())
            }
            qinspect::header::ExtensionKind::Bitmaps {
                nb_bitmaps,
                directory_size,
                directory_offset,
                ..
            } => {
                format!(
                    "{nb_bitmaps} bitmap(s), directory of {directory_size} bytes at {directory_offset:#x}"
                )
            }
            qinspect::header::ExtensionKind::Crypto { offset, length } => {
                format!("LUKS header at {offset:#x}, {length} bytes")
            }
            qinspect::header::ExtensionKind::DataFile { name } => format!("\"{name}\""),
            qinspect::header::ExtensionKind::Unknown => "unknown type, kept as raw bytes".into(),
        };
        writeln!(
            out,
            "  at {:#06x}  type {:#010x} {:<28} {:>5} bytes  {detail}",
            e.offset,
            e.ext_type,
            e.type_name(),
            e.length
        )?;
    }
    Ok(())
}

/// The snapshot table, as `qemu-img snapshot -l` lists it, with the L1 tables.
fn print_snapshots(out: &mut impl Write, img: &Qcow2) -> color_eyre::Result<()> {
    let (hd, dim, bad) = (style::HEAD, style::DIM, style::BAD);
    if !img.snapshots.snapshots.is_empty() || img.snapshots.error.is_some() {
        writeln!(out, "\n{hd}snapshots:{hd:#}")?;
        writeln!(
            out,
            "  {dim}{:<5} {:<20} {:>10} {:<20} {:>14} {:>10} {:>12}{dim:#}",
            "ID", "NAME", "VM SIZE", "DATE", "VM CLOCK", "L1 SIZE", "L1 OFFSET"
        )?;
        for s in &img.snapshots.snapshots {
            let secs = s.vm_clock_nsec / 1_000_000_000;
            writeln!(
                out,
                "  {:<5} {:<20} {:>10} {:<20} {:>14} {:>10} {:>#12x}",
                s.id,
                s.name,
                human_size(s.vm_state_size),
                format_date(s.date_sec),
                format!(
                    "{:02}:{:02}:{:02}.{:03}",
                    secs / 3600,
                    secs / 60 % 60,
                    secs % 60,
                    s.vm_clock_nsec / 1_000_000 % 1000
                ),
                s.l1_size,
                s.l1_table_offset
            )?;
        }
        if let Some(e) = &img.snapshots.error {
            writeln!(out, "  {bad}{e}{bad:#}")?;
        }
    }
    Ok(())
}

/// The persistent bitmaps.
fn print_bitmaps(out: &mut impl Write, img: &Qcow2) -> color_eyre::Result<()> {
    let h = &img.header;
    let (hd, bad) = (style::HEAD, style::BAD);
    match &img.bitmaps {
        None => {}
        Some(Ok(list)) => {
            writeln!(out, "\n{hd}bitmaps:{hd:#}")?;
            for b in list {
                writeln!(
                    out,
                    "  {:<20} granularity {:<8} flags [{}]  table: {} entries at {:#x}",
                    b.name,
                    human_size(b.granularity()),
                    b.flag_names().join(", "),
                    b.table_size,
                    b.table_offset
                )?;
            }
            if h.version < 3 {
                writeln!(
                    out,
                    "  {bad}a version 2 image has no autoclear bits: QEMU ignores these bitmaps{bad:#}"
                )?;
            } else if h.autoclear_features & qinspect::header::AUTOCLEAR_BITMAPS == 0 {
                writeln!(
                    out,
                    "  {bad}autoclear bit 0 is clear: QEMU ignores these bitmaps{bad:#}"
                )?;
            }
        }
        Some(Err(e)) => writeln!(out, "\n{hd}bitmaps:{hd:#} {bad}{e}{bad:#}")?,
    }
    Ok(())
}

/// Oddities QEMU accepts, then what it would object to.
fn print_notes(out: &mut impl Write, img: &Qcow2) -> color_eyre::Result<()> {
    let (hd, bad) = (style::HEAD, style::BAD);
    if !img.notes.is_empty() {
        writeln!(out, "\n{hd}notes:{hd:#}")?;
        for n in &img.notes {
            writeln!(out, "  {n}")?;
        }
    }
    if !img.problems.is_empty() {
        writeln!(out, "\n{bad}problems:{bad:#}")?;
        for p in &img.problems {
            writeln!(out, "  {p}")?;
        }
    }
    Ok(())
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` in local time, as `qemu-img
/// snapshot -l` and `qemu-img info` print snapshot dates: the zone `TZ` names, else
/// the system's (`/etc/localtime`).
pub fn format_date(secs: u32) -> String {
    format_date_in(secs, &jiff::tz::TimeZone::system())
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` in the zone `tz`.
pub fn format_date_in(secs: u32, tz: &jiff::tz::TimeZone) -> String {
    jiff::Timestamp::from_second(i64::from(secs))
        .map(|t| {
            t.to_zoned_datetime(tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| secs.to_string())
}

/// The encryption method and, for LUKS, every header field and key slot.
fn print_encryption(out: &mut impl Write, img: &Qcow2) -> color_eyre::Result<()> {
    use qinspect::header::CryptMethod;
    let hd = style::HEAD;
    match img.header.crypt() {
        CryptMethod::Aes => {
            writeln!(
                out,
                "encrypted: yes, legacy AES (crypt_method 1): AES-128-CBC, key = the passphrase's first 16 bytes, IV = guest sector number (plain64); no header records whether a passphrase is right"
            )?;
            return Ok(());
        }
        CryptMethod::Luks => {}
        other => {
            writeln!(out, "encrypted: yes ({other:?})")?;
            return Ok(());
        }
    }
    let Some(h) = qinspect::crypto::luks_header(img) else {
        writeln!(
            out,
            "encrypted: yes, LUKS (crypt_method 2), but there is no full disk encryption header extension"
        )?;
        return Ok(());
    };
    let h = match h {
        Ok(h) => h,
        Err(e) => {
            writeln!(
                out,
                "encrypted: yes, LUKS (crypt_method 2); the header cannot be read: {e}"
            )?;
            return Ok(());
        }
    };
    let geo = img.geometry();
    let last = HostOffset(h.offset.saturating_add(h.length.max(1)).get() - 1);
    writeln!(
        out,
        "encrypted: yes, LUKS (crypt_method 2): data clusters are encrypted, metadata is not"
    )?;
    writeln!(
        out,
        "\n{hd}LUKS header:{hd:#} at {:#x}, {} bytes reserved = host clusters {}..={} (role crypto-header: `check` counts one reference to each, `clusters` lists them)",
        h.offset,
        h.length,
        geo.host_cluster(h.offset).get(),
        geo.host_cluster(last).get()
    )?;
    if let Err(e) = h.check() {
        writeln!(
            out,
            "  {}QEMU refuses this header:{} {e}",
            style::BAD,
            style::BAD.render_reset()
        )?;
    }
    for f in h.fields() {
        if f.name.starts_with("slot[") {
            continue;
        }
        writeln!(out, "  {:<15} {:<40} {}", f.name, f.value, f.meaning)?;
    }
    if let Ok(spec) = h.spec() {
        writeln!(
            out,
            "  {:<15} {:<40} what QEMU calls it (cipher-alg, cipher-mode, ivgen-alg{})",
            "cipher",
            format!(
                "{} {} {}{}",
                spec.alg.qemu_name(),
                spec.mode.name(),
                spec.ivgen.name(),
                spec.ivgen_hash
                    .map(|h| format!(" ({})", h.name()))
                    .unwrap_or_default()
            ),
            if spec.ivgen_hash.is_some() {
                ", ivgen-hash-alg"
            } else {
                ""
            }
        )?;
    }
    writeln!(
        out,
        "  key slots: each active slot holds the master key, encrypted with a key PBKDF2 makes from one passphrase (iterations, salt) and split into stripes by the anti-forensic splitter, at key-material offset"
    )?;
    for s in &h.slots {
        let state = match s.active_raw {
            qinspect::crypto::luks::SLOT_ENABLED => "active  ",
            qinspect::crypto::luks::SLOT_DISABLED => "inactive",
            _ => "CORRUPT ",
        };
        let at = h.offset.saturating_add(s.key_offset());
        let len = s.material_len(h.key_bytes);
        if s.active() {
            writeln!(
                out,
                "  slot {}  {state}  {:>9} iterations  salt {}  key material at {at:#x} ({} stripes, {len} bytes)",
                s.index, s.iterations, s.salt, s.stripes
            )?;
        } else {
            writeln!(
                out,
                "  slot {}  {state}  key material reserved at {at:#x} ({} stripes){}",
                s.index,
                s.stripes,
                if s.active_raw == qinspect::crypto::luks::SLOT_DISABLED {
                    String::new()
                } else {
                    format!(", active field {:#010x}", s.active_raw)
                }
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use jiff::tz::TimeZone;

    #[test]
    fn dates_in_a_zone() {
        let utc = TimeZone::UTC;
        assert_eq!(super::format_date_in(0, &utc), "1970-01-01 00:00:00");
        assert_eq!(
            super::format_date_in(1_700_000_000, &utc),
            "2023-11-14 22:13:20"
        );
        assert_eq!(super::format_date_in(u32::MAX, &utc), "2106-02-07 06:28:15");
        // A zone half an hour off, and one with summer time.
        let kolkata = TimeZone::get("Asia/Kolkata").unwrap();
        assert_eq!(
            super::format_date_in(1_700_000_000, &kolkata),
            "2023-11-15 03:43:20"
        );
        let ny = TimeZone::get("America/New_York").unwrap();
        assert_eq!(
            super::format_date_in(1_700_000_000, &ny),
            "2023-11-14 17:13:20"
        );
        assert_eq!(
            super::format_date_in(1_690_000_000, &ny),
            "2023-07-22 00:26:40"
        );
    }
}

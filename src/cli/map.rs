//! `qinspect map`: the guest address space, extent by extent.

use super::num::{parse_guest, parse_size};
use super::{CmdResult, open_chain, style};
use qinspect::image::Strictness;
use qinspect::map::{map_range, qemu_json};
use qinspect::types::{GuestOffset, human_size};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `qinspect map`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "With --json the output is exactly what `qemu-img map --output=json` \
prints: one object per extent with start, length, depth (0 = this image, 1 = its backing \
file, ...), present (that layer itself has data or zeros there), zero, data, compressed, and \
offset (where the bytes are in that layer's file).\n\n\
The readable table shows every extent with the file that holds it; colours: green data, \
blue zeros, magenta compressed, yellow for ranges answered by a backing file.\n\n\
--snapshot maps an internal snapshot as `qemu-img snapshot -a` would leave the disk: at the \
snapshot's own disk size. Where that differs from the current size, `qemu-nbd -l` and \
`qemu-img convert -l` keep the current one, as `read --snapshot` does.\n\n\
An encrypted image needs its key, as with qemu-img map (the same --object/--image-opts \
or --passphrase-file options as read).\n\n\
Several images get one table each, under the image's name; one that cannot be read is \
reported and the others are still mapped (exit code 1). --json takes one image, since its \
output is qemu-img's JSON array."
)]
pub struct Args {
    /// The image files (each the top of its chain).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// Print qemu-img's JSON (one image only).
    #[arg(long)]
    pub json: bool,
    /// Map through this internal snapshot (ID or name).
    ///
    /// A bare ID_OR_NAME is tried as an ID, then as a name; `snapshot.name=NAME`,
    /// `snapshot.id=ID` (or both, comma-separated) match exactly, as in
    /// `qemu-img convert -l`.
    #[arg(long, short = 's')]
    pub snapshot: Option<String>,
    /// First guest byte (like qemu-img map -s).
    #[arg(long, value_parser = parse_guest, default_value = "0")]
    pub start_offset: GuestOffset,
    /// Bytes to map (like qemu-img map -l).
    #[arg(long, value_parser = parse_size)]
    pub max_length: Option<u64>,
    #[command(flatten)]
    pub key: super::secret::KeyArgs,
}

/// Run `qinspect map`.
pub fn run(a: Args) -> CmdResult {
    if let [one] = a.images.as_slice() {
        return run_one(&a, one);
    }
    if a.json {
        color_eyre::eyre::bail!(
            "--json maps one image (its output is qemu-img map's JSON array); {} were given",
            a.images.len()
        );
    }
    let mut code = 0;
    for (i, image) in a.images.iter().enumerate() {
        let hd = style::HEAD;
        let gap = if i > 0 { "\n" } else { "" };
        writeln!(anstream::stdout(), "{gap}{hd}{}{hd:#}", image.display())?;
        if let Err(e) = run_one(&a, image) {
            if super::is_broken_pipe(&e) {
                return Err(e);
            }
            super::report_error(&e);
            code = 1;
        }
    }
    Ok(code)
}

fn run_one(a: &Args, image: &std::path::Path) -> CmdResult {
    // qemu-img map opens encrypted images with their key, and refuses without one.
    let mut image = image.to_path_buf();
    let keys = a.key.resolve(&mut image)?;
    let chain = open_chain(&image, a.snapshot.as_deref(), Strictness::Qemu)?;
    keys.unlock(&chain)?;
    super::secret::Keys::require(&chain)?;
    let entries = map_range(&chain, a.start_offset, a.max_length.unwrap_or(u64::MAX))?;
    if a.json {
        let mut out = std::io::stdout().lock();
        out.write_all(qemu_json(&entries).as_bytes())?;
        return Ok(0);
    }
    let mut out = anstream::stdout();
    let (hd, dim) = (style::HEAD, style::DIM);
    writeln!(
        out,
        "{hd}{:>18} {:>18} {:>10}  {:<22} {:>18}  file{hd:#}",
        "start", "end", "length", "what", "host offset"
    )?;
    let mut totals = [0u64; 4];
    // qemu-img map prints no row for an empty range (a start at or past the end of
    // the disk); its JSON keeps the one empty extent, and so does --json above.
    let entries: Vec<_> = entries.into_iter().filter(|e| e.length > 0).collect();
    for e in &entries {
        let (what, st, slot) = if e.compressed {
            ("compressed data", style::COMPRESSED, 2)
        } else if e.data && e.zero {
            ("data (host hole: zeros)", style::ZERO, 1)
        } else if e.data {
            ("data", style::DATA, 0)
        } else if e.zero && e.present {
            ("zeros", style::ZERO, 1)
        } else {
            ("unallocated (zeros)", style::DIM, 3)
        };
        totals[slot] += e.length;
        let st = if e.depth > 0 && slot != 3 {
            style::BACKING
        } else {
            st
        };
        // An extent with a host offset is in the layer's data file (qemu-img map's
        // File column); the others are answered by the image's own tables.
        let file = chain
            .layers
            .get(e.depth)
            .map(|l| {
                if e.offset.is_some() && !e.compressed {
                    l.data_path().display().to_string()
                } else {
                    l.path.display().to_string()
                }
            })
            .unwrap_or_default();
        let depth = if e.depth > 0 {
            format!(" (depth {})", e.depth)
        } else {
            String::new()
        };
        writeln!(
            out,
            "{:>#18x} {:>#18x} {:>10}  {st}{:<22}{st:#} {:>18}  {}{dim}{depth}{dim:#}",
            e.start,
            e.start.saturating_add(e.length),
            human_size(e.length),
            what,
            e.offset
                .map(|o| format!("{o:#x}"))
                .unwrap_or_else(|| "-".into()),
            file
        )?;
    }
    writeln!(
        out,
        "\n{} extents: {} data, {} zeros, {} compressed, {} unallocated",
        entries.len(),
        human_size(totals[0]),
        human_size(totals[1]),
        human_size(totals[2]),
        human_size(totals[3])
    )?;
    Ok(0)
}

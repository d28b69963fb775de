//! `qinspect hexdump`: host bytes, or the bytes a guest read returns, through hexyl.

use super::num::{parse_guest, parse_host, parse_size};
use super::{CmdResult, open_chain};
use qinspect::image::Strictness;
use qinspect::io::{FileSource, Source};
use qinspect::lookup::{ReadCache, read};
use qinspect::types::{GuestOffset, HostOffset};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// Arguments of `qinspect hexdump`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("where").required(true).args(["host", "guest"])))]
#[command(
    after_help = "--host dumps bytes of the image file itself (headers, tables, data); \
--guest dumps what the guest reads at that offset, resolved through the backing chain (and \
a snapshot with --snapshot). Offsets shown on the left are host or guest offsets accordingly.\n\n\
Examples:\n  qinspect hexdump disk.qcow2 --host 0 --length 112      the header\n  \
qinspect hexdump disk.qcow2 --guest 1M --length 64"
)]
pub struct Args {
    /// The image file.
    pub image: PathBuf,
    /// Host (file) offset to start at.
    #[arg(long, value_parser = parse_host)]
    pub host: Option<HostOffset>,
    /// Guest offset to start at.
    #[arg(long, value_parser = parse_guest)]
    pub guest: Option<GuestOffset>,
    /// With --guest: read through this internal snapshot (ID or name; or
    /// `snapshot.name=NAME` / `snapshot.id=ID` to match exactly).
    #[arg(long, short = 's', requires = "guest")]
    pub snapshot: Option<String>,
    /// Bytes to show (at most 64 MiB; cut at the end of the file or disk, with a
    /// warning).
    #[arg(long, short = 'l', value_parser = parse_size, default_value = "256")]
    pub length: u64,
    /// Colour: auto (on a terminal), always or never.
    #[arg(long, value_enum, default_value = "auto")]
    pub color: ColorChoice,
    #[command(flatten)]
    pub key: super::secret::KeyArgs,
}

/// When to colour.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ColorChoice {
    /// On a terminal.
    Auto,
    /// Colour even when stdout is not a terminal.
    Always,
    /// No colour, even on a terminal.
    Never,
}

/// The most a hexdump shows at once.
const MAX_LEN: u64 = 64 << 20;

/// Run `qinspect hexdump`.
pub fn run(mut a: Args) -> CmdResult {
    let keys = a.key.resolve(&mut a.image)?;
    let len = a.length.min(MAX_LEN);
    let (start, bytes) = if let Some(h) = a.host {
        let src = FileSource::open(&a.image)?;
        let end = h.get().saturating_add(len).min(src.len());
        if h.get() >= src.len() {
            color_eyre::eyre::bail!(
                "host offset {h:#x} is past the end of {} ({} bytes)",
                a.image.display(),
                src.len()
            );
        }
        let mut buf = vec![0u8; (end - h.get()) as usize];
        qinspect::io::read_into(&src, "bytes", h, &mut buf)?;
        (h.get(), buf)
    } else {
        let g = a.guest.unwrap_or_default();
        let chain = open_chain(&a.image, a.snapshot.as_deref(), Strictness::Qemu)?;
        keys.unlock(&chain)?;
        super::secret::Keys::require(&chain)?;
        let size = chain.size();
        if g.get() >= size {
            color_eyre::eyre::bail!(
                "guest offset {g:#x} is past the end of the disk ({size} bytes)"
            );
        }
        let mut buf = vec![0u8; (g.get().saturating_add(len).min(size) - g.get()) as usize];
        read(&chain, g, &mut buf, &mut ReadCache::default())?;
        (g.get(), buf)
    };
    if (bytes.len() as u64) < a.length {
        // Cut short: said, so a short dump is not taken for all that was asked.
        let why = if a.length > MAX_LEN && bytes.len() as u64 == MAX_LEN {
            format!("a hexdump shows at most {MAX_LEN} bytes")
        } else if a.host.is_some() {
            format!("{} ends there", a.image.display())
        } else {
            "the disk ends there".to_string()
        };
        super::warn(format_args!(
            "{} of the {} bytes asked for are shown: {why}",
            bytes.len(),
            a.length
        ));
    }
    let color = match a.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    };
    let mut out = Vec::new();
    render(&mut out, start, &bytes, color)?;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&out) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        r => r?,
    }
    Ok(0)
}

/// Render `bytes` starting at `offset` with hexyl (no squeezing, so every row is
/// shown and lines up with its offset).
pub fn render(out: &mut Vec<u8>, offset: u64, bytes: &[u8], color: bool) -> std::io::Result<()> {
    let mut p = hexyl::PrinterBuilder::new(out)
        .show_color(color)
        .enable_squeezing(false)
        .with_border_style(hexyl::BorderStyle::Unicode)
        .build();
    p.display_offset(offset);
    p.print_all(bytes)
}

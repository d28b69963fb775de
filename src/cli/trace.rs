//! `qinspect trace`: every step of one guest lookup.

use super::{CmdResult, num::parse_guest, open_chain, print_json, style};
use qinspect::image::Strictness;
use qinspect::lookup::{StepKind, trace};
use qinspect::types::GuestOffset;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `qinspect trace`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Each step says what was read (the L1 entry, the L2 entry, where each \
sits in the file, its raw value) and what it means, then where the read goes: data at a host \
offset, zeros (and why), or down to the next layer of the backing chain.\n\n\
Example: qinspect trace top.qcow2 0x10000"
)]
pub struct Args {
    /// The image file (top of the chain).
    pub image: PathBuf,
    /// Guest offset to resolve (65536, 0x10000, 64k).
    #[arg(value_parser = parse_guest)]
    pub offset: GuestOffset,
    /// Resolve through this internal snapshot (ID or name) instead of the active L1.
    ///
    /// The disk then ends where the snapshot's did (`qemu-img snapshot -a`); a
    /// temporary load (`qemu-nbd -l`, `qemu-img convert -l`, `read --snapshot`)
    /// keeps the current size.
    ///
    /// A bare ID_OR_NAME is tried as an ID, then as a name; `snapshot.name=NAME`,
    /// `snapshot.id=ID` (or both, comma-separated) match exactly, as in
    /// `qemu-img convert -l`.
    #[arg(long, short = 's')]
    pub snapshot: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub key: super::secret::KeyArgs,
}

/// Run `qinspect trace`.
pub fn run(mut a: Args) -> CmdResult {
    let keys = a.key.resolve(&mut a.image)?;
    let chain = open_chain(&a.image, a.snapshot.as_deref(), Strictness::Qemu)?;
    keys.unlock(&chain)?;
    let t = trace(&chain, a.offset);
    if a.json {
        print_json(&t)?;
        return Ok(0);
    }
    let mut out = anstream::stdout();
    let (hd, dim) = (style::HEAD, style::DIM);
    writeln!(
        out,
        "{hd}guest offset {:#x}{hd:#} ({} bytes) via the {}",
        t.guest_offset,
        t.guest_offset.get(),
        t.view
    )?;
    let mut last_depth = usize::MAX;
    for (i, s) in t.steps.iter().enumerate() {
        if s.depth != last_depth {
            writeln!(out, "\n{hd}layer {}: {}{hd:#}", s.depth, s.layer)?;
            last_depth = s.depth;
        }
        let st = match &s.kind {
            StepKind::Data { .. } => style::DATA,
            StepKind::Zero { .. } => style::ZERO,
            StepKind::FallThrough { .. } | StepKind::PastEnd { .. } | StepKind::BeyondL1 { .. } => {
                style::BACKING
            }
            StepKind::Compressed { .. } => style::COMPRESSED,
            StepKind::Error { .. } => style::BAD,
            _ => anstyle::Style::new(),
        };
        writeln!(
            out,
            "  {dim}{:>2}.{dim:#} {st}{}{st:#}",
            i + 1,
            s.explanation
        )?;
    }
    writeln!(out, "\n{hd}result:{hd:#} {}", t.outcome)?;
    Ok(0)
}

//! `qinspect compare`: two states of one image, guest cluster by guest cluster.

use super::{CmdResult, style};
use qinspect::compare::{Options, Side, closest, compare};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, SharedSource};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `qinspect compare`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "A and B are `active` (the active L1 table) or an internal snapshot's ID \
or name. Each guest cluster is looked up in both L1 tables; a cluster differs when the two \
map it differently: different kinds (unallocated, zero, data, compressed), or different host \
clusters. Different host clusters are then read to tell a copy with the same data from \
different data; the same host cluster is shared, so its data is the same. Nothing is written.\n\n\
A cluster that differs here is one where `qemu-img map --output=json` of the two states \
(`qemu-img snapshot -a` on a copy for a snapshot) disagrees about present, zero, data or \
offset; compressed clusters are the exception, as qemu-img map gives no offset for them.\n\n\
--closest compares the active state with every snapshot (mappings only) and ranks the \
snapshots by fewest differing clusters: which snapshot the active state is based on.\n\n\
Examples:\n  qinspect compare disk.qcow2 active before-upgrade\n  \
qinspect compare disk.qcow2 1 2 --json\n  qinspect compare disk.qcow2 --closest"
)]
pub struct Args {
    /// The image file.
    pub image: PathBuf,
    /// Side A: `active`, or a snapshot's ID or name.
    #[arg(required_unless_present = "closest")]
    pub a: Option<String>,
    /// Side B: `active`, or a snapshot's ID or name.
    #[arg(required_unless_present = "closest")]
    pub b: Option<String>,
    /// Rank the snapshots by how few clusters differ from the active state.
    #[arg(long, conflicts_with_all = ["a", "b"])]
    pub closest: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Rows listed at most in the readable output (all are counted).
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
}

/// Run `qinspect compare`.
pub fn run(a: Args) -> CmdResult {
    let src: SharedSource = Arc::new(FileSource::open(&a.image)?);
    let img = Qcow2::open(src, Strictness::Lenient)?;
    let mut out = anstream::stdout();
    if a.closest {
        let ranked = closest(&img, None)?;
        if a.json {
            serde_json::to_writer_pretty(&mut out, &ranked)?;
            writeln!(out)?;
            return Ok(0);
        }
        if ranked.is_empty() {
            writeln!(out, "{} has no internal snapshots", a.image.display())?;
            return Ok(0);
        }
        let cs = img.geometry().cluster_size();
        writeln!(
            out,
            "{}snapshots by how many guest clusters ({cs} bytes) the active state maps differently{:#}",
            style::HEAD,
            style::HEAD
        )?;
        for (k, d) in ranked.iter().enumerate() {
            let mark = if k == 0 { "  ← closest" } else { "" };
            writeln!(
                out,
                "  {:>10}  snapshot {} '{}'{mark}",
                d.differing, d.id, d.name
            )?;
        }
        return Ok(0);
    }
    let (Some(sa), Some(sb)) = (a.a.as_deref(), a.b.as_deref()) else {
        return Err(color_eyre::eyre::eyre!(
            "name two states, or give --closest"
        ));
    };
    let side_a = Side::parse(&img, sa)?;
    let side_b = Side::parse(&img, sb)?;
    let c = compare(
        &side_a,
        &side_b,
        &Options {
            max_rows: if a.json { 1_000_000 } else { a.limit },
            ..Default::default()
        },
    )?;
    if a.json {
        serde_json::to_writer_pretty(&mut out, &c)?;
        writeln!(out)?;
        return Ok(0);
    }
    let (hd, dim) = (style::HEAD, style::DIM);
    writeln!(
        out,
        "{hd}A: {} · B: {} · {} guest clusters of {} bytes{hd:#}",
        c.a, c.b, c.clusters, c.cluster_size
    )?;
    writeln!(out, "{} differ", c.differing)?;
    for (k, n) in &c.counts {
        writeln!(out, "  {n:>10}  {k}")?;
    }
    if !c.kinds.is_empty() {
        writeln!(out, "{hd}differing clusters, A vs B{hd:#}")?;
        for (k, n) in &c.kinds {
            writeln!(out, "  {n:>10}  {k}")?;
        }
    }
    if !c.rows.is_empty() {
        writeln!(out, "{hd}guest offset  A vs B{hd:#}")?;
    }
    for r in &c.rows {
        writeln!(out, "  {:>#12x}  {}", r.guest, r.words)?;
    }
    if c.omitted > 0 {
        writeln!(
            out,
            "{dim}  … {} more differing cluster(s) not listed (--limit){dim:#}",
            c.omitted
        )?;
    }
    Ok(0)
}

//! `qinspect simulate`: what QEMU would write, without writing anything.

use super::{CmdResult, num::parse_size, style};
use qinspect::check::{CheckOptions, check};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, SharedSource};
use qinspect::simulate::{Op, Sim, simulate_layers};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `qinspect simulate`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Operations, each one argument, simulated in order on an in-memory \
copy of the metadata (the image is never written):\n\
\x20 snapshot-create:NAME           qemu-img snapshot -c NAME\n\
\x20 snapshot-delete:NAME           qemu-img snapshot -d NAME (names only, as\n\
\x20                                qemu-img)\n\
\x20 snapshot-delete-id:ID          QMP blockdev-snapshot-delete-internal-sync\n\
\x20                                with an id\n\
\x20 snapshot-apply:ID_OR_NAME      qemu-img snapshot -a ID_OR_NAME\n\
\x20 write:OFFSET:LENGTH[:P=N]      a guest write of byte N, 0xcd if not given\n\
\x20                                (qemu-io -c 'write [-P N] OFFSET LENGTH')\n\
\x20 write-compressed:OFF:LEN[:P=N] qemu-io -c 'write -c [-P N] OFF LEN' (whole\n\
\x20                                clusters)\n\
\x20 write-zeroes:OFF:LEN[:unmap]   qemu-io -c 'write -z [-u] OFF LEN'\n\
\x20 read:OFFSET:LENGTH             a read with copy-on-read (qemu-io -C -c 'read\n\
\x20                                OFFSET LENGTH'): what it finds unallocated in\n\
\x20                                the top layer is copied there (as zero\n\
\x20                                clusters where it reads as zeros, even with no\n\
\x20                                backing file)\n\
\x20 discard:OFFSET:LENGTH          a guest discard (qemu-io -c 'discard OFFSET\n\
\x20                                LENGTH')\n\
\x20 resize:SIZE[:shrink]           qemu-img resize [--shrink] IMG SIZE\n\
\x20 repair:leaks, repair:all       qemu-img check -r leaks|all (what the repair\n\
\x20                                would change)\n\
\x20 overlay, overlay:SNAPSHOT      a throw-away in-memory qcow2 overlay over the\n\
\x20                                image or a snapshot; the operations after it\n\
\x20                                act on it (qemu-nbd -s [-l SNAPSHOT])\n\
\x20 trace:OFFSET                   where a guest read at OFFSET comes from,\n\
\x20                                through the simulated chain\n\
\x20 refcount-update:L1:ADDEND      QEMU's refcount walk over L1 ('active' or a\n\
\x20                                snapshot) with ADDEND -1, 0 or +1\n\n\
Every refcount and table entry that changes is listed in order with the reason, then the \
clusters allocated and freed, then a check of the result (as `qinspect check`).\n\n\
The data written is tracked too (as descriptions, not copies): with --guest-raw FILE \
the guest disk the operations leave, that of the last overlay or else of the image, is \
written to FILE as `qemu-img convert -O raw` of the real result would write it.\n\n\
An encrypted image takes its passphrase as `qinspect read` does (--object secret,... \
--image-opts, --passphrase-file, or a prompt); the data it writes is encrypted as QEMU \
encrypts it.\n\n\
Example: qinspect simulate disk.qcow2 snapshot-create:before write:1M:4k snapshot-delete:before\n\
Example: qinspect simulate vm.qcow2 overlay:monday write:4k:4k:P=0x5a --guest-raw monday.raw"
)]
pub struct Args {
    /// The image file.
    pub image: PathBuf,
    /// Operations, in order.
    #[arg(required = true, value_name = "OP")]
    pub ops: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the guest disk the operations leave to FILE: that of the last
    /// overlay, or of the image when there is none; byte for byte what
    /// `qemu-img convert -O raw` of the real result writes, sparse as
    /// `qinspect read -o` (FILE may not be any file the simulation reads).
    #[arg(long, value_name = "FILE")]
    pub guest_raw: Option<PathBuf>,
    #[command(flatten)]
    pub key: super::secret::KeyArgs,
}

/// The image as QEMU opens it; or, when its only problem is its snapshot
/// table, as `qemu-img check` opens it (that table is read only in the
/// check): the simulation then lets only a repair get past the open. When
/// its only problems are its bitmap directory's, which every command's open
/// refuses, it is opened as far as it goes: each operation then fails in its
/// command's words.
fn open_for_simulation(src: SharedSource) -> color_eyre::Result<Qcow2> {
    use qinspect::error::CorruptKind;
    let bitmaps = |k: Option<CorruptKind>| k.is_some_and(|k| k.is_bitmap_directory());
    let err = match Qcow2::open(src.clone(), Strictness::Qemu) {
        Ok(img) => return Ok(img),
        Err(e) => e,
    };
    match Qcow2::open(src, Strictness::Lenient) {
        Ok(img)
            if img.check_refusal.is_none()
                && !img.problems.is_empty()
                && img
                    .problems
                    .iter()
                    .all(|p| p.corrupt_kind() == Some(CorruptKind::SnapshotTable)) =>
        {
            Ok(img)
        }
        Ok(img)
            if bitmaps(err.corrupt_kind())
                && img.problems.iter().all(|p| bitmaps(p.corrupt_kind())) =>
        {
            Ok(img)
        }
        _ => Err(err.into()),
    }
}

/// Run `qinspect simulate`.
pub fn run(mut a: Args) -> CmdResult {
    let ops: Vec<Op> = a
        .ops
        .iter()
        .map(|s| Op::parse(s, &parse_size))
        .collect::<Result<_, _>>()
        .map_err(|e| color_eyre::eyre::eyre!(e))?;
    let mut keys = a.key.resolve(&mut a.image)?;
    let src: SharedSource = Arc::new(FileSource::open(&a.image)?);
    let img = open_for_simulation(src)?;
    // An encrypted image is simulated with its key (its guest data written
    // encrypted); without one the simulation refuses it, as qemu-io does.
    keys.unlock_image(0, &img, &a.image)?;
    let mut layers = simulate_layers(&img, &a.image, &ops)?;
    let overlays = layers.len() > 1;
    let guest = match (&a.guest_raw, layers.last_mut()) {
        (Some(p), Some(top)) => Some((p, write_guest(top, p)?)),
        _ => None,
    };
    let mut failed = false;
    if a.json {
        // Streamed: refcounts_after can list millions of clusters.
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        if overlays {
            write!(out, "{{\n\"layers\": [\n")?;
        }
        for (i, sim) in layers.iter_mut().enumerate() {
            if i > 0 {
                writeln!(out, ",")?;
            }
            failed |= write_json(&mut out, sim, &a.image.to_string_lossy())?;
        }
        if overlays {
            write!(out, "]\n}}\n")?;
        }
        out.flush()?;
        return Ok(if failed { 1 } else { 0 });
    }
    let mut out = anstream::stdout();
    for (i, sim) in layers.iter_mut().enumerate() {
        if overlays {
            let (hd, dim) = (style::HEAD, style::DIM);
            let title = match sim.overlay_of() {
                None => format!("the image {}", a.image.display()),
                Some((_, None)) => format!(
                    "overlay {i}: a throw-away qcow2 overlay over {} (qemu-nbd -s), in memory",
                    a.image.display()
                ),
                Some((_, Some(sn))) => format!(
                    "overlay {i}: a throw-away qcow2 overlay over snapshot '{sn}' of {} (qemu-nbd -s -l {sn}), in memory",
                    a.image.display()
                ),
            };
            writeln!(out, "{hd}== {title} =={hd:#}")?;
            if sim.records.is_empty() {
                writeln!(out, "   {dim}no operations{dim:#}\n")?;
                continue;
            }
        }
        failed |= print_text(&mut out, sim)?;
    }
    if let Some((p, len)) = guest {
        let whose = if overlays {
            "the last overlay"
        } else {
            "the image"
        };
        writeln!(
            out,
            "the guest disk of {whose} after the operations ({len} bytes) is in {}",
            p.display()
        )?;
    }
    writeln!(
        out,
        "{}(nothing was written to {}){:#}",
        style::DIM,
        a.image.display(),
        style::DIM
    )?;
    Ok(if failed { 1 } else { 0 })
}

/// The simulated image checked, or why it cannot be opened.
fn check_after(sim: &mut Sim) -> (qinspect::check::CheckReport, Option<String>) {
    // The check reads every table: the simulator's cache is no use to it.
    sim.settle();
    // The simulated image may be too broken to open again (an operation on a
    // corrupt image can overwrite metadata): that is a result, not a crash.
    match sim.image() {
        // On one thread: the simulation is held to qemu-img's memory, and the
        // second thread's counts would be the largest part of it.
        Ok(after) => (
            check(
                &after,
                &CheckOptions {
                    one_thread: true,
                    ..Default::default()
                },
            ),
            None,
        ),
        Err(e) => {
            let r = qinspect::check::CheckReport {
                aborted: Some(qinspect::check::Refusal::SimulatedOpen(e.clone())),
                ..Default::default()
            };
            (r, Some(e.to_string()))
        }
    }
}

/// One layer as JSON; whether something failed.
fn write_json(out: &mut impl Write, sim: &mut Sim, name: &str) -> std::io::Result<bool> {
    let (report, unopenable) = check_after(sim);
    let failed = sim.records.iter().any(|r| r.error.is_some()) || unopenable.is_some();
    let cs = sim.cluster_size();
    writeln!(out, "{{")?;
    if let Some((base, snap)) = sim.overlay_of() {
        writeln!(
            out,
            "\"overlay_of\": {},",
            json!({"image": base.to_string_lossy(), "snapshot": snap})
        )?;
    }
    write!(out, "\"operations\": ")?;
    serde_json::to_writer_pretty(&mut *out, &sim.records)?;
    // Every list is serialized as it is written: a snapshot delete can free
    // millions of clusters, and refcounts_after lists every cluster in use.
    write!(out, ",\n\"allocated\": ")?;
    serde_json::to_writer_pretty(
        &mut *out,
        &JsonList(sim.allocated.iter().map(|(o, l, p)| Allocated {
            cluster: o.get() / cs,
            length: *l,
            offset: *o,
            purpose: p,
        })),
    )?;
    write!(out, ",\n\"freed\": ")?;
    serde_json::to_writer_pretty(
        &mut *out,
        &JsonList(sim.freed.iter().map(|(c, why)| Freed {
            cluster: *c,
            offset: c * cs,
            reason: why,
        })),
    )?;
    write!(out, ",\n\"refcounts_after\": [")?;
    // One entry a line, put together in a small buffer and written at once
    // (millions of them on a large image).
    let mut sep: &[u8] = b"";
    let (mut c_buf, mut r_buf) = (itoa::Buffer::new(), itoa::Buffer::new());
    let mut line = Vec::with_capacity(64);
    sim.try_for_each_refcount(|c, r| {
        line.clear();
        line.extend_from_slice(sep);
        line.extend_from_slice(b"\n  {\"cluster\": ");
        line.extend_from_slice(c_buf.format(c).as_bytes());
        line.extend_from_slice(b", \"refcount\": ");
        line.extend_from_slice(r_buf.format(r).as_bytes());
        line.push(b'}');
        sep = b",";
        out.write_all(&line)
    })?;
    write!(out, "\n],\n\"check\": ")?;
    serde_json::to_writer_pretty(&mut *out, &super::check::report_json(&report, name))?;
    writeln!(out, "\n}}")?;
    Ok(failed)
}

/// An `allocated` entry of the JSON output (keys in the order they print).
#[derive(serde::Serialize)]
struct Allocated<'a> {
    cluster: u64,
    length: u64,
    offset: qinspect::types::HostOffset,
    purpose: &'a str,
}

/// A `freed` entry of the JSON output.
#[derive(serde::Serialize)]
struct Freed<'a> {
    cluster: u64,
    offset: u64,
    reason: &'a str,
}

/// A JSON array of the items an iterator gives, serialized one at a time.
struct JsonList<I>(I);

impl<I, T> serde::Serialize for JsonList<I>
where
    I: Iterator<Item = T> + Clone,
    T: serde::Serialize,
{
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.clone())
    }
}

/// One layer for people; whether something failed.
fn print_text(out: &mut impl Write, sim: &mut Sim) -> std::io::Result<bool> {
    let (report, unopenable) = check_after(sim);
    let failed = sim.records.iter().any(|r| r.error.is_some()) || unopenable.is_some();
    let (hd, bad, dim) = (style::HEAD, style::BAD, style::DIM);
    for (n, r) in sim.records.iter().enumerate() {
        writeln!(out, "{hd}{}. {}{hd:#}", n + 1, r.description)?;
        for s in &r.steps {
            writeln!(out, "   {}", s.describe())?;
        }
        // What qinspect does not follow is no failure of QEMU's.
        match &r.error {
            Some(e) if r.not_simulated() => writeln!(out, "   {bad}{e}{bad:#}")?,
            Some(e) => writeln!(out, "   {bad}QEMU fails here:{bad:#} {e}")?,
            None => {}
        }
        writeln!(out)?;
    }
    writeln!(out, "{hd}allocated:{hd:#}")?;
    if sim.allocated.is_empty() {
        writeln!(out, "   nothing")?;
    }
    for (o, l, p) in &sim.allocated {
        writeln!(
            out,
            "   {l} bytes at {o:#x} (cluster {}) for {p}",
            o.get() / sim.cluster_size()
        )?;
    }
    writeln!(out, "{hd}freed (refcount now 0):{hd:#}")?;
    if sim.freed.is_empty() {
        writeln!(out, "   nothing")?;
    }
    for (c, why) in &sim.freed {
        writeln!(out, "   cluster {c} {dim}({why}){dim:#}")?;
    }
    writeln!(out, "\n{hd}check of the simulated image:{hd:#}")?;
    if let Some(e) = &unopenable {
        writeln!(
            out,
            "   {bad}the simulated image cannot be opened: {e}{bad:#}"
        )?;
    } else if report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0 {
        writeln!(out, "   No errors were found on the simulated image.")?;
    } else {
        writeln!(
            out,
            "   {bad}{} corruptions, {} leaks, {} check errors{bad:#}",
            report.corruptions, report.leaks, report.check_errors
        )?;
        for f in &report.findings {
            writeln!(out, "   {}", f.message)?;
        }
    }
    writeln!(out)?;
    Ok(failed)
}

/// Write the guest disk `sim` predicts to `p`, as `qinspect read -o` writes
/// one; its length.
fn write_guest(sim: &mut Sim, p: &std::path::Path) -> color_eyre::Result<u64> {
    let chain = sim.guest_chain()?;
    let len = chain.size();
    let file = super::read::open_output(&chain, p)?;
    super::read::write_output(&chain, qinspect::types::GuestOffset(0), len, file)?;
    Ok(len)
}

//! `qinspect check`: refcount consistency, as `qemu-img check` judges it.

use super::{CmdResult, style};
use qinspect::chain::{Chain, OpenOptions};
use qinspect::check::{CheckOptions, CheckReport, FindingKind, Progress, Refusal, check};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, SharedSource};
use serde_json::{Value, json};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Arguments of `qinspect check`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The verdict and the counts are qemu-img check's: every reference \
is recounted in QEMU's order and compared with the stored refcounts (lower than computed: \
corruption; higher: leak), then the COPIED flags are checked. Each finding names the \
cluster, the stored refcount and the computed reference count, who points at the cluster, \
and what a repair would change.\n\n\
Beyond qemu-img: refcounts set past the end of the file, a data cluster mapped at two \
guest offsets, metadata overlapping data (notes, not counted in qemu-img's totals). Images \
qemu-img check cannot open (a missing backing or data file, no key for an encrypted image, \
a header QEMU refuses even in check mode) exit 1 as with qemu-img, after what can be read \
is checked anyway. qemu-img check opens some images that other commands refuse: one with \
no refcount table is checked (and its clusters counted as corruptions).\n\n\
Exit codes, as qemu-img check: 0 clean, 1 check failed, 2 corruptions, 3 leaks only, \
63 a raw image.\n\n\
Several images (or --recursive): they are checked in parallel, one per core, and each \
gets one summary row (verdict, corruptions, leaks, allocated clusters, dirty bit, whether \
its backing chain opens), then a total. An image that cannot be read is reported in its \
row and the others are still checked. The exit code is the most severe of the images' \
codes, in this order: 2 (corruptions), then 1 (could not check: unreadable, check failed, \
not qcow2), then 3 (leaks only), then 0 (clean). With --json each image is one line of \
JSON (NDJSON), the same object `check --json IMAGE` prints for it, in the order given; an \
image that cannot be read is {\"filename\", \"error\"}.\n\n\
Nothing is written: to repair, use `qemu-img check -r` on a copy."
)]
pub struct Args {
    /// The image files; with --recursive, also directories to search for images.
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// Print JSON: qemu-img check's keys plus `findings` (one line per image when
    /// there are several).
    #[arg(long)]
    pub json: bool,
    /// Check every qcow2 image under the directories given (files that start with
    /// the qcow2 magic or whose name ends in .qcow2), in file-name order.
    #[arg(long, short = 'r')]
    pub recursive: bool,
    #[command(flatten)]
    pub key: super::secret::KeyArgs,
}

/// Run `qinspect check`.
pub fn run(mut a: Args) -> CmdResult {
    match a.images.as_mut_slice() {
        [one] if !a.recursive => {
            // qemu-img's JSON names the image as it was given: with
            // --image-opts, the option string.
            let given = one.to_string_lossy().into_owned();
            let keys = a.key.resolve(one)?;
            check_one(one, &given, a.json, keys)
        }
        _ => super::check_many::run(&a.images, a.recursive, a.json),
    }
}

fn check_one(image: &Path, given: &str, json: bool, mut keys: super::secret::Keys) -> CmdResult {
    let filename = image.to_string_lossy().into_owned();
    let src: SharedSource = Arc::new(FileSource::open(image)?);
    if qinspect::chain::Format::probe(src.as_ref()) == qinspect::chain::Format::Raw {
        let mut err = anstream::stderr();
        writeln!(
            err,
            "qinspect: {} is a raw image: {RAW_HAS_NO_CHECKS}",
            image.display()
        )?;
        return Ok(63);
    }
    let img = Qcow2::open(src, Strictness::Lenient)?;
    if img.header.crypt_method != 0 && !keys.unlock_image(0, &img, image)? {
        // qemu-img check opens the image with its key, and fails without one.
        let mut err = anstream::stderr();
        writeln!(
            err,
            "qinspect: Could not open '{filename}': Parameter 'encrypt.key-secret' is required for cipher (give the passphrase with --object secret,... --image-opts, or --passphrase-file)"
        )?;
        return Ok(1);
    }
    let show_progress = !json && std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::hidden();
    if show_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(bar_style());
    }
    let tick = |p: Progress| {
        bar.set_message(p.phase);
        bar.set_length(p.total);
        bar.set_position(p.done);
    };
    let opts = CheckOptions {
        progress: Some(&tick),
        ..Default::default()
    };
    let mut report = check(&img, &opts);
    bar.finish_and_clear();
    if report.qemu_refuses.is_none() {
        report.qemu_refuses = open_refusal(image, &img);
    }
    if json {
        let v = report_json(&report, given);
        super::print_json(&v)?;
        // Like qemu-img, say on stderr why the check failed.
        let why = report.qemu_refuses.as_ref().or(report.aborted.as_ref());
        if let Some(why) = why {
            let mut err = anstream::stderr();
            writeln!(err, "qinspect: qemu-img check fails: {why}")?;
        }
    } else {
        print_readable(&report)?;
    }
    Ok(report.exit_code())
}

/// Why `qemu-img check` would fail to open the image beyond its header: it opens
/// the decryption key, the external data file and the whole backing chain before
/// it checks anything.
pub fn open_refusal(path: &Path, img: &Qcow2) -> Option<Refusal> {
    if img.header.crypt_method != 0 && img.data_key().is_none() {
        return Some(Refusal::NoKey {
            path: path.to_path_buf(),
        });
    }
    let opts = OpenOptions {
        top_strictness: Some(Strictness::Lenient),
        strictness: Strictness::Qemu,
        ..Default::default()
    };
    match Chain::open_detailed(path, &opts) {
        // qemu-img check's open is read-only: it goes round the loop until
        // it runs out of file descriptors.
        Err(failure) if failure.read_only_open_loops() => Some(Refusal::BackingLoop {
            path: path.to_path_buf(),
            error: failure.error,
        }),
        Err(failure) => Some(match failure.qemu_reason() {
            Some(reason) => Refusal::Backing {
                path: path.to_path_buf(),
                failure,
                reason,
            },
            None => Refusal::Chain {
                path: path.to_path_buf(),
                error: failure.error,
            },
        }),
        // A data file found only next to the image: QEMU would not find it.
        Ok(chain) => chain.notes.first().cloned().map(Refusal::DataFileElsewhere),
    }
}

/// What a raw image gets instead of a check (qemu-img's words in quotes).
pub const RAW_HAS_NO_CHECKS: &str = "raw images have no metadata to check (qemu-img: \"This image format does not support checks\")";

/// The progress bar of one image's check.
pub fn bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({eta})")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// qemu-img check's JSON keys (all of them, zero when qemu-img leaves them out),
/// plus qinspect's findings.
pub fn report_json(r: &CheckReport, filename: &str) -> Value {
    let mut v = json!({
        "filename": filename,
        "format": "qcow2",
        "check-errors": r.check_errors,
        "corruptions": r.corruptions,
        "leaks": r.leaks,
        "image-end-offset": r.image_end_offset,
        "total-clusters": r.total_clusters,
        "allocated-clusters": r.allocated_clusters,
        "fragmented-clusters": r.fragmented_clusters,
        "compressed-clusters": r.compressed_clusters,
        "findings": r.findings,
    });
    if let Value::Object(m) = &mut v {
        if r.findings_omitted > 0 {
            m.insert("findings-omitted".into(), json!(r.findings_omitted));
        }
        if let Some(why) = &r.aborted {
            m.insert("aborted".into(), json!(why));
        }
        if let Some(why) = &r.qemu_refuses {
            m.insert("qemu-refuses-to-open".into(), json!(why));
        }
        if !r.warnings.is_empty() {
            m.insert("warnings".into(), json!(r.warnings));
        }
    }
    v
}

fn print_readable(r: &CheckReport) -> color_eyre::Result<()> {
    let mut out = anstream::stdout();
    let (hd, bad, dim) = (style::HEAD, style::BAD, style::DIM);
    for w in &r.warnings {
        writeln!(out, "{bad}warning:{bad:#} {w}")?;
    }
    match &r.qemu_refuses {
        Some(why @ Refusal::BackingLoop { .. }) => writeln!(
            out,
            "{bad}qemu-img check fails:{bad:#} {why}\n\
             What qinspect could read anyway, counted as qemu-img check would count it:\n"
        )?,
        Some(why) => writeln!(
            out,
            "{bad}qemu-img check fails:{bad:#} it cannot open this image, and exits 1 without checking it: {why}\n\
             What qinspect could read anyway, counted as qemu-img check would count it:\n"
        )?,
        None => {}
    }
    // qemu-img's summary.
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        if r.qemu_refuses.is_some() {
            writeln!(out, "No refcount errors in what could be read.")?;
        } else {
            writeln!(out, "No errors were found on the image.")?;
        }
    } else {
        if r.corruptions > 0 {
            writeln!(
                out,
                "\n{bad}{} errors were found on the image.{bad:#}\nData may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            )?;
        }
        if r.leaks > 0 {
            writeln!(
                out,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            )?;
        }
        if r.check_errors > 0 {
            writeln!(
                out,
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            )?;
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64,
            r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64
        )?;
    }
    if r.image_end_offset.get() != 0 {
        writeln!(out, "Image end offset: {}", r.image_end_offset.get())?;
    }
    if let Some(why) = &r.aborted {
        writeln!(out, "{bad}Check failed:{bad:#} {why}")?;
    } else if r.check_errors > 0 {
        writeln!(
            out,
            "{bad}Check failed{bad:#} (some refcounts could not be read)"
        )?;
    }
    // Findings grouped by kind.
    for (kind, title) in [
        (FindingKind::Corruption, "Corruptions"),
        (FindingKind::Leak, "Leaks"),
        (FindingKind::CheckError, "Check errors"),
        (FindingKind::Note, "Beyond qemu-img check"),
    ] {
        let list: Vec<_> = r.findings.iter().filter(|f| f.kind == kind).collect();
        if list.is_empty() {
            continue;
        }
        let st = if kind == FindingKind::Note { hd } else { bad };
        writeln!(out, "\n{st}{title} ({}):{st:#}", list.len())?;
        for f in list {
            let times = if f.count > 1 {
                format!(" {dim}(counted {} times){dim:#}", f.count)
            } else {
                String::new()
            };
            writeln!(out, "  {}{times}", f.message)?;
            for who in &f.referrers {
                writeln!(out, "    {dim}referenced by{dim:#} {}", who.describe())?;
            }
            if let Some(fix) = &f.repair {
                writeln!(out, "    {dim}repair:{dim:#} {fix}")?;
            }
        }
    }
    if r.findings_omitted > 0 {
        writeln!(out, "\n({} more findings not listed)", r.findings_omitted)?;
    }
    Ok(())
}

//! `qinspect check A B ...` and `check --recursive DIR`: many images checked in
//! parallel, one summary row each, a total, and the most severe exit code.

use super::check::{RAW_HAS_NO_CHECKS, open_refusal, report_json};
use super::style;
use qinspect::chain::{Chain, Format, OpenOptions};
use qinspect::check::{CheckOptions, CheckReport, Progress, check};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, SharedSource};
use rayon::prelude::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The first bytes of every qcow2 file.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// One image to check, or a path that could not even be listed.
pub enum Target {
    /// A file to check.
    File(PathBuf),
    /// A path that yields no image, and why.
    Unusable(PathBuf, String),
}

impl Target {
    fn path(&self) -> &Path {
        match self {
            Target::File(p) | Target::Unusable(p, _) => p,
        }
    }
}

/// The images named on the command line: files as given, directories walked when
/// `recursive` (qcow2 files only, in file-name order).
pub fn targets(paths: &[PathBuf], recursive: bool) -> Vec<Target> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push(Target::File(p.clone()));
            continue;
        }
        if !recursive {
            out.push(Target::Unusable(
                p.clone(),
                "is a directory (--recursive checks the images under it)".into(),
            ));
            continue;
        }
        for entry in walkdir::WalkDir::new(p).sort_by_file_name() {
            match entry {
                Ok(e) if e.file_type().is_file() && looks_like_qcow2(e.path()) => {
                    out.push(Target::File(e.into_path()));
                }
                Ok(_) => {}
                Err(e) => {
                    let at = e.path().unwrap_or(p).to_path_buf();
                    out.push(Target::Unusable(at, e.to_string()));
                }
            }
        }
    }
    out
}

/// A file found by `--recursive` is checked if its name ends in `.qcow2` or it
/// starts with the qcow2 magic.
fn looks_like_qcow2(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|()| &magic == QCOW2_MAGIC)
}

/// The result of checking one image.
struct Outcome {
    filename: String,
    /// qemu-img check's exit code for this image (63: raw, no checks).
    code: i32,
    /// The single-image `check --json` object, or `{filename, error}`.
    json: Value,
    /// Present when the check ran.
    row: Option<Row>,
    /// Why it could not be checked (or why the check stopped).
    problem: Option<String>,
}

/// How an image's backing chain fares.
enum Backing {
    /// No backing file.
    None,
    /// It opens: this many layers below the image.
    Opens(usize),
    /// It does not open (why is in the report's `qemu_refuses`).
    Broken,
}

struct Row {
    /// qemu-img check's counts; `None` when it refuses to open the image (it then
    /// prints none, and the row's numbers are left out of the totals).
    counts: Option<Counts>,
    dirty: bool,
    backing: Backing,
}

/// The numbers qemu-img check prints for an image it checks.
struct Counts {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    allocated: u64,
    total: u64,
}

/// How severe an exit code is, most severe highest: corruptions, then could not
/// check, then leaks, then clean.
fn severity(code: i32) -> u8 {
    match code {
        0 => 0,
        3 => 1,
        2 => 3,
        _ => 2,
    }
}

/// The overall exit code of several images' codes.
fn overall(codes: impl IntoIterator<Item = i32>) -> i32 {
    let worst = codes.into_iter().max_by_key(|&c| severity(c)).unwrap_or(0);
    // A raw image (63) could not be checked: that is exit code 1 overall.
    if worst == 0 || worst == 2 || worst == 3 {
        worst
    } else {
        1
    }
}

fn failed(filename: String, code: i32, why: String) -> Outcome {
    Outcome {
        json: json!({ "filename": filename, "error": why }),
        filename,
        code,
        row: None,
        problem: Some(why),
    }
}

fn check_target(t: &Target, bar: &indicatif::ProgressBar) -> Outcome {
    let filename = t.path().to_string_lossy().into_owned();
    let path = match t {
        Target::File(p) => p,
        Target::Unusable(_, why) => return failed(filename, 1, why.clone()),
    };
    let src: SharedSource = match FileSource::open(path) {
        Ok(s) => Arc::new(s),
        Err(e) => return failed(filename, 1, e.to_string()),
    };
    if Format::probe(src.as_ref()) == Format::Raw {
        return failed(filename, 63, RAW_HAS_NO_CHECKS.into());
    }
    let img = match Qcow2::open(src, Strictness::Lenient) {
        Ok(img) => img,
        Err(e) => return failed(filename, 1, e.to_string()),
    };
    let tick = |p: Progress| {
        bar.set_message(p.phase);
        bar.set_length(p.total);
        bar.set_position(p.done);
    };
    let mut report = check(
        &img,
        &CheckOptions {
            progress: Some(&tick),
            ..Default::default()
        },
    );
    // What qemu-img check would fail on before checking (the same as `check IMAGE`).
    if report.qemu_refuses.is_none() {
        report.qemu_refuses = open_refusal(path, &img);
    }
    let backing = match &img.backing_name {
        None => Backing::None,
        Some(_) => {
            let opts = OpenOptions {
                top_strictness: Some(Strictness::Lenient),
                strictness: Strictness::Qemu,
                ..Default::default()
            };
            match Chain::open(path, &opts) {
                Ok(chain) => Backing::Opens(chain.layers.len().saturating_sub(1)),
                Err(_) => Backing::Broken,
            }
        }
    };
    outcome(filename, &report, img.header.dirty(), backing)
}

fn outcome(filename: String, r: &CheckReport, dirty: bool, backing: Backing) -> Outcome {
    let problem = r.aborted.as_ref().map(ToString::to_string).or_else(|| {
        r.qemu_refuses
            .as_ref()
            .map(|w| format!("qemu-img check fails: {w}"))
    });
    Outcome {
        json: report_json(r, &filename),
        filename,
        code: r.exit_code(),
        row: Some(Row {
            counts: r.qemu_refuses.is_none().then_some(Counts {
                corruptions: r.corruptions,
                leaks: r.leaks,
                check_errors: r.check_errors,
                allocated: r.allocated_clusters,
                total: r.total_clusters,
            }),
            dirty,
            backing,
        }),
        problem,
    }
}

fn verdict(o: &Outcome) -> &'static str {
    match (o.code, &o.row) {
        (0, _) => "clean",
        (3, _) => "leaks",
        (2, _) => "corrupt",
        (63, _) => "not qcow2",
        (_, None) => "unreadable",
        (_, Some(_)) => "check failed",
    }
}

/// The progress bar of one image among many: its name, then its check's phase.
fn image_bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template("{prefix} {msg:>12} [{bar:30}] {pos}/{len}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Run a check over many images.
pub fn run(paths: &[PathBuf], recursive: bool, json: bool) -> super::CmdResult {
    let targets = targets(paths, recursive);
    let name_width = targets
        .iter()
        .map(|t| t.path().to_string_lossy().chars().count())
        .max()
        .unwrap_or(0)
        .clamp(5, 60);
    let multi =
        indicatif::MultiProgress::with_draw_target(if !json && std::io::stderr().is_terminal() {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        });
    let all = multi.add(indicatif::ProgressBar::new(targets.len() as u64));
    all.set_style(
        indicatif::ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len} images")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    all.set_prefix("checked");

    let mut printer = Printer::new(json, name_width);
    if !json {
        multi.suspend(|| printer.header())?;
    }
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Outcome)>();
    let mut codes = Vec::with_capacity(targets.len());
    let mut first_error = None;
    std::thread::scope(|s| {
        let (targets, multi, all, stop) = (&targets, &multi, &all, &stop);
        s.spawn(move || {
            targets
                .par_iter()
                .enumerate()
                .for_each_with(tx, |tx, (i, t)| {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let bar = multi.insert_before(all, indicatif::ProgressBar::hidden());
                    bar.set_style(image_bar_style());
                    bar.set_prefix(t.path().to_string_lossy().into_owned());
                    // A panic is a bug, but it must not cost the other images their check.
                    let o = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        check_target(t, &bar)
                    }))
                    .unwrap_or_else(|_| {
                        failed(
                            t.path().to_string_lossy().into_owned(),
                            1,
                            "internal error: the check of this image panicked".into(),
                        )
                    });
                    bar.finish_and_clear();
                    multi.remove(&bar);
                    all.inc(1);
                    let _ = tx.send((i, o));
                });
        });
        // Print in the order given, each image as soon as those before it are done.
        let mut pending = BTreeMap::new();
        let mut next = 0usize;
        for (i, o) in rx {
            pending.insert(i, o);
            while let Some(o) = pending.remove(&next) {
                next = next.saturating_add(1);
                codes.push(o.code);
                if first_error.is_none()
                    && let Err(e) = multi.suspend(|| printer.row(&o))
                {
                    first_error = Some(e);
                    stop.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    all.finish_and_clear();
    if let Some(e) = first_error {
        return Err(e);
    }
    let code = overall(codes.iter().copied());
    if !json {
        printer.total(code)?;
    }
    Ok(code)
}

/// Writes the rows, and adds up what the total row needs.
struct Printer {
    json: bool,
    width: usize,
    images: u64,
    by_verdict: BTreeMap<&'static str, u64>,
    corruptions: u64,
    leaks: u64,
    allocated: u64,
    total: u64,
    dirty: u64,
    broken_chains: u64,
    notes: Vec<String>,
}

impl Printer {
    fn new(json: bool, width: usize) -> Printer {
        Printer {
            json,
            width,
            images: 0,
            by_verdict: BTreeMap::new(),
            corruptions: 0,
            leaks: 0,
            allocated: 0,
            total: 0,
            dirty: 0,
            broken_chains: 0,
            notes: Vec::new(),
        }
    }

    fn header(&self) -> color_eyre::Result<()> {
        let hd = style::HEAD;
        let mut out = anstream::stdout();
        writeln!(
            out,
            "{hd}{:<w$}  {:<12} {:>11} {:>6} {:>21}  {:<5}  backing{hd:#}",
            "image",
            "verdict",
            "corruptions",
            "leaks",
            "allocated clusters",
            "dirty",
            w = self.width
        )?;
        Ok(())
    }

    fn row(&mut self, o: &Outcome) -> color_eyre::Result<()> {
        self.images = self.images.saturating_add(1);
        let v = verdict(o);
        let n = self.by_verdict.entry(v).or_insert(0);
        *n = n.saturating_add(1);
        if let Some(r) = &o.row {
            if let Some(c) = &r.counts {
                self.corruptions = self.corruptions.saturating_add(c.corruptions);
                self.leaks = self.leaks.saturating_add(c.leaks);
                self.allocated = self.allocated.saturating_add(c.allocated);
                self.total = self.total.saturating_add(c.total);
            }
            self.dirty = self.dirty.saturating_add(u64::from(r.dirty));
            if matches!(r.backing, Backing::Broken) {
                self.broken_chains = self.broken_chains.saturating_add(1);
            }
        }
        if self.json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, &o.json)?;
            writeln!(out)?;
            return Ok(());
        }
        let mut out = anstream::stdout();
        let st = match o.code {
            0 => style::DATA,
            3 => style::BACKING,
            _ => style::BAD,
        };
        let name = &o.filename;
        let w = self.width;
        match &o.row {
            None => writeln!(
                out,
                "{name:<w$}  {st}{v:<12}{st:#} {:>11} {:>6} {:>21}  {:<5}  -",
                "-", "-", "-", "-"
            )?,
            Some(r) => {
                let backing = match &r.backing {
                    Backing::None => "none".to_string(),
                    Backing::Opens(n) => format!("ok ({n} below)"),
                    Backing::Broken => format!("{}BROKEN{:#}", style::BAD, style::BAD),
                };
                let (corruptions, leaks, allocated, errors) = match &r.counts {
                    Some(c) => (
                        c.corruptions.to_string(),
                        c.leaks.to_string(),
                        format!("{}/{}", c.allocated, c.total),
                        if c.check_errors > 0 {
                            format!(" ({} check errors)", c.check_errors)
                        } else {
                            String::new()
                        },
                    ),
                    // qemu-img check does not open it, so it counts nothing.
                    None => ("-".into(), "-".into(), "-".into(), String::new()),
                };
                writeln!(
                    out,
                    "{name:<w$}  {st}{v:<12}{st:#} {corruptions:>11} {leaks:>6} {allocated:>21}  {:<5}  {backing}{errors}",
                    if r.dirty { "yes" } else { "no" },
                )?;
            }
        }
        if let Some(p) = &o.problem {
            // Error messages from opening a file already start with its name.
            if p.starts_with(name.as_str()) {
                self.notes.push(p.clone());
            } else {
                self.notes.push(format!("{name}: {p}"));
            }
        }
        Ok(())
    }

    fn total(&self, code: i32) -> color_eyre::Result<()> {
        let mut out = anstream::stdout();
        let hd = style::HEAD;
        let verdicts: Vec<String> = [
            "clean",
            "leaks",
            "corrupt",
            "check failed",
            "unreadable",
            "not qcow2",
        ]
        .iter()
        .filter_map(|v| self.by_verdict.get(v).map(|n| format!("{n} {v}")))
        .collect();
        let w = self.width;
        writeln!(
            out,
            "{hd}{:<w$}  {:<12} {:>11} {:>6} {:>21}  {:<5}  {}{hd:#}",
            format!("total: {} images", self.images),
            "",
            self.corruptions,
            self.leaks,
            format!("{}/{}", self.allocated, self.total),
            self.dirty,
            if self.broken_chains > 0 {
                format!("{} broken", self.broken_chains)
            } else {
                String::new()
            }
        )?;
        writeln!(out, "\n{}; exit code {code}", verdicts.join(", "))?;
        if !self.notes.is_empty() {
            writeln!(out)?;
            for n in &self.notes {
                writeln!(out, "{n}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::overall;

    #[test]
    fn exit_code_order_is_corruptions_failure_leaks_clean() {
        assert_eq!(overall([]), 0);
        assert_eq!(overall([0, 0]), 0);
        assert_eq!(overall([0, 3, 0]), 3);
        assert_eq!(overall([3, 1, 0]), 1);
        assert_eq!(overall([63, 3]), 1);
        assert_eq!(overall([3, 1, 2, 0]), 2);
        assert_eq!(overall([2, 63]), 2);
    }
}

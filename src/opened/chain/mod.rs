//! Backing chains and external data files.
//!
//! A qcow2 image may name a **backing file**: wherever the image has no data of its
//! own (an unallocated cluster), a read falls through to the same guest offset of
//! the backing file, which may itself have a backing file, and so on. Bytes past the
//! end of a shorter backing file read as zeros.
//!
//! Backing names are resolved as QEMU 10 resolves them:
//!
//! * a plain name: absolute as it is, relative to the directory of the image that
//!   names it (`path_combine`);
//! * `file:NAME`: the `file` protocol; NAME is taken as it is, so a relative one is
//!   relative to the working directory;
//! * `json:{...}`: a block-driver spec; qinspect follows the specs that end in a
//!   local file (`{"driver":"qcow2","file":{"driver":"file","filename":"b.qcow2"}}`,
//!   also with flattened `file.filename` keys) and names the driver of any other;
//! * another protocol (`nbd://`, `http://`, ...): refused, naming it.
//!
//! The format comes from the json spec's driver, the backing-format extension, or a
//! probe (qcow2 magic or raw). An image may instead keep its data in an **external
//! data file**, named by a header extension. QEMU opens that name as it is, relative
//! to the *working directory*, not to the image; qinspect does the same, and only
//! when that file does not exist but one of that name sits next to the image does it
//! read that one instead, saying so in [`Chain::notes`].

use crate::error::{Error, Result};
use crate::image::{Qcow2, Strictness, View};
use crate::io::{FileId, FileSource, SharedSource, Source};
use crate::types::HostOffset;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod failure;
mod names;
pub use failure::{ChainFailure, FailureCause};
pub use names::{Target, has_protocol, path_combine, resolve_backing, resolve_relative};

/// The deepest chain qinspect follows.
pub const MAX_CHAIN_DEPTH: usize = 500;

/// An image's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A qcow2 image: header, L1/L2 tables, refcounts.
    Qcow2,
    /// Raw bytes.
    Raw,
}

impl Format {
    /// "qcow2" or "raw".
    pub fn name(&self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// Parse a format name as used in backing-format extensions and options.
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "qcow2" => Ok(Format::Qcow2),
            "raw" | "file" => Ok(Format::Raw),
            other => Err(Error::unsupported(
                format!("format '{other}'"),
                "qinspect reads qcow2 and raw layers only",
            )),
        }
    }

    /// Guess from the first bytes, like QEMU's probe for these two formats.
    pub fn probe(src: &dyn Source) -> Format {
        let mut m = [0u8; 4];
        if crate::io::read_into(src, "magic", HostOffset(0), &mut m).ok() == Some(4)
            && u32::from_be_bytes(m) == crate::header::QCOW2_MAGIC
        {
            Format::Qcow2
        } else {
            Format::Raw
        }
    }
}

/// What a layer is.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum LayerKind {
    /// A qcow2 image, its view (active or snapshot), and its data file if external.
    Qcow2 {
        /// The image.
        image: Box<Qcow2>,
        /// The L1 table used for lookups.
        view: View,
        /// The external data file, if the image has one.
        data_file: Option<SharedSource>,
    },
    /// A raw file: guest offset = file offset.
    Raw,
}

/// One layer of a chain.
#[derive(Debug)]
pub struct Layer {
    /// The path used to open it.
    pub path: PathBuf,
    /// The file.
    pub src: SharedSource,
    /// qcow2 or raw.
    pub kind: LayerKind,
}

impl Layer {
    /// Virtual size this layer presents, as QEMU's block layer sees it: a qcow2
    /// size rounded down to 512 bytes, a raw file's size rounded up.
    pub fn size(&self) -> u64 {
        match &self.kind {
            LayerKind::Qcow2 { view, .. } => view.size & !511,
            LayerKind::Raw => self.src.len().div_ceil(512).saturating_mul(512),
        }
    }

    /// The format.
    pub fn format(&self) -> Format {
        match self.kind {
            LayerKind::Qcow2 { .. } => Format::Qcow2,
            LayerKind::Raw => Format::Raw,
        }
    }

    /// The qcow2 image, if this is one.
    pub fn qcow2(&self) -> Option<&Qcow2> {
        match &self.kind {
            LayerKind::Qcow2 { image, .. } => Some(image),
            LayerKind::Raw => None,
        }
    }

    /// The file a host offset of this layer's data clusters is in: the external
    /// data file if the image has one open, else the layer's own file. (Compressed
    /// clusters and metadata are always in the image file.)
    pub fn data_path(&self) -> &Path {
        match &self.kind {
            LayerKind::Qcow2 {
                data_file: Some(df),
                ..
            } => df.name(),
            _ => &self.path,
        }
    }

    /// A short label: the file name and format.
    pub fn label(&self) -> String {
        format!("{} ({})", self.path.display(), self.format().name())
    }
}

/// Options for opening a chain.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Format of the top image (probed if `None`).
    pub format: Option<Format>,
    /// Use this internal snapshot of the top image instead of the active L1.
    pub snapshot: Option<String>,
    /// Use this record of the top image's snapshot table (by its index, 0 the
    /// first) instead of the active L1; it takes the place of `snapshot`. Two
    /// records of a corrupt table can share an ID, and only the index tells them apart.
    pub snapshot_record: Option<usize>,
    /// Open only the top image (like `qemu-img info` does).
    pub no_backing: bool,
    /// Do not open external data files (`qemu-img info` opens none).
    pub no_data_file: bool,
    /// With `snapshot`: keep the active disk size, as `qemu-img convert -l` does,
    /// instead of the snapshot's own (see [`Qcow2::snapshot_view_loaded`]).
    pub snapshot_active_size: bool,
    /// How strictly to open qcow2 layers.
    pub strictness: Strictness,
    /// How strictly to open the top layer, where it differs (`qemu-img check`
    /// opens the image itself in check mode and its backing files normally).
    pub top_strictness: Option<Strictness>,
}

/// A chain of layers, top first.
#[derive(Debug)]
pub struct Chain {
    /// Layers from the top image down to the base.
    pub layers: Vec<Layer>,
    /// Where qinspect had to differ from QEMU to open the chain at all (a data
    /// file found next to the image rather than where QEMU looks). Commands print
    /// these as warnings.
    pub notes: Vec<String>,
}

/// Open the external data file of `image` (opened from `path`), as QEMU does.
///
/// Incompatible bit 2 without a name: QEMU needs a `data-file` option, which
/// qinspect does not take, so the chain cannot be read ("'data-file' is required
/// for this image"). A name is opened as it is (relative to the working
/// directory); if that fails and a file of that name is next to the image, that
/// one is used and a note says so.
fn open_data_file(
    image: &Qcow2,
    path: &Path,
    notes: &mut Vec<String>,
) -> Result<Option<SharedSource>> {
    if !image.header.has_data_file() {
        if image.header.data_file_raw() {
            return Err(Error::invalid(
                "header autoclear_features",
                HostOffset(crate::header::Field::AutoclearFeatures.offset()),
                "data-file-raw requires a data file",
            ));
        }
        return Ok(None);
    }
    let Some(name) = &image.data_file_name else {
        return Err(Error::Chain {
            chain: path.display().to_string(),
            reason: "'data-file' is required for this image (incompatible bit 2 is set, but the image names no data file)".into(),
        });
    };
    let t = resolve_backing(Path::new(""), name).map_err(|reason| Error::Chain {
        chain: path.display().to_string(),
        reason: format!("external data file: {reason}"),
    })?;
    match FileSource::open(&t.path) {
        Ok(f) => Ok(Some(Arc::new(f))),
        Err(Error::Io { source, .. }) => {
            let beside = resolve_relative(path, name);
            if beside != t.path
                && let Ok(f) = FileSource::open(&beside)
            {
                notes.push(format!(
                    "external data file '{name}': QEMU opens it relative to the working directory and would fail (Could not open '{}': {}); reading {} next to the image instead",
                    t.path.display(),
                    strerror(&source),
                    beside.display()
                ));
                return Ok(Some(Arc::new(f)));
            }
            Err(Error::Chain {
                chain: path.display().to_string(),
                reason: format!(
                    "Could not open '{}': {}",
                    t.path.display(),
                    strerror(&source)
                ),
            })
        }
        Err(e) => Err(e),
    }
}

fn chain_text(chain: &[PathBuf]) -> String {
    chain
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// An OS error as C's `strerror` says it, the way QEMU prints it ("No such file
/// or directory", without Rust's "(os error 2)").
pub fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s.get(..i).unwrap_or(&s).to_string(),
        _ => s,
    }
}

/// Open one layer's file; the cause says why it failed, for
/// [`ChainFailure::cause`], and what the OS said when it refused
/// (`ChainFailure::os_error`).
fn open_file(
    path: &Path,
    chain: &[PathBuf],
) -> std::result::Result<SharedSource, (Error, FailureCause, Option<String>)> {
    match FileSource::open(path) {
        Ok(f) => Ok(Arc::new(f)),
        Err(e) => {
            let cause = match &e {
                Error::Io { .. } if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) => {
                    FailureCause::NotRegularFile
                }
                Error::Io { source, .. } => FailureCause::Os(source.kind()),
                _ => FailureCause::Unfollowed,
            };
            let os_error = match &e {
                Error::Io { source, .. } => Some(strerror(source)),
                _ => None,
            };
            let e = match (e, &os_error) {
                (Error::Io { .. }, Some(os)) if !chain.is_empty() => Error::Chain {
                    chain: chain_text(chain),
                    reason: format!(
                        "Could not open backing file: Could not open '{}': {os}",
                        path.display(),
                    ),
                },
                (e, _) => e,
            };
            Err((e, cause, os_error))
        }
    }
}

impl Chain {
    /// Open `path` and, unless told not to, every backing file below it.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Chain> {
        Chain::open_detailed(path, opts).map_err(|f| f.error)
    }

    /// [`Chain::open`], saying on failure which layer stopped it and why
    /// ([`ChainFailure`]): whether QEMU's open would stop there too.
    pub fn open_detailed(
        path: &Path,
        opts: &OpenOptions,
    ) -> std::result::Result<Chain, Box<ChainFailure>> {
        let mut layers: Vec<Layer> = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut names: Vec<PathBuf> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let mut next: Option<(PathBuf, Option<Format>)> = Some((path.to_path_buf(), opts.format));
        while let Some((p, fmt)) = next.take() {
            names.push(p.clone());
            let depth = layers.len();
            let fail = |error: Error, cause: FailureCause| {
                Box::new(ChainFailure {
                    error,
                    depth,
                    file: p.clone(),
                    cause,
                    os_error: None,
                })
            };
            if depth >= MAX_CHAIN_DEPTH {
                let error = Error::Chain {
                    chain: format!(
                        "{} -> ... ({} layers)",
                        names
                            .first()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        names.len()
                    ),
                    reason: format!(
                        "deeper than {MAX_CHAIN_DEPTH} layers; refusing to follow it further"
                    ),
                };
                return Err(fail(error, FailureCause::Unfollowed));
            }
            let src = open_file(&p, if layers.is_empty() { &[] } else { &names }).map_err(
                |(e, cause, os_error)| {
                    let mut f = fail(e, cause);
                    f.os_error = os_error;
                    f
                },
            )?;
            let canon = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if seen.contains(&canon) {
                let error = Error::Chain {
                    chain: chain_text(&names),
                    reason: format!(
                        "loop: '{}' appears twice (an image cannot be its own backing file)",
                        p.display()
                    ),
                };
                return Err(fail(error, FailureCause::Loop));
            }
            seen.push(canon);
            let format = fmt.unwrap_or_else(|| Format::probe(src.as_ref()));
            let is_top = layers.is_empty();
            let layer = match format {
                Format::Raw => Layer {
                    path: p.clone(),
                    src,
                    kind: LayerKind::Raw,
                },
                Format::Qcow2 => {
                    let strictness = match opts.top_strictness {
                        Some(s) if is_top => s,
                        _ => opts.strictness,
                    };
                    let image = Qcow2::open(src.clone(), strictness).map_err(|e| {
                        let refused = !is_top
                            && match &e {
                                Error::Invalid { .. } => true,
                                Error::Truncated { offset, .. } => offset.get() == 0,
                                _ => false,
                            };
                        let cause = if refused {
                            FailureCause::Refused
                        } else {
                            FailureCause::Unfollowed
                        };
                        fail(e, cause)
                    })?;
                    let view = if is_top {
                        top_view(&image, opts).map_err(|e| fail(e, FailureCause::Unfollowed))?
                    } else {
                        image.active_view()
                    };
                    let data_file = if opts.no_data_file {
                        None
                    } else {
                        open_data_file(&image, &p, &mut notes)
                            .map_err(|e| fail(e, FailureCause::Unfollowed))?
                    };
                    if !opts.no_backing
                        && let Some(b) = &image.backing_name
                    {
                        // What goes wrong with the name is about the layer below.
                        let below = |error: Error, file: PathBuf, cause: FailureCause| {
                            Box::new(ChainFailure {
                                error,
                                depth: depth.saturating_add(1),
                                file,
                                cause,
                                os_error: None,
                            })
                        };
                        let t = resolve_backing(&p, b).map_err(|reason| {
                            let error = Error::Chain {
                                chain: chain_text(&names),
                                reason: format!("Could not open backing file: {reason}"),
                            };
                            below(error, PathBuf::from(b), FailureCause::Unfollowed)
                        })?;
                        let bf =
                            match (t.format, &image.backing_format) {
                                (Some(f), _) => Some(f),
                                (None, Some(f)) => Some(Format::parse(f).map_err(|e| {
                                    below(e, t.path.clone(), failure::format_cause(f))
                                })?),
                                (None, None) => None,
                            };
                        next = Some((t.path, bf));
                    }
                    Layer {
                        path: p.clone(),
                        src,
                        kind: LayerKind::Qcow2 {
                            image: Box::new(image),
                            view,
                            data_file,
                        },
                    }
                }
            };
            if is_top
                && (opts.snapshot.is_some() || opts.snapshot_record.is_some())
                && layer.qcow2().is_none()
            {
                return Err(fail(
                    Error::Request(format!(
                        "{} is a raw image; only qcow2 images have internal snapshots",
                        p.display()
                    )),
                    FailureCause::Unfollowed,
                ));
            }
            layers.push(layer);
        }
        Ok(Chain { layers, notes })
    }

    /// A one-layer chain over an in-memory (or any) source: no backing files are
    /// followed. For tests and fuzzing.
    pub fn from_source(src: SharedSource, name: &Path, opts: &OpenOptions) -> Result<Chain> {
        let format = opts.format.unwrap_or_else(|| Format::probe(src.as_ref()));
        let kind = match format {
            Format::Raw => LayerKind::Raw,
            Format::Qcow2 => {
                let image = Qcow2::open(src.clone(), opts.strictness)?;
                let view = top_view(&image, opts)?;
                LayerKind::Qcow2 {
                    image: Box::new(image),
                    view,
                    data_file: None,
                }
            }
        };
        Ok(Chain {
            layers: vec![Layer {
                path: name.to_path_buf(),
                src,
                kind,
            }],
            notes: Vec::new(),
        })
    }

    /// The top layer.
    pub fn top(&self) -> &Layer {
        // open() always pushes at least one layer.
        #[allow(clippy::indexing_slicing)]
        &self.layers[0]
    }

    /// The guest size (the top layer's).
    pub fn size(&self) -> u64 {
        self.top().size()
    }

    /// Every file this chain has open: each layer and each external data file,
    /// top first, with what it is to the chain.
    pub fn opened_files(&self) -> Vec<OpenedFile<'_>> {
        let mut out = Vec::new();
        for (depth, l) in self.layers.iter().enumerate() {
            out.push(OpenedFile {
                role: format!("layer {depth} ({})", l.format().name()),
                src: l.src.as_ref(),
            });
            if let LayerKind::Qcow2 {
                data_file: Some(df),
                ..
            } = &l.kind
            {
                out.push(OpenedFile {
                    role: format!("the external data file of layer {depth}"),
                    src: df.as_ref(),
                });
            }
        }
        out
    }

    /// The file of this chain that `id` is, if any.
    pub fn member(&self, id: FileId) -> Option<OpenedFile<'_>> {
        self.opened_files()
            .into_iter()
            .find(|f| f.src.identity() == Some(id))
    }
}

/// A file a chain reads from.
#[derive(Debug)]
pub struct OpenedFile<'a> {
    /// "layer 1 (qcow2)", "external data file of layer 0".
    pub role: String,
    /// The open file.
    pub src: &'a dyn Source,
}

#[cfg(test)]
mod tests;

/// The view of the top image that `opts` asks for: a snapshot record by index, a
/// snapshot by ID or name (the first match, as QEMU), or the active L1.
fn top_view(image: &Qcow2, opts: &OpenOptions) -> Result<View> {
    let mut view = match (opts.snapshot_record, &opts.snapshot) {
        (Some(i), _) => image.snapshot_view_at(i)?,
        (None, Some(s)) => image.snapshot_view(s)?,
        (None, None) => return Ok(image.active_view()),
    };
    if opts.snapshot_active_size {
        view.size = image.header.size;
    }
    Ok(view)
}

//! Backing chains and external data files.
//!
//! A qcow2 image may name a **backing file**: wherever the image has no data of its
//! own (an unallocated cluster), a read falls through to the same guest offset of
//! the backing file, which may itself have a backing file, and so on. Bytes past the
//! end of a shorter backing file read as zeros.
//!
//! Names are resolved like QEMU's `path_combine`: an absolute name is used as it
//! is; a relative one is taken relative to the directory of the image that names
//! it. The format comes from the backing-format extension, or is probed (qcow2 magic
//! or raw). An image may instead keep its data in an **external data file**, named
//! by a header extension and resolved the same way.

use crate::error::{Error, Result};
use crate::image::{Qcow2, Strictness, View};
use crate::io::{FileId, FileSource, SharedSource, Source};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The deepest chain qinspect follows.
pub const MAX_CHAIN_DEPTH: usize = 500;

/// An image's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// qcow2.
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
        if src.read_at(&mut m, 0).ok() == Some(4)
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
    /// Open only the top image (like `qemu-img info` does).
    pub no_backing: bool,
    /// With `snapshot`: keep the active disk size, as `qemu-img convert -l` does,
    /// instead of the snapshot's own (see [`Qcow2::snapshot_view_loaded`]).
    pub snapshot_active_size: bool,
    /// How strictly to open qcow2 layers.
    pub strictness: Strictness,
}

/// A chain of layers, top first.
#[derive(Debug)]
pub struct Chain {
    /// Layers from the top image down to the base.
    pub layers: Vec<Layer>,
}

/// Resolve `name` relative to the image at `base`, like QEMU's `path_combine`.
pub fn resolve_relative(base: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match base.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

/// QEMU's `path_combine` as a string (for `full-backing-filename`).
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// QEMU's `path_has_protocol`: a ':' before any '/' names a protocol
/// (`nbd://...`, `json:{...}`), not a file.
pub fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes().get(i) == Some(&b':'))
}

fn reject_protocol(name: &str, chain: &[PathBuf]) -> Result<()> {
    if has_protocol(name) {
        return Err(Error::Chain {
            chain: chain_text(chain),
            reason: format!(
                "backing file '{name}' is a protocol or json: name; qinspect follows plain files only"
            ),
        });
    }
    Ok(())
}

fn chain_text(chain: &[PathBuf]) -> String {
    chain
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn open_file(path: &Path, chain: &[PathBuf], role: &str) -> Result<SharedSource> {
    match FileSource::open(path) {
        Ok(f) => Ok(Arc::new(f)),
        Err(Error::Io { source, .. }) if !chain.is_empty() => Err(Error::Chain {
            chain: chain_text(chain),
            reason: format!("cannot open {role} '{}': {source}", path.display()),
        }),
        Err(e) => Err(e),
    }
}

impl Chain {
    /// Open `path` and, unless told not to, every backing file below it.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Chain> {
        let mut layers: Vec<Layer> = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut names: Vec<PathBuf> = Vec::new();
        let mut next: Option<(PathBuf, Option<Format>)> = Some((path.to_path_buf(), opts.format));
        while let Some((p, fmt)) = next.take() {
            names.push(p.clone());
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::Chain {
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
                });
            }
            let src = open_file(
                &p,
                if layers.is_empty() { &[] } else { &names },
                "backing file",
            )?;
            let canon = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if seen.contains(&canon) {
                return Err(Error::Chain {
                    chain: chain_text(&names),
                    reason: format!(
                        "loop: '{}' appears twice (an image cannot be its own backing file)",
                        p.display()
                    ),
                });
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
                    let image = Qcow2::open(src.clone(), opts.strictness)?;
                    let view = match (&opts.snapshot, is_top) {
                        (Some(s), true) if opts.snapshot_active_size => {
                            image.snapshot_view_loaded(s)?
                        }
                        (Some(s), true) => image.snapshot_view(s)?,
                        _ => image.active_view(),
                    };
                    let data_file = match (&image.data_file_name, image.header.has_data_file()) {
                        (Some(name), true) => {
                            let dp = resolve_relative(&p, name);
                            Some(open_file(
                                &dp,
                                std::slice::from_ref(&p),
                                "external data file",
                            )?)
                        }
                        _ => None,
                    };
                    if !opts.no_backing
                        && let Some(b) = &image.backing_name
                    {
                        reject_protocol(b, &names)?;
                        let bf = match &image.backing_format {
                            Some(f) => Some(Format::parse(f)?),
                            None => None,
                        };
                        next = Some((resolve_relative(&p, b), bf));
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
            if is_top && opts.snapshot.is_some() && layer.qcow2().is_none() {
                return Err(Error::Request(format!(
                    "{} is a raw image; only qcow2 images have internal snapshots",
                    p.display()
                )));
            }
            layers.push(layer);
        }
        Ok(Chain { layers })
    }

    /// A one-layer chain over an in-memory (or any) source: no backing files are
    /// followed. For tests and fuzzing.
    pub fn from_source(src: SharedSource, name: &Path, opts: &OpenOptions) -> Result<Chain> {
        let format = opts.format.unwrap_or_else(|| Format::probe(src.as_ref()));
        let kind = match format {
            Format::Raw => LayerKind::Raw,
            Format::Qcow2 => {
                let image = Qcow2::open(src.clone(), opts.strictness)?;
                let view = match &opts.snapshot {
                    Some(s) => image.snapshot_view(s)?,
                    None => image.active_view(),
                };
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
mod tests {
    use super::*;

    #[test]
    fn path_combine_like_qemu() {
        assert_eq!(path_combine("top.qcow2", "mid.qcow2"), "mid.qcow2");
        assert_eq!(path_combine("a/top.qcow2", "mid.qcow2"), "a/mid.qcow2");
        assert_eq!(path_combine("/x/top.qcow2", "/y/b.raw"), "/y/b.raw");
        assert_eq!(path_combine("./t.qcow2", "../b"), "./../b");
        assert_eq!(
            resolve_relative(Path::new("dir/top.qcow2"), "b.raw"),
            PathBuf::from("dir/b.raw")
        );
        assert_eq!(
            resolve_relative(Path::new("top.qcow2"), "b.raw"),
            PathBuf::from("b.raw")
        );
    }

    #[test]
    fn protocol_names_are_refused() {
        assert!(reject_protocol("json:{}", &[]).is_err());
        assert!(reject_protocol("nbd://host/x", &[]).is_err());
        assert!(reject_protocol("base.qcow2", &[]).is_ok());
        assert!(reject_protocol("dir/a:b", &[]).is_ok());
        assert!(reject_protocol("foo:bar.qcow2", &[]).is_err());
    }
}

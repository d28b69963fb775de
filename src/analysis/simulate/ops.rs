//! The operations a simulation runs, as parsed from the command line, and the
//! words QEMU's tools print when one fails.

use super::SimError;
use super::data::DEFAULT_PATTERN;
use crate::types::GuestOffset;
use serde::Serialize;

/// An operation to simulate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// `qemu-img snapshot -c NAME`.
    SnapshotCreate {
        /// The new snapshot's name.
        name: String,
    },
    /// `qemu-img snapshot -d NAME` (names only, as qemu-img matches them).
    SnapshotDelete {
        /// The name of the snapshot to delete.
        id_or_name: String,
    },
    /// QMP `blockdev-snapshot-delete-internal-sync` with only an `id`.
    SnapshotDeleteId {
        /// Snapshot ID.
        id: String,
    },
    /// `qemu-img snapshot -a ID_OR_NAME`.
    SnapshotApply {
        /// ID or name.
        id_or_name: String,
    },
    /// A guest write (`qemu-io -c 'write [-P PATTERN] OFFSET LENGTH'`).
    Write {
        /// Guest offset.
        offset: GuestOffset,
        /// Length in bytes.
        length: u64,
        /// The byte written ([`DEFAULT_PATTERN`] unless `-P` says otherwise).
        pattern: u8,
    },
    /// `qemu-io -c 'write -c [-P PATTERN] OFFSET LENGTH'`: compressed clusters
    /// of the pattern, whole clusters from a cluster boundary.
    WriteCompressed {
        /// Guest offset.
        offset: GuestOffset,
        /// Length in bytes.
        length: u64,
        /// The byte written.
        pattern: u8,
    },
    /// A guest write-zeroes (`qemu-io -c 'write -z [-u]'`).
    WriteZeroes {
        /// Guest offset.
        offset: GuestOffset,
        /// Length in bytes.
        length: u64,
        /// `-u`: clusters may be released.
        unmap: bool,
    },
    /// A guest read with copy-on-read on (`qemu-io -C -c 'read OFFSET
    /// LENGTH'`): what the read finds only in the layers below is copied into
    /// the top layer.
    Read {
        /// Guest offset.
        offset: GuestOffset,
        /// Length in bytes.
        length: u64,
    },
    /// A guest discard.
    Discard {
        /// Guest offset.
        offset: GuestOffset,
        /// Length in bytes.
        length: u64,
    },
    /// `qemu-img resize [--shrink] IMG SIZE`.
    Resize {
        /// New disk size in bytes.
        size: u64,
        /// `--shrink` given.
        shrink: bool,
    },
    /// A throw-away overlay over the image (`qemu-nbd -s`) or over one of its
    /// snapshots (`qemu-nbd -s -l SNAPSHOT`); the operations after it act on
    /// the overlay.
    Overlay {
        /// The snapshot shown (ID or name), or the active image.
        snapshot: Option<String>,
    },
    /// Where a guest read at an offset comes from, through the simulated chain.
    Trace {
        /// Guest offset.
        offset: GuestOffset,
    },
    /// `qemu-img check -r leaks` or `-r all`.
    Repair {
        /// `-r all` (else `-r leaks`).
        all: bool,
    },
    /// The bare refcount walk over an L1 table.
    RefcountUpdate {
        /// `active` or a snapshot ID or name.
        l1: String,
        /// -1, 0 or +1.
        addend: i32,
    },
}

impl Op {
    /// Parse `snapshot-create:NAME`, `write:1M:4k`, `refcount-update:active:-1`, ...
    pub fn parse(
        s: &str,
        parse_num: &dyn Fn(&str) -> std::result::Result<u64, String>,
    ) -> std::result::Result<Op, String> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        // `write` and `write-compressed` end in `:P=PATTERN` for qemu-io's -P.
        let (rest, pattern) = match rest.rsplit_once(":P=") {
            Some((r, p)) if kind == "write" || kind == "write-compressed" => {
                (r, parse_pattern(s, p)?)
            }
            _ => (rest, DEFAULT_PATTERN),
        };
        let need = |what: &str| {
            if rest.is_empty() {
                Err(format!("'{s}': {kind} needs {what}"))
            } else {
                Ok(rest.to_string())
            }
        };
        let range = || -> std::result::Result<(u64, u64), String> {
            let (o, l) = rest
                .split_once(':')
                .ok_or_else(|| format!("'{s}': {kind} takes OFFSET:LENGTH, e.g. {kind}:1M:64k"))?;
            Ok((parse_num(o)?, parse_num(l)?))
        };
        match kind {
            "snapshot-create" => Ok(Op::SnapshotCreate {
                name: need("a NAME")?,
            }),
            "snapshot-delete" => Ok(Op::SnapshotDelete {
                id_or_name: need("an ID or NAME")?,
            }),
            "snapshot-delete-id" => Ok(Op::SnapshotDeleteId { id: need("an ID")? }),
            "snapshot-apply" => Ok(Op::SnapshotApply {
                id_or_name: need("an ID or NAME")?,
            }),
            "write" => {
                let (offset, length) = range()?;
                let offset = GuestOffset(offset);
                Ok(Op::Write {
                    offset,
                    length,
                    pattern,
                })
            }
            "write-compressed" => {
                let (offset, length) = range()?;
                let offset = GuestOffset(offset);
                Ok(Op::WriteCompressed {
                    offset,
                    length,
                    pattern,
                })
            }
            "write-zeroes" => {
                let (r, unmap) = match rest.strip_suffix(":unmap") {
                    Some(r) => (r, true),
                    None => (rest, false),
                };
                let (o, l) = r.split_once(':').ok_or_else(|| {
                    format!(
                        "'{s}': write-zeroes takes OFFSET:LENGTH[:unmap], e.g. write-zeroes:1M:64k"
                    )
                })?;
                Ok(Op::WriteZeroes {
                    offset: GuestOffset(parse_num(o)?),
                    length: parse_num(l)?,
                    unmap,
                })
            }
            "read" => {
                let (offset, length) = range()?;
                let offset = GuestOffset(offset);
                Ok(Op::Read { offset, length })
            }
            "discard" => {
                let (offset, length) = range()?;
                let offset = GuestOffset(offset);
                Ok(Op::Discard { offset, length })
            }
            "resize" => {
                let (n, shrink) = match rest.split_once(':') {
                    Some((n, "shrink")) => (n, true),
                    Some(_) => {
                        return Err(format!(
                            "'{s}': resize takes SIZE or SIZE:shrink, e.g. resize:2G"
                        ));
                    }
                    None => (rest, false),
                };
                if n.is_empty() {
                    return Err(format!("'{s}': resize needs a SIZE"));
                }
                Ok(Op::Resize {
                    size: parse_num(n)?,
                    shrink,
                })
            }
            "overlay" => Ok(Op::Overlay {
                snapshot: (!rest.is_empty()).then(|| rest.to_string()),
            }),
            "trace" => Ok(Op::Trace {
                offset: GuestOffset(parse_num(&need("an OFFSET")?)?),
            }),
            "repair" => match rest {
                "leaks" => Ok(Op::Repair { all: false }),
                "all" => Ok(Op::Repair { all: true }),
                _ => Err(format!(
                    "'{s}': repair takes leaks or all, e.g. repair:leaks"
                )),
            },
            "refcount-update" => {
                let (l1, a) = rest.rsplit_once(':').ok_or_else(|| {
                    format!("'{s}': refcount-update takes L1:ADDEND, e.g. refcount-update:active:0")
                })?;
                let addend: i32 = a
                    .parse()
                    .map_err(|_| format!("'{s}': ADDEND must be -1, 0 or +1"))?;
                if !(-1..=1).contains(&addend) {
                    return Err(format!(
                        "'{s}': ADDEND must be -1, 0 or +1 (QEMU asserts it)"
                    ));
                }
                Ok(Op::RefcountUpdate {
                    l1: l1.to_string(),
                    addend,
                })
            }
            _ => Err(format!(
                "'{s}': unknown operation (snapshot-create, snapshot-delete, snapshot-delete-id, snapshot-apply, write, write-compressed, write-zeroes, read, discard, resize, repair, overlay, trace, refcount-update)"
            )),
        }
    }

    /// How QEMU would be asked to do it.
    pub fn describe(&self) -> String {
        match self {
            Op::SnapshotCreate { name } => {
                format!("snapshot-create '{name}' (qemu-img snapshot -c {name})")
            }
            Op::SnapshotDelete { id_or_name } => {
                format!("snapshot-delete '{id_or_name}' (qemu-img snapshot -d {id_or_name})")
            }
            Op::SnapshotDeleteId { id } => {
                format!(
                    "snapshot-delete-id '{id}' (QMP blockdev-snapshot-delete-internal-sync with id '{id}')"
                )
            }
            Op::SnapshotApply { id_or_name } => {
                format!("snapshot-apply '{id_or_name}' (qemu-img snapshot -a {id_or_name})")
            }
            Op::Write {
                offset,
                length,
                pattern,
            } => format!(
                "write {length} bytes at guest {offset:#x} (qemu-io -c 'write{} {} {length}')",
                pattern_flag(*pattern),
                offset.get()
            ),
            Op::WriteCompressed {
                offset,
                length,
                pattern,
            } => format!(
                "write {length} compressed bytes at guest {offset:#x} (qemu-io -c 'write -c{} {} {length}')",
                pattern_flag(*pattern),
                offset.get()
            ),
            Op::WriteZeroes {
                offset,
                length,
                unmap,
            } => format!(
                "write zeroes over {length} bytes at guest {offset:#x} (qemu-io -c 'write -z{} {} {length}')",
                if *unmap { " -u" } else { "" },
                offset.get()
            ),
            Op::Read { offset, length } => format!(
                "copy-on-read of {length} bytes at guest {offset:#x} (qemu-io -C -c 'read {} {length}')",
                offset.get()
            ),
            Op::Discard { offset, length } => format!(
                "discard {length} bytes at guest {offset:#x} (qemu-io -c 'discard {} {length}')",
                offset.get()
            ),
            Op::Resize { size, shrink } => format!(
                "resize the disk to {size} bytes (qemu-img resize{} IMG {size})",
                if *shrink { " --shrink" } else { "" }
            ),
            Op::Overlay { snapshot } => match snapshot {
                Some(sn) => {
                    format!("a throw-away overlay over snapshot '{sn}' (qemu-nbd -s -l {sn} IMG)")
                }
                None => "a throw-away overlay over the image (qemu-nbd -s IMG)".to_string(),
            },
            Op::Trace { offset } => format!(
                "where a guest read at {offset:#x} comes from (qinspect trace, through the simulated chain)"
            ),
            Op::Repair { all } => {
                let m = if *all { "all" } else { "leaks" };
                format!("repair {m} (qemu-img check -r {m} IMG)")
            }
            Op::RefcountUpdate { l1, addend } => {
                format!("refcount walk over the {l1} L1 table with addend {addend:+}")
            }
        }
    }
}

/// The longest request qemu-io sends (QEMU's `BDRV_REQUEST_MAX_BYTES`: the
/// largest multiple of 512 that fits in an `int`, 2^31 less 512).
pub(super) const REQUEST_MAX_BYTES: u64 = 2_147_483_136;

impl Op {
    /// qemu-io's refusal of a request longer than [`REQUEST_MAX_BYTES`]:
    /// `write` (`-z`, `-u` and `-c` too), `read` and `discard` check the
    /// length as they parse their arguments, after qemu-io opened the image
    /// and before anything is asked of it, print this and fail (exit code
    /// 1); only the open and the close change the file. `write` names `-n`
    /// (no fallback, which a plain `write -z` lacks), the others do not.
    /// qemu-io ends the line with the length as it was typed; this says it
    /// in bytes.
    pub(super) fn qemu_io_refusal(&self) -> Option<String> {
        let (length, n) = match self {
            Op::Write { length, .. }
            | Op::WriteCompressed { length, .. }
            | Op::WriteZeroes { length, .. } => (*length, " without -n"),
            Op::Read { length, .. } | Op::Discard { length, .. } => (*length, ""),
            _ => return None,
        };
        (length > REQUEST_MAX_BYTES).then(|| {
            format!(
                "length cannot exceed {REQUEST_MAX_BYTES}{n}, given {length} (qemu-io's own limit, BDRV_REQUEST_MAX_BYTES: the request is never made)"
            )
        })
    }
}

/// How `qcow2_snapshot_delete` words a failed refcount walk, before the
/// errno's text.
pub(super) const FREE_FAILED: &str = "Failed to free the cluster and L1 table: ";

/// An error as QEMU's tool would print it: its prefix for the operation and the
/// errno's text, then what qinspect knows of why. What qinspect does not follow
/// (`SimError::NotModelled`) is said in its own words, with no tool's prefix.
pub(super) fn qemu_words(op: &Op, cause: &SimError) -> String {
    let detail = cause.text();
    const ALREADY: [&str; 7] = [
        "Could not ",
        "length cannot exceed ",
        "can't open device ",
        "write failed: ",
        "discard failed: ",
        "read failed: ",
        "Snapshot with id ",
    ];
    if matches!(cause, SimError::NotModelled(_)) || ALREADY.iter().any(|p| detail.starts_with(p)) {
        return detail;
    }
    let prefix = match op {
        Op::SnapshotCreate { name } => format!("Could not create snapshot '{name}': "),
        Op::SnapshotDelete { id_or_name } => format!("Could not delete snapshot '{id_or_name}': "),
        Op::SnapshotDeleteId { id } => format!("Could not delete snapshot '{id}': "),
        // bdrv_snapshot_goto words the driver's errno this way.
        Op::SnapshotApply { id_or_name } => {
            format!("Could not apply snapshot '{id_or_name}': Failed to load snapshot: ")
        }
        Op::Write { .. } | Op::WriteZeroes { .. } | Op::WriteCompressed { .. } => {
            "write failed: ".into()
        }
        Op::Discard { .. } => "discard failed: ".into(),
        Op::Read { .. } => "read failed: ".into(),
        Op::Resize { .. } | Op::Repair { .. } | Op::Overlay { .. } | Op::Trace { .. } => {
            String::new()
        }
        Op::RefcountUpdate { .. } => String::new(),
    };
    const ERRNO: [(&str, &str); 8] = [
        ("EINVAL", "Invalid argument"),
        ("EIO", "Input/output error"),
        ("EFBIG", "File too large"),
        ("ENOTSUP", "Operation not supported"),
        ("ENOENT", "No such file or directory"),
        ("ENOSPC", "No space left on device"),
        ("EAGAIN", "Resource temporarily unavailable"),
        ("ENOMEM", "Cannot allocate memory"),
    ];
    let text = ERRNO
        .iter()
        .find(|(e, _)| detail.contains(&format!("({e})")) || detail.contains(&format!(", {e})")))
        .map(|(_, t)| *t);
    // What QEMU says before the errno's text, when the driver words it.
    const CONTEXT: [&str; 1] = [FREE_FAILED];
    let (context, detail) = CONTEXT
        .iter()
        .find_map(|c| Some((*c, detail.strip_prefix(c)?)))
        .unwrap_or(("", detail.as_str()));
    match text {
        Some(t) => format!("{prefix}{context}{t} ({detail})"),
        None => format!("{prefix}{context}{detail}"),
    }
}

/// qemu-io's `-P` for a pattern other than its default.
fn pattern_flag(p: u8) -> String {
    if p == DEFAULT_PATTERN {
        String::new()
    } else {
        format!(" -P {p:#04x}")
    }
}

/// A pattern byte as qemu-io reads one (`strtol` base 0: decimal, `0x` hex or
/// a leading-0 octal), 0 to 255.
fn parse_pattern(op: &str, p: &str) -> std::result::Result<u8, String> {
    let v = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        u8::from_str_radix(h, 16)
    } else if p.len() > 1
        && let Some(o) = p.strip_prefix('0')
    {
        u8::from_str_radix(o, 8)
    } else {
        p.parse::<u8>()
    };
    v.map_err(|_| format!("'{op}': P= takes a byte, 0 to 255 (e.g. P=0x5a)"))
}

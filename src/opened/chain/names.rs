//! Backing and data file names: resolved as QEMU resolves them, and json: specs
//! followed down to a local file.

use super::Format;
use std::path::{Path, PathBuf};

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

/// Where a backing or data file name leads: a local path and, from a json: spec,
/// a format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The file to open.
    pub path: PathBuf,
    /// The format the name itself sets (json: `"driver"`), if any.
    pub format: Option<Format>,
}

/// Resolve a backing file name stored in the image at `image`, as QEMU does.
pub fn resolve_backing(image: &Path, name: &str) -> std::result::Result<Target, String> {
    if let Some(spec) = name.strip_prefix("json:") {
        return parse_json_spec(spec);
    }
    if has_protocol(name) {
        if let Some(rest) = name.strip_prefix("file:") {
            return Ok(Target {
                path: PathBuf::from(rest),
                format: None,
            });
        }
        let proto = name.split(':').next().unwrap_or(name);
        return Err(format!(
            "'{name}' uses the '{proto}' protocol; qinspect opens local files only"
        ));
    }
    Ok(Target {
        path: resolve_relative(image, name),
        format: None,
    })
}

/// Drivers that open a local file.
const FILE_DRIVERS: [&str; 2] = ["file", "host_device"];
/// Options that change how a node behaves but not which bytes it reads.
const HARMLESS: [&str; 8] = [
    "node-name",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "force-share",
    "aio",
    "locking",
];

/// Follow a `json:{...}` block-driver spec down to a local file.
fn parse_json_spec(spec: &str) -> std::result::Result<Target, String> {
    let v: serde_json::Value = serde_json::from_str(spec)
        .map_err(|e| format!("json: backing name does not parse: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("json: backing name is not a JSON object")?;
    let node = crumple(obj)?;
    let driver = node
        .get("driver")
        .and_then(|d| d.as_str())
        .ok_or("json: spec has no \"driver\"")?;
    let unknown = |n: &serde_json::Map<String, serde_json::Value>, allowed: &[&str]| {
        n.keys()
            .find(|k| {
                !allowed.contains(&k.as_str())
                    && !HARMLESS.contains(&k.as_str())
                    && !k.starts_with("cache")
            })
            .map(|k| format!("json: spec option '{k}' is not modelled by qinspect, so it cannot tell which bytes QEMU would read"))
    };
    let file_node =
        |n: &serde_json::Map<String, serde_json::Value>| -> std::result::Result<PathBuf, String> {
            let d = n.get("driver").and_then(|d| d.as_str()).unwrap_or("file");
            if !FILE_DRIVERS.contains(&d) {
                return Err(format!(
                    "json: spec uses the '{d}' driver; qinspect opens local files only"
                ));
            }
            if let Some(e) = unknown(n, &["driver", "filename"]) {
                return Err(e);
            }
            n.get("filename")
                .and_then(|f| f.as_str())
                .map(PathBuf::from)
                .ok_or_else(|| "json: file node has no \"filename\"".to_string())
        };
    if FILE_DRIVERS.contains(&driver) {
        // A protocol node alone: QEMU puts the backing format's driver over it and
        // that driver finds no "file" child.
        return Err(format!(
            "json: spec is a bare '{driver}' protocol node with no format driver over it (QEMU: A block device must be specified for \"file\")"
        ));
    }
    let format = match driver {
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        other => {
            return Err(format!(
                "json: spec uses the '{other}' driver; qinspect reads qcow2 and raw over local files only"
            ));
        }
    };
    if let Some(e) = unknown(&node, &["driver", "file"]) {
        return Err(e);
    }
    let path = match node.get("file") {
        Some(serde_json::Value::Object(f)) => file_node(f)?,
        Some(serde_json::Value::String(name)) => {
            return Err(format!(
                "json: spec refers to the node '{name}' by name; qinspect cannot follow node references"
            ));
        }
        _ => return Err("json: spec has no \"file\" child".into()),
    };
    Ok(Target {
        path,
        format: Some(format),
    })
}

/// Turn flattened keys (`"file.filename": "x"`) into nested objects, as QEMU's
/// `qdict_crumple` does.
fn crumple(
    obj: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut out = serde_json::Map::new();
    for (k, v) in obj {
        let v = match v {
            serde_json::Value::Object(o) => serde_json::Value::Object(crumple(o)?),
            other => other.clone(),
        };
        match k.split_once('.') {
            None => {
                if out.contains_key(k) {
                    return Err(format!("json: spec gives '{k}' twice"));
                }
                out.insert(k.clone(), v);
            }
            Some((head, rest)) => {
                let child = out
                    .entry(head.to_string())
                    .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
                let serde_json::Value::Object(c) = child else {
                    return Err(format!(
                        "json: spec gives '{head}' both as a value and as an object"
                    ));
                };
                let mut one = serde_json::Map::new();
                one.insert(rest.to_string(), v);
                for (k2, v2) in crumple(&one)? {
                    c.insert(k2, v2);
                }
            }
        }
    }
    Ok(out)
}

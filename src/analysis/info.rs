//! The summary `qemu-img info` prints, computed from the file alone.
//!
//! [`qemu_info_qcow2`] (and [`qemu_info_raw`]) build the same JSON object as
//! `qemu-img info --output=json` (without `children`): like qemu-img, they look only
//! at the image itself, never at its backing file or data file. [`extra_info`] adds
//! what qinspect knows beyond that.

use crate::bytes::{be32, c_text, slice};
use crate::chain::{has_protocol, path_combine};
use crate::header::{CryptMethod, ExtensionKind};
use crate::image::Qcow2;
use crate::io::Source;
use serde_json::{Map, Value, json};

/// The `qemu-img info --output=json` object for a qcow2 image opened from
/// `filename` (the path exactly as the user typed it).
pub fn qemu_info_qcow2(img: &Qcow2, filename: &str) -> Map<String, Value> {
    let h = &img.header;
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!("qcow2"));
    m.insert("virtual-size".into(), json!(h.size & !511));
    m.insert("actual-size".into(), json!(img.src.allocated_size()));
    m.insert("cluster-size".into(), json!(h.cluster_size()));
    m.insert("dirty-flag".into(), json!(h.version >= 3 && h.dirty()));
    if h.crypt_method != 0 {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = img.backing_name.as_ref().filter(|b| !b.is_empty()) {
        m.insert("backing-filename".into(), json!(b));
        m.insert(
            "full-backing-filename".into(),
            json!(full_backing_filename(filename, b)),
        );
        if let Some(f) = img.backing_format.as_ref().filter(|f| !f.is_empty()) {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    if !img.snapshots.snapshots.is_empty() && !h.has_data_file() {
        let list: Vec<Value> = img
            .snapshots
            .snapshots
            .iter()
            .map(|s| {
                let mut o = Map::new();
                o.insert("id".into(), json!(s.id));
                o.insert("name".into(), json!(s.name));
                o.insert("vm-state-size".into(), json!(s.vm_state_size as i64));
                o.insert("date-sec".into(), json!(s.date_sec));
                o.insert("date-nsec".into(), json!(s.date_nsec));
                o.insert(
                    "vm-clock-sec".into(),
                    json!(s.vm_clock_nsec / 1_000_000_000),
                );
                o.insert(
                    "vm-clock-nsec".into(),
                    json!(s.vm_clock_nsec % 1_000_000_000),
                );
                if let Some(ic) = s.icount {
                    o.insert("icount".into(), json!(ic as i64));
                }
                Value::Object(o)
            })
            .collect();
        m.insert("snapshots".into(), Value::Array(list));
    }
    let mut data = Map::new();
    if h.version < 3 {
        data.insert("compat".into(), json!("0.10"));
        data.insert("compression-type".into(), json!("zlib"));
        data.insert("refcount-bits".into(), json!(16));
    } else {
        data.insert("compat".into(), json!("1.1"));
        data.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        data.insert("corrupt".into(), json!(h.corrupt()));
        data.insert("extended-l2".into(), json!(h.extended_l2()));
        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
        data.insert(
            "compression-type".into(),
            json!(h.compression_type().qemu_name()),
        );
        if let Some(df) = &img.data_file_name {
            data.insert("data-file".into(), json!(df));
        }
        if h.has_data_file() {
            data.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        if h.autoclear_features & crate::header::AUTOCLEAR_BITMAPS != 0
            && let Some(Ok(list)) = &img.bitmaps
            && !list.is_empty()
        {
            let v: Vec<Value> = list
                        .iter()
                        .map(|b| {
                            json!({"name": b.name, "granularity": b.granularity(), "flags": b.flag_names()})
                        })
                        .collect();
            data.insert("bitmaps".into(), Value::Array(v));
        }
    }
    match h.crypt() {
        CryptMethod::None => {}
        CryptMethod::Aes => {
            data.insert("encrypt".into(), json!({"format": "aes"}));
        }
        CryptMethod::Luks | CryptMethod::Unknown(_) => {
            if let Some(v) = luks_info(img) {
                data.insert("encrypt".into(), v);
            }
        }
    }
    m.insert(
        "format-specific".into(),
        json!({"type": "qcow2", "data": Value::Object(data)}),
    );
    m
}

/// The `qemu-img info --output=json` object for a raw image.
pub fn qemu_info_raw(src: &dyn Source, filename: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!("raw"));
    m.insert(
        "virtual-size".into(),
        json!(src.len().div_ceil(512).saturating_mul(512)),
    );
    m.insert("actual-size".into(), json!(src.allocated_size()));
    m.insert("dirty-flag".into(), json!(false));
    m
}

/// QEMU's `full-backing-filename`: names with a protocol or an absolute path are
/// kept; others are joined to the image name's directory, without normalising.
pub fn full_backing_filename(image: &str, backing: &str) -> String {
    if has_protocol(backing) {
        backing.to_string()
    } else {
        path_combine(image, backing)
    }
}

/// Decode the LUKS header the crypto extension points at, the way
/// `qcrypto_block_luks_get_info` reports it.
fn luks_info(img: &Qcow2) -> Option<Value> {
    let (off, _len) = img.extensions.iter().find_map(|e| match e.kind {
        ExtensionKind::Crypto { offset, length } => Some((offset, length)),
        _ => None,
    })?;
    let b = crate::io::read_exact(img.src.as_ref(), "LUKS header", off, 592).ok()?;
    if slice(&b, 0, 6) != b"LUKS\xba\xbe" {
        return None;
    }
    let cipher_name = c_text(slice(&b, 8, 32));
    let cipher_mode_full = c_text(slice(&b, 40, 32));
    let hash = c_text(slice(&b, 72, 32));
    let payload = u64::from(be32(&b, 104)) * 512;
    let mut key_len = u64::from(be32(&b, 108));
    let iters = be32(&b, 164);
    let uuid = c_text(slice(&b, 168, 40));
    let (mode, ivgen) = cipher_mode_full
        .split_once('-')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or((cipher_mode_full.clone(), String::new()));
    let (ivgen_alg, ivgen_hash) = match ivgen.split_once(':') {
        Some((a, h)) => (a.to_string(), Some(h.to_string())),
        None => (ivgen, None),
    };
    if mode == "xts" {
        key_len /= 2;
    }
    let alg = match cipher_name.as_str() {
        "cast5" => "cast5-128".to_string(),
        "sm4" => "sm4".to_string(),
        n => format!("{n}-{}", key_len.saturating_mul(8)),
    };
    let slots: Vec<Value> = (0..8)
        .map(|i: usize| {
            // Key slot i: 48 bytes at 208 + 48 * i (i < 8, inside the 592 read).
            let s = b
                .get(i.saturating_mul(48).saturating_add(208)..)
                .unwrap_or(&[]);
            let active = be32(s, 0) == 0x00AC_71F3;
            let key_off = u64::from(be32(s, 40)) * 512;
            if active {
                json!({"active": true, "iters": be32(s, 4), "key-offset": key_off, "stripes": be32(s, 44)})
            } else {
                json!({"active": false, "key-offset": key_off})
            }
        })
        .collect();
    let mut o = Map::new();
    o.insert("format".into(), json!("luks"));
    o.insert("cipher-alg".into(), json!(alg));
    o.insert("cipher-mode".into(), json!(mode));
    o.insert("ivgen-alg".into(), json!(ivgen_alg));
    if ivgen_alg == "essiv"
        && let Some(h) = ivgen_hash
    {
        o.insert("ivgen-hash-alg".into(), json!(h));
    }
    o.insert("hash-alg".into(), json!(hash));
    o.insert("payload-offset".into(), json!(payload));
    o.insert("master-key-iters".into(), json!(iters));
    o.insert("uuid".into(), json!(uuid));
    o.insert("detached-header".into(), json!(payload == 0));
    o.insert("slots".into(), Value::Array(slots));
    Some(Value::Object(o))
}

/// What qinspect adds to the qemu-img keys: raw header fields, extensions, named
/// features, and anything QEMU would object to.
pub fn extra_info(img: &Qcow2) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "header".into(),
        serde_json::to_value(img.header.fields()).unwrap_or(Value::Null),
    );
    m.insert(
        "extensions".into(),
        Value::Array(
            img.extensions
                .iter()
                .map(|e| {
                    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
                    if let Value::Object(o) = &mut v {
                        o.insert("type_name".into(), json!(e.type_name()));
                        o.insert("offset_hex".into(), json!(format!("{:#x}", e.offset)));
                        o.insert("type_hex".into(), json!(format!("{:#010x}", e.ext_type)));
                        if matches!(e.kind, ExtensionKind::Unknown) {
                            o.insert("data_hex".into(), json!(hex(&e.data)));
                        }
                    }
                    v
                })
                .collect(),
        ),
    );
    m.insert(
        "features".into(),
        serde_json::to_value(&img.features).unwrap_or(Value::Null),
    );
    m.insert("file-length".into(), json!(img.file_len()));
    if let Some(h) = crate::crypto::luks_header(img) {
        let v = match h {
            Ok(h) => {
                let mut v = serde_json::to_value(&h).unwrap_or(Value::Null);
                if let (Value::Object(o), Err(e)) = (&mut v, h.check()) {
                    o.insert("error".into(), json!(e.to_string()));
                }
                v
            }
            Err(e) => json!({ "error": e.to_string() }),
        };
        m.insert("luks".into(), v);
    }
    let problems: Vec<String> = img.problems.iter().map(ToString::to_string).collect();
    m.insert("problems".into(), json!(problems));
    m.insert("notes".into(), json!(img.notes));
    if let Some(Err(e)) = &img.bitmaps {
        m.insert("bitmap-directory-error".into(), json!(e.to_string()));
    }
    if let Some(e) = &img.snapshots.error {
        m.insert("snapshot-table-error".into(), json!(e.to_string()));
    }
    m
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_backing_filename_rules() {
        assert_eq!(
            full_backing_filename("top.qcow2", "base.qcow2"),
            "base.qcow2"
        );
        assert_eq!(
            full_backing_filename("./sub/top.qcow2", "base.qcow2"),
            "./sub/base.qcow2"
        );
        assert_eq!(
            full_backing_filename("sub//top.qcow2", "base.qcow2"),
            "sub//base.qcow2"
        );
        assert_eq!(full_backing_filename("sub/t.qcow2", "/abs/b"), "/abs/b");
        assert_eq!(
            full_backing_filename("sub/t.qcow2", "nbd://h/x"),
            "nbd://h/x"
        );
        assert_eq!(
            full_backing_filename("sub/t.qcow2", "dir/a:b"),
            "sub/dir/a:b"
        );
    }
}

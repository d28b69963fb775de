//! `dump header`, also of a header QEMU refuses.

use super::{Args, Row, Rows, print_json, write_rows};
use crate::cli::CmdResult;
use qinspect::error::{CorruptKind, Error};
use qinspect::header::{Header, V3_MIN_HEADER_LEN};
use qinspect::io::{Source, read_exact};
use qinspect::types::HostOffset;
use serde_json::json;

/// `dump header` on an image that cannot be opened (`why`): the header's fields
/// as stored, when its bytes decode, then the error, naming the field and its
/// offset (an `"error"` member with `--json`); exit code 1. Without a header to
/// decode, only the error.
pub(super) fn refused(a: &Args, src: &dyn Source, why: Error) -> CmdResult {
    let len = src.len().min(u64::from(V3_MIN_HEADER_LEN) + 8);
    let h =
        match read_exact(src, "qcow2 header", HostOffset(0), len).and_then(|b| Header::parse(&b)) {
            Ok(h) => h,
            Err(_) => return Err(why.into()),
        };
    let (_, rows) = rows(&h)?;
    let mut title = "header".to_string();
    if !matches!(h.version, 2 | 3) {
        title.push_str(&format!(
            " (version {} is none QEMU knows: every field is read and described as version 3 lays it out)",
            h.version
        ));
    }
    title.push_str("; QEMU refuses it");
    if a.json {
        let field = match why.corrupt_kind() {
            Some(CorruptKind::HeaderField(f)) => Some(f.name()),
            _ => None,
        };
        let offset = match &why {
            Error::Invalid { offset, .. } | Error::Truncated { offset, .. } => Some(*offset),
            _ => None,
        };
        print_json(&json!({
            "table": title,
            "entries": rows,
            "error": {"message": why.to_string(), "field": field, "offset": offset},
        }))?;
        return Ok(1);
    }
    write_rows(&title, &rows, None, "(no fields)")?;
    crate::cli::report_error(&why.into());
    Ok(1)
}

/// The header fields, in file order.
pub(super) fn rows(h: &Header) -> Rows {
    let rows = h
        .fields()
        .into_iter()
        .enumerate()
        .map(|(i, f)| Row {
            index: i as u64,
            file_offset: f.offset,
            raw: format!("{:#x}", f.value),
            decoded: json!({"field": f.name, "size": f.size, "value": f.value}),
            meaning: format!("{}: {}", f.name, f.meaning),
        })
        .collect();
    Ok(("header".into(), rows))
}

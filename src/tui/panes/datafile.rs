//! The Tables pane's words for an image with an external data file: a data
//! cluster is in that file, where nothing has a refcount.

use crate::tui::ctx::Ctx;
use qinspect::tables::L2Entry;

/// Whether the host cluster an L2 entry names is in the image's external data
/// file, where nothing has a refcount (QEMU takes it as 1 for COPIED).
pub fn in_data_file(e: &L2Entry, ctx: &Ctx) -> bool {
    ctx.img.as_ref().is_some_and(|img| {
        img.header.has_data_file() && e.mapping(&img.geometry(), true).host_offset().is_some()
    })
}

/// The data file's name as the image stores it, or words for it.
pub fn data_file_name(ctx: &Ctx) -> String {
    ctx.img
        .as_ref()
        .and_then(|i| i.data_file_name.clone())
        .unwrap_or_else(|| "the data file".into())
}

/// Description `d` of entry `e`, its host offset named as in the data file when
/// it is there.
pub fn name_data_file(d: String, e: &L2Entry, ctx: &Ctx) -> String {
    if !in_data_file(e, ctx) {
        return d;
    }
    let host = e.host_offset();
    d.replacen(
        &host.to_string(),
        &format!("{host} in {}", data_file_name(ctx)),
        1,
    )
}

/// What COPIED says of a cluster in the external data file `name`.
pub fn data_file_sentence(active: bool, copied: bool, name: &str) -> String {
    let set = if copied { "set" } else { "clear" };
    let base = format!(
        "The cluster is in the data file {name}, which has no refcounts (the column says rc -); QEMU takes its refcount as 1"
    );
    if !active {
        format!("{base}. COPIED is {set} here, but in a snapshot's tables the flag has no meaning.")
    } else if copied {
        format!("{base}, so COPIED is right and a write goes straight into the cluster.")
    } else {
        format!("{base}, so COPIED should be set: qemu-img check reports OFLAG_COPIED.")
    }
}

//! The Tables pane's words for an image with an external data file: a data
//! cluster is in that file, where nothing has a refcount.

use qinspect::tables::L2Mapping;

/// Whether the host cluster an L2 entry names (its mapping `m`, in an image
/// with an external data file when `has_data_file`) is in that file, where
/// nothing has a refcount (QEMU takes it as 1 for COPIED).
pub fn in_data_file(m: &L2Mapping, has_data_file: bool) -> bool {
    has_data_file && m.host_offset().is_some()
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

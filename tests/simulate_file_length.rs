//! The length of the file a simulation predicts, against the one QEMU
//! left. QEMU's cluster allocation only counts clusters in the refcounts:
//! the file grows when a write lands past its end, as far as that write
//! goes. A snapshot table or a snapshot's L1 table is written at its own
//! length, and with extended L2 entries a guest write fills only the
//! subclusters it touches, so the file often ends inside a cluster. (Every
//! byte is not compared here: a snapshot's date is QEMU's clock.)

mod common;
mod sim_compare;
use common::Work;

/// `ops` on a new 1G image made with `opts`, compared with QEMU after each
/// (metadata and qemu-img check), then the file lengths; the simulated
/// errors.
fn same_length(opts: &str, ops: &[&str]) -> Vec<Option<String>> {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, "a.qcow2", "1G"]);
    let sim = sim_compare::compare_metadata(w.dir.path(), "a.qcow2", ops)
        .unwrap_or_else(|e| panic!("{opts} {ops:?}: {e}"));
    let len = std::fs::metadata(w.path("a.qcow2.qemu")).unwrap().len();
    assert_eq!(sim.file_len(), len, "{opts} {ops:?}: file length");
    sim.records.iter().map(|r| r.error.clone()).collect()
}

#[test]
fn a_snapshot_table_ends_the_file_at_its_own_length() {
    // The new snapshot table (66 bytes) is written last, into a cluster of
    // its own.
    let errors = same_length("cluster_size=64k", &["write:0:4096", "snapshot-create:a"]);
    assert_eq!(errors, [None, None]);
    // 4k clusters: a resize grows the L1 table first.
    let errors = same_length(
        "cluster_size=4k",
        &[
            "write:0:4096",
            "resize:8589934592",
            "snapshot-create:a",
            "write:1073741824:512",
        ],
    );
    assert_eq!(errors, [None, None, None, None]);
}

#[test]
fn a_write_with_extended_l2_grows_the_file_to_its_last_subcluster() {
    // 2M clusters of 64k subclusters: 4k at guest 0 fills one subcluster
    // of a new data cluster, 70000 bytes at 4M two.
    let opts = "cluster_size=2M,extended_l2=on";
    let errors = same_length(opts, &["write:0:4096"]);
    assert_eq!(errors, [None]);
    let ops = [
        "write:0:4096",
        "write:4194304:70000",
        "snapshot-create:a",
        "write:0:512",
    ];
    let errors = same_length(opts, &ops);
    assert_eq!(errors, [None, None, None, None]);
}

#[test]
fn a_failed_compressed_write_and_a_second_snapshot_on_2m_clusters() {
    // The compressed write fails (guest 0 is allocated) before anything is
    // written; the second snapshot's table then ends the file.
    let ops = [
        "write:0:4096",
        "snapshot-create:a",
        "write-compressed:0:2097152",
        "snapshot-create:b",
    ];
    let errors = same_length("cluster_size=2M", &ops);
    assert!(errors[2].is_some(), "{errors:?}");
    assert_eq!(errors[3], None);
}

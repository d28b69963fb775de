//! Words that must say what they mean: the Snapshots pane's Difference box and
//! the Tables pane on an image with an external data file.

use super::*;

/// The host offset `qemu-img map` gives for guest `start` of the active state.
fn qemu_host(d: &Path, image: &str, start: u64) -> u64 {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", image])
        .current_dir(d)
        .output()
        .unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    map.iter()
        .find(|e| e["start"] == start && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("qemu-img maps the guest offset")
}

#[test]
fn snapshot_difference_says_unallocated_and_where_the_data_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "4M"]);
    qemu_io(d, "s.qcow2", "write 0 64k");
    qemu_img(d, &["snapshot", "-c", "a", "s.qcow2"]);
    qemu_io(d, "s.qcow2", "write 3M 64k");
    qemu_img(d, &["snapshot", "-c", "b", "s.qcow2"]);
    let host = qemu_host(d, "s.qcow2", 0x300000);
    let mut a = open(d.join("s.qcow2"));
    typed(&mut a, "5m");
    key(&mut a, KeyCode::Down);
    typed(&mut a, "m");
    a.wait_background();
    let diff = a
        .panes
        .snapshots
        .diff
        .clone()
        .expect("compared")
        .expect("ok");
    // Guest 0 is the same cluster in both; only 0x300000 differs.
    let want = format!("unallocated (zeros) vs data at {host:#x} in this file");
    assert_eq!(diff, vec![(0x300000, want.clone())]);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains(&format!("guest 0x300000: {want}")), "{s}");
}

/// Data clusters of an external data file have no refcount in the image: the L2
/// rows say `rc -` and name the data file, and only a COPIED flag QEMU's check
/// would report is marked.
#[test]
fn tables_name_the_data_file_and_show_no_refcount_for_its_clusters() {
    use crate::tui::panes::PaneState;
    for opts in ["data_file=df.raw,data_file_raw=on", "data_file=df.raw"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", opts, "dfr.qcow2", "4M"],
        );
        qemu_io(d, "dfr.qcow2", "write 0 1M");
        // QEMU finds nothing wrong with the image.
        qemu_img(d, &["check", "dfr.qcow2"]);
        let mut a = open(d.join("dfr.qcow2"));
        typed(&mut a, "3");
        key(&mut a, KeyCode::Enter);
        let s = screen(&mut a, 120, 30);
        let row = s
            .lines()
            .find(|l| l.contains(" 0x8000000000050000 "))
            .unwrap_or_else(|| panic!("{opts}: no row for entry 5:\n{s}"));
        assert!(row.contains("COPIED rc -  "), "{opts}: {row}");
        assert!(
            row.contains("data at host offset 0x50000 in df.raw, COPIED"),
            "{opts}: {row}"
        );
        assert!(
            !s.contains('!'),
            "{opts}: a mark where QEMU finds nothing wrong:\n{s}"
        );
        typed(&mut a, "jjjjj");
        assert_eq!(a.panes.tables.l2.sel, 5);
        let e = a.panes.tables.explain(&a.ctx);
        assert!(e.contains("0x50000 in df.raw"), "{e}");
        assert!(
            e.contains("in the data file df.raw, which has no refcounts"),
            "{e}"
        );
        assert!(!e.contains("stored refcount"), "{e}");
    }
}

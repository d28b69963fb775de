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

#[test]
fn snapshot_difference_names_the_file_once_when_both_sides_are_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "4M"]);
    qemu_io(d, "s.qcow2", "write 0 64k");
    let before = qemu_host(d, "s.qcow2", 0);
    qemu_img(d, &["snapshot", "-c", "a", "s.qcow2"]);
    // The shared cluster is copied before the write: guest 0 moves.
    qemu_io(d, "s.qcow2", "write -P 7 0 64k");
    let after = qemu_host(d, "s.qcow2", 0);
    assert_ne!(before, after);
    qemu_img(d, &["snapshot", "-c", "b", "s.qcow2"]);
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
    let want = format!("data at {before:#x} vs data at {after:#x} in this file");
    assert_eq!(diff, vec![(0, want)]);
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
        // Data at offset 0 of the data file (the image's header is at 0 of the image).
        let row0 = s
            .lines()
            .find(|l| l.contains(" 0x8000000000000000 "))
            .unwrap_or_else(|| panic!("{opts}: no row for entry 0:\n{s}"));
        assert!(row0.contains("COPIED rc -  "), "{opts}: {row0}");
        assert!(
            row0.contains("data at host offset 0x0 in df.raw, COPIED"),
            "{opts}: {row0}"
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

/// A clear COPIED flag on a data file's cluster is what QEMU's check reports
/// (it takes the refcount as 1): that row, and only that one, is marked.
#[test]
fn tables_mark_a_clear_copied_flag_on_a_data_file_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let opts = "data_file=df.raw,data_file_raw=on";
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", opts, "dfr.qcow2", "4M"],
    );
    qemu_io(d, "dfr.qcow2", "write 0 1M");
    let p = d.join("dfr.qcow2");
    let mut bytes = std::fs::read(&p).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        as usize;
    // Entry 5's bit 63 (COPIED) cleared.
    bytes[l2 + 5 * 8] &= 0x7f;
    std::fs::write(&p, &bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "dfr.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "QEMU reports a corruption: {out:?}"
    );
    let mut a = open(p);
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    let s = screen(&mut a, 120, 30);
    let marked: Vec<&str> = s.lines().filter(|l| l.contains("rc -  !")).collect();
    assert_eq!(marked.len(), 1, "{s}");
    assert!(marked[0].contains(" 0x0000000000050000 "), "{s}");
}

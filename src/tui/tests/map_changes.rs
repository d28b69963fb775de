//! The Map pane, and what a snapshot operation changed.

use super::*;

// ---- issue 11: the Map pane ------------------------------------------------------

#[test]
fn the_map_pane_lists_qemu_img_map_extents_coloured_and_traces_them() {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "demo-top.qcow2"])
        .current_dir("assets")
        .output()
        .unwrap();
    assert!(out.status.success());
    let want: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "0");
    assert_eq!(a.pane, Pane::Map);
    key(&mut a, KeyCode::End);
    let b = draw(&mut a, 120, 40);
    let got = &a.panes.map.extents;
    assert_eq!(got.len(), want.len(), "{}", text(&b));
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.start.get(), w["start"].as_u64().unwrap());
        assert_eq!(g.length, w["length"].as_u64().unwrap());
        assert_eq!(g.depth as u64, w["depth"].as_u64().unwrap());
        assert_eq!(g.data, w["data"].as_bool().unwrap());
        assert_eq!(g.zero, w["zero"].as_bool().unwrap());
        assert_eq!(g.offset.map(|o| o.get()), w["offset"].as_u64());
    }
    // Each kind in its colour: the top layer's data green, a backing layer's in
    // another colour, nothing allocated grey.
    key(&mut a, KeyCode::Home);
    let b = draw(&mut a, 120, 40);
    let s = text(&b);
    for (needle, colour) in [
        ("data in demo-top.qcow2 (layer 0)", Color::Green),
        ("data in demo-mid.qcow2 (layer 1)", Color::Blue),
    ] {
        let (x, y) = find(&b, needle).unwrap_or_else(|| panic!("{needle}:\n{s}"));
        assert_eq!(b[(x, y)].fg, colour, "{needle}:\n{s}");
    }
    // Enter traces the first byte of the selected extent; Backspace comes back.
    key(&mut a, KeyCode::Down);
    let start = a.panes.map.extents[1].start.get();
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Trace);
    assert_eq!(
        a.panes.trace.trace.as_ref().map(|t| t.guest_offset.get()),
        Some(start)
    );
    key(&mut a, KeyCode::Backspace);
    assert_eq!((a.pane, a.panes.map.list.sel), (Pane::Map, 1));
    // g lists from an offset: its first row is the rest of the extent there.
    let mid = start + 0x200;
    typed(&mut a, &format!("g{mid:#x}"));
    key(&mut a, KeyCode::Enter);
    draw(&mut a, 120, 40);
    assert_eq!(a.panes.map.extents[0].start.get(), mid);
    assert_eq!(
        a.panes.map.extents[0].start.get() + a.panes.map.extents[0].length,
        start + want[1]["length"].as_u64().unwrap()
    );
}

// ---- issue 11: what a snapshot operation changed ----------------------------------

#[test]
fn the_changes_after_qemu_img_snapshot_are_the_refcounts_qemu_leaves() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    qemu_io(dir.path(), "a.qcow2", "write -P 7 0 192k");
    let p = dir.path().join("a.qcow2");
    let mut a = open(p.clone());
    let counted = |a: &App| a.ctx.report.as_ref().unwrap().imrt.clone().unwrap();
    let before = counted(&a);
    typed(&mut a, "c");
    assert!(a.status.contains("nothing to compare yet"), "{}", a.status);
    qemu_img(dir.path(), &["snapshot", "-c", "x", "a.qcow2"]);
    // QEMU's own check of what it left: every stored refcount equals its references.
    qemu_img(dir.path(), &["check", "a.qcow2"]);
    typed(&mut a, "r");
    a.wait_background();
    let after = counted(&a);
    assert_eq!(a.ctx.report.as_ref().unwrap().corruptions, 0);
    let changes = a.changes.clone().expect("compared");
    let mut rows = 0;
    let n = a.recorded.as_ref().unwrap().refcounts.len() as u64;
    for c in 0..n {
        let (x, y) = (before.get(c), after.get(c));
        if x != y {
            rows += 1;
            let row = changes
                .iter()
                .find(|ch| ch.cluster == Some(c))
                .unwrap_or_else(|| panic!("cluster {c}: {x}→{y} missing in {changes:?}"));
            assert!(row.text.ends_with(&format!(": {x}→{y}")), "{}", row.text);
        }
    }
    assert_eq!(changes.iter().filter(|c| c.cluster.is_some()).count(), rows);
    // Three data clusters and their L2 table went from 1 to 2; the copied L1
    // table and the new snapshot table from 0 to 1.
    let texts: Vec<&str> = changes.iter().map(|c| c.text.as_str()).collect();
    assert_eq!(
        texts.iter().filter(|t| t.ends_with("(data): 1→2")).count(),
        3,
        "{texts:#?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("(l2-table): 1→2")),
        "{texts:#?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("(l1-table): 0→1")),
        "{texts:#?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("(snapshot-table): 0→1")),
        "{texts:#?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("snapshot 1 created: 'x'")),
        "{texts:#?}"
    );
    // COPIED went off in the active L1 entry and the three L2 entries.
    assert!(
        texts.iter().any(|t| t.starts_with("active L1[0]: 0x8")),
        "{texts:#?}"
    );
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.starts_with("active L1[0] → L2["))
            .count(),
        3,
        "{texts:#?}"
    );
    // On screen: c lists them, Enter opens a refcount, the file is unchanged.
    let on_disk = std::fs::read(&p).unwrap();
    typed(&mut a, "c");
    let b = draw(&mut a, 120, 40);
    let s = text(&b);
    assert!(s.contains("Changes since the previous load"), "{s}");
    let (x, y) = find(&b, "(data): 1→2").unwrap_or_else(|| panic!("{s}"));
    assert_eq!(b[(x, y)].fg, color::REFCOUNT, "{s}");
    let first = changes.iter().position(|c| c.cluster.is_some()).unwrap();
    for _ in 0..first {
        key(&mut a, KeyCode::Down);
    }
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Refcounts);
    assert_eq!(
        Some(a.panes.refcounts.block.sel as u64),
        changes[first].cluster
    );
    assert_eq!(std::fs::read(&p).unwrap(), on_disk);
}

// ---- the Map pane names an external data file -------------------------------------

#[test]
fn the_map_pane_names_the_data_file_that_holds_the_data() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.raw",
            "df.qcow2",
            "4M",
        ],
    );
    qemu_io(dir.path(), "df.qcow2", "write 0 64k");
    let mut a = open(dir.path().join("df.qcow2"));
    typed(&mut a, "0");
    assert_eq!(a.pane, Pane::Map);
    let s = screen(&mut a, 120, 40);
    assert!(
        s.contains("data in df.raw (the data file of df.qcow2, layer 0)"),
        "{s}"
    );
    assert!(!s.contains("data in df.qcow2"), "{s}");
}

// ---- L2 entries past the end of the disk ------------------------------------------

#[test]
fn l2_entries_past_the_end_of_the_disk_say_no_read_reaches_them() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(dir.path(), "top.qcow2", "write 0 64k");
    let mut a = open(dir.path().join("top.qcow2"));
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    // Entry 63 maps the disk's last cluster: a read falls through to base.qcow2.
    for _ in 0..63 {
        key(&mut a, KeyCode::Down);
    }
    let e = view::explanation(&a);
    assert!(e.contains("reads fall through to the backing file"), "{e}");
    assert!(!e.contains("past the end"), "{e}");
    // Entry 64 (guest 0x400000) is past the 4 MiB end.
    key(&mut a, KeyCode::Down);
    let e = view::explanation(&a);
    assert!(e.contains("past disk end: never read"), "{e}");
    assert!(e.contains("No guest read reaches this entry"), "{e}");
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("past disk end: never read"), "{s}");
    // At 80x24: End, Enter on the last entry traces nothing and says why.
    key(&mut a, KeyCode::End);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    assert!(
        a.status.contains("past the end of the disk"),
        "{}",
        a.status
    );
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("nothing to trace"), "{s}");
}

/// In the Tables pane, on the L2 entry of guest `at` (below 1 GiB, 64 KiB clusters;
/// reached with the arrows from `g0`), press Enter: `Some(guest)` when it traced.
fn enter_in_tables_at(a: &mut App, at: u64) -> Option<u64> {
    typed(a, "3g0");
    key(a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    for _ in 0..at / 0x1_0000 {
        key(a, KeyCode::Down);
    }
    a.panes.trace.trace = None;
    key(a, KeyCode::Enter);
    match a.pane {
        Pane::Trace => a.panes.trace.trace.as_ref().map(|t| t.guest_offset.get()),
        _ => None,
    }
}

/// View snapshot record 0 (Snapshots pane, Enter).
fn view_first_snapshot(a: &mut App) {
    typed(a, "5");
    key(a, KeyCode::Home);
    key(a, KeyCode::Enter);
    assert_eq!(a.ctx.view_snapshot, Some(0), "{}", a.status);
}

#[test]
fn enter_on_an_l2_entry_is_past_the_end_of_the_viewed_snapshots_disk() {
    // Grown: a snapshot of a 1 MiB disk, then `qemu-img resize` to 4 MiB.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "g.qcow2", "1M"]);
    qemu_io(d, "g.qcow2", "write -P 1 0 64k");
    qemu_img(d, &["snapshot", "-c", "s1", "g.qcow2"]);
    qemu_img(d, &["resize", "-q", "g.qcow2", "4M"]);
    qemu_io(d, "g.qcow2", "write -P 2 2M 64k");
    let mut a = open(d.join("g.qcow2"));
    // Active view: guest 2M is inside the 4 MiB disk.
    assert_eq!(enter_in_tables_at(&mut a, 0x20_0000), Some(0x20_0000));
    view_first_snapshot(&mut a);
    // The snapshot's disk ends at 1 MiB: its last cluster traces, 2M does not.
    assert_eq!(enter_in_tables_at(&mut a, 0xf_0000), Some(0xf_0000));
    assert_eq!(enter_in_tables_at(&mut a, 0x20_0000), None);
    assert!(
        a.status
            .contains("past the end of the disk (1048576 bytes) of snapshot 1 's1'"),
        "{}",
        a.status
    );
    // qemu-nbd -l and convert -l keep the current 4 MiB disk, and read it.
    assert!(
        a.status
            .contains("a temporary load (qemu-nbd -l, qemu-img convert -l) keeps the current disk of 4194304 bytes and does read it"),
        "{}",
        a.status
    );
    assert!(view::explanation(&a).contains("past the end of the disk"));
    // `g` to there is refused for the same reason.
    typed(&mut a, "g0x200000");
    key(&mut a, KeyCode::Enter);
    assert!(
        a.status
            .contains("past the end of the disk of snapshot 1 's1' (1048576 bytes"),
        "{}",
        a.status
    );

    // Shrunk: a snapshot of a 4 MiB disk, then `qemu-img resize --shrink` to 1 MiB.
    qemu_img(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "4M"]);
    qemu_io(d, "s.qcow2", "write -P 1 2M 64k");
    qemu_img(d, &["snapshot", "-c", "s1", "s.qcow2"]);
    qemu_img(d, &["resize", "-q", "--shrink", "s.qcow2", "1M"]);
    let mut a = open(d.join("s.qcow2"));
    // Active view: guest 2M is past the 1 MiB end.
    assert_eq!(enter_in_tables_at(&mut a, 0x20_0000), None);
    assert!(
        a.status
            .contains("past the end of the disk (1048576 bytes), no read"),
        "{}",
        a.status
    );
    // The snapshot's 4 MiB disk holds it: Enter traces the snapshot's data there.
    view_first_snapshot(&mut a);
    assert_eq!(enter_in_tables_at(&mut a, 0x20_0000), Some(0x20_0000));
    assert_eq!(enter_in_tables_at(&mut a, 0x40_0000), None);
    assert!(
        a.status
            .contains("past the end of the disk (4194304 bytes) of snapshot 1 's1'"),
        "{}",
        a.status
    );
    // Past both ends: no temporary load reads it either.
    assert!(!a.status.contains("temporary load"), "{}", a.status);
    // `g` to 2M goes there in the snapshot's view.
    typed(&mut a, "g0x200000");
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.panes.tables.l2.sel, 32, "{}", a.status);
}

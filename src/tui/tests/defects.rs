//! Help, scrolling, footers, the Layout past the role map, simulate on a worker, 80x24.

use super::*;

#[test]
fn help_lists_every_binding_once_and_closes() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "?");
    // Tall enough for the whole table, so that every row is on screen.
    let s = screen(&mut a, 120, 90);
    assert!(!s.contains("█"), "the help does not fit: {s}");
    for b in crate::tui::keymap::KEYMAP {
        assert_eq!(
            s.matches(&format!("│{:<11}", b.keys)).count(),
            1,
            "{} not exactly once:\n{s}",
            b.keys
        );
    }
    key(&mut a, KeyCode::Esc);
    assert!(a.popup.is_none());
}

// ---- defect 1: Hex scrolls inside a cluster ------------------------------------

#[test]
fn hex_reaches_an_entry_deep_in_a_cluster_and_scrolls_across_clusters() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "6g0x3000000");
    key(&mut a, KeyCode::Enter);
    typed(&mut a, "nn");
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Hex);
    let b = draw(&mut a, 80, 24);
    let s = text(&b);
    // The L2 entry of guest 0x3000000 is 8 KiB into the L2 table's cluster.
    let (x, y) = find(&b, "00046000").unwrap_or_else(|| panic!("row 0x46000:\n{s}"));
    assert_eq!(x, 1, "{s}");
    assert_eq!(b[(x + 10, y)].bg, Color::White, "the cursor is on it:\n{s}");
    assert_eq!(
        b[(x + 13, y)].bg,
        Color::Yellow,
        "the entry is highlighted:\n{s}"
    );
    assert!(s.contains("Hex — layer 0: demo-top.qcow2: 0x45fc0"), "{s}");
    assert!(s.contains("at 0x46000"), "the exact offset:\n{s}");
    // ↓ moves the cursor a row, PgDn a page, both inside the cluster.
    key(&mut a, KeyCode::Down);
    assert_eq!(a.panes.hex.cursor.get(), 0x46010);
    key(&mut a, KeyCode::PageDown);
    let page = a.panes.hex.rows * 16;
    assert_eq!(a.panes.hex.cursor.get(), 0x46010 + page);
    assert!(
        a.panes.hex.top.get() > 0x45fc0,
        "the page follows the cursor"
    );
    // ] is a whole cluster, and rows cross into it.
    typed(&mut a, "]");
    assert_eq!(a.panes.hex.top.get(), 0x48000);
    assert_eq!(a.panes.hex.cursor.get(), 0x48000);
    key(&mut a, KeyCode::Up);
    assert_eq!(a.panes.hex.top.get(), 0x47ff0);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("(host cluster 17–18)"), "{s}");
    // End: the last bytes of the file, and what lies past it is marked.
    key(&mut a, KeyCode::End);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("the file ends at 0x6008e"), "{s}");
    assert!(
        s.contains("-- --  │"),
        "bytes past the end are not zeros:\n{s}"
    );
    key(&mut a, KeyCode::Home);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("0x0–") && s.contains("(host cluster 0)"), "{s}");
    assert!(s.contains("scrolled off"), "{s}");
}

// ---- defect 2: COPIED against the actual refcount --------------------------------

#[test]
fn copied_explanations_state_the_stored_refcount_and_contradictions() {
    // demo-corrupt: L2 0x40000[0] has COPIED with stored refcount 2.
    let mut a = app("demo-corrupt.qcow2");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    typed(&mut a, "e");
    let e = view::explanation(&a);
    assert!(
        e.contains("COPIED is set but the cluster's stored refcount is 2, not 1")
            && e.contains("OFLAG_COPIED"),
        "{e}"
    );
    let b = draw(&mut a, 100, 30);
    let (x, y) = find(&b, "rc 2  !").unwrap_or_else(|| panic!("{}", text(&b)));
    assert_eq!(b[(x, y)].fg, color::BAD, "{}", text(&b));
    // Check reports that same entry.
    typed(&mut a, "7");
    assert!(screen(&mut a, 100, 30).contains("l2_entry=8000000000050000 refcount=2"));
    // An unallocated entry of an image without a backing file reads as zeros
    // (entry 2: inside the 1 MiB disk; the last entries are past its end).
    typed(&mut a, "3");
    key(&mut a, KeyCode::Home);
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Down);
    let e = view::explanation(&a);
    assert!(e.contains("reads as zeros: no backing file"), "{e}");
    assert!(!e.contains("falls through"), "{e}");
    // With a backing file, it falls through.
    let mut m = app("demo-mid.qcow2");
    typed(&mut m, "3");
    key(&mut m, KeyCode::Enter);
    key(&mut m, KeyCode::Down);
    key(&mut m, KeyCode::Down);
    assert!(view::explanation(&m).contains("fall through to the backing file"));
    key(&mut m, KeyCode::Home);
    key(&mut m, KeyCode::Down);
    let e = view::explanation(&m);
    assert!(
        e.contains("COPIED is set and the cluster's stored refcount is 1"),
        "{e}"
    );
    // In a snapshot's table the flag has no meaning.
    let mut t = app("demo-top.qcow2");
    typed(&mut t, "5");
    key(&mut t, KeyCode::Enter);
    typed(&mut t, "3");
    let e = view::explanation(&t);
    assert!(
        e.starts_with("snapshot 1 'snap1' L1[0]") && e.contains("has no meaning"),
        "{e}"
    );
}

// ---- defect 3: every list scrolls ------------------------------------------------

#[test]
fn snapshots_scroll_to_the_last_of_a_hundred() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"],
    );
    for i in 1..=100 {
        qemu_img(
            dir.path(),
            &["snapshot", "-c", &format!("snap{i}"), "s.qcow2"],
        );
    }
    let mut a = open(dir.path().join("s.qcow2"));
    typed(&mut a, "5");
    key(&mut a, KeyCode::End);
    let b = draw(&mut a, 80, 24);
    let s = text(&b);
    assert!(s.contains("snap100") && s.contains("100/100"), "{s}");
    let (x, y) = find(&b, "snap100").unwrap();
    assert!(
        b[(x, y)]
            .modifier
            .contains(ratatui::style::Modifier::REVERSED),
        "the last row is the selected one:\n{s}"
    );
    key(&mut a, KeyCode::PageUp);
    let s = screen(&mut a, 80, 24);
    assert!(!s.contains("snap100 ") && s.contains("snap99"), "{s}");
}

#[test]
fn the_difference_box_scrolls_to_its_last_cluster() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "d.qcow2", "8M"],
    );
    qemu_img(dir.path(), &["snapshot", "-c", "a", "d.qcow2"]);
    qemu_io(dir.path(), "d.qcow2", "write -P 7 0 4M");
    qemu_img(dir.path(), &["snapshot", "-c", "b", "d.qcow2"]);
    let mut a = open(dir.path().join("d.qcow2"));
    typed(&mut a, "5m");
    key(&mut a, KeyCode::Down);
    typed(&mut a, "m");
    a.wait_background();
    typed(&mut a, "f");
    key(&mut a, KeyCode::End);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("64 guest cluster(s)"), "{s}");
    assert!(s.contains("guest 0x3f0000") && s.contains("64/64"), "{s}");
    key(&mut a, KeyCode::Home);
    let s = screen(&mut a, 80, 24);
    assert!(
        s.contains("guest 0x0:") && !s.contains("guest 0x3f0000"),
        "{s}"
    );
}

#[test]
fn help_scrolls_to_its_end_at_80x24() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "?");
    let s = screen(&mut a, 80, 24);
    assert!(!s.contains("Mouse: click"), "{s}");
    key(&mut a, KeyCode::End);
    let s = screen(&mut a, 80, 24);
    assert!(
        s.contains("Mouse: click") && s.contains("--no-mouse"),
        "{s}"
    );
    assert!(matches!(a.popup, Some(Popup::Help(_))));
    key(&mut a, KeyCode::Home);
    assert!(screen(&mut a, 80, 24).contains("Keys (this table"));
}

#[test]
fn the_explanation_panel_scrolls_whole_sentences() {
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "3e");
    let full = view::explanation(&a);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("Explanation"), "{s}");
    assert!(full.ends_with("so QEMU may write it in place."), "{full}");
    assert!(!s.contains("may write it in place."), "{s}");
    for _ in 0..30 {
        typed(&mut a, "J");
    }
    let s = screen(&mut a, 80, 24);
    assert!(
        s.contains("write it in place."),
        "the end of the text:\n{s}"
    );
    let v = &a.explain_view;
    assert!(v.offset > 0 && v.offset + v.height == v.len, "{v:?}");
    assert!(s.contains(&format!(" {}/{} ", v.len, v.len)), "{s}");
}

// ---- defect 4: help contents ------------------------------------------------------

#[test]
fn pane_local_keys_are_in_that_panes_footer_and_help() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "2");
    let s = screen(&mut a, 120, 40);
    let foot = s.lines().last().unwrap();
    assert!(foot.contains("i who refers"), "{foot}");
    typed(&mut a, "?");
    let s = screen(&mut a, 120, 40);
    assert!(
        s.contains("[Layout] List everything that references"),
        "{s}"
    );
}

// ---- defect 5: Layout past the role map ------------------------------------------

#[test]
fn layout_says_not_classified_instead_of_free_past_the_role_map() {
    let dir = tempfile::tempdir().unwrap();
    // 300 GiB of preallocated 64 KiB clusters: 4.9 Mi host clusters.
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "big.qcow2",
            "300G",
        ],
    );
    let mut a = open(dir.path().join("big.qcow2"));
    typed(&mut a, "2");
    key(&mut a, KeyCode::End);
    let s = screen(&mut a, 120, 40);
    assert!(s.contains("not classified"), "{s}");
    let line = s
        .lines()
        .find(|l| l.contains("cluster ") && l.contains(" at 0x"))
        .unwrap();
    assert!(!line.contains(": free"), "{line}");
    assert!(s.contains("■ not classified"), "the legend says it:\n{s}");
}

// ---- defect 6: simulate on a worker ------------------------------------------------

#[test]
fn simulate_runs_on_a_worker_and_esc_cancels_it() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "8");
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::Enter);
    // The key returns at once: the simulation is running, not done.
    assert!(a.panes.simulate.running.is_some());
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("Esc cancels"), "{s}");
    // Other panes work meanwhile.
    typed(&mut a, "3");
    assert!(screen(&mut a, 100, 30).contains("active L1 at 0xc000"));
    typed(&mut a, "8");
    key(&mut a, KeyCode::Esc);
    assert!(a.panes.simulate.running.is_none());
    assert!(a.status.contains("cancelled"));
    a.wait_background();
    assert!(
        a.panes.simulate.outcome.is_none(),
        "a cancelled simulation leaves no result"
    );
    // Run again and let it finish.
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    assert!(matches!(a.panes.simulate.outcome, Some(Ok(_))));
}

#[test]
fn a_failed_operation_is_not_green() {
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "8");
    key(&mut a, KeyCode::Enter);
    press(&mut a, KeyCode::Char('u'), KeyModifiers::CONTROL);
    typed(&mut a, "snapshot-delete:nosuch");
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    let b = draw(&mut a, 100, 30);
    let s = text(&b);
    assert!(s.contains("operation 1 failed"), "{s}");
    let (x, y) = find(&b, "operation 1 failed").unwrap();
    assert_eq!(b[(x, y)].fg, color::BAD);
    assert!(s.contains("QEMU fails here"), "{s}");
}

#[test]
fn simulate_offers_snapshot_operations_only_for_existing_snapshots() {
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "8");
    let s = screen(&mut a, 100, 30);
    assert!(
        !s.contains("snapshot-delete:") && !s.contains("snapshot-apply:"),
        "{s}"
    );
    assert!(s.contains("↑/↓ choose"), "{s}");
    let mut t = app("demo-top.qcow2");
    typed(&mut t, "8");
    let s = screen(&mut t, 100, 30);
    assert!(
        s.contains("snapshot-delete:snap1") && s.contains("snapshot-apply:1"),
        "{s}"
    );
    key(&mut t, KeyCode::Enter);
    key(&mut t, KeyCode::Enter);
    t.wait_background();
    let s = screen(&mut t, 100, 30);
    assert!(!s.contains("↑/↓ choose") && s.contains("↑/↓ move"), "{s}");
}

// ---- defect 7: 80x24 --------------------------------------------------------------

#[test]
fn at_80x24_every_tab_the_quit_key_and_the_copied_column_are_visible() {
    let mut a = app("demo-corrupt.qcow2");
    for p in Pane::ALL {
        a.update(Action::Pane(p));
        let s = screen(&mut a, 80, 24);
        assert!(s.lines().next().unwrap().contains("9 Hex"), "{s}");
        assert!(s.lines().last().unwrap().contains("q quit"), "{s}");
    }
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    let b = draw(&mut a, 80, 24);
    let s = text(&b);
    assert!(s.contains("COPIED rc 2  !"), "{s}");
}

/// A status message longer than 80 columns wraps onto the lines above the footer
/// instead of being cut off, and the footer stays.
#[test]
fn a_long_status_message_is_shown_whole_at_80x24() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "6g0x4000000");
    key(&mut a, KeyCode::Enter);
    let msg = a.status.clone();
    assert!(msg.contains("offsets 0 to 0x3ffffff)"), "{msg}");
    let s = screen(&mut a, 80, 24);
    let joined: String = s.lines().map(str::trim_end).collect::<Vec<_>>().join("");
    assert!(joined.contains("offsets 0 to 0x3ffffff)"), "{s}");
    assert!(s.lines().last().unwrap().contains("q quit"), "{s}");
}

// ---- the Snapshots pane's cut columns, in the explanation -------------------------

#[test]
fn the_snapshot_explanation_shows_the_columns_80x24_cuts() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "5");
    let s = screen(&mut a, 80, 24);
    assert!(
        !s.contains("ICOUNT"),
        "the table is cut at 80 columns:\n{s}"
    );
    typed(&mut a, "e");
    let snap = a.ctx.img.as_ref().unwrap().snapshots.snapshots[0].clone();
    let e = view::explanation(&a);
    // qemu-img snapshot -l: ID 1, snap1, VM clock 0000:00:00.000, ICOUNT 0.
    assert!(
        e.starts_with("Snapshot 1 'snap1' (table entry 0 at "),
        "{e}"
    );
    assert!(e.contains("VM clock 0.000s"), "{e}");
    assert!(e.contains("icount 0;"), "{e}");
    assert!(e.contains("VM state 0 bytes"), "{e}");
    let date = crate::cli::info::format_date(snap.date_sec);
    assert!(e.contains(&format!("taken {date}")), "{e}");
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("icount 0"), "{s}");
}

// ---- a dirty image's warning is shown whole ----------------------------------------

#[test]
fn check_pane_wraps_the_dirty_bit_warning_to_its_last_word() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "c.qcow2",
            "16M",
        ],
    );
    // A crash while lazy refcounts are on leaves the dirty bit set.
    let out = Command::new("sh")
        .args([
            "-c",
            "ulimit -c 0; qemu-io -f qcow2 -c 'write -P 1 0 1M' -c abort c.qcow2",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-io did not abort: {out:?}");
    let mut a = open(dir.path().join("c.qcow2"));
    typed(&mut a, "7");
    for (w, h) in [(80, 24), (200, 60)] {
        let s = screen(&mut a, w, h);
        assert!(s.contains("warning: the dirty bit is set"), "{s}");
        // Its last sentence ends on screen, above the findings.
        let end = s
            .find("are what they should be.")
            .unwrap_or_else(|| panic!("{s}"));
        assert!(end < s.find("Findings").unwrap(), "{s}");
        assert!(s.contains("ERROR cluster 5 refcount=0 reference=1"), "{s}");
    }
}

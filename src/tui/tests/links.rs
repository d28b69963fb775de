//! History and cross-links: findings to entries and back, Enter on cells, referrers and fields.

use super::*;
use qinspect::types::HostOffset;

// ---- issue 11: history and cross-links ------------------------------------------

fn finding(a: &App, prefix: &str) -> usize {
    let r = a.ctx.report.as_ref().expect("checked");
    r.findings
        .iter()
        .position(|f| f.message.starts_with(prefix))
        .unwrap_or_else(|| panic!("no finding {prefix}: {:?}", r.findings))
}

fn select_finding(a: &mut App, prefix: &str) {
    typed(a, "7");
    key(a, KeyCode::Home);
    for _ in 0..finding(a, prefix) {
        key(a, KeyCode::Down);
    }
}

#[test]
fn a_check_finding_leads_to_the_entry_at_fault_and_back_returns_to_the_same_place() {
    let mut a = app("demo-corrupt.qcow2");
    // A leak: the refcount entry of cluster 5 is at fault.
    select_finding(&mut a, "Leaked cluster 5");
    let check_screen = screen(&mut a, 100, 30);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Refcounts);
    let b = draw(&mut a, 100, 30);
    let row = selected_row(&b, 2);
    assert!(
        stable(row.clone()).contains("5 cluster 5 stored 2 counted 1 leaked"),
        "{row}\n{}",
        text(&b)
    );
    // Back: the Check pane exactly as it was.
    key(&mut a, KeyCode::Backspace);
    assert_eq!(a.pane, Pane::Check);
    assert_eq!(screen(&mut a, 100, 30), check_screen);
    // Forward (Ctrl-I) and back (Ctrl-O).
    press(&mut a, KeyCode::Char('i'), KeyModifiers::CONTROL);
    assert_eq!(a.pane, Pane::Refcounts);
    assert_eq!(a.panes.refcounts.block.sel, 5);
    press(&mut a, KeyCode::Char('o'), KeyModifiers::CONTROL);
    assert_eq!(screen(&mut a, 100, 30), check_screen);

    // A COPIED flag that contradicts the refcount: the L2 entry is at fault.
    select_finding(&mut a, "ERROR OFLAG_COPIED data cluster");
    let check_screen = screen(&mut a, 100, 30);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    let b = draw(&mut a, 100, 30);
    assert!(text(&b).contains("L2 table at 0x40000"), "{}", text(&b));
    let row = selected_row(&b, 2);
    assert!(row.contains("0x50000") && row.contains("rc 2"), "{row}");
    // The L2 entry → a trace of its guest offset.
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Trace);
    assert_eq!(
        a.panes.trace.trace.as_ref().map(|t| t.guest_offset.get()),
        Some(0)
    );
    // Back, back: Tables at that entry, then the Check pane as it was.
    key(&mut a, KeyCode::Backspace);
    assert_eq!(a.pane, Pane::Tables);
    assert_eq!(selected_row(&draw(&mut a, 100, 30), 2), row);
    key(&mut a, KeyCode::Backspace);
    assert_eq!(a.pane, Pane::Check);
    assert_eq!(screen(&mut a, 100, 30), check_screen);
}

#[test]
fn back_restores_the_selection_and_scroll_of_a_long_table() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter); // L1[0] → its L2 table (a step of the history)
    for _ in 0..3 {
        key(&mut a, KeyCode::PageDown);
        draw(&mut a, 100, 30);
    }
    let (sel, offset) = (a.panes.tables.l2.sel, a.panes.tables.l2.offset);
    assert!(offset > 0, "scrolled");
    let before = screen(&mut a, 100, 30);
    key(&mut a, KeyCode::Enter); // → Trace
    assert_eq!(a.pane, Pane::Trace);
    typed(&mut a, "n");
    key(&mut a, KeyCode::Backspace);
    assert_eq!(
        (a.panes.tables.l2.sel, a.panes.tables.l2.offset),
        (sel, offset)
    );
    assert_eq!(screen(&mut a, 100, 30), before);
    // Back again: the L1 table; once more: nothing left, said so.
    key(&mut a, KeyCode::Backspace);
    assert!(screen(&mut a, 100, 30).contains("active L1 at"));
    // Forward twice: the L2 table as scrolled, then the trace.
    press(&mut a, KeyCode::Right, KeyModifiers::ALT);
    assert_eq!(screen(&mut a, 100, 30), before);
    press(&mut a, KeyCode::Right, KeyModifiers::ALT);
    assert_eq!(a.pane, Pane::Trace);
    press(&mut a, KeyCode::Right, KeyModifiers::ALT);
    assert_eq!(a.status, "nothing to go forward to");
}

#[test]
fn layout_cells_referrers_and_header_fields_are_followed_with_enter() {
    // A data cluster in Layout → its refcount entry.
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "2g0x18000");
    key(&mut a, KeyCode::Enter);
    let c = 0x18000 / a.ctx.cluster_size();
    assert_eq!(a.panes.layout.sel, c);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Refcounts);
    assert_eq!(a.panes.refcounts.block.sel as u64, c);
    key(&mut a, KeyCode::Backspace);
    assert_eq!(a.pane, Pane::Layout);
    // x: its bytes in Hex.
    typed(&mut a, "x");
    assert_eq!(a.pane, Pane::Hex);
    assert_eq!(
        a.panes.hex.target.as_ref().map(|t| t.0.get()),
        Some(0x18000)
    );
    key(&mut a, KeyCode::Backspace);
    // Its referrers → each one's entry in Tables, in that L1's view.
    typed(&mut a, "i");
    a.wait_background();
    let refs = a.panes.layout.detail.clone().unwrap().1;
    assert!(refs.len() >= 2);
    for (k, r) in refs.iter().enumerate() {
        if k > 0 {
            key(&mut a, KeyCode::Down);
        }
        key(&mut a, KeyCode::Enter);
        assert_eq!(a.pane, Pane::Tables, "{}", r.describe());
        let j = r.l2_index.unwrap() as usize;
        assert_eq!(a.panes.tables.l2.sel, j);
        let want = if r.l1.as_deref() == Some("active L1") {
            None
        } else {
            a.ctx
                .img
                .as_ref()
                .unwrap()
                .snapshots
                .snapshots
                .iter()
                .position(|s| {
                    r.l1.as_ref()
                        .unwrap()
                        .contains(&format!("snapshot {} ", s.id))
                })
        };
        assert_eq!(a.ctx.view_snapshot, want, "{}", r.describe());
        let b = draw(&mut a, 100, 30);
        assert!(selected_row(&b, 2).contains("0x18000"), "{}", text(&b));
        key(&mut a, KeyCode::Backspace);
        assert_eq!(a.pane, Pane::Layout);
    }
    // Overview: header fields lead to their tables.
    let fields = a.ctx.img.as_ref().unwrap().header.fields();
    let at = |n: &str| fields.iter().position(|f| f.name == n).unwrap();
    a.apply(crate::tui::ctx::Effect::View(None));
    typed(&mut a, "1");
    for _ in 0..at("l1_table_offset") {
        key(&mut a, KeyCode::Down);
    }
    let b = draw(&mut a, 120, 40);
    assert!(
        selected_row(&b, 1).contains("l1_table_offset"),
        "{}",
        text(&b)
    );
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    let l1 = a.ctx.img.as_ref().unwrap().header.l1_table_offset;
    let s = screen(&mut a, 120, 40);
    assert!(s.contains(&format!("active L1 at {l1:#x}")), "{s}");
    key(&mut a, KeyCode::Backspace);
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Refcounts);
    assert_eq!(
        a.panes.refcounts.level,
        crate::tui::panes::refcounts::Level::Table
    );
}

#[test]
fn the_header_field_qemu_rejects_is_red() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    let p = dir.path().join("a.qcow2");
    let mut b = std::fs::read(&p).unwrap();
    // l1_table_offset (byte 40) one byte off a cluster boundary.
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap());
    b[40..48].copy_from_slice(&(l1 + 1).to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let out = Command::new("qemu-img")
        .args(["info", "a.qcow2"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "QEMU refuses it");
    let mut a = open(p);
    let buf = draw(&mut a, 160, 50);
    let s = text(&buf);
    let (x, y) = find(&buf, "l1_table_offset").unwrap_or_else(|| panic!("{s}"));
    assert_eq!(buf[(x, y)].fg, color::BAD, "{s}");
    assert!(
        s.lines()
            .nth(y as usize)
            .unwrap()
            .contains("QEMU refuses it"),
        "{s}"
    );
    let (x, y) = find(&buf, "refcount_table_offset").unwrap();
    assert_eq!(buf[(x, y)].fg, color::META, "{s}");
}

#[test]
fn a_compressed_entry_shows_its_compressed_bytes_in_hex() {
    let mut a = app("demo-compressed.qcow2");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    let img = a.ctx.img.clone().unwrap();
    let geo = img.geometry();
    let l2 = img.l2_table(img.l1[0].l2_offset().unwrap()).unwrap();
    let j = l2
        .iter()
        .position(|e| e.compressed())
        .expect("a compressed entry");
    let (start, end) = l2[j].compressed_descriptor(&geo).unwrap().range();
    for _ in 0..j {
        key(&mut a, KeyCode::Down);
    }
    typed(&mut a, "x");
    assert_eq!(a.pane, Pane::Hex);
    assert_eq!(a.panes.hex.mark, Some((HostOffset(start), HostOffset(end))));
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("compressed data of guest"), "{s}");
    // Enter on the entry traces it: the trace inflates the cluster.
    key(&mut a, KeyCode::Backspace);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Trace);
    let s = screen(&mut a, 100, 30);
    assert!(s.to_lowercase().contains("compressed"), "{s}");
}

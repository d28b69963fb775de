//! Broken headers, missing backing files, snapshots changed on disk, text input, small ones, LUKS.

use super::*;

// ---- defect 8: broken images ----------------------------------------------------

#[test]
fn an_unopenable_header_still_shows_bytes_and_says_why_check_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, b"not an image").unwrap();
    let mut a = open(p);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("cannot be opened"), "{s}");
    typed(&mut a, "9");
    let s = screen(&mut a, 80, 24);
    assert!(
        s.contains("6e 6f 74 20 61 6e 20 69") && s.contains("not an i"),
        "{s}"
    );
    typed(&mut a, "7");
    let s = screen(&mut a, 80, 24);
    assert!(
        s.contains("The check cannot run") && !s.contains("0/1"),
        "{s}"
    );
    typed(&mut a, "2");
    assert!(screen(&mut a, 80, 24).contains("cannot be opened as qcow2"));
    typed(&mut a, "t");
    assert!(a.tour.is_none());
    assert!(screen(&mut a, 80, 24).contains("the tour needs an image that opens"));
}

#[test]
fn a_missing_backing_file_is_traced_to_where_the_read_falls_through() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(asset("demo-top.qcow2"), dir.path().join("demo-top.qcow2")).unwrap();
    let mut a = open(dir.path().join("demo-top.qcow2"));
    typed(&mut a, "6g0x1c000");
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::End);
    let s = screen(&mut a, 100, 30);
    assert!(
        s.contains("layer 0:") && s.contains("demo-mid.qcow2 (missing)"),
        "{s}"
    );
    assert!(s.contains("result: stops: the backing file"), "{s}");
    // Data in layer 0 is still found.
    typed(&mut a, "g0x18000");
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::End);
    assert!(screen(&mut a, 100, 30).contains("result: data in"));
}

#[test]
fn a_viewed_snapshot_deleted_on_disk_falls_back_to_the_active_l1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(asset("demo-top.qcow2"), dir.path().join("t.qcow2")).unwrap();
    std::fs::copy(asset("demo-mid.qcow2"), dir.path().join("demo-mid.qcow2")).unwrap();
    std::fs::copy(asset("demo-base.raw"), dir.path().join("demo-base.raw")).unwrap();
    let mut a = App::new(
        dir.path().join("t.qcow2"),
        Options {
            mouse: false,
            watch: true,
            ..Default::default()
        },
    );
    a.wait_background();
    typed(&mut a, "5");
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.ctx.view_snapshot, Some(0));
    qemu_img(dir.path(), &["snapshot", "-d", "snap1", "t.qcow2"]);
    let f = std::fs::File::options()
        .write(true)
        .open(dir.path().join("t.qcow2"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    a.check_watch();
    a.wait_background();
    assert_eq!(a.ctx.view_snapshot, None);
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("snapshot 1 no longer exists"), "{s}");
    typed(&mut a, "3");
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("active L1 at 0xc000"), "{s}");
}

/// A viewed snapshot whose record moves up (an earlier one deleted on disk) is
/// followed to its new record, not dropped.
#[test]
fn a_viewed_snapshot_whose_record_moves_is_followed_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(asset("demo-top.qcow2"), dir.path().join("t.qcow2")).unwrap();
    std::fs::copy(asset("demo-mid.qcow2"), dir.path().join("demo-mid.qcow2")).unwrap();
    std::fs::copy(asset("demo-base.raw"), dir.path().join("demo-base.raw")).unwrap();
    let mut a = App::new(
        dir.path().join("t.qcow2"),
        Options {
            mouse: false,
            watch: true,
            ..Default::default()
        },
    );
    a.wait_background();
    typed(&mut a, "5");
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.ctx.view_snapshot, Some(1));
    assert_eq!(a.ctx.viewed().unwrap().name, "snap3");
    qemu_img(dir.path(), &["snapshot", "-d", "snap1", "t.qcow2"]);
    let f = std::fs::File::options()
        .write(true)
        .open(dir.path().join("t.qcow2"))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    a.check_watch();
    a.wait_background();
    assert_eq!(a.ctx.view_snapshot, Some(0));
    assert_eq!(a.ctx.viewed().unwrap().name, "snap3");
    let s = screen(&mut a, 100, 30);
    assert!(!s.contains("no longer exists"), "{s}");
}

/// `--watch` waits for the file to stop changing: a modification time less than
/// `WATCH_QUIET` old may be a write still going on (`qemu-img snapshot -c` writes
/// several times), so the reload comes once it is older.
#[test]
fn watch_reloads_only_once_the_file_has_stopped_changing() {
    use crate::tui::app::{WATCH_QUIET, still_being_written};
    use std::time::{Duration, SystemTime};
    let now = SystemTime::now();
    assert!(still_being_written(now, now));
    assert!(still_being_written(now - WATCH_QUIET / 2, now));
    assert!(!still_being_written(now - WATCH_QUIET, now));
    assert!(still_being_written(now + WATCH_QUIET / 2, now));
    assert!(!still_being_written(now + Duration::from_secs(5), now));

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.qcow2");
    std::fs::copy(asset("demo-mid.qcow2"), &p).unwrap();
    let mut a = App::new(
        p.clone(),
        Options {
            mouse: false,
            watch: true,
            ..Default::default()
        },
    );
    a.wait_background();
    std::fs::copy(asset("demo-corrupt.qcow2"), &p).unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    // Just written (a little ahead, so a slow test machine still sees it as recent).
    f.set_modified(SystemTime::now() + WATCH_QUIET / 2).unwrap();
    a.check_watch();
    a.wait_background();
    assert_eq!(
        a.ctx.previous, None,
        "reloaded while the file may still change"
    );
    assert_eq!(a.ctx.report.as_ref().unwrap().leaks, 0);
    // Quiet since.
    f.set_modified(SystemTime::now() - 2 * WATCH_QUIET).unwrap();
    a.check_watch();
    a.wait_background();
    assert_eq!(a.ctx.previous, Some((0, 0, 0)));
    assert_eq!(a.ctx.report.as_ref().unwrap().leaks, 1);
}

// ---- defect 9: text input -----------------------------------------------------------

#[test]
fn text_input_edits_with_a_cursor_and_goto_checks_the_size() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "6g0x1000");
    press(&mut a, KeyCode::Char('u'), KeyModifiers::CONTROL);
    typed(&mut a, "abc");
    key(&mut a, KeyCode::Left);
    key(&mut a, KeyCode::Left);
    typed(&mut a, "X");
    key(&mut a, KeyCode::Home);
    typed(&mut a, "Y");
    key(&mut a, KeyCode::End);
    typed(&mut a, "Z");
    let Some(Popup::Input(_, i)) = &a.popup else {
        panic!("input open")
    };
    assert_eq!(i.text, "YaXbcZ");
    press(&mut a, KeyCode::Char('u'), KeyModifiers::CONTROL);
    typed(&mut a, "0x4000000");
    key(&mut a, KeyCode::Enter);
    assert!(
        a.status
            .contains("past the end of the disk (67108864 bytes"),
        "{}",
        a.status
    );
    typed(&mut a, "9g1G");
    key(&mut a, KeyCode::Enter);
    assert!(
        a.status.contains("past the end of the file"),
        "{}",
        a.status
    );
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("past the end of the file"), "{s}");
}

// ---- defect 10: small ones -----------------------------------------------------------

#[test]
fn referrers_are_all_listed_in_natural_order() {
    let r = |l1: &str| qinspect::check::Referrer {
        role: qinspect::check::Role::Data,
        l1: Some(l1.to_string()),
        l1_index: Some(0),
        l2_table: Some(qinspect::types::HostOffset(0x40000)),
        l2_index: Some(0),
        guest_offset: Some(qinspect::types::GuestOffset(0)),
        detail: None,
        l1_table: None,
    };
    let mut refs = vec![r("snapshot 11 L1"), r("snapshot 5 L1"), r("active L1")];
    crate::tui::panes::layout::sort_referrers(&mut refs);
    let order: Vec<_> = refs.iter().map(|r| r.l1.clone().unwrap()).collect();
    assert_eq!(order, ["active L1", "snapshot 5 L1", "snapshot 11 L1"]);
    // Layout lists every referrer, with their number.
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "2g0x18000");
    key(&mut a, KeyCode::Enter);
    typed(&mut a, "i");
    // The lookup walks the whole image, so it runs on a worker.
    assert!(screen(&mut a, 120, 40).contains("looking up who references it"));
    a.wait_background();
    let s = screen(&mut a, 120, 40);
    let n = a.panes.layout.detail.as_ref().unwrap().1.len();
    assert!(n >= 2, "{s}");
    assert!(s.contains(&format!("{n} referrer(s)")), "{s}");
    assert_eq!(s.matches("referenced by").count(), n, "{s}");
}

#[test]
fn the_overview_stops_at_its_last_line() {
    let mut a = app("demo-mid.qcow2");
    for _ in 0..500 {
        key(&mut a, KeyCode::Down);
        draw(&mut a, 100, 30);
    }
    let s = screen(&mut a, 100, 30);
    assert!(
        s.contains("snapshot(s)"),
        "the last line is on screen:\n{s}"
    );
    let v = &a.panes.overview.view;
    assert_eq!(v.offset + v.height, v.len, "no blank space below the end");
}

#[test]
fn legend_colours_that_sit_together_differ_in_hue() {
    use color::*;
    for (a, b) in [(LEAK, REFCOUNT), (TABLE, SNAPSHOT), (COMPRESSED, BITMAP)] {
        assert_ne!(a, b);
    }
    assert_eq!(LEAK, Color::Indexed(208));
    assert_eq!(SNAPSHOT, Color::White);
}

#[test]
fn the_trace_shows_the_subcluster_bitmap_for_extended_l2() {
    let mut a = app("demo-extl2.qcow2");
    typed(&mut a, "6g0x800");
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::End);
    let s = screen(&mut a, 120, 40);
    assert!(s.contains(", subcluster 1"), "{s}");
    assert!(
        s.contains("bitmap 0x") && s.contains("subcluster 1 is"),
        "{s}"
    );
}

#[test]
fn ctrl_c_quits_even_from_a_text_field() {
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "g");
    press(&mut a, KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert!(a.quit);
}

#[test]
fn hex_keeps_wide_offsets_aligned_and_drops_ascii_first_when_narrow() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wide.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(0x100_0000_0010).unwrap(); // 1 TiB + 16: offsets need 11 hex digits
    drop(f);
    let mut a = open(p);
    typed(&mut a, "9");
    key(&mut a, KeyCode::End);
    for w in [80, 120] {
        let s = screen(&mut a, w, 24);
        let rows: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("│0ffff") || l.starts_with("│10000"))
            .collect();
        assert!(rows.len() > 2, "{s}");
        let head = s.lines().find(|l| l.contains("offset ")).unwrap();
        for r in &rows {
            assert_eq!(r.chars().count(), head.chars().count(), "{s}");
            assert_eq!(
                r.chars().nth(12),
                Some(' '),
                "11 digits, then the gap:\n{s}"
            );
            assert_eq!(r.chars().nth(13), Some(' '), "{s}");
            assert_eq!(r.chars().nth(14), Some('0'), "{s}");
        }
        assert_eq!(s.contains("│ascii"), w >= 100, "{s}");
        assert!(s.contains("the file ends at 0x10000000010"), "{s}");
    }
}

/// An encrypted image made by qemu-img: the Overview decodes the LUKS header
/// and says whether the passphrase opened a key slot; a trace through the app's
/// chain decrypts with that slot.
#[test]
fn overview_decodes_luks_and_the_key_opens_the_chain() {
    use crate::cli::secret::Passphrase;
    use qinspect::lookup::StepKind;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.qcow2");
    std::fs::write(dir.path().join("pass"), "abc").unwrap();
    let st = std::process::Command::new("qemu-img")
        .current_dir(dir.path())
        .args([
            "create", "-q", "-f", "qcow2", "--object", "secret,id=s,file=pass", "-o",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            "e.qcow2", "1M",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let st = std::process::Command::new("qemu-io")
        .current_dir(dir.path())
        .args([
            "--object",
            "secret,id=s,file=pass",
            "--image-opts",
            "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=s",
            "-c",
            "write -P 0x42 0 64k",
        ])
        .output()
        .unwrap();
    assert!(st.status.success());
    let open = |pass: &[u8]| {
        let mut a = App::new(
            p.clone(),
            Options {
                passphrase: Passphrase(Some(zeroize::Zeroizing::new(pass.to_vec()))),
                ..Default::default()
            },
        );
        a.wait_background();
        a
    };
    let mut a = open(b"abc");
    let t: Vec<String> = crate::tui::panes::overview::lines(&a.ctx)
        .iter()
        .map(|l| l.to_string())
        .collect();
    let all = t.join("\n");
    assert!(all.contains("key: unlocked with key slot 0"), "{all}");
    assert!(
        all.contains("cipher-mode") && all.contains("cbc-essiv:sha256"),
        "{all}"
    );
    assert!(
        all.contains("slot 0  active") && all.contains("slot 7  free"),
        "{all}"
    );
    assert!(all.contains("LUKS header at 0x"), "{all}");
    a.apply(crate::tui::ctx::Effect::Trace(
        qinspect::types::GuestOffset(0x200),
    ));
    let steps = &a.panes.trace.trace.as_ref().unwrap().steps;
    let d = steps
        .iter()
        .find_map(|s| match &s.kind {
            StepKind::Decrypt(d) => Some(d.clone()),
            _ => None,
        })
        .expect("a decrypt step");
    assert_eq!(d.key_slot, Some(0));
    assert_eq!(d.cipher, "aes-256-cbc-essiv:sha256");
    let mut buf = [0u8; 16];
    let c = a.ctx.chain.as_ref().unwrap();
    qinspect::lookup::read(
        c,
        qinspect::types::GuestOffset(0x1000),
        &mut buf,
        &mut Default::default(),
    )
    .unwrap();
    assert_eq!(buf, [0x42; 16]);
    let bad = open(b"abd");
    let all: String = crate::tui::panes::overview::lines(&bad.ctx)
        .iter()
        .map(|l| l.to_string() + "\n")
        .collect();
    assert!(
        all.contains("key: no key slot matches this passphrase"),
        "{all}"
    );
}

// ---- keys the footer shows, where they have nothing to act on -----------------

#[test]
fn f_and_z_with_nothing_to_act_on_say_what_they_need_and_leave_the_arrows_alone() {
    let mut a = app("demo-top.qcow2");
    // Snapshots: no two snapshots compared, so there is no Difference to scroll;
    // the list keeps the arrows.
    typed(&mut a, "5f");
    assert!(
        a.status.contains("once two snapshots are marked (m)"),
        "{}",
        a.status
    );
    assert!(!a.panes.snapshots.focus_diff);
    key(&mut a, KeyCode::Down);
    assert_eq!(a.panes.snapshots.list.sel, 1);
    // Layout: no referrers listed yet (i finds them).
    typed(&mut a, "2f");
    assert!(
        a.status.contains("once i has found someone"),
        "{}",
        a.status
    );
    assert!(!a.panes.layout.focus_refs);
    key(&mut a, KeyCode::Right);
    assert_eq!(a.panes.layout.sel, 1);
    // Once i has listed them, f moves between the grid and the list.
    typed(&mut a, "i");
    a.wait_background();
    assert!(a.panes.layout.focus_refs);
    typed(&mut a, "f");
    assert!(!a.panes.layout.focus_refs);
    // Trace before any trace: n says how to start one.
    typed(&mut a, "6n");
    assert!(
        a.status.contains("g and a guest offset start one"),
        "{}",
        a.status
    );
    // Tables at the L1 level: z inflates L2 entries only.
    typed(&mut a, "3z");
    assert!(a.status.contains("open an L2 table first"), "{}", a.status);
    assert_eq!(a.pane, Pane::Tables);
}

#[test]
fn a_file_that_does_not_exist_is_not_offered_as_bytes_in_hex() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = open(dir.path().join("missing.qcow2"));
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("No such file or directory"), "{s}");
    assert!(!s.contains("Hex (9) shows the file's"), "{s}");
    // A file that exists but is not qcow2 still gets the offer.
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, b"not an image").unwrap();
    let mut b = open(p);
    assert!(screen(&mut b, 80, 24).contains("Hex (9) shows the file's 12 bytes as they are."));
}

#[test]
fn the_layout_legend_keeps_each_square_with_its_word_when_it_wraps() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "2");
    for w in [40, 60, 80, 120] {
        let s = screen(&mut a, w, 24);
        let legend: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("│■"))
            .map(|l| l.trim_matches(|c: char| c == '│' || c.is_whitespace()))
            .collect();
        assert!(!legend.is_empty(), "{s}");
        for l in &legend {
            assert!(!l.ends_with('■'), "{w} columns: {l:?}\n{s}");
        }
        // Every role is named, however narrow.
        let all = legend.join(" ");
        for word in ["header", "data", "free", "leaked", "over-ref"] {
            assert!(all.contains(word), "{w} columns: {word} missing\n{s}");
        }
    }
}

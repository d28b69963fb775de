//! Headless tests: actions into the app, frames drawn into ratatui's TestBackend,
//! screens compared with insta snapshots, colours checked where they carry meaning.

use super::app::{App, Options};
use super::keymap::{Action, pane};
use super::panes::color;
use super::view;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use std::path::PathBuf;

/// Relative to the package root (cargo runs tests there), so screens do not
/// depend on where the checkout is.
fn asset(name: &str) -> PathBuf {
    PathBuf::from("assets").join(name)
}

fn app(name: &str) -> App {
    let mut a = App::new(asset(name), Options::default());
    a.wait_background();
    a
}

fn draw(app: &mut App, w: u16, h: u16) -> Buffer {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| view::draw(f, app)).unwrap();
    t.backend().buffer().clone()
}

fn text(b: &Buffer) -> String {
    let mut s = String::new();
    for y in 0..b.area.height {
        for x in 0..b.area.width {
            s.push_str(b[(x, y)].symbol());
        }
        s.push('\n');
    }
    s
}

fn key(app: &mut App, c: KeyCode) {
    super::handle_event(app, Event::Key(KeyEvent::new(c, KeyModifiers::NONE)));
}

fn typed(app: &mut App, s: &str) {
    for c in s.chars() {
        key(app, KeyCode::Char(c));
    }
}

/// Snapshot text with what varies between machines taken out: dates, the space
/// the file takes on disk (it depends on the file system), and the padding those
/// change (runs of spaces become one).
fn stable(s: String) -> String {
    s.lines()
        .map(|l| {
            let mut l = l.to_string();
            if let Some(i) = l.find("2026-") {
                l.replace_range(i..(i + 19).min(l.len()), "YYYY-MM-DD HH:MM:SS");
            }
            if let Some(end) = l.find(" on disk)")
                && let Some(start) = l[..end].rfind('(')
            {
                l.replace_range(start..end + " on disk)".len(), "(… on disk)");
            }
            let mut out = String::new();
            let mut prev_space = false;
            for c in l.chars() {
                if c == ' ' && prev_space {
                    continue;
                }
                prev_space = c == ' ';
                out.push(c);
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_pane_draws_at_80x24() {
    let mut a = app("demo-top.qcow2");
    for p in 0..9 {
        a.update(Action::Pane(p));
        let screen = text(&draw(&mut a, 80, 24));
        assert!(
            screen.contains(super::keymap::PANES[p]),
            "pane {p}:\n{screen}"
        );
        insta::assert_snapshot!(
            format!("pane_{}_{}", p + 1, super::keymap::PANES[p].to_lowercase()),
            stable(screen)
        );
    }
}

#[test]
fn tables_drill_into_l2_and_back() {
    let mut a = app("demo-mid.qcow2");
    a.update(Action::Pane(pane::TABLES));
    a.update(Action::Enter);
    let s = text(&draw(&mut a, 100, 30));
    assert!(s.contains("L2 table at 0x40000"), "{s}");
    assert!(s.contains("data at host offset 0x50000"), "{s}");
    a.update(Action::Back);
    assert!(text(&draw(&mut a, 100, 30)).contains("active L1 at 0x30000"));
}

#[test]
fn trace_steps_forward_and_back() {
    let mut a = app("demo-top.qcow2");
    a.update(Action::Pane(pane::TRACE));
    key(&mut a, KeyCode::Char('g'));
    typed(&mut a, "0x18000");
    key(&mut a, KeyCode::Enter);
    let t = a.trace.as_ref().expect("a trace");
    assert_eq!(t.guest_offset, 0x18000);
    let n = t.steps.len();
    for _ in 0..n {
        a.update(Action::NextStep);
    }
    assert_eq!(a.trace_step, n - 1);
    let s = text(&draw(&mut a, 100, 30));
    assert!(s.contains("result:"), "{s}");
    a.update(Action::PrevStep);
    assert_eq!(a.trace_step, n - 2);
    insta::assert_snapshot!("trace_0x18000", stable(text(&draw(&mut a, 100, 30))));
}

#[test]
fn a_leaked_cluster_is_coloured_in_layout_and_refcounts() {
    let mut a = app("demo-corrupt.qcow2");
    a.update(Action::Pane(pane::LAYOUT));
    let b = draw(&mut a, 100, 30);
    // Row 0 of the grid starts after the legend line and the 10-column label.
    let leak_cell = &b[(1 + 10 + 5, 3)];
    assert_eq!(
        leak_cell.fg,
        color::LEAK,
        "cluster 5 is leaked:\n{}",
        text(&b)
    );
    let ok_cell = &b[(1 + 10 + 6, 3)];
    assert_eq!(ok_cell.fg, color::DATA);
    a.update(Action::Pane(pane::REFCOUNTS));
    a.update(Action::Enter);
    let b = draw(&mut a, 100, 30);
    let s = text(&b);
    let row = s
        .lines()
        .position(|l| l.contains("cluster          5"))
        .expect("row of cluster 5");
    let x = s.lines().nth(row).unwrap().find("stored").unwrap() as u16;
    assert_eq!(b[(x, row as u16)].fg, color::LEAK, "{s}");
}

#[test]
fn check_pane_lists_findings_and_jumps_to_the_cluster() {
    let mut a = app("demo-corrupt.qcow2");
    a.update(Action::Pane(pane::CHECK));
    let s = text(&draw(&mut a, 100, 30));
    assert!(s.contains("2 corruptions, 1 leaks"), "{s}");
    assert!(s.contains("Leaked cluster 5 refcount=2 reference=1"), "{s}");
    a.update(Action::Enter);
    assert_eq!(a.pane, pane::LAYOUT);
    assert_eq!(a.layout_sel, 5);
}

#[test]
fn simulate_runs_and_steps_without_writing() {
    let before = std::fs::read(asset("demo-mid.qcow2")).unwrap();
    let mut a = app("demo-mid.qcow2");
    a.update(Action::Pane(pane::SIMULATE));
    a.update(Action::Enter);
    key(&mut a, KeyCode::Enter);
    let (records, summary) = a.sim.clone().expect("ran");
    assert_eq!(records.len(), 1);
    assert!(summary.contains("no errors"), "{summary}");
    a.update(Action::NextStep);
    a.update(Action::NextStep);
    assert_eq!(a.sim_step, 2);
    let s = text(&draw(&mut a, 100, 30));
    assert!(s.contains("change 3/"), "{s}");
    assert_eq!(std::fs::read(asset("demo-mid.qcow2")).unwrap(), before);
}

#[test]
fn snapshots_become_the_view_and_two_marked_are_compared() {
    let mut a = app("demo-top.qcow2");
    a.update(Action::Pane(pane::SNAPSHOTS));
    a.update(Action::Enter);
    assert_eq!(a.view_snapshot.as_deref(), Some("1"));
    a.update(Action::Mark);
    a.update(Action::Down);
    a.update(Action::Mark);
    assert!(a.diff_running, "the comparison runs on a worker thread");
    a.wait_background();
    let diff = a.diff.clone().expect("compared").expect("readable");
    assert!(!diff.is_empty(), "the two demo snapshots differ");
    let s = text(&draw(&mut a, 100, 30));
    assert!(
        s.contains("guest cluster(s) map differently") && s.contains("view: snapshot 1"),
        "{s}"
    );
    let _ = diff;
}

#[test]
fn help_lists_every_binding_and_closes() {
    let mut a = app("demo-top.qcow2");
    a.update(Action::Help);
    let s = text(&draw(&mut a, 120, 40));
    for b in super::keymap::KEYMAP {
        assert!(s.contains(b.keys), "{} missing:\n{s}", b.keys);
    }
    a.update(Action::Escape);
    assert!(a.popup.is_none());
}

#[test]
fn broken_images_open_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.qcow2");
    let mut bytes = std::fs::read(asset("demo-mid.qcow2")).unwrap();
    bytes[4..8].copy_from_slice(&9u32.to_be_bytes());
    std::fs::write(&p, bytes).unwrap();
    let mut a = App::new(p.clone(), Options::default());
    let s = text(&draw(&mut a, 80, 24));
    assert!(s.contains("Unsupported") && s.contains("version 9"), "{s}");
    for pn in 0..9 {
        a.update(Action::Pane(pn));
        draw(&mut a, 80, 24);
    }
    std::fs::write(&p, b"not an image").unwrap();
    let mut a = App::new(p, Options::default());
    assert!(text(&draw(&mut a, 80, 24)).contains("cannot be opened"));
}

#[test]
fn mouse_clicks_tabs_and_the_tour_moves_panes() {
    let mut a = app("demo-top.qcow2");
    draw(&mut a, 100, 30);
    let (r, i) = a.areas.tabs[6];
    super::handle_event(
        &mut a,
        Event::Mouse(ratatui::crossterm::event::MouseEvent {
            kind: ratatui::crossterm::event::MouseEventKind::Down(
                ratatui::crossterm::event::MouseButton::Left,
            ),
            column: r.x + 1,
            row: r.y,
            modifiers: KeyModifiers::NONE,
        }),
    );
    assert_eq!(a.pane, i);
    a.update(Action::Tour);
    let mut seen = vec![a.pane];
    for _ in 0..6 {
        a.update(Action::NextStep);
        seen.push(a.pane);
    }
    assert_eq!(
        seen,
        vec![
            pane::OVERVIEW,
            pane::TABLES,
            pane::TABLES,
            pane::HEX,
            pane::REFCOUNTS,
            pane::SNAPSHOTS,
            pane::SIMULATE
        ]
    );
    assert!(
        a.sim.is_some(),
        "the tour's last step simulates a write after a snapshot"
    );
}

#[test]
fn watch_reloads_when_the_file_changes_and_shows_what_changed() {
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
    assert_eq!(a.report.as_ref().unwrap().leaks, 0);
    // Someone changes the image (here: a leaked cluster, as qemu-img check -r would find).
    std::fs::copy(asset("demo-corrupt.qcow2"), &p).unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    a.check_watch();
    a.wait_background();
    assert_eq!(a.previous, Some((0, 0, 0)));
    assert_eq!(a.report.as_ref().unwrap().leaks, 1);
    a.update(Action::Pane(pane::CHECK));
    let s = text(&draw(&mut a, 100, 30));
    assert!(
        s.contains("since the previous load: corruptions 0 → 2, leaks 0 → 1"),
        "{s}"
    );
}

#[test]
fn enter_on_a_trace_data_step_shows_the_backing_file_bytes() {
    let mut a = app("demo-top.qcow2");
    a.update(Action::Pane(pane::TRACE));
    a.goto("0x1c000");
    let n = a.trace.as_ref().unwrap().steps.len();
    a.trace_step = n - 1;
    a.update(Action::Enter);
    assert_eq!(a.pane, pane::HEX);
    assert!(
        a.hex_src
            .as_ref()
            .unwrap()
            .name()
            .ends_with("demo-mid.qcow2")
    );
    assert_eq!(a.hex_base, 0x5c000);
}

#[test]
fn layout_enter_on_an_l2_table_opens_it_in_tables() {
    let mut a = app("demo-mid.qcow2");
    a.update(Action::Pane(pane::LAYOUT));
    a.layout_sel = 4;
    a.update(Action::Enter);
    assert_eq!(a.pane, pane::TABLES);
    assert_eq!(a.tables_level, super::app::TablesLevel::L2(0));
}

#[test]
fn the_viewer_opens_broken_images_and_draws_every_pane() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read(asset("demo-top.qcow2")).unwrap();
    let patch = |at: usize, bytes: &[u8]| {
        let mut b = base.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        (
            "random",
            (0..20000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
                .collect(),
        ),
        ("truncated", base[..3000].to_vec()),
        ("version-9", patch(4, &9u32.to_be_bytes())),
        ("cluster-bits-63", patch(20, &63u32.to_be_bytes())),
        ("l1-size-max", patch(36, &u32::MAX.to_be_bytes())),
        ("refcount-order-7", patch(96, &7u32.to_be_bytes())),
        ("snapshots-max", patch(60, &u32::MAX.to_be_bytes())),
        ("size-max", patch(24, &u64::MAX.to_be_bytes())),
        (
            "l1-to-header",
            patch(0xc000, &0x8000_0000_0000_0000u64.to_be_bytes()),
        ),
    ];
    for (name, bytes) in cases {
        let p = dir.path().join(format!("{name}.qcow2"));
        std::fs::write(&p, bytes).unwrap();
        let before = std::fs::read(&p).unwrap();
        let mut a = App::new(p.clone(), Options::default());
        a.wait_background();
        for pn in 0..9 {
            a.update(Action::Pane(pn));
            for act in [Action::Down, Action::Enter, Action::NextStep, Action::Back] {
                a.update(act);
            }
            draw(&mut a, 80, 24);
        }
        assert_eq!(std::fs::read(&p).unwrap(), before, "{name} changed");
    }
}

#[test]
fn the_explanation_describes_the_selected_entry() {
    let mut a = app("demo-mid.qcow2");
    a.update(Action::Pane(pane::TABLES));
    a.update(Action::Explain);
    let e = super::view::explanation(&a);
    assert!(
        e.starts_with("active L1[0]") && e.contains("COPIED is set"),
        "{e}"
    );
    a.update(Action::Enter);
    a.update(Action::Down);
    let e = super::view::explanation(&a);
    assert!(
        e.contains("L2 0x40000[1]") && e.contains("COPIED: refcount 1"),
        "{e}"
    );
    let s = text(&draw(&mut a, 100, 30));
    assert!(s.contains("Explanation"), "{s}");
    let mut c = app("demo-corrupt.qcow2");
    c.update(Action::Pane(pane::CHECK));
    assert!(super::view::explanation(&c).contains("Repair:"));
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
    let t: Vec<String> = super::panes::overview::lines(&a)
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
    a.run_trace(0x200);
    let steps = &a.trace.as_ref().unwrap().steps;
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
    let c = a.chain.as_ref().unwrap();
    qinspect::lookup::read(c, 0x1000, &mut buf, &mut Default::default()).unwrap();
    assert_eq!(buf, [0x42; 16]);
    let bad = open(b"abd");
    let all: String = super::panes::overview::lines(&bad)
        .iter()
        .map(|l| l.to_string() + "\n")
        .collect();
    assert!(
        all.contains("key: no key slot matches this passphrase"),
        "{all}"
    );
}

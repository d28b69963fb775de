//! Headless tests: keys into the app, frames drawn into ratatui's TestBackend,
//! screens compared with insta snapshots, colours checked where they carry meaning.

use super::app::{App, Options, Popup};
use super::ctx::Pane;
use super::keymap::Action;
use super::panes::color;
use super::view;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Relative to the package root (cargo runs tests there), so screens do not
/// depend on where the checkout is.
fn asset(name: &str) -> PathBuf {
    PathBuf::from("assets").join(name)
}

fn app(name: &str) -> App {
    open(asset(name))
}

fn open(p: PathBuf) -> App {
    let mut a = App::new(p, Options::default());
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

fn screen(app: &mut App, w: u16, h: u16) -> String {
    text(&draw(app, w, h))
}

/// Where `needle` starts on screen (x, y), counting one cell per character.
fn find(b: &Buffer, needle: &str) -> Option<(u16, u16)> {
    text(b).lines().enumerate().find_map(|(y, l)| {
        let i = l.find(needle)?;
        Some((l[..i].chars().count() as u16, y as u16))
    })
}

fn press(app: &mut App, c: KeyCode, m: KeyModifiers) {
    super::handle_event(app, Event::Key(KeyEvent::new(c, m)));
}

fn key(app: &mut App, c: KeyCode) {
    press(app, c, KeyModifiers::NONE);
}

/// Type keys as a person would: characters one by one.
fn typed(app: &mut App, s: &str) {
    for c in s.chars() {
        key(app, KeyCode::Char(c));
    }
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img is installed");
    assert!(out.status.success(), "{args:?}: {out:?}");
}

fn qemu_io(dir: &Path, image: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd, image])
        .current_dir(dir)
        .output()
        .expect("qemu-io is installed");
    assert!(out.status.success(), "{cmd}: {out:?}");
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
fn every_pane_draws_at_80x24_and_120x40() {
    let mut a = app("demo-top.qcow2");
    for (w, h) in [(80, 24), (120, 40)] {
        for p in Pane::ALL {
            a.update(Action::Pane(p));
            let s = screen(&mut a, w, h);
            let tab = if w >= 100 { p.name() } else { p.short() };
            assert!(s.contains(&format!("{} {tab}", p.number())), "{p:?}:\n{s}");
            assert!(s.contains("? help") && s.contains("q quit"), "{s}");
            insta::assert_snapshot!(
                format!("pane_{}_{}_{w}x{h}", p.number(), p.name().to_lowercase()),
                stable(s)
            );
        }
    }
}

#[test]
fn tables_drill_into_l2_and_back() {
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("L2 table at 0x40000"), "{s}");
    assert!(s.contains("data at host offset 0x50000"), "{s}");
    key(&mut a, KeyCode::Backspace);
    assert!(screen(&mut a, 100, 30).contains("active L1 at 0x30000"));
}

#[test]
fn trace_steps_forward_and_back() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "6g0x18000");
    key(&mut a, KeyCode::Enter);
    let t = a.panes.trace.trace.as_ref().expect("a trace");
    assert_eq!(t.guest_offset, 0x18000);
    let n = t.steps.len();
    for _ in 0..n {
        typed(&mut a, "n");
    }
    assert_eq!(a.panes.trace.step, n - 1);
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("result:"), "{s}");
    typed(&mut a, "p");
    assert_eq!(a.panes.trace.step, n - 2);
    insta::assert_snapshot!("trace_0x18000", stable(screen(&mut a, 100, 30)));
}

#[test]
fn a_leaked_cluster_is_coloured_in_layout_and_refcounts() {
    let mut a = app("demo-corrupt.qcow2");
    typed(&mut a, "2");
    let b = draw(&mut a, 100, 30);
    // Row 0 of the grid starts after the legend line and the 10-column label.
    assert_eq!(
        b[(1 + 10 + 5, 3)].fg,
        color::LEAK,
        "cluster 5:\n{}",
        text(&b)
    );
    assert_eq!(b[(1 + 10 + 6, 3)].fg, color::DATA);
    typed(&mut a, "4");
    key(&mut a, KeyCode::Enter);
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
    typed(&mut a, "7");
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("2 corruptions, 1 leaks"), "{s}");
    assert!(s.contains("Leaked cluster 5 refcount=2 reference=1"), "{s}");
    key(&mut a, KeyCode::Enter);
    // Enter goes to the entry at fault: the refcount of cluster 5.
    assert_eq!(a.pane, Pane::Refcounts);
    assert_eq!(a.panes.refcounts.block.sel, 5);
    // Backspace returns to where the jump came from.
    key(&mut a, KeyCode::Backspace);
    assert_eq!(a.pane, Pane::Check);
}

#[test]
fn simulate_runs_and_steps_without_writing() {
    let before = std::fs::read(asset("demo-mid.qcow2")).unwrap();
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "8");
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    let o = a.panes.simulate.outcome.clone().expect("ran").expect("ok");
    assert_eq!(o.records.len(), 1);
    assert!(o.summary.contains("no errors") && o.clean, "{}", o.summary);
    typed(&mut a, "nn");
    assert_eq!(a.panes.simulate.steps.sel, 2);
    let b = draw(&mut a, 100, 30);
    let s = text(&b);
    assert!(s.contains("change 3/"), "{s}");
    let (x, y) = find(&b, "check of the simulated image: no errors").unwrap();
    assert_eq!(b[(x, y)].fg, color::DATA);
    assert_eq!(std::fs::read(asset("demo-mid.qcow2")).unwrap(), before);
}

#[test]
fn snapshots_become_the_view_and_two_marked_are_compared() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "5");
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.ctx.view_snapshot, Some(0));
    typed(&mut a, "m");
    key(&mut a, KeyCode::Down);
    typed(&mut a, "m");
    assert!(
        a.panes.snapshots.diff_running,
        "the comparison runs on a worker"
    );
    assert!(screen(&mut a, 100, 30).contains("comparing the two snapshots"));
    a.wait_background();
    let diff = a
        .panes
        .snapshots
        .diff
        .clone()
        .expect("compared")
        .expect("ok");
    assert!(!diff.is_empty(), "the two demo snapshots differ");
    let s = screen(&mut a, 100, 30);
    assert!(
        s.contains("guest cluster(s) map differently") && s.contains("view: snapshot 1"),
        "{s}"
    );
    // The "comparing…" line is gone once the result is there.
    assert!(!s.contains("comparing the two snapshots"), "{s}");
}

#[test]
fn mouse_clicks_tabs_and_the_tour_moves_panes() {
    let mut a = app("demo-top.qcow2");
    draw(&mut a, 100, 30);
    let (r, p) = a.areas.tabs[6];
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
    assert_eq!(a.pane, p);
    typed(&mut a, "t");
    let mut seen = vec![a.pane];
    for _ in 0..6 {
        typed(&mut a, "n");
        seen.push(a.pane);
    }
    assert_eq!(
        seen,
        vec![
            Pane::Overview,
            Pane::Tables,
            Pane::Tables,
            Pane::Hex,
            Pane::Refcounts,
            Pane::Snapshots,
            Pane::Simulate
        ]
    );
    a.wait_background();
    assert!(
        matches!(a.panes.simulate.outcome, Some(Ok(_))),
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
    assert_eq!(a.ctx.report.as_ref().unwrap().leaks, 0);
    std::fs::copy(asset("demo-corrupt.qcow2"), &p).unwrap();
    let f = std::fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    a.check_watch();
    a.wait_background();
    assert_eq!(a.ctx.previous, Some((0, 0, 0)));
    assert_eq!(a.ctx.report.as_ref().unwrap().leaks, 1);
    typed(&mut a, "7");
    let s = screen(&mut a, 100, 30);
    assert!(
        s.contains("since the previous load: corruptions 0 → 2, leaks 0 → 1"),
        "{s}"
    );
}

#[test]
fn enter_on_a_trace_data_step_shows_the_backing_file_bytes() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "6g0x1c000");
    key(&mut a, KeyCode::Enter);
    key(&mut a, KeyCode::End);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Hex);
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("Hex — assets/demo-mid.qcow2: "), "{s}");
    assert!(s.contains("data of guest 0x1c000 at 0x5c000"), "{s}");
}

#[test]
fn layout_enter_on_an_l2_table_opens_it_in_tables() {
    let mut a = app("demo-mid.qcow2");
    typed(&mut a, "2");
    a.panes.layout.sel = 4;
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Tables);
    assert_eq!(a.panes.tables.level, super::panes::tables::Level::L2(0));
}

/// What QEMU says about an image on its own (no backing file): why it refuses to
/// open it, if it does, and its check's counts (corruptions, leaks, check
/// errors) and messages when the check runs.
struct QemuSays {
    refusal: Option<String>,
    check: Option<(u64, u64, u64)>,
    check_failed: bool,
    messages: Vec<String>,
}

fn qemu_says(p: &Path) -> QemuSays {
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        p.display()
    );
    let info = Command::new("qemu-img")
        .args(["info", "-U", &spec])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&info.stderr);
    let refusal = (!info.status.success()).then(|| {
        let l = err.lines().next().unwrap_or_default();
        l.rsplit_once("': ").map_or(l, |(_, why)| why).to_string()
    });
    let check = Command::new("qemu-img")
        .args(["check", "-U", "--output=json", &spec])
        .output()
        .unwrap();
    let json: Option<serde_json::Value> = serde_json::from_slice(&check.stdout).ok();
    let n = |j: &serde_json::Value, k: &str| j[k].as_u64().unwrap_or(0);
    let stderr = String::from_utf8_lossy(&check.stderr);
    QemuSays {
        refusal,
        check: json
            .as_ref()
            .map(|j| (n(j, "corruptions"), n(j, "leaks"), n(j, "check-errors"))),
        check_failed: stderr.contains("Check failed"),
        messages: stderr
            .lines()
            .filter(|l| l.starts_with("ERROR") || l.starts_with("Leaked"))
            .map(str::to_string)
            .collect(),
    }
}

/// The text of the Overview's lines, and the header fields drawn red (offset
/// and the whole line).
fn overview_lines(a: &App) -> (String, Vec<(u64, String)>) {
    let lines = super::panes::overview::lines(&a.ctx);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let red = lines
        .iter()
        .filter(|l| {
            l.spans
                .get(1)
                .is_some_and(|s| s.style.fg == Some(color::BAD))
        })
        .filter_map(|l| {
            let off = l.spans.first()?.content.trim().parse().ok()?;
            Some((off, l.to_string()))
        })
        .collect();
    (text, red)
}

/// Long (about 200 lines) on purpose: one corpus of broken images, built once
/// with qemu-img, and for each image what every pane shows, checked in turn
/// against qemu-img's answer for that image.
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
    // Wide enough that no message wraps.
    let (w, h) = (260, 40);
    for (name, bytes) in cases {
        let p = dir.path().join(format!("{name}.qcow2"));
        std::fs::write(&p, &bytes).unwrap();
        let before = std::fs::read(&p).unwrap();
        let qemu = qemu_says(&p);
        let mut a = open(p.clone());
        let (overview, red) = overview_lines(&a);
        let shows = |a: &mut App, pn: Pane| {
            a.update(Action::Pane(pn));
            screen(a, w, h)
        };
        // Hex shows the file's own first bytes, whatever they are.
        let hex = shows(&mut a, Pane::Hex);
        match bytes.get(..16) {
            Some(first) => {
                let row: Vec<String> = first.iter().map(|b| format!("{b:02x}")).collect();
                let row = format!("{}  {}", row[..8].join(" "), row[8..].join(" "));
                assert!(hex.contains(&format!("00000000  {row}")), "{name}: {hex}");
            }
            None => assert!(
                hex.contains(&format!("the file ends at {:#x}", bytes.len())),
                "{name}: {hex}"
            ),
        }
        match a.ctx.load_error.clone() {
            // Not qcow2 even leniently: every pane that needs the structures says
            // why, naming the structure and its offset; Overview points at Hex.
            Some(why) => {
                assert!(qemu.refusal.is_some(), "{name}: QEMU opens what we cannot");
                assert!(why.contains(" at 0x"), "{name}: {why}");
                if name.starts_with("version") || name.starts_with("cluster") {
                    let q = qemu.refusal.as_deref().unwrap();
                    assert!(why.contains(q), "{name}: {why} vs QEMU's {q}");
                }
                assert!(
                    overview.contains(&format!("cannot be opened: {why}"))
                        && overview
                            .contains(&format!("Hex (9) shows the file's {} bytes", bytes.len())),
                    "{name}: {overview}"
                );
                for pn in [
                    Pane::Layout,
                    Pane::Tables,
                    Pane::Refcounts,
                    Pane::Snapshots,
                    Pane::Simulate,
                    Pane::Map,
                ] {
                    let s = shows(&mut a, pn);
                    assert!(
                        s.contains(&format!("cannot be opened as qcow2: {why}")),
                        "{name} {pn:?}: {s}"
                    );
                }
                let s = shows(&mut a, Pane::Check);
                assert!(s.contains("The check cannot run:"), "{name}: {s}");
            }
            // Opened leniently: what QEMU refuses is said, at the field marked red,
            // in QEMU's words; the check counts what QEMU's check counts.
            None => {
                let said: Vec<&str> = overview
                    .lines()
                    .filter(|l| l.starts_with("QEMU would refuse this: "))
                    .collect();
                match &qemu.refusal {
                    Some(q) => {
                        assert!(!said.is_empty(), "{name}: QEMU refuses ({q}): {overview}");
                        // QEMU's open stops at the sector count for this one; the
                        // header check before it names the size field.
                        if name != "size-max" {
                            assert!(
                                said.iter().any(|l| l.contains(q.as_str())),
                                "{name}: {q} vs {said:?}"
                            );
                        }
                        for l in &said {
                            let off = l
                                .split(" at 0x")
                                .nth(1)
                                .and_then(|r| r.split(':').next())
                                .and_then(|h| u64::from_str_radix(h, 16).ok())
                                .unwrap_or_else(|| panic!("{name}: no offset in {l}"));
                            if off < 0x200 {
                                let field = red.iter().find(|(o, _)| *o == off);
                                assert!(
                                    field.is_some_and(|(_, t)| t.contains("QEMU refuses it")),
                                    "{name}: field at {off:#x} not red: {red:?}"
                                );
                            }
                        }
                    }
                    None => {
                        assert!(said.is_empty(), "{name}: QEMU opens it: {said:?}");
                        assert!(red.is_empty(), "{name}: {red:?}");
                    }
                }
                let r = a.ctx.report.clone().expect("checked");
                let check = shows(&mut a, Pane::Check);
                let verdict = format!(
                    "{} corruptions, {} leaks, {} check errors",
                    r.corruptions, r.leaks, r.check_errors
                );
                if let Some((c, l, e)) = qemu.check {
                    assert_eq!(
                        (r.corruptions, r.leaks, r.check_errors),
                        (c, l, e),
                        "{name}"
                    );
                    assert!(
                        check.contains(&verdict)
                            || (c + l + e == 0 && check.contains("No errors were found")),
                        "{name}: {check}"
                    );
                    // Each message of QEMU's check is a finding, in its words.
                    for m in &qemu.messages {
                        assert!(
                            r.findings.iter().any(|f| &f.message == m),
                            "{name}: QEMU says {m}; findings {:?}",
                            r.findings.iter().map(|f| &f.message).collect::<Vec<_>>()
                        );
                    }
                    if let Some(f) = r.findings.first() {
                        assert!(check.contains(&f.message), "{name}: {check}");
                    }
                } else if qemu.check_failed {
                    assert!(r.check_errors > 0, "{name}: QEMU's check fails: {check}");
                    assert!(check.contains(&verdict), "{name}: {check}");
                }
                // The tables shown are this image's: the L1 table where the header
                // puts it, and its first entry's raw value as in the file.
                let img = a.ctx.img.clone().unwrap();
                let l1 = img.header.l1_table_offset.get() as usize;
                let tables = shows(&mut a, Pane::Tables);
                let l1_refused = said.iter().any(|l| l.contains("L1 table"));
                if l1_refused {
                    // Refused: not read, and no row pretends to be an entry.
                    for pn in [Pane::Tables, Pane::Map] {
                        let s = if pn == Pane::Tables {
                            tables.clone()
                        } else {
                            shows(&mut a, pn)
                        };
                        assert!(
                            s.contains("The active L1 table is not read: ")
                                && !s.contains("unallocated"),
                            "{name} {pn:?}: {s}"
                        );
                    }
                } else if let Some(raw) = bytes.get(l1..l1 + 8) {
                    let raw = u64::from_be_bytes(raw.try_into().unwrap());
                    assert!(
                        tables.contains(&format!("active L1 at {l1:#x}"))
                            && tables.contains(&format!("{:#x} {raw:#018x}", l1)),
                        "{name}: {tables}"
                    );
                }
            }
        }
        // Every key in every pane: nothing panics, nothing is written.
        for pn in Pane::ALL {
            a.update(Action::Pane(pn));
            for act in [
                Action::Down,
                Action::End,
                Action::Enter,
                Action::NextStep,
                Action::Back,
            ] {
                a.update(act);
            }
            a.popup = None;
            draw(&mut a, 80, 24);
        }
        a.wait_background();
        assert_eq!(std::fs::read(&p).unwrap(), before, "{name} changed");
    }
}

#[test]
fn help_lists_every_binding_once_and_closes() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "?");
    // Tall enough for the whole table, so that every row is on screen.
    let s = screen(&mut a, 120, 90);
    assert!(!s.contains("█"), "the help does not fit: {s}");
    for b in super::keymap::KEYMAP {
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
    assert_eq!(a.panes.hex.cursor, 0x46010);
    key(&mut a, KeyCode::PageDown);
    let page = a.panes.hex.rows * 16;
    assert_eq!(a.panes.hex.cursor, 0x46010 + page);
    assert!(a.panes.hex.top > 0x45fc0, "the page follows the cursor");
    // ] is a whole cluster, and rows cross into it.
    typed(&mut a, "]");
    assert_eq!(a.panes.hex.top, 0x48000);
    assert_eq!(a.panes.hex.cursor, 0x48000);
    key(&mut a, KeyCode::Up);
    assert_eq!(a.panes.hex.top, 0x47ff0);
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
    // An unallocated entry of an image without a backing file reads as zeros.
    typed(&mut a, "3");
    key(&mut a, KeyCode::End);
    let e = view::explanation(&a);
    assert!(e.contains("reads as zeros: no backing file"), "{e}");
    assert!(!e.contains("falls through"), "{e}");
    // With a backing file, it falls through.
    let mut m = app("demo-mid.qcow2");
    typed(&mut m, "3");
    key(&mut m, KeyCode::Enter);
    key(&mut m, KeyCode::End);
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
    super::panes::layout::sort_referrers(&mut refs);
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
    let t: Vec<String> = super::panes::overview::lines(&a.ctx)
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
    a.apply(crate::tui::ctx::Effect::Trace(0x200));
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
    qinspect::lookup::read(c, 0x1000, &mut buf, &mut Default::default()).unwrap();
    assert_eq!(buf, [0x42; 16]);
    let bad = open(b"abd");
    let all: String = super::panes::overview::lines(&bad.ctx)
        .iter()
        .map(|l| l.to_string() + "\n")
        .collect();
    assert!(
        all.contains("key: no key slot matches this passphrase"),
        "{all}"
    );
}

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

/// The selected row of a list: the text of the first reversed cell's row.
fn selected_row(b: &Buffer, from_y: u16) -> String {
    (from_y..b.area.height)
        .find(|y| {
            (0..b.area.width).any(|x| {
                b[(x, *y)]
                    .modifier
                    .contains(ratatui::style::Modifier::REVERSED)
            })
        })
        .map(|y| {
            (0..b.area.width)
                .map(|x| b[(x, y)].symbol().to_string())
                .collect()
        })
        .unwrap_or_default()
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
        a.panes.trace.trace.as_ref().map(|t| t.guest_offset),
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
    assert_eq!(a.panes.hex.target.as_ref().map(|t| t.0), Some(0x18000));
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
    a.apply(super::ctx::Effect::View(None));
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
        super::panes::refcounts::Level::Table
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
    assert_eq!(a.panes.hex.mark, Some((start, end)));
    let s = screen(&mut a, 100, 30);
    assert!(s.contains("compressed data of guest"), "{s}");
    // Enter on the entry traces it: the trace inflates the cluster.
    key(&mut a, KeyCode::Backspace);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Trace);
    let s = screen(&mut a, 100, 30);
    assert!(s.to_lowercase().contains("compressed"), "{s}");
}

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
        assert_eq!(g.start, w["start"].as_u64().unwrap());
        assert_eq!(g.length, w["length"].as_u64().unwrap());
        assert_eq!(g.depth as u64, w["depth"].as_u64().unwrap());
        assert_eq!(g.data, w["data"].as_bool().unwrap());
        assert_eq!(g.zero, w["zero"].as_bool().unwrap());
        assert_eq!(g.offset, w["offset"].as_u64());
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
    let start = a.panes.map.extents[1].start;
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.pane, Pane::Trace);
    assert_eq!(
        a.panes.trace.trace.as_ref().map(|t| t.guest_offset),
        Some(start)
    );
    key(&mut a, KeyCode::Backspace);
    assert_eq!((a.pane, a.panes.map.list.sel), (Pane::Map, 1));
    // g lists from an offset: its first row is the rest of the extent there.
    let mid = start + 0x200;
    typed(&mut a, &format!("g{mid:#x}"));
    key(&mut a, KeyCode::Enter);
    draw(&mut a, 120, 40);
    assert_eq!(a.panes.map.extents[0].start, mid);
    assert_eq!(
        a.panes.map.extents[0].start + a.panes.map.extents[0].length,
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

// ---- issue 11 item 8: find and filter in lists --------------------------------------

/// Let a search finish, as the main loop does between frames.
fn settle(a: &mut App) {
    for _ in 0..100_000 {
        if !super::find::running(a) {
            return;
        }
        a.poll_background();
    }
    panic!("the search did not finish");
}

/// `/`, the text, Enter, and the search run to its end.
fn search(a: &mut App, q: &str) {
    typed(a, "/");
    assert!(
        matches!(
            a.popup,
            Some(Popup::Input(super::app::InputFor::FindInList, _))
        ),
        "/ opens the prompt in {:?}",
        a.pane
    );
    press(a, KeyCode::Char('u'), KeyModifiers::CONTROL);
    typed(a, q);
    key(a, KeyCode::Enter);
    settle(a);
}

fn qemu_map(dir: &str, image: &str) -> Vec<serde_json::Value> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", image])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The guest clusters that qemu-img map says hold data of layer 0, under L1
/// entry `l1` (as row numbers of its L2 table).
fn top_data_rows(map: &[serde_json::Value], cs: u64, per: u64, l1: u64) -> Vec<usize> {
    map.iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .flat_map(|e| {
            let s = e["start"].as_u64().unwrap() / cs;
            s..s + e["length"].as_u64().unwrap().div_ceil(cs)
        })
        .filter(|c| c / per == l1)
        .map(|c| (c % per) as usize)
        .collect()
}

#[test]
fn find_in_an_l2_table_selects_the_entry_of_a_host_offset_or_a_guest_offset() {
    let map = qemu_map("assets", "demo-top.qcow2");
    let mut a = app("demo-top.qcow2");
    let geo = a.ctx.img.as_ref().unwrap().geometry();
    let (cs, per) = (geo.cluster_size(), geo.l2_entries());
    // The top layer's data that L1 entry 1 maps, as qemu-img map lists it.
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["offset"].as_u64().unwrap()))
        .filter(|(s, _)| s / cs / per == 1)
        .collect();
    assert!(data.len() >= 2, "{map:?}");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.panes.tables.level, super::panes::tables::Level::L2(1));
    let (start, host) = data[1];
    let row = ((start / cs) % per) as usize;
    // A host offset: the entry that maps to it.
    search(&mut a, &format!("{host:#x}"));
    assert_eq!(a.panes.tables.l2.sel, row, "{host:#x}");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains(&format!("1/1 match for {host:#x}")), "{s}");
    assert!(selected_row(&draw(&mut a, 120, 30), 1).contains(&format!("{host:x}")));
    // A guest offset inside the cluster, in decimal: the same entry.
    key(&mut a, KeyCode::Home);
    search(&mut a, &(start + 4096).to_string());
    assert_eq!(a.panes.tables.l2.sel, row);
    // Words: the entries that map data say so; n and N go round them.
    key(&mut a, KeyCode::Home);
    search(&mut a, "DATA AT HOST");
    let rows = top_data_rows(&map, cs, per, 1);
    let found = a.panes.tables.l2.find.as_ref().unwrap().matches().to_vec();
    assert_eq!(
        found, rows,
        "the clusters qemu-img map says hold this layer's data"
    );
    assert_eq!(a.panes.tables.l2.sel, rows[0]);
    typed(&mut a, "n");
    assert_eq!(a.panes.tables.l2.sel, rows[1]);
    typed(&mut a, "N");
    assert_eq!(a.panes.tables.l2.sel, rows[0]);
    typed(&mut a, "N");
    assert_eq!(a.panes.tables.l2.sel, *rows.last().unwrap(), "N goes round");
    let s = screen(&mut a, 120, 30);
    assert!(
        s.contains(&format!(
            "{}/{} matches for DATA AT HOST",
            rows.len(),
            rows.len()
        )),
        "{s}"
    );
    // Nothing: said, and the selection stays.
    let before = a.panes.tables.l2.sel;
    search(&mut a, "0x7777777");
    assert_eq!(a.panes.tables.l2.sel, before);
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("no match for 0x7777777"), "{s}");
    // Esc forgets the search.
    key(&mut a, KeyCode::Esc);
    assert!(a.panes.tables.l2.find.is_none());
    assert!(!screen(&mut a, 120, 30).contains("no match"));
    // Esc in the prompt cancels it.
    typed(&mut a, "/0x");
    key(&mut a, KeyCode::Esc);
    assert!(a.popup.is_none() && a.panes.tables.l2.find.is_none());
}

#[test]
fn find_in_the_map_walks_every_extent_qemu_img_map_lists_for_a_layer() {
    let map = qemu_map("assets", "demo-top.qcow2");
    let want: Vec<u64> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["start"].as_u64().unwrap())
        .collect();
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "0");
    // Nothing is mapped before the first draw: the search maps as it goes.
    assert!(a.panes.map.extents.is_empty());
    search(&mut a, "data in demo-top.qcow2");
    let mut got = Vec::new();
    for _ in 0..want.len() {
        got.push(a.panes.map.extents[a.panes.map.list.sel].start);
        typed(&mut a, "n");
    }
    assert_eq!(got, want);
    assert_eq!(
        a.panes.map.extents[a.panes.map.list.sel].start, want[0],
        "n goes round to the first"
    );
    let s = screen(&mut a, 120, 40);
    assert!(
        s.contains(&format!(
            "1/{} matches for data in demo-top.qcow2",
            want.len()
        )),
        "{s}"
    );
}

#[test]
fn find_works_in_check_snapshots_refcounts_and_the_simulation_log() {
    let mut a = app("demo-corrupt.qcow2");
    // Check: the leak qemu-img check names, by its cluster number.
    let out = Command::new("qemu-img")
        .args(["check", "demo-corrupt.qcow2"])
        .current_dir("assets")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let leaked: u64 = said
        .lines()
        .find_map(|l| l.strip_prefix("Leaked cluster "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    typed(&mut a, "7");
    search(&mut a, &leaked.to_string());
    let r = a.ctx.report.clone().unwrap();
    let f = &r.findings[a.panes.check.list.sel];
    assert_eq!(f.cluster, Some(leaked), "{f:?}");
    // Refcounts: the leaked cluster's row in its block, by a host offset in it.
    let cs = a.ctx.cluster_size();
    typed(&mut a, "4");
    key(&mut a, KeyCode::Enter);
    search(&mut a, &format!("{:#x}", leaked * cs + 1));
    assert_eq!(a.panes.refcounts.block.sel as u64, leaked);
    // Snapshots: by name.
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "5");
    search(&mut a, "snap3");
    let img = a.ctx.img.clone().unwrap();
    assert_eq!(
        img.snapshots.snapshots[a.panes.snapshots.list.sel].name,
        "snap3"
    );
    // The simulation log: a word of its changes.
    typed(&mut a, "8");
    a.apply(super::ctx::Effect::Start(super::ctx::Job::Simulate(
        "write:0:4k".into(),
    )));
    a.wait_background();
    search(&mut a, "refcount");
    let sel = a.panes.simulate.steps.sel;
    let Some(Ok(o)) = &a.panes.simulate.outcome else {
        panic!("simulated")
    };
    let (_, text, _) = &super::panes::simulate::flat(o)[sel];
    assert!(text.to_lowercase().contains("refcount"), "{text}");
    // Back at the operations there is no list to search: / says so.
    key(&mut a, KeyCode::Backspace);
    typed(&mut a, "/");
    assert!(a.popup.is_none());
    assert!(
        a.status.contains("searches lists") && a.status.contains("run an operation first"),
        "{}",
        a.status
    );
    // Overview has no list and no / at all.
    typed(&mut a, "1/");
    assert!(a.popup.is_none());
}

#[test]
fn a_search_of_a_long_list_goes_on_between_frames_and_keys_still_work() {
    // 2 MiB clusters: L2 tables of 262144 entries.
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "big.qcow2",
            "1T",
        ],
    );
    qemu_io(dir.path(), "big.qcow2", "write -P 1 511G 4k");
    let mut a = open(dir.path().join("big.qcow2"));
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.panes.tables.level, super::panes::tables::Level::L2(0));
    typed(&mut a, "/");
    typed(&mut a, "no such words");
    key(&mut a, KeyCode::Enter);
    // Keys work whether or not the search is done; Esc stops it.
    key(&mut a, KeyCode::Down);
    assert_eq!(a.panes.tables.l2.sel, 1);
    draw(&mut a, 100, 30);
    key(&mut a, KeyCode::Esc);
    assert!(!super::find::running(&a) && a.panes.tables.l2.find.is_none());
    // The entry of the data qemu-io wrote, found by its guest offset.
    search(&mut a, "511G");
    let geo = a.ctx.img.as_ref().unwrap().geometry();
    let row = ((511u64 << 30) / geo.cluster_size() % geo.l2_entries()) as usize;
    assert_eq!(a.panes.tables.l2.sel, row);
    assert_eq!(geo.l2_entries(), 262144);
}

/// What `qemu-img check` says about an image, all of it (the details are on stderr).
fn qemu_check_text(dir: &str, image: &str) -> String {
    let out = Command::new("qemu-img")
        .args(["check", image])
        .current_dir(dir)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Press a key until the selection stops moving; the rows it stopped at.
fn stops(a: &mut App, k: char, sel: impl Fn(&App) -> u64) -> Vec<u64> {
    let mut v = Vec::new();
    for _ in 0..10_000 {
        let before = sel(a);
        typed(a, &k.to_string());
        if sel(a) == before {
            return v;
        }
        v.push(sel(a));
    }
    panic!("{k} never stopped")
}

#[test]
fn next_that_matters_stops_at_each_allocated_entry_mismatch_and_finding() {
    // Tables: } stops at exactly the entries qemu-img map says this layer maps
    // (data or zeros of depth 0), { comes back the same way.
    let map = qemu_map("assets", "demo-top.qcow2");
    let mut a = app("demo-top.qcow2");
    let geo = a.ctx.img.as_ref().unwrap().geometry();
    let (cs, per) = (geo.cluster_size(), geo.l2_entries());
    let mine: Vec<u64> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .flat_map(|e| {
            let s = e["start"].as_u64().unwrap() / cs;
            s..s + e["length"].as_u64().unwrap().div_ceil(cs)
        })
        .filter(|c| c / per == 0)
        .collect();
    assert!(mine.len() >= 2, "{map:?}");
    typed(&mut a, "3");
    key(&mut a, KeyCode::Enter);
    let l2sel = |a: &App| a.panes.tables.l2.sel as u64;
    let mut got: Vec<u64> = if mine.first() == Some(&0) {
        vec![0]
    } else {
        vec![]
    };
    got.extend(stops(&mut a, '}', l2sel));
    assert_eq!(got, mine);
    assert!(
        a.status.contains("no allocated L2 entry after"),
        "{}",
        a.status
    );
    let back = stops(&mut a, '{', l2sel);
    let want: Vec<u64> = mine.iter().rev().skip(1).copied().collect();
    assert_eq!(back, want);

    // Refcounts, Check and Layout on the corrupt image, against qemu-img check.
    let said = qemu_check_text("assets", "demo-corrupt.qcow2");
    let mismatched: Vec<u64> = said
        .lines()
        .filter_map(|l| {
            l.strip_prefix("Leaked cluster ")
                .or_else(|| l.strip_prefix("ERROR cluster "))
        })
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert!(!mismatched.is_empty(), "{said}");
    let mut a = app("demo-corrupt.qcow2");
    let cs = a.ctx.cluster_size();
    typed(&mut a, "4");
    key(&mut a, KeyCode::Enter);
    let blocksel = |a: &App| a.panes.refcounts.block.sel as u64;
    assert_eq!(stops(&mut a, '}', blocksel), mismatched, "{said}");
    assert!(a.status.contains("no refcount mismatch"), "{}", a.status);
    // Check: } stops at the corruptions and check errors only; their counts add
    // up to the errors qemu-img check reports.
    let errors: u64 = said
        .lines()
        .find_map(|l| l.strip_suffix(" errors were found on the image."))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    typed(&mut a, "7");
    key(&mut a, KeyCode::Home);
    let r = a.ctx.report.clone().unwrap();
    let bad = |i: u64| {
        matches!(
            r.findings[i as usize].kind,
            qinspect::check::FindingKind::Corruption | qinspect::check::FindingKind::CheckError
        )
    };
    let mut visited: Vec<u64> = if bad(0) { vec![0] } else { vec![] };
    visited.extend(stops(&mut a, '}', |a| a.panes.check.list.sel as u64));
    let counted: u64 = visited.iter().map(|i| r.findings[*i as usize].count).sum();
    assert_eq!(counted, errors, "{:?}", r.findings);
    assert!(visited.iter().all(|i| bad(*i)));
    // Layout: } stops at each cluster qemu-img check names (the leaked cluster
    // and the data clusters whose L2 entries have COPIED wrong).
    let mut named: Vec<u64> = mismatched.clone();
    for l in said.lines() {
        if let Some(e) = l.split("l2_entry=").nth(1) {
            let raw = u64::from_str_radix(e.split(' ').next().unwrap(), 16).unwrap();
            named.push((raw & 0x00ff_ffff_ffff_fe00) / cs);
        }
    }
    named.sort();
    named.dedup();
    typed(&mut a, "2");
    key(&mut a, KeyCode::Home);
    let mut at: Vec<u64> = if named.first() == Some(&0) {
        vec![0]
    } else {
        vec![]
    };
    at.extend(stops(&mut a, '}', |a| a.panes.layout.sel));
    assert_eq!(at, named, "{said}");
    assert!(
        a.status.contains("no cluster with a finding after"),
        "{}",
        a.status
    );
    // The keys are in the help of the panes they work in.
    typed(&mut a, "?");
    let s = screen(&mut a, 120, 60);
    assert!(
        s.contains("}/{") && s.contains("a cluster with a finding"),
        "{s}"
    );
}

#[test]
fn u_hides_unallocated_rows_and_selection_and_search_keep_to_the_rows_shown() {
    let map = qemu_map("assets", "demo-top.qcow2");
    let mut a = app("demo-top.qcow2");
    let geo = a.ctx.img.as_ref().unwrap().geometry();
    let (cs, per) = (geo.cluster_size(), geo.l2_entries());
    // What qemu-img map says layer 0 maps under L1 entry 1.
    let mine: Vec<usize> = map
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .flat_map(|e| {
            let s = e["start"].as_u64().unwrap() / cs;
            s..s + e["length"].as_u64().unwrap().div_ceil(cs)
        })
        .filter(|c| c / per == 1)
        .map(|c| (c % per) as usize)
        .collect();
    assert!(mine.len() >= 2);
    typed(&mut a, "3");
    key(&mut a, KeyCode::Down);
    key(&mut a, KeyCode::Enter);
    typed(&mut a, "u");
    let s = screen(&mut a, 120, 30);
    let hidden = per as usize - mine.len();
    assert!(
        s.contains(&format!("(hiding {hidden} unallocated: u shows them)")),
        "{s}"
    );
    assert!(s.contains(&format!(" 1/{} ", mine.len())), "{s}");
    // The rows on screen are those entries, in order; the arrows go through them.
    assert_eq!(
        a.panes.tables.l2.sel, mine[0],
        "the selection moved to a row shown"
    );
    let mut seen = vec![a.panes.tables.l2.sel];
    for _ in 1..mine.len() {
        key(&mut a, KeyCode::Down);
        seen.push(a.panes.tables.l2.sel);
    }
    assert_eq!(seen, mine);
    key(&mut a, KeyCode::Home);
    assert_eq!(a.panes.tables.l2.sel, mine[0]);
    key(&mut a, KeyCode::End);
    assert_eq!(a.panes.tables.l2.sel, *mine.last().unwrap());
    // A guest offset of a hidden (unallocated) entry finds nothing; the offset of
    // one shown finds it.
    let geo_row = |r: usize| (per + r as u64) * cs;
    let gap = (0..per as usize).find(|r| !mine.contains(r)).unwrap();
    search(&mut a, &geo_row(gap).to_string());
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("no match for"), "{s}");
    search(&mut a, &geo_row(mine[1]).to_string());
    assert_eq!(a.panes.tables.l2.sel, mine[1]);
    // The row drawn selected is that entry.
    let b = draw(&mut a, 120, 30);
    let row = selected_row(&b, 1);
    assert!(row.contains(&format!("{:#x}", geo_row(mine[1]))), "{row}");
    // A jump to a hidden entry (g and its guest offset) lands on it, with every
    // row shown again.
    typed(&mut a, &format!("g{}", geo_row(gap)));
    key(&mut a, KeyCode::Enter);
    assert_eq!(a.panes.tables.l2.sel, gap);
    assert!(a.panes.tables.l2.hidden.is_none());
    assert!(!screen(&mut a, 120, 30).contains("hiding"));
    // Backspace returns to the place before the jump, rows hidden as they were.
    key(&mut a, KeyCode::Backspace);
    assert!(a.panes.tables.l2.hidden.is_some());
    assert_eq!(a.panes.tables.l2.sel, mine[1]);
    // u again: every row, the selection where it was.
    typed(&mut a, "u");
    let s = screen(&mut a, 120, 30);
    assert!(!s.contains("hiding"), "{s}");
    assert_eq!(a.panes.tables.l2.sel, mine[1]);
    assert!(s.contains(&format!(" {}/{per} ", mine[1] + 1)), "{s}");

    // Map: the extents that are allocated nowhere go.
    let unallocated = map.iter().filter(|e| e["present"] == false).count();
    typed(&mut a, "0");
    draw(&mut a, 120, 40);
    key(&mut a, KeyCode::End);
    draw(&mut a, 120, 40);
    typed(&mut a, "u");
    key(&mut a, KeyCode::Home);
    let b = draw(&mut a, 120, 40);
    let s = text(&b);
    assert!(
        s.contains(&format!("(hiding {unallocated} unallocated: u shows them)")),
        "{s}"
    );
    assert!(!s.contains("unallocated in every layer"), "{s}");

    // Refcounts: the clusters with refcount 0 go.
    typed(&mut a, "4");
    key(&mut a, KeyCode::Enter);
    typed(&mut a, "u");
    let s = screen(&mut a, 120, 40);
    let img = a.ctx.img.clone().unwrap();
    let per = img.refcount_geometry().entries_per_block();
    let used = (0..per)
        .filter(|c| a.ctx.stored_refcount(*c).unwrap_or(0) > 0)
        .count() as u64;
    assert!(
        s.contains(&format!(
            "(hiding {} with refcount 0: u shows them)",
            per - used
        )),
        "{s}"
    );
    assert!(!s.contains("stored 0 "), "{s}");
}

#[test]
fn find_in_the_changes_after_qemu_img_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    );
    qemu_io(dir.path(), "a.qcow2", "write -P 7 0 192k");
    let mut a = open(dir.path().join("a.qcow2"));
    qemu_img(dir.path(), &["snapshot", "-c", "x", "a.qcow2"]);
    typed(&mut a, "r");
    a.wait_background();
    let changes = a.changes.clone().expect("compared");
    // Opened from a pane that has no list of its own: / works in the popup.
    typed(&mut a, "1c");
    search(&mut a, "1→2");
    let Some(Popup::Changes(v)) = &a.popup else {
        panic!("the Changes list stays open: {:?}", a.popup.is_some())
    };
    let want: Vec<usize> = (0..changes.len())
        .filter(|i| changes[*i].text.contains("1→2"))
        .collect();
    assert!(want.len() >= 4, "{changes:?}");
    assert_eq!(v.find.as_ref().unwrap().matches(), &want[..]);
    assert_eq!(v.sel, want[0]);
    typed(&mut a, "n");
    let sel = |a: &App| match &a.popup {
        Some(Popup::Changes(v)) => v.sel,
        _ => usize::MAX,
    };
    assert_eq!(sel(&a), want[1]);
    let s = screen(&mut a, 120, 40);
    assert!(
        s.contains(&format!("2/{} matches for 1→2", want.len())),
        "{s}"
    );
    // A cluster number: the row of that cluster; Enter opens its refcount.
    let l2 = changes
        .iter()
        .find(|c| c.text.contains("(l2-table)"))
        .and_then(|c| c.cluster)
        .unwrap();
    search(&mut a, &l2.to_string());
    assert_eq!(changes[sel(&a)].cluster, Some(l2));
    // Esc forgets the search, a second Esc closes the list.
    key(&mut a, KeyCode::Esc);
    assert!(matches!(&a.popup, Some(Popup::Changes(v)) if v.find.is_none()));
    key(&mut a, KeyCode::Enter);
    assert_eq!(
        (a.pane, a.panes.refcounts.block.sel as u64),
        (Pane::Refcounts, l2)
    );
}

// ---- issue 11 item 7: structure-aware Hex ----------------------------------------

/// Put the Hex cursor on host offset `off` (as `g` does) and draw.
fn hex_at(a: &mut App, off: u64, w: u16, h: u16) -> String {
    if a.pane != Pane::Hex {
        typed(a, "9");
    }
    typed(a, &format!("g{off:#x}"));
    key(a, KeyCode::Enter);
    assert_eq!(a.panes.hex.cursor, off);
    screen(a, w, h)
}

fn be(b: &[u8], at: u64, n: u64) -> u64 {
    b[at as usize..(at + n) as usize]
        .iter()
        .fold(0, |v, x| (v << 8) | u64::from(*x))
}

#[test]
fn the_hex_cursor_names_every_header_field_at_each_of_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1G"],
    );
    let p = dir.path().join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    // The header layout of the qcow2 specification (offset, size, name).
    let layout: &[(u64, u64, &str)] = &[
        (0, 4, "magic"),
        (4, 4, "version"),
        (8, 8, "backing_file_offset"),
        (16, 4, "backing_file_size"),
        (20, 4, "cluster_bits"),
        (24, 8, "size"),
        (32, 4, "crypt_method"),
        (36, 4, "l1_size"),
        (40, 8, "l1_table_offset"),
        (48, 8, "refcount_table_offset"),
        (56, 4, "refcount_table_clusters"),
        (60, 4, "nb_snapshots"),
        (64, 8, "snapshots_offset"),
        (72, 8, "incompatible_features"),
        (80, 8, "compatible_features"),
        (88, 8, "autoclear_features"),
        (96, 4, "refcount_order"),
        (100, 4, "header_length"),
        (104, 1, "compression_type"),
    ];
    let mut a = open(p);
    for &(start, size, name) in layout {
        for off in start..start + size {
            let s = hex_at(&mut a, off, 160, 40);
            let d = a.panes.hex.decoded(&a.ctx).unwrap();
            assert_eq!(d.structure, "header", "{off}");
            assert_eq!(d.item, name, "byte {off}");
            assert_eq!(
                (d.start.get(), d.end.get()),
                (start, start + size),
                "{name}"
            );
            assert_eq!(d.raw, Some(be(&bytes, start, size)), "{name}");
            assert!(s.contains(&format!("field: {name}")), "{s}");
        }
    }
    // The padding up to header_length (112 as QEMU writes it) is no field.
    let s = hex_at(&mut a, 105, 160, 40);
    assert!(s.contains("field: padding"), "{s}");
    // Past the header: the feature name table QEMU writes, and its entries.
    let ext = a.ctx.img.as_ref().unwrap().extensions.clone();
    let ft = ext
        .iter()
        .find(|e| e.ext_type == qinspect::header::EXT_FEATURE_TABLE)
        .unwrap();
    let s = hex_at(&mut a, ft.offset.get(), 160, 40);
    assert!(s.contains("header extension 'feature name table'"), "{s}");
    assert!(s.contains("field: type"), "{s}");
    let s = hex_at(&mut a, ft.offset.get() + 8 + 48, 160, 40);
    assert!(s.contains("field: entry 1"), "{s}");
}

#[test]
fn the_hex_cursor_decodes_an_l2_entry_and_a_refcount_entry() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
    );
    qemu_io(dir.path(), "a.qcow2", "write -P 0x5a 0x30000 64k");
    let p = dir.path().join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    // What qemu-img says guest 0x30000 maps to.
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "a.qcow2"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let host = map
        .iter()
        .find(|e| e["start"] == 0x30000 && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("guest 0x30000 is data");
    // The L2 table from the L1 entry in the file; entry 3 maps guest 0x30000.
    let l1 = be(&bytes, 40, 8);
    let l2 = be(&bytes, l1, 8) & 0x00ff_ffff_ffff_fe00;
    let entry = l2 + 3 * 8;
    let mut a = open(p);
    let s = hex_at(&mut a, entry + 5, 160, 40);
    let d = a.panes.hex.decoded(&a.ctx).unwrap();
    assert_eq!(
        d.structure,
        format!("L2 table at {l2:#x} (active L1 table[0])")
    );
    assert_eq!(d.item, "entry 3 (guest 0x30000)");
    assert_eq!((d.start.get(), d.end.get()), (entry, entry + 8));
    let raw = be(&bytes, entry, 8);
    assert_eq!(d.raw, Some(raw));
    assert_eq!(raw & 0x00ff_ffff_ffff_fe00, host);
    assert!(d.meaning.contains(&format!("{host:#x}")), "{}", d.meaning);
    assert!(s.contains("entry 3 (guest 0x30000)"), "{s}");
    // The field's bytes are highlighted, the cursor byte stands out.
    let b = draw(&mut a, 160, 40);
    let (x, y) = find(&b, &format!("{:08x}", entry / 16 * 16)).unwrap();
    let col = |i: u64| x + 10 + (i * 3 + i / 8) as u16;
    assert_eq!(b[(col(entry % 16), y)].bg, Color::Blue, "{}", text(&b));
    assert_eq!(b[(col((entry + 5) % 16), y)].bg, Color::White);
    // A refcount entry: the block named by refcount table entry 0, 16-bit
    // entries; the data cluster's count as stored in the file.
    let rt = be(&bytes, 48, 8);
    let block = be(&bytes, rt, 8) & !0x1ff;
    let cl = host >> 16;
    let s = hex_at(&mut a, block + 2 * cl + 1, 160, 40);
    let d = a.panes.hex.decoded(&a.ctx).unwrap();
    assert_eq!(d.item, format!("entry {cl} (16-bit)"));
    assert_eq!(d.raw, Some(be(&bytes, block + 2 * cl, 2)));
    assert_eq!(d.raw, Some(1));
    assert!(
        s.contains(&format!(
            "host cluster {cl} (offset {host:#x}) has refcount 1"
        )),
        "{s}"
    );
    // The refcount table's entry 0 names that block.
    hex_at(&mut a, rt + 2, 160, 40);
    let d = a.panes.hex.decoded(&a.ctx).unwrap();
    assert_eq!(d.item, "entry 0");
    assert!(
        d.meaning.contains(&format!("refcount block at {block:#x}")),
        "{}",
        d.meaning
    );
    // The data cluster itself is no metadata: the side panel says what it is.
    let s = hex_at(&mut a, host + 7, 160, 40);
    assert!(s.contains(&format!("host cluster {cl}: guest data")), "{s}");
}

#[test]
fn hex_rows_are_32_bytes_wide_and_16_at_80_columns_with_the_side_panel_below() {
    let mut a = app("demo-top.qcow2");
    let s = hex_at(&mut a, 0x28, 200, 40);
    assert!(s.contains("0e 0f  10 11"), "32 a row:\n{s}");
    assert!(s.contains("│00000020  "), "{s}");
    let side = s
        .lines()
        .find(|l| l.contains("field: l1_table_offset"))
        .unwrap();
    assert!(side.contains("│000000"), "beside the bytes:\n{s}");
    let s = screen(&mut a, 80, 24);
    assert!(!s.contains("0f  10"), "16 a row:\n{s}");
    assert!(s.contains("│00000020  "), "{s}");
    let side = s.lines().position(|l| l.contains("field: l1_table_offset"));
    let row = s.lines().position(|l| l.contains("│00000020"));
    assert!(side > row, "below the bytes:\n{s}");
    // Moving: a byte, a row of 16, a cluster.
    key(&mut a, KeyCode::Right);
    assert_eq!(a.panes.hex.cursor, 0x29);
    key(&mut a, KeyCode::Down);
    assert_eq!(a.panes.hex.cursor, 0x39);
    typed(&mut a, "]");
    assert_eq!(a.panes.hex.cursor, a.ctx.cluster_size());
    typed(&mut a, "[");
    assert_eq!(a.panes.hex.cursor, 0);
    typed(&mut a, "G");
    assert_eq!(a.panes.hex.cursor, a.ctx.file_len() - 1);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("the file ends at"), "{s}");
}

#[test]
fn slash_finds_bytes_and_text_and_n_repeats_it() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "16M"],
    );
    qemu_io(dir.path(), "a.qcow2", "write -P 0xde 0x200000 4k");
    let p = dir.path().join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    let first = bytes.windows(4).position(|w| w == [0xde; 4]).unwrap() as u64;
    let mut a = open(p);
    typed(&mut a, "9/\"QFI\"");
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    assert_eq!(a.panes.hex.cursor, 0);
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("\"QFI\" found at 0x0"), "{s}");
    typed(&mut a, "/de de de de");
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    assert_eq!(a.panes.hex.cursor, first);
    assert_eq!(a.panes.hex.mark, Some((first, first + 4)));
    typed(&mut a, "n");
    a.wait_background();
    assert_eq!(a.panes.hex.cursor, first + 1);
    typed(&mut a, "N");
    a.wait_background();
    assert_eq!(a.panes.hex.cursor, first);
    typed(&mut a, "/0xdeadbeef");
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    assert_eq!(a.panes.hex.cursor, first, "not found: the cursor stays");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("de ad be ef does not occur at or after"), "{s}");
    // The help lists the keys.
    typed(&mut a, "?");
    let s = screen(&mut a, 120, 60);
    assert!(s.contains("Find hex bytes"), "{s}");
}

#[test]
fn a_search_of_a_big_file_runs_in_the_background_and_esc_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 << 30).unwrap(); // sparse: 64 GiB of zeros to look through
    drop(f);
    let mut a = open(p);
    typed(&mut a, "9/\"not there\"");
    key(&mut a, KeyCode::Enter);
    assert!(a.panes.hex.searching());
    // Keys answer while it runs.
    key(&mut a, KeyCode::Right);
    assert_eq!(a.panes.hex.cursor, 1);
    let s = screen(&mut a, 160, 30);
    assert!(s.contains("searching for \"not there\""), "{s}");
    key(&mut a, KeyCode::Esc);
    assert!(!a.panes.hex.searching());
    assert_eq!(a.status, "search cancelled");
    let s = screen(&mut a, 160, 30);
    assert!(s.contains("search for \"not there\" cancelled at"), "{s}");
}

// ---- issue 11 item 2: a compressed entry's inflated guest data -------------------

#[test]
fn z_on_a_compressed_entry_shows_the_inflated_guest_cluster_as_qemu_reads_it() {
    for ctype in ["zlib", "zstd"] {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compression_type={ctype}"),
                "c.qcow2",
                "1M",
            ],
        );
        // A cluster of varied bytes, written compressed by QEMU.
        let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("pattern"), &pattern).unwrap();
        qemu_io(dir.path(), "c.qcow2", "write -c -s pattern 0x20000 64k");
        qemu_img(dir.path(), &["convert", "-O", "raw", "c.qcow2", "c.raw"]);
        let raw = std::fs::read(dir.path().join("c.raw")).unwrap();
        let want = &raw[0x20000..0x30000];
        assert_eq!(want, &pattern[..], "QEMU reads back what it wrote");
        let mut a = open(dir.path().join("c.qcow2"));
        typed(&mut a, "3");
        key(&mut a, KeyCode::Enter);
        key(&mut a, KeyCode::Down);
        key(&mut a, KeyCode::Down);
        typed(&mut a, "z");
        assert_eq!(a.pane, Pane::Hex, "{}", a.status);
        let src = a.panes.hex.src.clone().unwrap();
        assert_eq!(src.len(), 65536);
        let mut got = vec![0u8; 65536];
        qinspect::io::read_into(src.as_ref(), "t", qinspect::types::HostOffset(0), &mut got)
            .unwrap();
        assert_eq!(got, want, "{ctype}");
        let s = screen(&mut a, 160, 30);
        assert!(
            s.contains(&format!(
                "Hex — guest data of guest cluster 2 (0x20000), inflated ({ctype}) from host"
            )),
            "{s}"
        );
        assert!(s.contains("not a file of the chain"), "{s}");
        // Back to the entry; an entry that is not compressed says so.
        key(&mut a, KeyCode::Backspace);
        assert_eq!(a.pane, Pane::Tables);
        key(&mut a, KeyCode::Up);
        typed(&mut a, "z");
        assert_eq!(a.pane, Pane::Tables);
        assert!(a.status.contains("is not compressed"), "{}", a.status);
    }
}

// ---- issue 11 item 9: layers ------------------------------------------------------

#[test]
fn l_steps_tables_layout_and_hex_through_a_three_layer_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // base.raw ← mid.qcow2 ← top.qcow2, each with data of its own.
    let mut base = vec![0u8; 4 << 20];
    base[0x1000..0x1004].copy_from_slice(b"BASE");
    std::fs::write(d.join("base.raw"), &base).unwrap();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
        ],
    );
    qemu_io(d, "mid.qcow2", "write -P 0x4d 0x100000 64k");
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(d, "top.qcow2", "write -P 0x54 0 64k");
    let mid_map = Command::new("qemu-img")
        .args(["map", "--output=json", "mid.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    let mid_map: Vec<serde_json::Value> = serde_json::from_slice(&mid_map.stdout).unwrap();
    let mid_host = mid_map
        .iter()
        .find(|e| e["start"] == 0x100000 && e["depth"] == 0 && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("mid maps 0x100000");
    let mid = std::fs::read(d.join("mid.qcow2")).unwrap();
    let mid_l1 = be(&mid, 40, 8);

    let mut a = open(d.join("top.qcow2"));
    typed(&mut a, "3");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("layer 0: top.qcow2 · active L1 at"), "{s}");
    // L: layer 1, mid.qcow2, its own L1 table and L2 entries.
    typed(&mut a, "L");
    a.wait_background();
    assert!(a.status.contains("layer 1: mid.qcow2"), "{}", a.status);
    let s = screen(&mut a, 120, 30);
    assert!(
        s.contains(&format!("layer 1: mid.qcow2 · active L1 at {mid_l1:#x}")),
        "{s}"
    );
    key(&mut a, KeyCode::Enter);
    for _ in 0..16 {
        key(&mut a, KeyCode::Down);
    }
    let s = screen(&mut a, 160, 40);
    assert!(s.contains("layer 1: mid.qcow2 · L2 table at"), "{s}");
    assert!(
        s.contains(&format!("{mid_host:#x}")),
        "entry 16 maps guest 0x100000 where qemu-img map says:\n{s}"
    );
    typed(&mut a, "2");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("layer 1: mid.qcow2 · Layout of"), "{s}");
    typed(&mut a, "9");
    let s = screen(&mut a, 160, 30);
    assert!(s.contains("Hex — layer 1: mid.qcow2: 0x"), "{s}");
    assert!(s.contains("structure: header"), "{s}");
    // L: layer 2, the raw base: no tables, Hex shows its bytes.
    typed(&mut a, "L");
    a.wait_background();
    typed(&mut a, "3");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("┌ layer 2: base.raw · Tables "), "{s}");
    assert!(s.contains("layer 2: base.raw is a raw file"), "{s}");
    typed(&mut a, "2");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("┌ layer 2: base.raw · Layout "), "{s}");
    assert!(s.contains("layer 2: base.raw is a raw file"), "{s}");
    typed(&mut a, "9g0x1000");
    key(&mut a, KeyCode::Enter);
    let s = screen(&mut a, 160, 30);
    assert!(s.contains("Hex — layer 2: base.raw: 0x"), "{s}");
    assert!(s.contains("42 41 53 45"), "BASE at 0x1000:\n{s}");
    // L: back to the top.
    typed(&mut a, "L");
    a.wait_background();
    typed(&mut a, "3");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("layer 0: top.qcow2 · active L1"), "{s}");
    // The help names the key.
    typed(&mut a, "?");
    let s = screen(&mut a, 160, 80);
    assert!(s.contains("The next layer of the backing chain"), "{s}");
    key(&mut a, KeyCode::Esc);
    // A single file has no layers to step through.
    let mut b = app("demo-compressed.qcow2");
    typed(&mut b, "3L");
    assert!(b.status.contains("only layer"), "{}", b.status);
    let s = screen(&mut b, 120, 30);
    assert!(!s.contains("layer 0"), "{s}");
}

#[test]
fn a_reload_forgets_searches_and_hidden_rows_of_the_state_before() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "3");
    search(&mut a, "unallocated");
    assert!(a.panes.tables.l1.find.is_some());
    typed(&mut a, "u");
    assert!(a.panes.tables.l1.hidden.is_some());
    typed(&mut a, "r");
    a.wait_background();
    assert!(a.panes.tables.l1.find.is_none());
    assert!(a.panes.tables.l1.hidden.is_none());
    let s = screen(&mut a, 120, 40);
    assert!(!s.contains("matches for unallocated"), "{s}");
    assert!(!s.contains("hiding"), "{s}");
}

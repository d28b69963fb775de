//! The corpus of broken images: what every pane shows, against qemu-img's answer.

use super::*;

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
    let lines = crate::tui::panes::overview::lines(&a.ctx);
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

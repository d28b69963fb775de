//! Snapshot dates are shown as qemu-img shows them: local time, honouring `TZ`.

mod common;

use common::Work;
use std::process::Command;

/// Every `YYYY-MM-DD HH:MM:SS` in `text`, in order.
fn dates(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| {
            let (d, t) = (w[0].as_bytes(), w[1].as_bytes());
            d.len() == 10
                && d[4] == b'-'
                && d[7] == b'-'
                && t.len() == 8
                && t[2] == b':'
                && t[5] == b':'
                && d.iter()
                    .chain(t)
                    .all(|c| c.is_ascii_digit() || b"-:".contains(c))
        })
        .map(|w| format!("{} {}", w[0], w[1]))
        .collect()
}

fn run_in(w: &Work, tz: &str, prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .env("TZ", tz)
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{prog} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn snapshot_dates_match_qemu_img_in_every_zone() {
    let w = Work::new();
    w.qemu_img(&["create", "-f", "qcow2", "s.qcow2", "16M"]);
    w.qemu_img(&["snapshot", "-c", "summer", "s.qcow2"]);
    w.qemu_img(&["snapshot", "-c", "winter", "s.qcow2"]);
    // Fixed dates, one in summer time and one not: date_sec is at byte 16 of an entry.
    let img = qinspect::image::Qcow2::open(
        std::sync::Arc::new(qinspect::io::FileSource::open(&w.path("s.qcow2")).unwrap()),
        qinspect::image::Strictness::Qemu,
    )
    .unwrap();
    let entries: Vec<u64> = img
        .snapshots
        .snapshots
        .iter()
        .map(|s| s.entry_offset.get())
        .collect();
    assert_eq!(entries.len(), 2);
    w.patch("s.qcow2", entries[0] + 16, &1_690_000_000u32.to_be_bytes());
    w.patch("s.qcow2", entries[1] + 16, &1_700_000_000u32.to_be_bytes());

    let qinspect = env!("CARGO_BIN_EXE_qinspect");
    let mut seen = Vec::new();
    for tz in ["UTC", "America/New_York", "Asia/Kolkata"] {
        let qemu = dates(&run_in(&w, tz, "qemu-img", &["snapshot", "-l", "s.qcow2"]));
        assert_eq!(qemu.len(), 2, "qemu-img snapshot -l under TZ={tz}");
        let info = dates(&run_in(&w, tz, qinspect, &["info", "s.qcow2"]));
        assert_eq!(info, qemu, "qinspect info under TZ={tz}");
        let dump = dates(&run_in(&w, tz, qinspect, &["dump", "snapshots", "s.qcow2"]));
        assert_eq!(dump, qemu, "qinspect dump snapshots under TZ={tz}");
        seen.push(qemu);
    }
    assert_eq!(
        seen[0],
        ["2023-07-22 04:26:40", "2023-11-14 22:13:20"],
        "UTC"
    );
    assert_ne!(seen[0], seen[1], "New York is not UTC");
    assert_ne!(seen[0], seen[2], "Kolkata is not UTC");
    // JSON keeps QEMU's date-sec, whatever the zone.
    let j =
        Work::json(run_in(&w, "Asia/Kolkata", qinspect, &["info", "--json", "s.qcow2"]).as_bytes());
    assert_eq!(j["snapshots"][0]["date-sec"], 1_690_000_000u32);
    assert_eq!(j["snapshots"][1]["date-sec"], 1_700_000_000u32);
}

//! Inputs the fuzzer found (tests/regressions/*): each goes through the same path
//! as the fuzz target and must finish without a panic.

use qinspect::chain::{Chain, OpenOptions};
use qinspect::check::{CheckOptions, check};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{MemSource, SharedSource};
use qinspect::lookup::{ReadCache, read, trace};
use qinspect::simulate::{Op, simulate};
use qinspect::types::GuestOffset;
use std::path::Path;
use std::sync::Arc;

#[test]
fn fuzzer_findings_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let src: SharedSource = Arc::new(MemSource::new("regression.qcow2", data));
        let Ok(img) = Qcow2::open(src.clone(), Strictness::Lenient) else {
            continue;
        };
        let report = check(&img, &CheckOptions::default());
        let _ = report.exit_code();
        let opts = OpenOptions {
            strictness: Strictness::Lenient,
            ..Default::default()
        };
        if let Ok(chain) = Chain::from_source(src, Path::new("regression.qcow2"), &opts) {
            let _ = qinspect::map::map_range(&chain, GuestOffset(0), 1 << 30);
            let _ = trace(&chain, GuestOffset(0));
            let mut buf = vec![0u8; 64 << 10];
            let _ = read(&chain, GuestOffset(0), &mut buf, &mut ReadCache::default());
        }
        let ops = [
            Op::SnapshotCreate { name: "f".into() },
            Op::Write {
                offset: qinspect::types::GuestOffset(0),
                length: 4096,
                pattern: qinspect::simulate::DEFAULT_PATTERN,
            },
        ];
        let _ = simulate(&img, Path::new("regression.qcow2"), &ops).and_then(|s| s.image());
        n += 1;
    }
    assert!(n > 0, "no regression inputs were exercised");
}

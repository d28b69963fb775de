//! One target that walks all the way through: open, info, check, map, a trace
//! at an offset taken from the input, a read, and a simulated snapshot + write.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qinspect::chain::{Chain, OpenOptions};
use qinspect::check::{CheckOptions, check};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{MemSource, SharedSource};
use qinspect::lookup::{ReadCache, read, trace};
use qinspect::simulate::{Op, simulate};
use qinspect::types::GuestOffset;
use std::path::Path;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    // The last 8 bytes choose the guest offset to trace.
    let pick = data.len().checked_sub(8).map_or(0, |i| {
        u64::from_le_bytes(data[i..].try_into().unwrap_or([0; 8]))
    });
    let src: SharedSource = Arc::new(MemSource::new("fuzz.qcow2", data.to_vec()));
    let _ = Qcow2::open(src.clone(), Strictness::Qemu);
    let Ok(img) = Qcow2::open(src.clone(), Strictness::Lenient) else { return };
    let _ = qinspect::info::qemu_info_qcow2(&img, "fuzz.qcow2");
    let _ = check(&img, &CheckOptions::default());
    let opts = OpenOptions { strictness: Strictness::Lenient, ..Default::default() };
    if let Ok(chain) = Chain::from_source(src, Path::new("fuzz.qcow2"), &opts) {
        let _ = qinspect::map::map_range(&chain, 0, 1 << 30);
        let size = chain.size().max(1);
        let _ = trace(&chain, GuestOffset(pick % size));
        let mut buf = vec![0u8; 64 << 10];
        let _ = read(&chain, GuestOffset(pick % size), &mut buf, &mut ReadCache::default());
    }
    let ops = [Op::SnapshotCreate { name: "f".into() }, Op::Write { offset: qinspect::types::GuestOffset(pick % img.header.size.max(1)), length: 4096, pattern: 0xcd }];
    if let Ok(sim) = simulate(&img, Path::new("fuzz.qcow2"), &ops) {
        let _ = sim.image();
    }
});

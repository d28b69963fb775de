//! Thousands of byte mutations of real images, each run through the whole core
//! in-process: open (QEMU's rules and lenient), info, check, map, trace, read,
//! cluster roles and a simulated snapshot plus write. Nothing may panic.

use qinspect::chain::{Chain, OpenOptions};
use qinspect::check::{CheckOptions, check, clusters, role_map};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{MemSource, SharedSource};
use qinspect::lookup::{ReadCache, read, trace};
use qinspect::simulate::{Op, simulate};
use qinspect::types::GuestOffset;
use std::path::Path;
use std::sync::Arc;

/// A small deterministic generator (xorshift), so failures can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    let n = 1 + rng.below(8);
    for _ in 0..n {
        match rng.below(6) {
            // A byte in the header and extensions.
            0 | 1 => {
                let i = rng.below(512.min(b.len() as u64)) as usize;
                if let Some(x) = b.get_mut(i) {
                    *x = rng.next() as u8;
                }
            }
            // A header field set to an extreme value.
            2 => {
                let fields = [8usize, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64, 72, 96, 100];
                let f = fields[rng.below(fields.len() as u64) as usize];
                let v: u64 = match rng.below(4) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => 1 << rng.below(64),
                    _ => rng.next(),
                };
                let w = if [8, 24, 40, 48, 64, 72].contains(&f) {
                    8
                } else {
                    4
                };
                if b.len() >= f + w {
                    b[f..f + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
                }
            }
            // Anywhere (tables, snapshot table, refcount blocks, data).
            3 | 4 => {
                let i = rng.below(b.len() as u64) as usize;
                if let Some(x) = b.get_mut(i) {
                    *x ^= 1 << rng.below(8);
                }
            }
            // Truncation.
            _ => {
                let l = rng.below(b.len() as u64 + 1) as usize;
                b.truncate(l);
            }
        }
    }
    b
}

fn exercise(bytes: Vec<u8>, rng: &mut Rng) {
    let src: SharedSource = Arc::new(MemSource::new("mutant.qcow2", bytes));
    let _ = Qcow2::open(src.clone(), Strictness::Qemu);
    let Ok(img) = Qcow2::open(src.clone(), Strictness::Lenient) else {
        return;
    };
    let _ = qinspect::info::qemu_info_qcow2(&img, "mutant.qcow2");
    let _ = qinspect::info::extra_info(&img);
    let report = check(&img, &CheckOptions::default());
    let _ = report.exit_code();
    let cs = img.geometry().cluster_size();
    let n = img.file_len().div_ceil(cs);
    let _ = role_map(&img, 0, n.min(4096));
    let c = rng.below(n + 2);
    let _ = clusters(&img, c, c);
    if let Ok(chain) = Chain::from_source(
        src.clone(),
        Path::new("mutant.qcow2"),
        &OpenOptions {
            strictness: Strictness::Lenient,
            ..Default::default()
        },
    ) {
        let _ = qinspect::map::map_range(&chain, GuestOffset(0), 1 << 30);
        let size = chain.size().max(1);
        let g = rng.below(size);
        let _ = trace(&chain, GuestOffset(g));
        let mut buf = vec![0u8; 256 << 10];
        let _ = read(
            &chain,
            GuestOffset(g.min(size.saturating_sub(buf.len() as u64))),
            &mut buf,
            &mut ReadCache::default(),
        );
    }
    let w = rng.below(img.header.size.max(1));
    let ops = [
        Op::SnapshotCreate { name: "m".into() },
        Op::Write {
            offset: qinspect::types::GuestOffset(w),
            length: 4096,
            pattern: qinspect::simulate::DEFAULT_PATTERN,
        },
        Op::Discard {
            offset: qinspect::types::GuestOffset(0),
            length: 1 << 20,
        },
    ];
    if let Ok(after) = simulate(&img, Path::new("mutant.qcow2"), &ops).and_then(|sim| sim.image()) {
        let _ = check(&after, &CheckOptions::default());
    }
}

#[test]
fn thousands_of_mutations_never_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let seeds: Vec<(String, Vec<u8>)> = [
        "demo-top.qcow2",
        "demo-mid.qcow2",
        "demo-compressed.qcow2",
        "demo-zstd.qcow2",
        "demo-extl2.qcow2",
        "demo-corrupt.qcow2",
    ]
    .iter()
    .map(|n| (n.to_string(), std::fs::read(root.join(n)).unwrap()))
    .collect();
    let iterations: u64 = std::env::var("QINSPECT_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut panics = Vec::new();
    for i in 0..iterations {
        let (name, seed) = &seeds[(i % seeds.len() as u64) as usize];
        let state = rng.0;
        let mutant = mutate(seed, &mut rng);
        let mut inner = Rng(rng.next() | 1);
        if std::env::var_os("QINSPECT_MUTATION_TRACE").is_some() {
            eprintln!("iteration {i}");
            let _ = std::fs::write(
                std::env::temp_dir().join("qinspect-mutant-current.qcow2"),
                &mutant,
            );
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            exercise(mutant.clone(), &mut inner)
        }));
        if r.is_err() {
            let path = std::env::temp_dir().join(format!("qinspect-mutant-{i}.qcow2"));
            let _ = std::fs::write(&path, &mutant);
            panics.push(format!(
                "iteration {i} (seed image {name}, rng state {state:#x}) panicked; saved as {}",
                path.display()
            ));
        }
    }
    println!(
        "{iterations} mutations of {} seed images, {} panics",
        seeds.len(),
        panics.len()
    );
    assert!(panics.is_empty(), "{panics:#?}");
}

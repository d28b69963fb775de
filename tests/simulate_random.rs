//! A randomized differential test of the simulator against QEMU.
//!
//! Each scenario is a random starting image (every cluster size from 512 B to 2 MiB,
//! refcount widths 1 to 64 bits, compat 0.10 or 1.1, extended L2, lazy
//! refcounts, a backing file, compressed clusters (deflate or zstd), bitmaps,
//! snapshots, a grown disk; in two scenarios of five also a preallocated image,
//! an amend, a commit, a rebase, a crash with lazy refcounts or a shrink)
//! built with qemu-img/qemu-io, then a random sequence of operations,
//! each run by one real qemu-img or qemu-io process on a copy and simulated;
//! `sim_compare::compare` compares everything after every operation. One
//! scenario in five runs its operations on a throw-away overlay instead (over
//! the image, or over one of its snapshots), against a real overlay made by
//! `qemu-img create -b`.
//!
//! The scenarios come from proptest's seeded ChaCha generator, so a seed is a
//! scenario. `QINSPECT_SIM_SCENARIOS` (default 150) sets how many the test runs,
//! `QINSPECT_SIM_FIRST` the first seed, `QINSPECT_SIM_SEED` runs one and prints
//! it. A failing seed prints the command that reproduces it.

mod common;
mod sim_compare;
use common::Work;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use std::collections::BTreeMap;

/// A stream of random numbers drawn from proptest's generator for one seed.
struct Draw {
    values: Vec<u64>,
    at: usize,
}

impl Draw {
    fn new(seed: u64) -> Draw {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let mut runner = TestRunner::new_with_rng(Config::default(), rng);
        let values = proptest::collection::vec(proptest::num::u64::ANY, 512)
            .new_tree(&mut runner)
            .expect("value tree")
            .current();
        Draw { values, at: 0 }
    }
    /// 0..n.
    fn below(&mut self, n: u64) -> u64 {
        let v = self.values.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        if n == 0 { 0 } else { v % n }
    }
    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One scenario: how to build the image, and the operations.
#[derive(Debug)]
struct Scenario {
    create: Vec<String>,
    prep: Vec<Vec<String>>,
    ops: Vec<String>,
    /// Run the operations on a throw-away overlay (over a snapshot, or the
    /// image) instead of on the image.
    overlay: Option<Option<String>>,
}

fn scenario(seed: u64) -> Scenario {
    let mut d = Draw::new(seed);
    let mut cluster_bits = *d.pick(&[9u32, 9, 10, 12, 12, 14, 16, 16, 16, 17, 21]);
    let v3 = d.chance(80);
    let refcount_bits = if v3 {
        *d.pick(&[1u32, 2, 4, 8, 16, 16, 16, 32, 64])
    } else {
        16
    };
    let extended = v3 && cluster_bits >= 14 && d.chance(25);
    let lazy = v3 && d.chance(20);
    // The cluster sizes drawn above leave out 2, 8 and 32 KiB and 256 KiB to
    // 1 MiB: one seed in five takes one of those, from a stream of its own so
    // that the number of values drawn above stays what it was (16 KiB at
    // least with extended L2 entries, as QEMU asks).
    let mut other = Draw::new(seed ^ 0xc1b5_d000_0000_0000);
    if other.chance(20) {
        cluster_bits = if extended {
            *other.pick(&[15u32, 18, 19, 20])
        } else {
            *other.pick(&[11u32, 13, 15, 18, 19, 20])
        };
    }
    let cs = 1u64 << cluster_bits;
    let mib = *d.pick(&[0u64, 1, 1, 4, 16, 16, 64, 100, 1024]);
    let mut size = mib << 20;
    if d.chance(20) {
        size += d.below(64) * 512;
    }
    let backing = d.chance(20);
    let mut opts = vec![
        format!("cluster_size={cs}"),
        format!("compat={}", if v3 { "1.1" } else { "0.10" }),
    ];
    if v3 {
        opts.push(format!("refcount_bits={refcount_bits}"));
    }
    if extended {
        opts.push("extended_l2=on".into());
    }
    if lazy {
        opts.push("lazy_refcounts=on".into());
    }
    // zstd for compressed clusters, drawn from a stream of its own so that every
    // other choice of a seed stays what it was before zstd was drawn.
    if v3 && Draw::new(seed ^ 0x7a57_d000_0000_0000).chance(30) {
        opts.push("compression_type=zstd".into());
    }
    let mut create: Vec<String> = ["qemu-img", "create", "-q", "-f", "qcow2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if backing {
        create.extend([
            "-b".into(),
            "base.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
        ]);
    }
    create.extend([
        "-o".into(),
        opts.join(","),
        "img.qcow2".into(),
        size.to_string(),
    ]);

    // Offsets: cluster-aligned mostly, sometimes anywhere, sometimes at the end.
    let range = |d: &mut Draw, size: u64| -> (u64, u64) {
        let clusters = size.div_ceil(cs).max(1);
        let len = match d.below(4) {
            0 => cs,
            1 => (d.below(8) + 1) * cs,
            2 => (d.below(64) + 1) * 512,
            _ => (d.below(3 * cs / 512 + 1) + 1) * 512,
        };
        let off = match d.below(5) {
            0 => d.below(clusters) * cs,
            1 => d.below(clusters) * cs + d.below(cs / 512) * 512,
            2 => size.saturating_sub(len),
            3 => d.below(size.max(1) / 512) * 512,
            _ => d.below(4) * cs,
        };
        (off, len)
    };
    let io = |cmd: String| -> Vec<String> {
        vec![
            "qemu-io".into(),
            "-f".into(),
            "qcow2".into(),
            "-c".into(),
            cmd,
            "img.qcow2".into(),
        ]
    };
    let img = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["qemu-img".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let mut prep = Vec::new();
    let mut snaps: Vec<String> = Vec::new();
    let mut cur_size = size;
    for i in 0..d.below(6) {
        match d.below(9) {
            0..=2 if cur_size > 0 => {
                let (o, l) = range(&mut d, cur_size);
                if o + l <= cur_size {
                    prep.push(io(format!("write -P {} {o} {l}", 1 + i)));
                }
            }
            3 if cur_size >= cs => {
                // Compressed clusters (one whole cluster, aligned), with
                // extended L2 entries too.
                let o = d.below(cur_size / cs) * cs;
                prep.push(io(format!("write -c -P 7 {o} {cs}")));
            }
            4 if cur_size > 0 => {
                let (o, l) = range(&mut d, cur_size);
                if o + l <= cur_size {
                    prep.push(io(format!("discard {o} {l}")));
                }
            }
            5 | 6 => {
                let name = format!("p{i}");
                prep.push(img(&["snapshot", "-c", &name, "img.qcow2"]));
                snaps.push(name);
            }
            7 if v3 => {
                let g = *d.pick(&["64k", "512k", "4k"]);
                prep.push(img(&[
                    "bitmap",
                    "--add",
                    "-g",
                    g,
                    "img.qcow2",
                    &format!("b{i}"),
                ]));
            }
            8 => {
                let grow = (d.below(4) + 1) << 20;
                cur_size += grow;
                prep.push(img(&["resize", "-q", "img.qcow2", &cur_size.to_string()]));
            }
            _ => {}
        }
    }
    let mut ops = Vec::new();
    for i in 0..(2 + d.below(5)) {
        match d.below(15) {
            14 if cur_size >= 512 => {
                // One cluster per request, so every seed draws what it drew
                // before; a longer request, whose clusters QEMU places in the
                // order its compression threads finish, is compared in the
                // order the real run took (an overlay's smaller clusters
                // give such requests).
                let clusters = cur_size.div_ceil(cs);
                let o = if d.chance(90) {
                    d.below(clusters) * cs
                } else {
                    d.below(cur_size / 512).min(cur_size / 512 - 1) * 512
                };
                let l = cs.min(cur_size - o).max(512.min(cur_size - o));
                ops.push(format!("write-compressed:{o}:{l}"));
            }
            12 | 13 => {
                let (o, l) = range(&mut d, cur_size);
                let u = if d.chance(50) { ":unmap" } else { "" };
                ops.push(format!("write-zeroes:{o}:{l}{u}"));
            }
            11 => ops.push(format!("repair:{}", d.pick(&["leaks", "all"]))),
            10 => {
                let new = match d.below(3) {
                    0 => cur_size + ((d.below(8) + 1) << 20),
                    1 => cur_size / 2 / 512 * 512,
                    _ => d.below(cur_size / 512 + 1) * 512,
                };
                let shrink = d.chance(70);
                if new >= cur_size || shrink {
                    cur_size = new;
                }
                ops.push(format!(
                    "resize:{new}{}",
                    if shrink { ":shrink" } else { "" }
                ));
            }
            0..=2 => {
                let (o, l) = range(&mut d, cur_size);
                ops.push(format!("write:{o}:{l}"));
            }
            3 => {
                let (o, l) = range(&mut d, cur_size);
                ops.push(format!("read:{o}:{l}"));
            }
            4 | 5 => {
                let (o, l) = range(&mut d, cur_size);
                ops.push(format!("discard:{o}:{l}"));
            }
            6 | 7 => {
                let name = format!("s{i}");
                ops.push(format!("snapshot-create:{name}"));
                snaps.push(name);
            }
            8 => {
                let name = if snaps.is_empty() || d.chance(10) {
                    "1".to_string()
                } else {
                    d.pick(&snaps).clone()
                };
                ops.push(format!("snapshot-delete:{name}"));
            }
            _ => {
                let name = if snaps.is_empty() {
                    "nosuch".to_string()
                } else {
                    d.pick(&snaps).clone()
                };
                ops.push(format!("snapshot-apply:{name}"));
            }
        }
    }
    if backing {
        prep.insert(
            0,
            io("write -P 9 0 1M".into())
                .into_iter()
                .map(|a| a.replace("img.qcow2", "base.qcow2"))
                .collect(),
        );
        prep.insert(
            0,
            img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "base.qcow2",
                &size.to_string(),
            ]),
        );
    }
    // Images from the wild: what amend, commit, rebase, a crash and a shrink
    // leave behind, drawn from a stream of its own so that the image and the
    // operations drawn above stay what they were for each seed.
    let wild = wild_steps(seed, v3, lazy, backing, cs, cur_size);
    if wild.prealloc
        && let Some(o) = create.iter_mut().find(|a| a.starts_with("cluster_size="))
    {
        o.push_str(",preallocation=metadata");
    }
    prep.extend(wild.steps);
    // Drawn last, so the image and operations of a seed do not depend on it.
    let prep_snaps: Vec<String> = snaps
        .iter()
        .filter(|n| n.starts_with('p'))
        .cloned()
        .collect();
    let overlay = d
        .chance(20)
        .then(|| (!prep_snaps.is_empty() && d.chance(60)).then(|| d.pick(&prep_snaps).clone()));
    Scenario {
        create,
        prep,
        ops,
        overlay,
    }
}

/// The steps that make a starting image look like one from the wild.
struct Wild {
    /// `preallocation=metadata` at create (never with a backing file, which
    /// QEMU allows only with extended L2 entries).
    prealloc: bool,
    steps: Vec<Vec<String>>,
}

/// In two scenarios of five, one to three of: `qemu-img amend` of the
/// refcount width, the compat level or lazy refcounts; a `qemu-img commit`
/// of an overlay written into the image; a crash (qemu-io `abort`) after a
/// write with lazy refcounts, which leaves the image dirty; a safe `qemu-img
/// rebase` onto no backing file; a `qemu-img resize --shrink`. A step QEMU
/// refuses (an amend an image's features forbid, a shrink with snapshots)
/// leaves the image as it was, which is a starting image too.
fn wild_steps(seed: u64, v3: bool, lazy: bool, backing: bool, cs: u64, size: u64) -> Wild {
    let mut d = Draw::new(seed ^ 0x3117_d000_0000_0000);
    let mut wild = Wild {
        prealloc: false,
        steps: Vec::new(),
    };
    if !d.chance(40) {
        return wild;
    }
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|a| a.to_string()).collect() };
    wild.prealloc = !backing && size <= 1 << 30 && d.chance(25);
    let range = |d: &mut Draw| -> (u64, u64) {
        let len = ((d.below(4 * cs / 512) + 1) * 512).min(size);
        let off = d.below((size - len) / 512 + 1) * 512;
        (off, len)
    };
    let mut lazy = lazy;
    for _ in 0..=d.below(3) {
        match d.below(7) {
            // QEMU's amend of the refcount width takes time that grows with
            // the square of the cluster size (a second with 64 KiB clusters,
            // minutes with 2 MiB ones).
            0 if v3 && cs <= 16384 => {
                let bits = d.pick(&[1u32, 2, 4, 8, 16, 32, 64]);
                wild.steps.push(s(&[
                    "qemu-img",
                    "amend",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("refcount_bits={bits}"),
                    "img.qcow2",
                ]));
            }
            1 => {
                let compat = if v3 { "0.10" } else { "1.1" };
                wild.steps.push(s(&[
                    "qemu-img",
                    "amend",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("compat={compat}"),
                    "img.qcow2",
                ]));
            }
            2 if v3 => {
                lazy = !lazy;
                let on = if lazy { "on" } else { "off" };
                wild.steps.push(s(&[
                    "qemu-img",
                    "amend",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("lazy_refcounts={on}"),
                    "img.qcow2",
                ]));
            }
            3 if size > 0 => {
                let (o, l) = range(&mut d);
                wild.steps.push(s(&[
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "img.qcow2",
                    "-F",
                    "qcow2",
                    "ov0.qcow2",
                ]));
                wild.steps.push(s(&[
                    "qemu-io",
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("write -P 5 {o} {l}"),
                    "ov0.qcow2",
                ]));
                wild.steps
                    .push(s(&["qemu-img", "commit", "-q", "-f", "qcow2", "ov0.qcow2"]));
            }
            4 if v3 && size > 0 => {
                // The crash: lazy refcounts on, a write, then abort() before
                // the refcounts reach the file (no core file is written).
                let (o, l) = range(&mut d);
                wild.steps.push(s(&[
                    "qemu-img",
                    "amend",
                    "-f",
                    "qcow2",
                    "-o",
                    "lazy_refcounts=on",
                    "img.qcow2",
                ]));
                lazy = true;
                wild.steps.push(s(&[
                    "sh",
                    "-c",
                    &format!(
                        "ulimit -c 0; qemu-io -f qcow2 -c 'write -P 6 {o} {l}' -c abort img.qcow2; true"
                    ),
                ]));
            }
            5 if backing => {
                wild.steps.push(s(&[
                    "qemu-img",
                    "rebase",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "",
                    "img.qcow2",
                ]));
            }
            6 if size > 0 => {
                let new = d.below(size / 512) * 512;
                wild.steps.push(s(&[
                    "qemu-img",
                    "resize",
                    "-q",
                    "-f",
                    "qcow2",
                    "--shrink",
                    "img.qcow2",
                    &new.to_string(),
                ]));
            }
            _ => {}
        }
    }
    wild
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Exact,
    Refused(String),
    Wrong(String),
    /// QEMU could not build the starting image (an impossible combination).
    Skipped,
}

fn run(seed: u64) -> Outcome {
    let s = scenario(seed);
    let w = Work::new();
    let mut steps = Vec::new();
    // The base image first (when there is one), then the image.
    let (before, after): (Vec<_>, Vec<_>) = s
        .prep
        .iter()
        .partition(|c| c.iter().any(|a| a == "base.qcow2"));
    steps.extend(before.into_iter().cloned());
    steps.push(s.create.clone());
    steps.extend(after.into_iter().cloned());
    for cmd in &steps {
        let (ok, _) = sim_compare::run_qemu(w.dir.path(), cmd);
        if !ok && cmd.iter().any(|a| a == "create") {
            return Outcome::Skipped;
        }
    }
    // Over a snapshot the real overlay's base is `qemu-img convert -l` of it,
    // whose clusters are laid out anew: a partial-cluster write-zeroes asks the
    // base whether the rest of the cluster reads as zeros, and the converted
    // copy can answer differently from the snapshot qemu-nbd -l would show.
    // Such scenarios leave write-zeroes out.
    let ops: Vec<&str> = s
        .ops
        .iter()
        .map(String::as_str)
        .filter(|o| !(matches!(s.overlay, Some(Some(_))) && o.starts_with("write-zeroes")))
        .collect();
    let result = match &s.overlay {
        None => sim_compare::compare(w.dir.path(), "img.qcow2", &ops),
        Some(snap) => {
            // qemu-nbd -s [-l SNAP] in the simulator; for real, an overlay made
            // by qemu-img create -b over the image (or its snapshot, converted).
            let before = w.fingerprint("img.qcow2");
            let base = match snap {
                Some(sn) => {
                    let (ok, _) = sim_compare::run_qemu(
                        w.dir.path(),
                        &[
                            "qemu-img",
                            "convert",
                            "-O",
                            "qcow2",
                            "-l",
                            sn,
                            "img.qcow2",
                            "snap.qcow2",
                        ]
                        .map(String::from),
                    );
                    if !ok {
                        return Outcome::Skipped;
                    }
                    "snap.qcow2"
                }
                None => "img.qcow2",
            };
            let (ok, _) = sim_compare::run_qemu(
                w.dir.path(),
                &[
                    "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                    "ov.qcow2",
                ]
                .map(String::from),
            );
            if !ok {
                return Outcome::Skipped;
            }
            let img = match sim_compare::open_path(&w.path("img.qcow2")) {
                Ok(i) => i,
                Err(e) => return Outcome::Wrong(format!("cannot open the image: {e}")),
            };
            match qinspect::simulate::Sim::overlay(&img, &w.path("img.qcow2"), snap.as_deref()) {
                Err(e) => Err(format!("Sim::new: {e}")),
                Ok(sim) => sim_compare::compare_sim(w.dir.path(), sim, "ov.qcow2", &ops, &ops)
                    .and_then(|sim| {
                        if w.fingerprint("img.qcow2") == before {
                            Ok(sim)
                        } else {
                            Err("the image under the overlay changed".into())
                        }
                    }),
            }
        }
    };
    match result {
        Ok(_) => Outcome::Exact,
        Err(e) if e.contains("refused: ") || e.starts_with("Sim::new") => {
            Outcome::Refused(e.split("not simulated: ").last().unwrap_or(&e).to_string())
        }
        Err(e) => Outcome::Wrong(e),
    }
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_scenarios_match_qemu() {
    let seeds: Vec<u64> = match env("QINSPECT_SIM_SEED") {
        Some(s) => {
            println!("{:#?}", scenario(s));
            println!("{:?}", &Draw::new(s).values[..12]);
            vec![s]
        }
        None => {
            let first = env("QINSPECT_SIM_FIRST").unwrap_or(0);
            let n = env("QINSPECT_SIM_SCENARIOS").unwrap_or(150);
            (first..first + n).collect()
        }
    };
    let mut exact = 0;
    let mut skipped = 0;
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut wrong = Vec::new();
    for &seed in &seeds {
        match run(seed) {
            Outcome::Exact => exact += 1,
            Outcome::Skipped => skipped += 1,
            Outcome::Refused(why) => {
                // Group by the reason's first words (the numbers vary).
                let key: String = why
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(90)
                    .collect();
                *refused.entry(key).or_default() += 1;
            }
            Outcome::Wrong(e) => {
                println!(
                    "seed {seed} is wrong: {e}\n  reproduce: QINSPECT_SIM_SEED={seed} cargo test --release --test simulate_random -- --nocapture"
                );
                wrong.push(seed);
            }
        }
    }
    let total = seeds.len() as u64 - skipped;
    println!(
        "scenarios {total} (seeds {}..={}), exact {exact}, refused {}, wrong {}",
        seeds.first().unwrap_or(&0),
        seeds.last().unwrap_or(&0),
        refused.values().sum::<u64>(),
        wrong.len()
    );
    for (why, n) in &refused {
        println!("  refused {n}: {why}");
    }
    assert!(exact > 0 || seeds.len() == 1, "no scenario ran");
    assert!(wrong.is_empty(), "wrong seeds: {wrong:?}");
}

//! Compressed writes (`qemu-io -c 'write -c'`) on images whose compression type
//! is zstd: the frame sizes qinspect computes against the frames qemu-io really
//! writes, for many kinds of data, and whole scenarios compared with real
//! qemu-io operation by operation (see `sim_compare`).

mod common;
mod sim_compare;
use common::Work;
use qinspect::compress::compress;
use qinspect::header::CompressionType;
use sim_compare::compare;

fn ok(w: &Work, image: &str, ops: &[&str]) -> qinspect::simulate::Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{e}"))
}

fn create(w: &Work, name: &str, opts: &str, size: &str) {
    let o = if opts.is_empty() {
        "compression_type=zstd".to_string()
    } else {
        format!("compression_type=zstd,{opts}")
    };
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, name, size]);
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The length of the zstd frame at the start of `b`, read from its header and
/// block headers (RFC 8878, section 3.1.1).
fn frame_len(b: &[u8]) -> usize {
    assert_eq!(&b[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
    let fhd = b[4];
    let single = fhd & 0x20 != 0;
    let fcs = match fhd >> 6 {
        0 => usize::from(single),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let dict = [0, 1, 2, 4][usize::from(fhd & 3)];
    let mut at = 5 + usize::from(!single) + dict + fcs;
    loop {
        let h = u32::from(b[at]) | u32::from(b[at + 1]) << 8 | u32::from(b[at + 2]) << 16;
        let size = (h >> 3) as usize;
        at += 3 + if (h >> 1) & 3 == 1 { 1 } else { size };
        if h & 1 == 1 {
            break;
        }
    }
    if fhd & 4 != 0 {
        at += 4;
    }
    at
}

/// What qemu-io did with guest cluster 0 of `image`: `Some(frame length)` when
/// it is compressed, `None` when it was written as an ordinary cluster.
fn cluster0(w: &Work, image: &str, cluster_bits: u32) -> Option<usize> {
    let f = std::fs::read(w.path(image)).unwrap();
    let l1 = be64(&f, 40) as usize;
    let l2 = (be64(&f, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(&f, l2);
    assert_ne!(entry, 0, "{image}: guest cluster 0 is allocated");
    if entry & (1 << 62) == 0 {
        return None;
    }
    let x = 62 - (cluster_bits - 8);
    let host = (entry & ((1u64 << x) - 1)) as usize;
    Some(frame_len(&f[host..]))
}

fn xorshift(seed: u64) -> impl FnMut() -> u8 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 24) as u8
    }
}

/// Clusters of many kinds: uniform, zeros, noise, text-like, mostly zero with a
/// few bytes set, halves of noise and pattern, short periods, and noise whose
/// tail is constant, in steps that cross the point where the frame stops fitting
/// in a cluster less one byte.
fn samples(cs: usize) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = Vec::new();
    v.push(("0xcd".into(), vec![0xcd; cs]));
    v.push(("zeros".into(), vec![0; cs]));
    let mut r = xorshift(cs as u64);
    v.push(("noise".into(), (0..cs).map(|_| r()).collect()));
    let words = [
        "qcow2 ",
        "cluster ",
        "refcount ",
        "table ",
        "the ",
        "of ",
        "image\n",
        "snapshot ",
        "L2 ",
        "entry ",
        "a ",
        "is ",
    ];
    let mut text = Vec::new();
    let mut r = xorshift(7);
    while text.len() < cs {
        text.extend_from_slice(words[usize::from(r()) % words.len()].as_bytes());
    }
    text.truncate(cs);
    v.push(("text".into(), text));
    let mut sparse = vec![0u8; cs];
    let mut r = xorshift(11);
    for i in (0..cs).step_by(97) {
        sparse[i] = r();
    }
    v.push(("mostly zero".into(), sparse));
    let mut half: Vec<u8> = (0..cs / 2).map(|_| r()).collect();
    half.resize(cs, 0x5a);
    v.push(("half noise".into(), half));
    v.push((
        "period 3".into(),
        (0..cs).map(|i| [1u8, 2, 3][i % 3]).collect(),
    ));
    v.push(("counter".into(), (0..cs).map(|i| (i / 16) as u8).collect()));
    for tail in [0usize, 8, 16, 24, 32, 40, 48, 64, 96, 128, 256] {
        let mut r = xorshift(3);
        let mut d: Vec<u8> = (0..cs - tail.min(cs)).map(|_| r()).collect();
        d.resize(cs, 0);
        v.push((format!("noise then {tail} zeros"), d));
    }
    v
}

/// The zstd frame sizes, and whether a cluster is compressed at all, equal what
/// qemu-io writes, for every kind of data and every cluster size.
#[test]
fn zstd_frame_sizes_equal_qemus() {
    let w = Work::new();
    let mut checked = 0;
    let mut fallbacks = 0;
    let mut wrong = Vec::new();
    for (bits, cs) in [(9u32, "512"), (12, "4k"), (16, "64k"), (21, "2M")] {
        let size = 1usize << bits;
        for (i, (what, data)) in samples(size).into_iter().enumerate() {
            let img = format!("s{bits}-{i}.qcow2");
            let src = format!("s{bits}-{i}.bin");
            std::fs::write(w.path(&src), &data).unwrap();
            create(&w, &img, &format!("cluster_size={cs}"), "4M");
            w.qemu_io(&img, &[&format!("write -c -s {src} 0 {size}")]);
            let ours = compress(CompressionType::Zstd, &data, size - 1)
                .unwrap()
                .map(|f| f.len());
            let real = cluster0(&w, &img, bits);
            if ours != real {
                wrong.push(format!(
                    "cluster size {cs}, {what}: {ours:?}, qemu-io {real:?}"
                ));
            }
            checked += 1;
            fallbacks += usize::from(real.is_none());
        }
    }
    assert!(
        wrong.is_empty(),
        "libzstd {}:\n{}",
        qinspect::compress::zstd_library_version(),
        wrong.join("\n")
    );
    // Both outcomes were seen: clusters compressed and clusters written as they are.
    assert!(
        fallbacks > 0 && fallbacks < checked,
        "{fallbacks} of {checked}"
    );
    eprintln!(
        "{checked} clusters, {fallbacks} written uncompressed, libzstd {}",
        qinspect::compress::zstd_library_version()
    );
}

/// `write-compressed` on zstd images, every cluster size: placement after other
/// compressed clusters in the same host cluster, next to ordinary clusters,
/// patterns, a refused write over an allocated cluster, and the zero-padded last
/// cluster of a disk that ends inside one.
#[test]
fn zstd_compressed_writes_are_placed_as_qemu_places_them() {
    let w = Work::new();
    for (i, (cs, c)) in [
        ("512", 512u64),
        ("4k", 4096),
        ("64k", 65536),
        ("2M", 2 << 20),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}.qcow2");
        create(&w, &name, &format!("cluster_size={cs}"), "16M");
        let ops = [
            format!("write-compressed:0:{c}"),
            format!("write-compressed:{}:{c}:P=0x11", 4 * c),
            format!("write:{}:{}", 2 * c, c),
            format!("write-compressed:{}:{c}:P=0", 3 * c),
            format!("write-compressed:{}:{c}:P=0xab", 5 * c),
            format!("write-compressed:{}:{c}", 6 * c),
            // Over an allocated cluster: EIO, nothing changes.
            format!("write-compressed:{}:{c}", 2 * c),
        ];
        let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
        let sim = ok(&w, &name, &ops);
        let compressed = sim
            .allocated
            .iter()
            .filter(|a| a.2.starts_with("compressed data"))
            .count();
        assert_eq!(compressed, 5, "cluster size {cs}");
    }
    // A disk ending inside a cluster: the last one is padded with zeros.
    create(&w, "e.qcow2", "", "1000000");
    ok(
        &w,
        "e.qcow2",
        &[
            "write-compressed:983040:16960:P=0x77",
            "write-compressed:4096:65536",
        ],
    );
}

/// Over a backing file (deflate below, zstd on top), and after a snapshot whose
/// L2 table the write must copy first.
#[test]
fn zstd_compressed_writes_over_a_backing_file_and_a_snapshot() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "8M"]);
    w.qemu_io("b.qcow2", &["write -P 0x11 0 1M", "write -c 2M 64k"]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        "t.qcow2",
    ]);
    w.qemu_io("t.qcow2", &["write -P 0x22 64k 4k"]);
    ok(
        &w,
        "t.qcow2",
        &[
            "write-compressed:0:65536:P=0x33",
            "write-compressed:2097152:65536",
            "write-compressed:3145728:65536:P=0",
        ],
    );
    create(&w, "s.qcow2", "cluster_size=4k", "8M");
    w.qemu_io("s.qcow2", &["write -c 0 4k", "write 8k 4k"]);
    w.qemu_img(&["snapshot", "-c", "s", "s.qcow2"]);
    ok(
        &w,
        "s.qcow2",
        &[
            "write-compressed:16384:4096:P=0x44",
            "write-compressed:4096:4096",
        ],
    );
}

/// One request of several clusters: their frames share host clusters (each
/// host cluster's refcount counts the frames in it). QEMU compresses them in
/// worker threads and places each as its thread ends, so which guest cluster
/// names which frame varies from run to run: the L2 entries are compared as a
/// set; everything else, and the guest bytes, exactly.
#[test]
fn zstd_clusters_of_one_request_share_host_clusters() {
    use sim_compare::{
        guest_matches, meta, open_path, parse_op, qemu_check, qemu_command, run_qemu,
    };
    let w = Work::new();
    for (cs, c, len) in [
        ("512", 512u64, 8 * 512u64),
        ("4k", 4096, 32768),
        ("64k", 65536, 1 << 20),
    ] {
        let name = format!("m{cs}.qcow2");
        create(&w, &name, &format!("cluster_size={cs}"), "8M");
        w.qemu_io(&name, &[&format!("write -c 0 {c}")]);
        let copy = format!("{name}.qemu");
        std::fs::copy(w.path(&name), w.path(&copy)).unwrap();
        let img = open_path(&w.path(&name)).unwrap();
        let mut sim = qinspect::simulate::Sim::new(&img, &w.path(&name)).unwrap();
        let op = format!("write-compressed:{}:{len}:P=0x5a", 2 * c);
        let (ran, line) = run_qemu(w.dir.path(), &qemu_command(&op, &copy));
        assert!(ran, "{line}");
        sim.apply(&parse_op(&op));
        assert_eq!(sim.records[0].error, None);
        let simulated = sim.image().unwrap();
        let real = open_path(&w.path(&copy)).unwrap();
        assert_eq!(sim.file_len(), real.file_len(), "{cs}: file end");
        let upto = sim.file_len();
        let (mut a, mut b) = (meta(&simulated, upto).unwrap(), meta(&real, upto).unwrap());
        for m in [&mut a, &mut b] {
            // Guest indices and descriptors each sorted: the same sets.
            for entries in m.l2.values_mut() {
                let mut at: Vec<u64> = entries.iter().map(|e| e.0).collect();
                let mut named: Vec<(u64, u64)> = entries.iter().map(|e| (e.1, e.2)).collect();
                at.sort_unstable();
                named.sort_unstable();
                *entries = at
                    .into_iter()
                    .zip(named)
                    .map(|(i, (d, x))| (i, d, x))
                    .collect();
            }
        }
        assert_eq!(a, b, "{cs}");
        // The new frames are packed: fewer host clusters than guest clusters.
        let frames = len / c;
        let shared = a.refcounts.iter().filter(|(_, r)| *r > 1).count();
        assert!(shared >= 1, "{cs}: {:?}", a.refcounts);
        let new_clusters = sim
            .allocated
            .iter()
            .filter(|x| x.2.starts_with("compressed"))
            .count();
        assert_eq!(
            new_clusters as u64, frames,
            "{cs}: one allocation per frame"
        );
        assert_eq!(qemu_check(w.dir.path(), &copy), (0, 0, 0));
        guest_matches(w.dir.path(), &mut sim, &copy).unwrap();
    }
}

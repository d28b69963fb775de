//! Hostile bitmap directories: the directory entries QEMU's open refuses (the
//! same refusal as `qemu-img info`), and directories of many entries naming one
//! table or overlapping tables, which must cost a bounded number of bytes read.

mod common;
use common::Work;
use qinspect::check::{CheckOptions, Refusal, check};
use qinspect::error::{CorruptKind, Error};
use qinspect::header::ExtensionKind;
use qinspect::image::{Qcow2, Strictness, TABLE_READ_BUDGET};
use qinspect::io::{MemSource, Source};
use qinspect::locate::Structures;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// An in-memory file that counts the bytes read from it.
#[derive(Debug)]
struct Counting {
    inner: MemSource,
    read: AtomicU64,
}

impl Source for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn name(&self) -> &Path {
        self.inner.name()
    }
}

fn counting(p: &Path) -> Arc<Counting> {
    Arc::new(Counting {
        inner: MemSource::new(p, std::fs::read(p).unwrap()),
        read: AtomicU64::new(0),
    })
}

fn read_so_far(c: &Counting) -> u64 {
    c.read.load(Ordering::Relaxed)
}

/// Offset of the bitmaps extension and of the directory of `image`.
fn bitmaps_ext(w: &Work, image: &str) -> (u64, u64) {
    let src = Arc::new(qinspect::io::FileSource::open(&w.path(image)).unwrap());
    let img = Qcow2::open(src, Strictness::Lenient).unwrap();
    img.extensions
        .iter()
        .find_map(|e| match e.kind {
            ExtensionKind::Bitmaps {
                directory_offset, ..
            } => Some((e.offset.get(), directory_offset.get())),
            _ => None,
        })
        .unwrap()
}

/// Bits per table entry's cluster of bitmap data, at 512 bytes a bit: a disk
/// of `disk` bytes needs this many 512-byte-granularity table entries.
fn entries_for(disk: u64, cs: u64) -> u32 {
    (disk / 512 / (cs * 8)) as u32
}

/// An image of `disk` bytes with `cs`-byte clusters and one bitmap made by
/// qemu-img, then `area` bytes of zeros for tables at the next cluster (its
/// offset is returned) and a directory after them with one entry per `(table
/// offset in the area, table size)`, named b0, b1, ..., each of 512-byte
/// granularity; the extension points at it. QEMU's checks of the entries and
/// of the table sizes pass when the tables are `entries_for(disk, cs)` long.
fn hostile(w: &Work, image: &str, disk: &str, cs: u64, area: u64, tables: &[(u64, u32)]) -> u64 {
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cs}"),
        image,
        disk,
    ]);
    w.qemu_img(&["bitmap", "--add", image, "b0"]);
    let (ext, _) = bitmaps_ext(w, image);
    let mut file = std::fs::read(w.path(image)).unwrap();
    let start = (file.len() as u64).div_ceil(cs) * cs;
    let dir_at = (start + area).div_ceil(cs) * cs;
    let mut dir = Vec::new();
    for (i, (off, size)) in tables.iter().enumerate() {
        let name = format!("b{i}");
        dir.extend_from_slice(&(start + off).to_be_bytes());
        dir.extend_from_slice(&size.to_be_bytes());
        dir.extend_from_slice(&2u32.to_be_bytes()); // auto
        dir.push(1); // dirty tracking
        dir.push(9); // 512-byte granularity
        dir.extend_from_slice(&(name.len() as u16).to_be_bytes());
        dir.extend_from_slice(&0u32.to_be_bytes());
        dir.extend_from_slice(name.as_bytes());
        dir.resize(dir.len().div_ceil(8) * 8, 0);
    }
    file.resize(dir_at as usize, 0);
    file.extend_from_slice(&dir);
    file.resize(file.len().div_ceil(cs as usize) * cs as usize, 0);
    let ext = ext as usize;
    file[ext + 8..ext + 12].copy_from_slice(&(tables.len() as u32).to_be_bytes());
    file[ext + 16..ext + 24].copy_from_slice(&(dir.len() as u64).to_be_bytes());
    file[ext + 24..ext + 32].copy_from_slice(&dir_at.to_be_bytes());
    std::fs::write(w.path(image), &file).unwrap();
    start
}

/// 65535 entries, each naming the same table of QEMU's largest size for 64 KiB
/// clusters (8192 entries, 64 KiB, for a 2 TiB disk): read one by one that is
/// 4 GiB; the open reads the table once, and locate and check read none of it
/// again.
#[test]
fn many_entries_naming_one_table_read_it_once() {
    let w = Work::new();
    let n = entries_for(2 << 40, 65536);
    assert_eq!(n, 8192);
    let tables = vec![(0u64, n); 65535];
    hostile(&w, "shared.qcow2", "2T", 65536, 65536, &tables);
    let src = counting(&w.path("shared.qcow2"));
    let file_len = src.len();
    let img = Qcow2::open(src.clone(), Strictness::Qemu).unwrap();
    assert_eq!(img.bitmap_tables.bytes_read(), 65536);
    let opened = read_so_far(&src);
    // The header, cluster 0, the L1 table, the 2 MiB directory and the table.
    assert!(opened < file_len + (1 << 20), "{opened} of {file_len}");
    for i in [0, 1, 65534] {
        let t = img.bitmap_tables.table(i).unwrap();
        assert_eq!(t.len(), 8192);
        assert!(t.first_invalid().is_none());
    }

    // locate lists the tables but goes through at most MAX_REGIONS entries:
    // 128 tables of 8192, not all 65535.
    let s = Structures::of(&img);
    assert!(s.truncated);
    let located = read_so_far(&src) - opened;
    assert!(located < 1 << 20, "locate read {located} bytes");

    // check counts every table (as qemu-img check would) from what the open read.
    let before = read_so_far(&src);
    let r = check(&img, &CheckOptions::default());
    assert!(r.aborted.is_none(), "{:?}", r.aborted);
    // The 8 MiB active L1 table of the 2 TiB disk, which check reads for
    // itself, and none of the 17 MiB of tables.
    let checked = read_so_far(&src) - before;
    assert!(checked < (9 << 20), "check read {checked} bytes");
}

/// 4096 tables of 1 MiB (QEMU's largest for 4 KiB clusters, for a 2 TiB
/// disk), each one cluster after the last, so that they overlap: 4 GiB read
/// one by one, the 17 MiB they span together read once; check goes through a
/// bounded number of their entries.
#[test]
fn overlapping_tables_are_read_once() {
    let w = Work::new();
    let n = 4096u64;
    let entries = entries_for(2 << 40, 4096);
    assert_eq!(entries, 1 << 17);
    let span = (n - 1) * 4096 + u64::from(entries) * 8;
    let tables: Vec<(u64, u32)> = (0..n).map(|k| (k * 4096, entries)).collect();
    hostile(&w, "chain.qcow2", "2T", 4096, span, &tables);
    let src = counting(&w.path("chain.qcow2"));
    let img = Qcow2::open(src.clone(), Strictness::Qemu).unwrap();
    assert_eq!(img.bitmap_tables.bytes_read(), span);
    let opened = read_so_far(&src);
    // And the 8 MiB L1 table of the 2 TiB disk.
    assert!(opened < span + (10 << 20), "{opened} for a span of {span}");
    let t = img.bitmap_tables.table(4095).unwrap();
    assert_eq!(t.offset.get() % 4096, 0);
    assert_eq!(t.len(), u64::from(entries));
    // Together the tables hold 2^29 entries: check goes through 2^26 of them
    // (512 tables) and stops at the next bitmap, saying so.
    let before = read_so_far(&src);
    let r = check(&img, &CheckOptions::default());
    assert!(
        matches!(&r.aborted, Some(Refusal::BitmapTablesNotRead { name, .. }) if name == "b512"),
        "{:?}",
        r.aborted
    );
    // The 8 MiB active L1 table of the 2 TiB disk, which check reads for
    // itself, and none of the 17 MiB of tables.
    let checked = read_so_far(&src) - before;
    assert!(checked < (9 << 20), "check read {checked} bytes");
}

/// 65 tables of 1 MiB that do not overlap: the first 64 fill the budget, the
/// last is not read; the open says what it did not look at and check stops
/// there instead of counting without it.
#[test]
fn tables_past_the_budget_are_not_read() {
    let w = Work::new();
    let entries = entries_for(2 << 40, 4096);
    let size = u64::from(entries) * 8;
    let tables: Vec<(u64, u32)> = (0..65).map(|k| (k * size, entries)).collect();
    hostile(&w, "many.qcow2", "2T", 4096, 65 * size, &tables);
    let src = counting(&w.path("many.qcow2"));
    let img = Qcow2::open(src.clone(), Strictness::Qemu).unwrap();
    assert_eq!(img.bitmap_tables.bytes_read(), TABLE_READ_BUDGET);
    assert!(read_so_far(&src) < TABLE_READ_BUDGET + (10 << 20));
    for i in 0..64 {
        assert!(img.bitmap_tables.table(i).is_ok(), "{i}");
    }
    assert!(matches!(
        img.bitmap_tables.table(64),
        Err(Error::Unsupported { .. })
    ));
    assert!(
        img.notes.iter().any(|n| n.contains("bitmap 'b64'")),
        "{:?}",
        img.notes
    );
    let r = check(&img, &CheckOptions::default());
    assert!(
        matches!(&r.aborted, Some(Refusal::BitmapTablesNotRead { name, .. }) if name == "b64"),
        "{:?}",
        r.aborted
    );
}

/// What `qemu-img info` says after "Could not open 'IMAGE': ", or None if it opens.
fn qemu_refusal(w: &Work, image: &str) -> Option<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", image])
        .current_dir(w.dir.path())
        .output()
        .unwrap();
    if out.status.success() {
        return None;
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let prefix = format!("qemu-img: Could not open '{image}': ");
    Some(err.strip_prefix(&prefix).unwrap_or(&err).to_string())
}

/// Directory entries QEMU's open refuses before reading any table (a table
/// over 512 MiB of bits, and the other constraints of its `check_dir_entry`),
/// and two it accepts: qinspect refuses the same ones, with QEMU's words, naming
/// the entry and its offset; `qemu-img check` fails at the same open.
#[test]
fn directory_entries_refused_as_qemu_info_refuses_them() {
    let w = Work::new();
    // Entry 1 (b1) of a 64 MiB image with two bitmaps: field offset, bytes.
    let cases: &[(&str, u64, &[u8], bool)] = &[
        // 8193 entries of 64 KiB clusters: 0x20010000 bytes, over 0x20000000.
        ("phys", 8, &[0, 0, 0x20, 0x01], true),
        // Exactly 0x20000000 passes the directory check, but QEMU then finds
        // the table larger than the disk needs when it loads the bitmap.
        ("phys-max", 8, &[0, 0, 0x20, 0x00], true),
        ("size0", 8, &[0, 0, 0, 0], true),
        ("off0", 0, &[0; 8], true),
        ("unaligned", 6, &[0x02, 0x00], true),
        ("gran8", 17, &[8], true),
        ("gran32", 17, &[32], true),
        ("type2", 16, &[2], true),
        ("flags8", 15, &[0x0a], true),
    ];
    for &(name, at, bytes, refused) in cases {
        let image = format!("{name}.qcow2");
        w.qemu_img(&["create", "-q", "-f", "qcow2", &image, "64M"]);
        w.qemu_img(&["bitmap", "--add", &image, "b0"]);
        w.qemu_img(&["bitmap", "--add", &image, "b1"]);
        let (_, dir) = bitmaps_ext(&w, &image);
        // b0's entry: 24 bytes and "b0", padded to 32.
        let entry = dir + 32;
        w.patch(&image, entry + at, bytes);
        if name == "phys-max" {
            // The table must then be 64 KiB of valid entries: the table of b1
            // points at a fresh zeroed area at the end of the file.
            let len = std::fs::metadata(w.path(&image)).unwrap().len();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(w.path(&image))
                .unwrap();
            f.set_len(len.div_ceil(65536) * 65536 + 65536).unwrap();
            w.patch(&image, entry, &(len.div_ceil(65536) * 65536).to_be_bytes());
        }
        let at = match name {
            _ if !refused => None,
            // The refusal names the entry's bitmap_table_size field.
            "phys-max" => Some(entry + 8),
            _ => Some(entry),
        };
        check_refusal_matches(&w, &image, at);
    }
    // A table that covers less than the disk: refused unless the bitmap is in use.
    for (name, in_use) in [("small", false), ("small-in-use", true)] {
        let image = format!("{name}.qcow2");
        w.qemu_img(&["create", "-q", "-f", "qcow2", &image, "1G"]);
        w.qemu_img(&["bitmap", "--add", &image, "b0"]);
        let (_, dir) = bitmaps_ext(&w, &image);
        // 512-byte granularity: one table entry covers 256 MiB of the 1 GiB.
        w.patch(&image, dir + 17, &[9]);
        if in_use {
            w.patch(&image, dir + 15, &[3]);
        }
        check_refusal_matches(&w, &image, (!in_use).then_some(dir));
    }
}

fn check_refusal_matches(w: &Work, image: &str, entry: Option<u64>) {
    let qemu = qemu_refusal(w, image);
    let src = Arc::new(qinspect::io::FileSource::open(&w.path(image)).unwrap());
    let ours = Qcow2::open(src.clone(), Strictness::Qemu);
    match (entry, &qemu, ours) {
        (None, None, Ok(_)) => {}
        (Some(at), Some(words), Err(e)) => {
            assert!(
                matches!(
                    e,
                    Error::Invalid {
                        kind: CorruptKind::BitmapDirectoryEntry,
                        offset,
                        ..
                    } if offset.get() == at
                ),
                "{image}: {e:?}"
            );
            assert!(
                e.to_string().contains(words.as_str()),
                "{image}: {e} / {words}"
            );
            // qemu-img check fails at the same open.
            let img = Qcow2::open(src, Strictness::Lenient).unwrap();
            assert_eq!(
                img.check_refusal.as_ref().and_then(Error::corrupt_kind),
                Some(CorruptKind::BitmapDirectoryEntry),
                "{image}"
            );
            let out = std::process::Command::new("qemu-img")
                .args(["check", image])
                .current_dir(w.dir.path())
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&out.stderr).contains(words.as_str()),
                "{image}"
            );
        }
        (_, qemu, ours) => panic!("{image}: QEMU {qemu:?}, qinspect {:?}", ours.err()),
    }
}

/// Two directory entries naming one table (with a data cluster): the check,
/// which goes through the table once, counts its clusters twice, as
/// `qemu-img check` does (and the other table becomes a leak).
#[test]
fn a_table_named_twice_is_counted_twice() {
    let w = Work::new();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "two.qcow2", "64M"]);
    w.qemu_img(&["bitmap", "--add", "two.qcow2", "b0"]);
    w.qemu_img(&["bitmap", "--add", "two.qcow2", "b1"]);
    w.qemu_io("two.qcow2", &["write 8M 64k"]);
    let (_, dir) = bitmaps_ext(&w, "two.qcow2");
    let table =
        std::fs::read(w.path("two.qcow2")).unwrap()[dir as usize..dir as usize + 12].to_vec();
    // b1's table_offset and table_size: b0's.
    w.patch("two.qcow2", dir + 32, &table);
    let v = w.assert_check_matches("two.qcow2");
    assert!(v["corruptions"].as_u64().unwrap() > 0, "{v}");
}

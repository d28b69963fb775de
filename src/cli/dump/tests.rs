//! `dump bitmaps N` shows the table the open read, without reading it again.

use super::*;
use qinspect::io::{MemSource, Source};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

/// An image in memory that notes where every read starts and how long it is.
#[derive(Debug)]
struct Counting {
    inner: MemSource,
    reads: Mutex<Vec<(u64, usize)>>,
}

impl Source for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.reads.lock().unwrap().push((offset, buf.len()));
        self.inner.read_at(buf, offset)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn name(&self) -> &Path {
        self.inner.name()
    }
}

fn run(dir: &Path, prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{prog} {args:?}: {out:?}");
}

#[test]
fn dump_bitmaps_n_reads_no_bitmap_table_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "bm.qcow2", "4M"],
    );
    run(d, "qemu-img", &["bitmap", "--add", "bm.qcow2", "b0"]);
    // Dirty bits in the first 64 KiB: the table's first entry names a data cluster.
    run(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write 0 64k", "bm.qcow2"],
    );
    let bytes = std::fs::read(d.join("bm.qcow2")).unwrap();
    let src = Arc::new(Counting {
        inner: MemSource::new("bm.qcow2", bytes.clone()),
        reads: Mutex::new(Vec::new()),
    });
    let img = Qcow2::open(src.clone(), Strictness::Lenient).unwrap();
    let Some(Ok(list)) = &img.bitmaps else {
        panic!("no bitmap directory: {:?}", img.bitmaps)
    };
    let b = &list[0];
    let (start, end) = (
        b.table_offset.get(),
        b.table_offset.get() + u64::from(b.table_size) * 8,
    );
    let table_reads = || {
        src.reads
            .lock()
            .unwrap()
            .iter()
            .filter(|&&(o, n)| o < end && o + n as u64 > start)
            .count()
    };
    assert_eq!(table_reads(), 1, "the open reads the table once");
    let a = Args {
        table: Table::Bitmaps,
        image: "bm.qcow2".into(),
        index: Some(0),
        snapshot: None,
        all: false,
        json: false,
    };
    let (title, rows) = bitmap_table_rows(&a, &img, list, 0).unwrap();
    assert_eq!(table_reads(), 1, "dump read the table again");
    assert!(title.contains("'b0'"), "{title}");
    // The entry is the one in the file.
    let at = usize::try_from(start).unwrap();
    let raw = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    assert_ne!(raw, 0);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].raw, format!("{raw:#018x}"));
    assert_eq!(rows[0].file_offset, b.table_offset);
}

/// Each table entry covers `granularity * cluster_size * 8` guest bytes; its row
/// names where that range ends, and the last one ends at the disk's end.
#[test]
fn dump_bitmaps_n_gives_each_range_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 512-byte clusters and granularity: each entry covers 512 * 512 * 8 = 2 MiB.
    run(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "bm.qcow2",
            "3M",
        ],
    );
    run(
        d,
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "bm.qcow2", "b0"],
    );
    run(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write 0 4k",
            "-c",
            "write 2M 4k",
            "bm.qcow2",
        ],
    );
    let bytes = std::fs::read(d.join("bm.qcow2")).unwrap();
    let img = Qcow2::open(
        Arc::new(MemSource::new("bm.qcow2", bytes)),
        Strictness::Lenient,
    )
    .unwrap();
    let Some(Ok(list)) = &img.bitmaps else {
        panic!("no bitmap directory: {:?}", img.bitmaps)
    };
    let a = Args {
        table: Table::Bitmaps,
        image: "bm.qcow2".into(),
        index: Some(0),
        snapshot: None,
        all: false,
        json: false,
    };
    let (_, rows) = bitmap_table_rows(&a, &img, list, 0).unwrap();
    let meanings: Vec<&str> = rows.iter().map(|r| r.meaning.as_str()).collect();
    assert_eq!(meanings.len(), 2, "{meanings:?}");
    assert!(
        meanings[0].starts_with("bits for guest 0x0..0x200000 stored at 0x"),
        "{meanings:?}"
    );
    // The second range is cut at the end of the 3 MiB disk.
    assert!(
        meanings[1].starts_with("bits for guest 0x200000..0x300000 stored at 0x"),
        "{meanings:?}"
    );
}

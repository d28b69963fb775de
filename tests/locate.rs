//! The core's answer to "which structure holds this host offset" on images QEMU
//! wrote: snapshot-table fields and bitmap directory fields named as the qcow2
//! specification lays them out, raw values equal to the bytes in the file, and no
//! panic at any offset of a damaged image.

use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, MemSource, SharedSource};
use qinspect::locate::Structures;
use qinspect::types::HostOffset;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("qemu-img is installed");
    assert!(out.status.success(), "{args:?}: {out:?}");
}

fn open(p: &Path) -> Qcow2 {
    let src: SharedSource = Arc::new(FileSource::open(p).unwrap());
    Qcow2::open(src, Strictness::Lenient).unwrap()
}

fn be(b: &[u8], at: u64, n: u64) -> u64 {
    b[at as usize..(at + n) as usize]
        .iter()
        .fold(0, |v, x| (v << 8) | u64::from(*x))
}

#[test]
fn snapshot_table_fields_are_named_at_each_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"]);
    qemu_img(d, &["snapshot", "-c", "first", "a.qcow2"]);
    qemu_img(d, &["snapshot", "-c", "second-one", "a.qcow2"]);
    let p = d.join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    let img = open(&p);
    let s = Structures::of(&img);
    let table = be(&bytes, 64, 8);
    // The fixed part of an entry, then the extra data QEMU writes (24 bytes).
    let layout: &[(u64, u64, &str)] = &[
        (0, 8, "l1_table_offset"),
        (8, 4, "l1_size"),
        (12, 2, "id_str_size"),
        (14, 2, "name_size"),
        (16, 4, "date_sec"),
        (20, 4, "date_nsec"),
        (24, 8, "vm_clock_nsec"),
        (32, 4, "vm_state_size"),
        (36, 4, "extra_data_size"),
        (40, 8, "extra data: vm_state_size_large"),
        (48, 8, "extra data: disk_size"),
        (56, 8, "extra data: icount"),
    ];
    assert_eq!(
        be(&bytes, table + 36, 4),
        24,
        "QEMU writes 24 bytes of extra data"
    );
    let sn = &img.snapshots.snapshots;
    let mut entry = table;
    for (i, snap) in sn.iter().enumerate() {
        for &(off, size, name) in layout {
            for b in off..off + size {
                let d = s.decode(&img, HostOffset(entry + b)).unwrap();
                assert_eq!(d.item, name, "entry {i} byte {b}");
                assert_eq!(
                    (d.start.get(), d.end.get()),
                    (entry + off, entry + off + size)
                );
                assert_eq!(d.raw, Some(be(&bytes, entry + off, size)), "{name}");
                assert!(
                    d.structure
                        .starts_with(&format!("snapshot table entry {i}"))
                );
            }
        }
        let id_len = be(&bytes, entry + 12, 2);
        let name_len = be(&bytes, entry + 14, 2);
        let d = s.decode(&img, HostOffset(entry + 64)).unwrap();
        assert_eq!(d.item, "id_str");
        assert!(d.meaning.contains(&format!("\"{}\"", snap.id)));
        let d = s
            .decode(&img, HostOffset(entry + 64 + id_len + name_len - 1))
            .unwrap();
        assert_eq!(d.item, "name");
        assert!(d.meaning.contains(&format!("\"{}\"", snap.name)));
        // Entries are padded to 8 bytes.
        entry += (64 + id_len + name_len).div_ceil(8) * 8;
    }
    // The snapshot's own L1 table is named too.
    let l1 = sn[1].l1_table_offset.get();
    let d = s.decode(&img, HostOffset(l1)).unwrap();
    assert!(
        d.structure
            .starts_with("L1 table of snapshot 2 'second-one'"),
        "{d:?}"
    );
    assert_eq!(d.item, "entry 0");
}

#[test]
fn bitmap_directory_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"]);
    qemu_img(d, &["bitmap", "--add", "a.qcow2", "dirty0"]);
    let p = d.join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    let img = open(&p);
    let s = Structures::of(&img);
    let dir_off = img
        .extensions
        .iter()
        .find_map(|e| match e.kind {
            qinspect::header::ExtensionKind::Bitmaps {
                directory_offset, ..
            } => Some(directory_offset.get()),
            _ => None,
        })
        .expect("a bitmaps extension");
    let layout: &[(u64, u64, &str)] = &[
        (0, 8, "bitmap_table_offset"),
        (8, 4, "bitmap_table_size"),
        (12, 4, "flags"),
        (16, 1, "type"),
        (17, 1, "granularity_bits"),
        (18, 2, "name_size"),
        (20, 4, "extra_data_size"),
    ];
    for &(off, size, name) in layout {
        for b in off..off + size {
            let x = s.decode(&img, HostOffset(dir_off + b)).unwrap();
            assert_eq!(x.item, name, "byte {b}");
            assert_eq!(x.raw, Some(be(&bytes, dir_off + off, size)));
            assert!(x.structure.starts_with("bitmap directory entry 0 'dirty0'"));
        }
    }
    let x = s.decode(&img, HostOffset(dir_off + 24)).unwrap();
    assert_eq!(x.item, "name");
    assert!(x.meaning.contains("\"dirty0\""));
    assert_eq!(be(&bytes, dir_off + 16, 1), 1);
    let x = s.decode(&img, HostOffset(dir_off + 16)).unwrap();
    assert_eq!(x.meaning, "dirty tracking bitmap");
    // The extension that points at the directory.
    let ext = img
        .extensions
        .iter()
        .find(|e| e.ext_type == qinspect::header::EXT_BITMAPS)
        .unwrap();
    let x = s
        .decode(&img, HostOffset(ext.offset.get() + 8 + 16))
        .unwrap();
    assert_eq!(x.item, "bitmap_directory_offset");
    assert_eq!(x.raw, Some(dir_off));
}

#[test]
fn every_offset_of_damaged_images_decodes_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"]);
    qemu_img(d, &["snapshot", "-c", "s", "a.qcow2"]);
    let good = std::fs::read(d.join("a.qcow2")).unwrap();
    // Every 8-byte word of the first clusters set to all ones in turn, then to
    // a value just past the end of the file.
    let mut tried = 0;
    for word in (0..good.len().min(0x50000))
        .step_by(8)
        .filter(|w| w % 0x1000 < 0x80)
    {
        for v in [u64::MAX, good.len() as u64 + 0x200] {
            let mut b = good.clone();
            b[word..word + 8].copy_from_slice(&v.to_be_bytes());
            let src: SharedSource = Arc::new(MemSource::new("m", b));
            let Ok(img) = Qcow2::open(src, Strictness::Lenient) else {
                continue;
            };
            let s = Structures::of(&img);
            for off in (0..good.len() as u64).step_by(61) {
                let _ = s.decode(&img, HostOffset(off));
            }
            tried += 1;
        }
    }
    assert!(tried > 100, "{tried} damaged images opened");
}

#[test]
fn bitmap_tables_and_their_data_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "8M"]);
    qemu_img(d, &["bitmap", "--add", "-g", "64k", "a.qcow2", "b0"]);
    // qemu-io marks the bits of what it writes and stores the bitmap on close.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write 0 64k",
            "-c",
            "write 1M 64k",
            "a.qcow2",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let p = d.join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    let img = open(&p);
    let s = Structures::of(&img);
    let dir_off = img
        .extensions
        .iter()
        .find(|e| e.ext_type == qinspect::header::EXT_BITMAPS)
        .map(|e| be(&bytes, e.offset.get() + 8 + 16, 8))
        .unwrap();
    let table = be(&bytes, dir_off, 8);
    let data = be(&bytes, table, 8) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(data, 0, "QEMU stored a data cluster for the written bits");
    for b in 0..8 {
        let x = s.decode(&img, HostOffset(table + b)).unwrap();
        assert!(x.structure.starts_with("table of bitmap 'b0'"), "{x:?}");
        assert_eq!(x.item, "entry 0");
        assert_eq!(x.raw, Some(be(&bytes, table, 8)));
        assert!(
            x.meaning.contains(&format!("data cluster at {data:#x}")),
            "{x:?}"
        );
    }
    // Bit 0 covers guest 0..64k, bit 16 (byte 2) guest 1M..1M+64k.
    let x = s.decode(&img, HostOffset(data)).unwrap();
    assert!(x.structure.starts_with("data of bitmap 'b0'"), "{x:?}");
    assert_eq!(x.raw, Some(u64::from(bytes[data as usize])));
    assert_eq!(x.raw, Some(1));
    let x = s.decode(&img, HostOffset(data + 2)).unwrap();
    assert_eq!(x.raw, Some(1));
    assert!(x.meaning.contains("0x100000..0x180000"), "{x:?}");
    let x = s.decode(&img, HostOffset(data + 1)).unwrap();
    assert_eq!(x.raw, Some(0));
    assert!(x.meaning.starts_with("0 of 8 bits set"), "{x:?}");
}

#[test]
fn the_luks_header_and_key_material_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "e.qcow2",
            "8M",
        ],
    );
    let p = d.join("e.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    let img = open(&p);
    let s = Structures::of(&img);
    let ext = img
        .extensions
        .iter()
        .find(|e| e.ext_type == qinspect::header::EXT_CRYPTO)
        .expect("a crypto header extension");
    let luks = be(&bytes, ext.offset.get() + 8, 8);
    assert_eq!(&bytes[luks as usize..luks as usize + 4], b"LUKS");
    for b in 0..6 {
        let x = s.decode(&img, HostOffset(luks + b)).unwrap();
        assert!(x.structure.starts_with("LUKS header at"), "{x:?}");
        assert_eq!(x.item, "magic");
    }
    // Slot 0 is the one qemu-img filled; its key material starts at the
    // sector its key-material-offset field (LUKS header byte 208 + 40) names.
    assert_eq!(be(&bytes, luks + 208, 4), 0x00ac_71f3);
    let sector = be(&bytes, luks + 208 + 40, 4);
    let x = s.decode(&img, HostOffset(luks + sector * 512)).unwrap();
    assert_eq!(x.item, "key material of slot 0", "{x:?}");
    assert!(!x.meaning.contains("not in use"), "{x:?}");
}

#[test]
fn a_backing_file_name_with_a_nul_inside_is_read_to_the_nul() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    let o = "backing_file=base.qcow2,backing_fmt=qcow2";
    qemu_img(d, &["create", "-q", "-f", "qcow2", "-o", o, "a.qcow2"]);
    let p = d.join("a.qcow2");
    let mut bytes = std::fs::read(&p).unwrap();
    let at = be(&bytes, 8, 8);
    assert_eq!(be(&bytes, 16, 4), 10, "base.qcow2");
    // "base.qcow2", a NUL, "zz": 13 bytes.
    bytes[at as usize + 10..at as usize + 13].copy_from_slice(b"\0zz");
    bytes[16..20].copy_from_slice(&13u32.to_be_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let img = open(&p);
    assert_eq!(img.backing_name.as_deref(), Some("base.qcow2"));
    let d = Structures::of(&img).decode(&img, HostOffset(at)).unwrap();
    assert_eq!((d.start.get(), d.end.get()), (at, at + 13));
    assert_eq!(
        d.meaning,
        "the backing file is \"base.qcow2\" (QEMU reads it to the NUL byte at 10 of its bytes; backing_file_size 13 bytes)"
    );
}

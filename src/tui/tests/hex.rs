//! Structure-aware Hex, and a compressed entry's inflated guest data.

use super::*;
use qinspect::types::HostOffset;

// ---- issue 11 item 7: structure-aware Hex ----------------------------------------

/// Put the Hex cursor on host offset `off` (as `g` does) and draw.
fn hex_at(a: &mut App, off: u64, w: u16, h: u16) -> String {
    if a.pane != Pane::Hex {
        typed(a, "9");
    }
    typed(a, &format!("g{off:#x}"));
    key(a, KeyCode::Enter);
    assert_eq!(a.panes.hex.cursor.get(), off);
    screen(a, w, h)
}

#[test]
fn the_hex_cursor_names_every_header_field_at_each_of_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1G"],
    );
    let p = dir.path().join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    // The header layout of the qcow2 specification (offset, size, name).
    let layout: &[(u64, u64, &str)] = &[
        (0, 4, "magic"),
        (4, 4, "version"),
        (8, 8, "backing_file_offset"),
        (16, 4, "backing_file_size"),
        (20, 4, "cluster_bits"),
        (24, 8, "size"),
        (32, 4, "crypt_method"),
        (36, 4, "l1_size"),
        (40, 8, "l1_table_offset"),
        (48, 8, "refcount_table_offset"),
        (56, 4, "refcount_table_clusters"),
        (60, 4, "nb_snapshots"),
        (64, 8, "snapshots_offset"),
        (72, 8, "incompatible_features"),
        (80, 8, "compatible_features"),
        (88, 8, "autoclear_features"),
        (96, 4, "refcount_order"),
        (100, 4, "header_length"),
        (104, 1, "compression_type"),
    ];
    let mut a = open(p);
    for &(start, size, name) in layout {
        for off in start..start + size {
            let s = hex_at(&mut a, off, 160, 40);
            let d = a.panes.hex.decoded(&a.ctx).unwrap();
            assert_eq!(d.structure, "header", "{off}");
            assert_eq!(d.item, name, "byte {off}");
            assert_eq!(
                (d.start.get(), d.end.get()),
                (start, start + size),
                "{name}"
            );
            assert_eq!(d.raw, Some(be(&bytes, start, size)), "{name}");
            assert!(s.contains(&format!("field: {name}")), "{s}");
        }
    }
    // The padding up to header_length (112 as QEMU writes it) is no field.
    let s = hex_at(&mut a, 105, 160, 40);
    assert!(s.contains("field: padding"), "{s}");
    // Past the header: the feature name table QEMU writes, and its entries.
    let ext = a.ctx.img.as_ref().unwrap().extensions.clone();
    let ft = ext
        .iter()
        .find(|e| e.ext_type == qinspect::header::EXT_FEATURE_TABLE)
        .unwrap();
    let s = hex_at(&mut a, ft.offset.get(), 160, 40);
    assert!(s.contains("header extension 'feature name table'"), "{s}");
    assert!(s.contains("field: type"), "{s}");
    let s = hex_at(&mut a, ft.offset.get() + 8 + 48, 160, 40);
    assert!(s.contains("field: entry 1"), "{s}");
}

#[test]
fn the_hex_cursor_decodes_an_l2_entry_and_a_refcount_entry() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "64M"],
    );
    qemu_io(dir.path(), "a.qcow2", "write -P 0x5a 0x30000 64k");
    let p = dir.path().join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    // What qemu-img says guest 0x30000 maps to.
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "a.qcow2"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let host = map
        .iter()
        .find(|e| e["start"] == 0x30000 && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("guest 0x30000 is data");
    // The L2 table from the L1 entry in the file; entry 3 maps guest 0x30000.
    let l1 = be(&bytes, 40, 8);
    let l2 = be(&bytes, l1, 8) & 0x00ff_ffff_ffff_fe00;
    let entry = l2 + 3 * 8;
    let mut a = open(p);
    let s = hex_at(&mut a, entry + 5, 160, 40);
    let d = a.panes.hex.decoded(&a.ctx).unwrap();
    assert_eq!(
        d.structure,
        format!("L2 table at {l2:#x} (active L1 table[0])")
    );
    assert_eq!(d.item, "entry 3 (guest 0x30000)");
    assert_eq!((d.start.get(), d.end.get()), (entry, entry + 8));
    let raw = be(&bytes, entry, 8);
    assert_eq!(d.raw, Some(raw));
    assert_eq!(raw & 0x00ff_ffff_ffff_fe00, host);
    assert!(d.meaning.contains(&format!("{host:#x}")), "{}", d.meaning);
    assert!(s.contains("entry 3 (guest 0x30000)"), "{s}");
    // The field's bytes are highlighted, the cursor byte stands out.
    let b = draw(&mut a, 160, 40);
    let (x, y) = find(&b, &format!("{:08x}", entry / 16 * 16)).unwrap();
    let col = |i: u64| x + 10 + (i * 3 + i / 8) as u16;
    assert_eq!(b[(col(entry % 16), y)].bg, Color::Blue, "{}", text(&b));
    assert_eq!(b[(col((entry + 5) % 16), y)].bg, Color::White);
    // A refcount entry: the block named by refcount table entry 0, 16-bit
    // entries; the data cluster's count as stored in the file.
    let rt = be(&bytes, 48, 8);
    let block = be(&bytes, rt, 8) & !0x1ff;
    let cl = host >> 16;
    let s = hex_at(&mut a, block + 2 * cl + 1, 160, 40);
    let d = a.panes.hex.decoded(&a.ctx).unwrap();
    assert_eq!(d.item, format!("entry {cl} (16-bit)"));
    assert_eq!(d.raw, Some(be(&bytes, block + 2 * cl, 2)));
    assert_eq!(d.raw, Some(1));
    assert!(
        s.contains(&format!(
            "host cluster {cl} (offset {host:#x}) has refcount 1"
        )),
        "{s}"
    );
    // The refcount table's entry 0 names that block.
    hex_at(&mut a, rt + 2, 160, 40);
    let d = a.panes.hex.decoded(&a.ctx).unwrap();
    assert_eq!(d.item, "entry 0");
    assert!(
        d.meaning.contains(&format!("refcount block at {block:#x}")),
        "{}",
        d.meaning
    );
    // The data cluster itself is no metadata: the side panel says what it is.
    let s = hex_at(&mut a, host + 7, 160, 40);
    assert!(s.contains(&format!("host cluster {cl}: guest data")), "{s}");
}

#[test]
fn hex_rows_are_32_bytes_wide_and_16_at_80_columns_with_the_side_panel_below() {
    let mut a = app("demo-top.qcow2");
    let s = hex_at(&mut a, 0x28, 200, 40);
    assert!(s.contains("0e 0f  10 11"), "32 a row:\n{s}");
    assert!(s.contains("│00000020  "), "{s}");
    let side = s
        .lines()
        .find(|l| l.contains("field: l1_table_offset"))
        .unwrap();
    assert!(side.contains("│000000"), "beside the bytes:\n{s}");
    let s = screen(&mut a, 80, 24);
    assert!(!s.contains("0f  10"), "16 a row:\n{s}");
    assert!(s.contains("│00000020  "), "{s}");
    let side = s.lines().position(|l| l.contains("field: l1_table_offset"));
    let row = s.lines().position(|l| l.contains("│00000020"));
    assert!(side > row, "below the bytes:\n{s}");
    // Moving: a byte, a row of 16, a cluster.
    key(&mut a, KeyCode::Right);
    assert_eq!(a.panes.hex.cursor.get(), 0x29);
    key(&mut a, KeyCode::Down);
    assert_eq!(a.panes.hex.cursor.get(), 0x39);
    typed(&mut a, "]");
    assert_eq!(a.panes.hex.cursor.get(), a.ctx.cluster_size());
    typed(&mut a, "[");
    assert_eq!(a.panes.hex.cursor.get(), 0);
    typed(&mut a, "G");
    assert_eq!(a.panes.hex.cursor.get(), a.ctx.file_len() - 1);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains("the file ends at"), "{s}");
}

#[test]
fn slash_finds_bytes_and_text_and_n_repeats_it() {
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "a.qcow2", "16M"],
    );
    qemu_io(dir.path(), "a.qcow2", "write -P 0xde 0x200000 4k");
    let p = dir.path().join("a.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    let first = bytes.windows(4).position(|w| w == [0xde; 4]).unwrap() as u64;
    let mut a = open(p);
    typed(&mut a, "9/\"QFI\"");
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    assert_eq!(a.panes.hex.cursor.get(), 0);
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("\"QFI\" found at 0x0"), "{s}");
    typed(&mut a, "/de de de de");
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    assert_eq!(a.panes.hex.cursor.get(), first);
    assert_eq!(
        a.panes.hex.mark,
        Some((HostOffset(first), HostOffset(first + 4)))
    );
    typed(&mut a, "n");
    a.wait_background();
    assert_eq!(a.panes.hex.cursor.get(), first + 1);
    typed(&mut a, "N");
    a.wait_background();
    assert_eq!(a.panes.hex.cursor.get(), first);
    typed(&mut a, "/0xdeadbeef");
    key(&mut a, KeyCode::Enter);
    a.wait_background();
    assert_eq!(
        a.panes.hex.cursor.get(),
        first,
        "not found: the cursor stays"
    );
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("de ad be ef does not occur at or after"), "{s}");
    // The help lists the keys.
    typed(&mut a, "?");
    let s = screen(&mut a, 120, 60);
    assert!(s.contains("Find hex bytes"), "{s}");
}

#[test]
fn a_search_of_a_big_file_runs_in_the_background_and_esc_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 << 30).unwrap(); // sparse: 64 GiB of zeros to look through
    drop(f);
    let mut a = open(p);
    typed(&mut a, "9/\"not there\"");
    key(&mut a, KeyCode::Enter);
    assert!(a.panes.hex.searching());
    // Keys answer while it runs.
    key(&mut a, KeyCode::Right);
    assert_eq!(a.panes.hex.cursor.get(), 1);
    let s = screen(&mut a, 160, 30);
    assert!(s.contains("searching for \"not there\""), "{s}");
    key(&mut a, KeyCode::Esc);
    assert!(!a.panes.hex.searching());
    assert_eq!(a.status, "search cancelled");
    let s = screen(&mut a, 160, 30);
    assert!(s.contains("search for \"not there\" cancelled at"), "{s}");
}

// ---- issue 11 item 2: a compressed entry's inflated guest data -------------------

#[test]
fn z_on_a_compressed_entry_shows_the_inflated_guest_cluster_as_qemu_reads_it() {
    for ctype in ["zlib", "zstd"] {
        let dir = tempfile::tempdir().unwrap();
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compression_type={ctype}"),
                "c.qcow2",
                "1M",
            ],
        );
        // A cluster of varied bytes, written compressed by QEMU.
        let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.path().join("pattern"), &pattern).unwrap();
        qemu_io(dir.path(), "c.qcow2", "write -c -s pattern 0x20000 64k");
        qemu_img(dir.path(), &["convert", "-O", "raw", "c.qcow2", "c.raw"]);
        let raw = std::fs::read(dir.path().join("c.raw")).unwrap();
        let want = &raw[0x20000..0x30000];
        assert_eq!(want, &pattern[..], "QEMU reads back what it wrote");
        let mut a = open(dir.path().join("c.qcow2"));
        typed(&mut a, "3");
        key(&mut a, KeyCode::Enter);
        key(&mut a, KeyCode::Down);
        key(&mut a, KeyCode::Down);
        typed(&mut a, "z");
        assert_eq!(a.pane, Pane::Hex, "{}", a.status);
        let src = a.panes.hex.src.clone().unwrap();
        assert_eq!(src.len(), 65536);
        let mut got = vec![0u8; 65536];
        qinspect::io::read_into(src.as_ref(), "t", qinspect::types::HostOffset(0), &mut got)
            .unwrap();
        assert_eq!(got, want, "{ctype}");
        let s = screen(&mut a, 160, 30);
        assert!(
            s.contains(&format!(
                "Hex — guest data of guest cluster 2 (0x20000), inflated ({ctype}) from host"
            )),
            "{s}"
        );
        assert!(s.contains("not a file of the chain"), "{s}");
        // Back to the entry; an entry that is not compressed says so.
        key(&mut a, KeyCode::Backspace);
        assert_eq!(a.pane, Pane::Tables);
        key(&mut a, KeyCode::Up);
        typed(&mut a, "z");
        assert_eq!(a.pane, Pane::Tables);
        assert!(a.status.contains("is not compressed"), "{}", a.status);
    }
}

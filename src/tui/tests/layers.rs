//! Layers of a backing chain.

use super::*;

// ---- issue 11 item 9: layers ------------------------------------------------------

#[test]
fn l_steps_tables_layout_and_hex_through_a_three_layer_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // base.raw ← mid.qcow2 ← top.qcow2, each with data of its own.
    let mut base = vec![0u8; 4 << 20];
    base[0x1000..0x1004].copy_from_slice(b"BASE");
    std::fs::write(d.join("base.raw"), &base).unwrap();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
        ],
    );
    qemu_io(d, "mid.qcow2", "write -P 0x4d 0x100000 64k");
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qemu_io(d, "top.qcow2", "write -P 0x54 0 64k");
    let mid_map = Command::new("qemu-img")
        .args(["map", "--output=json", "mid.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    let mid_map: Vec<serde_json::Value> = serde_json::from_slice(&mid_map.stdout).unwrap();
    let mid_host = mid_map
        .iter()
        .find(|e| e["start"] == 0x100000 && e["depth"] == 0 && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("mid maps 0x100000");
    let mid = std::fs::read(d.join("mid.qcow2")).unwrap();
    let mid_l1 = be(&mid, 40, 8);

    let mut a = open(d.join("top.qcow2"));
    typed(&mut a, "3");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("layer 0: top.qcow2 · active L1 at"), "{s}");
    // L: layer 1, mid.qcow2, its own L1 table and L2 entries.
    typed(&mut a, "L");
    a.wait_background();
    assert!(a.status.contains("layer 1: mid.qcow2"), "{}", a.status);
    let s = screen(&mut a, 120, 30);
    assert!(
        s.contains(&format!("layer 1: mid.qcow2 · active L1 at {mid_l1:#x}")),
        "{s}"
    );
    key(&mut a, KeyCode::Enter);
    for _ in 0..16 {
        key(&mut a, KeyCode::Down);
    }
    let s = screen(&mut a, 160, 40);
    assert!(s.contains("layer 1: mid.qcow2 · L2 table at"), "{s}");
    assert!(
        s.contains(&format!("{mid_host:#x}")),
        "entry 16 maps guest 0x100000 where qemu-img map says:\n{s}"
    );
    typed(&mut a, "2");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("layer 1: mid.qcow2 · Layout of"), "{s}");
    typed(&mut a, "9");
    let s = screen(&mut a, 160, 30);
    assert!(s.contains("Hex — layer 1: mid.qcow2: 0x"), "{s}");
    assert!(s.contains("structure: header"), "{s}");
    // L: layer 2, the raw base: no tables, Hex shows its bytes.
    typed(&mut a, "L");
    a.wait_background();
    typed(&mut a, "3");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("┌ layer 2: base.raw · Tables "), "{s}");
    assert!(s.contains("layer 2: base.raw is a raw file"), "{s}");
    typed(&mut a, "2");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("┌ layer 2: base.raw · Layout "), "{s}");
    assert!(s.contains("layer 2: base.raw is a raw file"), "{s}");
    // Their keys have nothing to act on, and say so.
    a.status.clear();
    typed(&mut a, "x");
    assert!(a.status.contains("base.raw is a raw file"), "{}", a.status);
    a.status.clear();
    typed(&mut a, "3z");
    assert!(a.status.contains("base.raw is a raw file"), "{}", a.status);
    // The Overview calls a raw backing file raw, not a qcow2 that failed to open.
    typed(&mut a, "1");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("layer 2: base.raw is a raw file"), "{s}");
    assert!(!s.contains("cannot be opened"), "{s}");
    typed(&mut a, "9g0x1000");
    key(&mut a, KeyCode::Enter);
    let s = screen(&mut a, 160, 30);
    assert!(s.contains("Hex — layer 2: base.raw: 0x"), "{s}");
    assert!(s.contains("42 41 53 45"), "BASE at 0x1000:\n{s}");
    // L: back to the top.
    typed(&mut a, "L");
    a.wait_background();
    typed(&mut a, "3");
    let s = screen(&mut a, 120, 30);
    assert!(s.contains("layer 0: top.qcow2 · active L1"), "{s}");
    // The help names the key.
    typed(&mut a, "?");
    let s = screen(&mut a, 160, 80);
    assert!(s.contains("The next layer of the backing chain"), "{s}");
    key(&mut a, KeyCode::Esc);
    // A single file has no layers to step through.
    let mut b = app("demo-compressed.qcow2");
    typed(&mut b, "3L");
    assert!(b.status.contains("only layer"), "{}", b.status);
    let s = screen(&mut b, 120, 30);
    assert!(!s.contains("layer 0"), "{s}");
}

#[test]
fn a_reload_forgets_searches_and_hidden_rows_of_the_state_before() {
    let mut a = app("demo-top.qcow2");
    typed(&mut a, "3");
    search(&mut a, "unallocated");
    assert!(a.panes.tables.l1.find.is_some());
    typed(&mut a, "u");
    assert!(a.panes.tables.l1.hidden.is_some());
    typed(&mut a, "r");
    a.wait_background();
    assert!(a.panes.tables.l1.find.is_none());
    assert!(a.panes.tables.l1.hidden.is_none());
    let s = screen(&mut a, 120, 40);
    assert!(!s.contains("matches for unallocated"), "{s}");
    assert!(!s.contains("hiding"), "{s}");
}

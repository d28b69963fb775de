//! Words that must say what they mean: the Snapshots pane's Difference box and
//! the Tables pane on an image with an external data file.

use super::*;

/// The host offset `qemu-img map` gives for guest `start` of the active state.
fn qemu_host(d: &Path, image: &str, start: u64) -> u64 {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", image])
        .current_dir(d)
        .output()
        .unwrap();
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    map.iter()
        .find(|e| e["start"] == start && e["data"] == true)
        .and_then(|e| e["offset"].as_u64())
        .expect("qemu-img maps the guest offset")
}

#[test]
fn snapshot_difference_says_unallocated_and_where_the_data_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "4M"]);
    qemu_io(d, "s.qcow2", "write 0 64k");
    qemu_img(d, &["snapshot", "-c", "a", "s.qcow2"]);
    qemu_io(d, "s.qcow2", "write 3M 64k");
    qemu_img(d, &["snapshot", "-c", "b", "s.qcow2"]);
    let host = qemu_host(d, "s.qcow2", 0x300000);
    let mut a = open(d.join("s.qcow2"));
    typed(&mut a, "5m");
    key(&mut a, KeyCode::Down);
    typed(&mut a, "m");
    a.wait_background();
    let diff = a
        .panes
        .snapshots
        .diff
        .clone()
        .expect("compared")
        .expect("ok");
    // Guest 0 is the same cluster in both; only 0x300000 differs.
    let want = format!("unallocated (zeros) vs data at {host:#x} in this file");
    assert_eq!(diff, vec![(0x300000, want.clone())]);
    let s = screen(&mut a, 80, 24);
    assert!(s.contains(&format!("guest 0x300000: {want}")), "{s}");
}

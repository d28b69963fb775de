//! `repair:all` of what `qemu-img check -r all` repairs beyond refcounts and
//! COPIED flags, each image broken as the iotests break it, and compared
//! with a real repair on a copy (see `sim_compare`).

mod common;
mod sim_compare;
use common::Work;
use sim_compare::{compare, open_path};

fn ok(w: &Work, image: &str, ops: &[&str]) -> qinspect::simulate::Sim {
    compare(w.dir.path(), image, ops).unwrap_or_else(|e| panic!("{image}: {e}"))
}

/// Move the host offset of entry `index` of the L2 table under active L1
/// entry 0 by `by` bytes (the rest of the entry as it is).
fn misalign_l2_entry(w: &Work, image: &str, index: u64, by: u64) {
    let img = open_path(&w.path(image)).unwrap();
    let l2 = img.l1[0].0 & qinspect::tables::L1E_OFFSET_MASK;
    let at = l2 + index * img.geometry().l2_entry_size();
    let mut raw = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(w.path(image)).unwrap(),
        &mut raw,
        at,
    )
    .unwrap();
    let e = u64::from_be_bytes(raw) + by;
    w.patch(image, at, &e.to_be_bytes());
}

#[test]
fn unaligned_zero_clusters_become_plain_zero_clusters() {
    let w = Work::new();
    for (name, opts, snapshot) in [
        ("z.qcow2", "cluster_size=65536", false),
        ("s.qcow2", "cluster_size=65536", true),
        ("x.qcow2", "extended_l2=on", false),
        ("r.qcow2", "refcount_bits=1", false),
    ] {
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"]);
        w.qemu_io(
            name,
            &["write 0 192k", "write -z 0 64k", "write -z 128k 64k"],
        );
        if snapshot {
            w.qemu_img(&["snapshot", "-c", "s", name]);
        }
        // iotest 060's "unaligned zero cluster": a preallocated zero
        // cluster whose offset is no longer cluster aligned.
        misalign_l2_entry(&w, name, 0, 0x2000);
        misalign_l2_entry(&w, name, 2, 0x200);
        let copy = format!("l{name}");
        w.run("cp", &[name, &copy]);
        let sim = ok(&w, name, &["repair:all", "write:0:4096", "repair:all"]);
        assert!(
            sim.records[0]
                .steps
                .iter()
                .any(|c| c.reason.starts_with("Repairing offset=")),
            "{name}: {:?}",
            sim.records[0].steps
        );
        // -r leaks leaves them (and so the COPIED flags and the dirty state).
        // With 1-bit refcounts the misaligned entries also overflow a
        // refcount, which only -r all is simulated for.
        if !opts.starts_with("refcount_bits=1") {
            ok(&w, &copy, &["repair:leaks", "repair:all"]);
        }
    }
}

//! QEMU's refcount cache (four refcount blocks, least recently used goes,
//! a changed one written back as it goes) followed through an operation
//! that meets an extended-L2 entry whose bits contradict each other:
//! images of more refcount blocks than the cache holds, each compared
//! with a real qemu-io on a copy, every byte of the file.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::same_bytes;

/// 16k clusters with 64-bit refcounts: a refcount block counts 2048
/// clusters, 32M of the file.
const OPTS: &str = "extended_l2=on,cluster_size=16k,refcount_bits=64";

/// A big-endian u64 of the file `name` at `at`.
fn u64_at(w: &Work, name: &str, at: u64) -> u64 {
    let bytes = std::fs::read(w.path(name)).expect("read the image");
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Where the L2 entry of guest `g` sits in the file (16k clusters: an L2
/// table of 1024 entries of 16 bytes covers 16M).
fn entry_of(w: &Work, name: &str, g: u64) -> u64 {
    let l1 = u64_at(w, name, 40);
    let l2 = u64_at(w, name, l1 + (g >> 24) * 8) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "guest {g:#x} has no L2 table");
    l2 + ((g >> 14) & 1023) * 16
}

/// Make guest `g`'s entry contradictory: subcluster 0 allocated and zero.
fn contradict(w: &Work, name: &str, g: u64) {
    let at = entry_of(w, name, g);
    assert_ne!(u64_at(w, name, at), 0, "guest {g:#x} is not allocated");
    w.patch(name, at + 8, &0x0000_0001_0000_0001u64.to_be_bytes());
}

/// 160M preallocated (falloc): six refcount blocks, every cluster in use.
fn falloc(w: &Work, name: &str) {
    let o = format!("{OPTS},preallocation=falloc");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, name, "160M"]);
}

#[test]
fn block_status_reads_every_refcount_block_and_writes_a_release_back() {
    let w = Work::new();
    // An unmapping write-zeroes of guest 0..16k releases its cluster (in
    // the first refcount block, changed in QEMU's cache, which from then on
    // depends on the L2 cache), then asks block status at 16k: its first
    // look reads the refcounts of all six blocks, the fifth replaces the
    // first, which goes back to the file after the L2 cache (the zeroed
    // entry). The entry at 16k then marks the image corrupt: the release
    // and the zeroed entry stay.
    let make = |w: &Work, n: &str| {
        falloc(w, n);
        contradict(w, n, 0x4000);
    };
    let (errors, corrupt) = same_bytes(&w, "z.qcow2", make, &["write-zeroes:0:16640:unmap"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
    // Without unmap the cluster stays and only the entry changes, in the L2
    // cache, with nothing to write it back: it is lost.
    let (errors, corrupt) = same_bytes(&w, "k.qcow2", make, &["write-zeroes:0:16640"]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
}

#[test]
fn an_allocation_far_from_the_first_refcount_block_is_lost() {
    let w = Work::new();
    // Guests 130M and 150M discarded (their clusters, in the fifth refcount
    // block, freed), then a write of guest 150M..150M+16k+512, whose entry
    // at 150M+16k is contradictory: the search for a free cluster reads
    // blocks one to five and takes 130M's old cluster, whose new refcount
    // is still in QEMU's cache when the write's next piece meets the entry;
    // no changed block was replaced on the way. The data stays.
    let (a, b) = (130u64 << 20, 150u64 << 20);
    let make = move |w: &Work, n: &str| {
        falloc(w, n);
        contradict(w, n, b + 0x4000);
    };
    let one = format!("discard:{a}:16384");
    let two = format!("discard:{b}:16384");
    let write = format!("write:{b}:16896:P=5");
    let (errors, corrupt) = same_bytes(&w, "a.qcow2", make, &[&one, &two, &write]);
    assert_eq!(errors[..2], [None, None]);
    assert!(errors[2].is_some() && corrupt, "{errors:?}");
}

#[test]
fn a_changed_refcount_block_replaced_by_the_search_for_a_free_cluster_is_written_back() {
    let w = Work::new();
    // Free clusters left in the first refcount block (guest 0's) and in the
    // fifth (guest 130M's, after guest 32k's old cluster went to guest
    // 130M). A write of guest 0..48k+512: guest 0 takes the free cluster of
    // the first block (changed in QEMU's cache), guest 16k is written in
    // place, guest 32k's search reads blocks one to five, and the fifth
    // replaces the first, which is written back; the write then meets the
    // entry at 48k. The first cluster's refcount stays, the fifth's is
    // lost, and so are the write's L2 entries (never set).
    let g = 130 << 20;
    let make = |w: &Work, n: &str| {
        falloc(w, n);
        contradict(w, n, 0xc000);
    };
    let gone = format!("discard:{g}:16384");
    let refill = format!("write:{g}:16384:P=3");
    let ops = [
        "discard:32768:16384",
        gone.as_str(),
        refill.as_str(),
        "discard:0:16384",
        "write:0:49664:P=5",
    ];
    let (errors, corrupt) = same_bytes(&w, "r.qcow2", make, &ops);
    assert_eq!(errors[..4], [None, None, None, None]);
    assert!(errors[4].is_some() && corrupt, "{errors:?}");
}

#[test]
fn a_copy_on_read_after_block_status_read_every_refcount_block() {
    let w = Work::new();
    // An overlay of 256M over a raw backing file with data at 200M: guest
    // 0..150M written in the overlay (five refcount blocks), and 4k at
    // 200M+16k, whose entry is made contradictory. Copy-on-read of guest
    // 200M..200M+16k+512: block status's first look reads all five
    // blocks, the copy of guest 200M takes a new cluster at the end of the
    // file (its search reads them all again), and the next look meets the
    // entry: the new refcount and the copy's entry are lost, the data
    // stays.
    let g = 200u64 << 20;
    let make = move |w: &Work, n: &str| {
        w.qemu_img(&["create", "-q", "-f", "raw", "base.raw", "256M"]);
        let fill = format!("write -P 7 {g} 64k");
        let out = w.run("qemu-io", &["-f", "raw", "-c", &fill, "base.raw"]);
        assert!(out.status.success());
        let o = format!("{OPTS},backing_file=base.raw,backing_fmt=raw");
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, n, "256M"]);
        let late = format!("write -P 2 {} 4k", g + 0x4000);
        w.qemu_io(n, &[&late, "write -P 1 0 150M"]);
        contradict(w, n, g + 0x4000);
    };
    let read = format!("read:{g}:16896");
    let (errors, corrupt) = same_bytes(&w, "c.qcow2", make, &[&read]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
}

#[test]
fn block_status_that_may_stop_early_in_the_refcounts_is_not_simulated() {
    let w = Work::new();
    // Metadata preallocation: every cluster in use, few stored on disk, so
    // block status's first look stops reading refcounts within the first
    // refcount block, after a number of clusters that depends on what the
    // file stores on disk now (not known here): a write-zeroes that
    // released a cluster first and then asks block status is refused.
    let o = format!("{OPTS},preallocation=metadata");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, "m.qcow2", "160M"]);
    contradict(&w, "m.qcow2", 0x4000);
    let img = sim_compare::open_path(&w.path("m.qcow2")).expect("open");
    let mut sim = qinspect::simulate::Sim::new(&img, &w.path("m.qcow2")).expect("sim");
    sim.apply(&sim_compare::parse_op("write-zeroes:0:16640:unmap"));
    let r = &sim.records[0];
    assert!(
        matches!(r.cause, Some(qinspect::simulate::SimError::NotModelled(_))),
        "{:?}",
        r.error
    );
}

#[test]
fn a_write_through_five_refcount_blocks_of_512_byte_clusters_stopped_by_the_overlap_check() {
    let w = Work::new();
    // 512-byte clusters with 16-bit refcounts: a refcount block counts 256
    // clusters, 128k of the file. Guest 0..1M written, then one cluster at
    // each of guest 128k, 256k, 384k, 512k and 640k discarded (their
    // clusters freed, one in each of five refcount blocks), and guest
    // 640k+512's entry made to name the active L1 table. A write of guest
    // 128k..640k+1024 takes each freed cluster back where it was, block by
    // block, so the fifth block replaces the first (changed, written
    // back); then its last cluster's data would land on the L1 table: the
    // overlap check marks the image corrupt, and what the cache still held
    // is lost.
    let make = |w: &Work, n: &str| {
        let o = "cluster_size=512,refcount_bits=16";
        w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, n, "4M"]);
        let mut cmds = vec!["write -P 1 0 1M".to_string()];
        for k in 1..=5u64 {
            cmds.push(format!("discard {} 512", k * 128 * 1024));
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        w.qemu_io(n, &cmds);
        let g = 640 * 1024 + 512;
        let l1 = u64_at(w, n, 40);
        let l2 = u64_at(w, n, l1 + (g >> 15) * 8) & 0x00ff_ffff_ffff_fe00;
        let at = l2 + ((g >> 9) & 63) * 8;
        assert_ne!(u64_at(w, n, at), 0, "layout moved");
        w.patch(n, at, &((1u64 << 63) | l1).to_be_bytes());
    };
    let write = format!("write:{}:{}:P=5", 128 * 1024, 512 * 1024 + 1024);
    let (errors, corrupt) = same_bytes(&w, "o.qcow2", make, &[&write]);
    let first = errors[0].as_deref().unwrap_or_default();
    assert!(first.contains("overlaps with active L1 table"), "{first}");
    assert!(corrupt);
}

#[test]
fn an_entry_met_in_the_same_piece_as_an_allocation_writes_no_data() {
    let w = Work::new();
    // Guest 130M discarded, its cluster freed; a write of guest
    // 130M..130M+16k+512 takes that cluster back, which sits right before
    // the cluster of guest 130M+16k, whose entry is contradictory. The host
    // range runs on, so QEMU's allocation of the request's first piece goes
    // on into that entry and fails there, before any of the piece's data
    // is written: the file keeps what it had at 130M's cluster.
    let g = 130u64 << 20;
    let make = move |w: &Work, n: &str| {
        falloc(w, n);
        contradict(w, n, g + 0x4000);
    };
    let gone = format!("discard:{g}:16384");
    let write = format!("write:{g}:16896:P=5");
    let (errors, corrupt) = same_bytes(&w, "p.qcow2", make, &[&gone, &write]);
    assert_eq!(errors[0], None);
    assert!(errors[1].is_some() && corrupt, "{errors:?}");
}

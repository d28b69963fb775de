//! QEMU's L2 cache followed slice by slice through a write-zeroes that
//! changes more L2 entries than the old log kept (2^16), then meets an
//! extended-L2 entry whose bits contradict each other: what the cache
//! still holds is lost, every byte of the file compared with a real
//! qemu-io on a copy.
//!
//! qemu-io takes at most 2147483136 bytes in one request (`write -z`
//! included, without `-n`): with QEMU's default L2 cache (the whole disk
//! when that takes at most 32 MiB, else 32 MiB of slices, each a cluster
//! or 4 KiB, whichever is smaller), such a
//! request never goes through more slices than the cache holds, so what
//! it changed stays in the cache until a write-back of the whole cache.

mod common;
mod sim_bytes;
mod sim_compare;
use common::Work;
use sim_bytes::same_bytes;

/// Extended L2 entries of 16 bytes in 16k clusters: a table covers 16M,
/// a subcluster is 512 bytes.
const OPTS: &str = "extended_l2=on,cluster_size=16k";

/// A big-endian u64 of the file `name` at `at`.
fn u64_at(w: &Work, name: &str, at: u64) -> u64 {
    let bytes = std::fs::read(w.path(name)).expect("read the image");
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Make guest `g`'s entry contradictory: subcluster 0 allocated and zero.
fn contradict(w: &Work, name: &str, g: u64) {
    let l1 = u64_at(w, name, 40);
    let l2 = u64_at(w, name, l1 + (g >> 24) * 8) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "guest {g:#x} has no L2 table");
    let at = l2 + ((g >> 14) & 1023) * 16;
    assert_ne!(u64_at(w, name, at), 0, "guest {g:#x} is not allocated");
    w.patch(name, at + 8, &0x0000_0001_0000_0001u64.to_be_bytes());
}

/// An image of `size` with 512 bytes of data at the start of each of the
/// 128 L2 tables from guest `from` on, and in the cluster at `bad`, whose
/// entry is then made contradictory.
fn tables(w: &Work, name: &str, size: &str, from: u64, bad: u64) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", OPTS, name, size]);
    let mut cmds: Vec<String> = (0..128u64)
        .map(|i| format!("write -P {} {} 512", i % 200 + 1, from + (i << 24)))
        .collect();
    cmds.push(format!("write -P 9 {bad} 16k"));
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    w.qemu_io(name, &cmds);
    contradict(w, name, bad);
}

/// The longest request qemu-io takes, less one cluster, plus 256 bytes:
/// whole clusters up to the contradictory one, then a tail of half a
/// subcluster in it, which asks block status about the rest of that
/// subcluster last.
const SPAN: u64 = (2 << 30) - 16384;

#[test]
fn a_write_zeroes_through_the_cache_of_a_4g_disk_loses_131071_entries() {
    let w = Work::new();
    // 4G: the default cache holds the whole disk, 256 tables of one slice
    // each. The 128 tables exist (no new table writes the cache back), so
    // the 131071 zeroed entries of guest 0..2G-16k and the 128 released
    // clusters' refcounts (one refcount block) are all in QEMU's caches
    // when the tail meets the entry at 2G-16k: lost; the released
    // clusters are punched all the same.
    let make = |w: &Work, n: &str| tables(w, n, "4G", 0, SPAN);
    let op = format!("write-zeroes:0:{}:unmap", SPAN + 256);
    let (errors, corrupt) = same_bytes(&w, "a.qcow2", make, &[&op]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
}

#[test]
fn a_write_zeroes_in_4k_slices_of_a_40g_disk_loses_what_the_cache_holds() {
    let w = Work::new();
    // 40G: the whole disk would take 40M of cache, more than the default
    // 32M, so QEMU's cache is 8192 slices of 4k (256 entries each). The
    // write-zeroes of guest 34G.. goes through 512 of them, keeps them
    // all, and loses them at the entry it meets last; without unmap the
    // clusters stay.
    let from = 34u64 << 30;
    let make = move |w: &Work, n: &str| tables(w, n, "40G", from, from + SPAN);
    let op = format!("write-zeroes:{from}:{}", SPAN + 256);
    let (errors, corrupt) = same_bytes(&w, "b.qcow2", make, &[&op]);
    assert!(errors[0].is_some() && corrupt, "{errors:?}");
}

/// A 5T disk of 2M clusters with extended L2: its tables would take 40M of
/// cache, so QEMU's slices are 4k (256 entries), 512 to a table. Guest
/// 0..64k written (its table `t0`, its data cluster `d`); with `snapshot`,
/// snapshot `s1` is taken and its L1 entry 0, else active L1[1], then names
/// the active L1 table's cluster as an L2 table, whose first slice holds
/// the L1 table (160 bytes) and whose entry 256, the first of its second
/// slice, is patched to name `d` (COPIED as `d`'s refcount of 1 wants it
/// before a snapshot, cleared after). Where the L1 table is, for checks.
fn l2_over_the_l1_cluster(w: &Work, image: &str, snapshot: bool) -> u64 {
    let o = "extended_l2=on,cluster_size=2M";
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, image, "5T"]);
    w.qemu_io(image, &["write -P 0x11 0 64k"]);
    if snapshot {
        w.qemu_img(&["snapshot", "-c", "s1", image]);
    }
    let l1 = u64_at(w, image, 40);
    let t0 = u64_at(w, image, l1) & 0x00ff_ffff_ffff_fe00;
    let d = u64_at(w, image, t0) & 0x00ff_ffff_ffff_fe00;
    assert!(t0 != 0 && d != 0 && t0 != l1, "{image}: layout");
    let copied = if snapshot { 0 } else { 1u64 << 63 };
    if snapshot {
        let table = u64_at(w, image, 64);
        let snap_l1 = u64_at(w, image, table);
        w.patch(image, snap_l1, &l1.to_be_bytes());
    } else {
        w.patch(image, l1 + 8, &((1u64 << 63) | l1).to_be_bytes());
    }
    w.patch(image, l1 + 4096, &(copied | d).to_be_bytes());
    w.patch(image, l1 + 4096 + 8, &1u64.to_be_bytes());
    l1
}

/// A snapshot's walk (addend +1) clears COPIED in both slices of the "L2
/// table" that is the L1 table's cluster. At the flush after it the
/// overlap check stops both: it looks at the whole clusters a write
/// touches, so a slice of 4k is checked as its table is. The file keeps
/// COPIED in entry 256, and the snapshot fails. Every byte of the file is
/// compared, its length too: the snapshot's L1 table, written last into a
/// cluster of its own at the end of the file, is 20 entries, and the file
/// ends 160 bytes into that cluster (the allocation did not grow it).
#[test]
fn a_snapshot_walk_is_stopped_at_every_slice_of_a_table_over_metadata() {
    let w = Work::new();
    let make = |w: &Work, n: &str| {
        l2_over_the_l1_cluster(w, n, false);
    };
    let (errors, corrupt) = same_bytes(&w, "c.qcow2", make, &["snapshot-create:s1"]);
    assert!(errors[0].is_some());
    assert!(corrupt);
    let len = std::fs::metadata(w.path("c.qcow2.qemu")).unwrap().len();
    assert_eq!(
        len % (2 << 20),
        160,
        "QEMU's file ends 160 bytes into a cluster"
    );
    let l1 = u64_at(&w, "c.qcow2.qemu", 40);
    assert_eq!(u64_at(&w, "c.qcow2.qemu", l1 + 4096) >> 63, 1);
}

/// A snapshot delete's walk (addend -1) sets COPIED in both slices of the
/// "L2 table" that is the active L1 table's cluster, then frees that
/// cluster (its refcount 1 goes to 0). QEMU then drops from its L2 cache
/// only the slice at the cluster's start; the second slice stays, changed,
/// and the flush after the walk meets the overlap check there: the delete
/// fails and the image is marked corrupt. (Were the whole table dropped,
/// as with slices of a whole cluster, nothing would stop the delete.)
#[test]
fn a_freed_table_leaves_its_later_slices_in_the_cache_for_the_overlap_check() {
    let w = Work::new();
    let make = |w: &Work, n: &str| {
        l2_over_the_l1_cluster(w, n, true);
    };
    let (errors, corrupt) = same_bytes(&w, "d.qcow2", make, &["snapshot-delete:s1"]);
    let first = errors[0].as_deref().unwrap_or_default();
    assert!(first.contains("overlaps with active L1 table"), "{first}");
    assert!(corrupt);
}

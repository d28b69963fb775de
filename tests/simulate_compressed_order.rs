//! A compressed write of several clusters: QEMU compresses them in worker
//! threads and places each as its thread finishes, so where each cluster
//! lands varies between runs of the same `qemu-io -c 'write -c'`. The
//! simulator places them in guest order, one of QEMU's orders, and says so;
//! the comparison with a real run gives it the order that run took
//! (`sim_compare::compressed_order`), and nothing else is let through.

mod common;
mod sim_compare;
use common::Work;
use qinspect::simulate::Sim;
use qinspect::types::GuestOffset;
use sim_compare::{compare, compressed_order, meta, open_path, parse_op, qemu_command, run_qemu};

fn create(w: &Work, name: &str, cluster_size: u64) {
    let opts = format!("cluster_size={cluster_size}");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, name, "64M"]);
}

/// Several runs of each request, each compared with the simulation told the
/// order that run took: all match, every cluster of the request placed.
#[test]
fn each_real_run_is_matched_when_its_order_is_followed() {
    let w = Work::new();
    for (cs, clusters) in [(4096u64, 4u64), (65536, 8)] {
        let name = format!("c{cs}.qcow2");
        create(&w, &name, cs);
        let op = format!("write-compressed:0:{}", cs * clusters);
        let mut orders = Vec::new();
        for run in 0..6 {
            let sim = compare(w.dir.path(), &name, &[&op])
                .unwrap_or_else(|e| panic!("{cs}-byte clusters, run {run}: {e}"));
            assert!(sim.records[0].error.is_none());
            let order = compressed_order(&w.path(&format!("{name}.qemu")), &parse_op(&op))
                .expect("a request of several clusters");
            assert_eq!(order.len() as u64, clusters);
            orders.push(order);
        }
        // Without an order given, guest order, and the output says it is
        // one of QEMU's.
        let img = open_path(&w.path(&name)).unwrap();
        let mut sim = Sim::new(&img, &w.path(&name)).unwrap();
        sim.apply(&parse_op(&op));
        let notes: Vec<&str> = sim.records[0]
            .steps
            .iter()
            .map(|c| c.reason.as_str())
            .collect();
        assert!(
            notes
                .iter()
                .any(|n| n.contains(&format!("the {clusters} clusters"))
                    && n.contains("in guest order, one of the orders QEMU can take")),
            "{notes:?}"
        );
        eprintln!("{cs}-byte clusters: QEMU's orders {orders:?}");
    }
}

/// The tolerance is the order and nothing more: told an order QEMU's run
/// did not take, the simulation's L2 entries differ from the real ones.
#[test]
fn an_order_the_run_did_not_take_is_caught() {
    let w = Work::new();
    create(&w, "o.qcow2", 4096);
    let op = "write-compressed:0:16384";
    std::fs::copy(w.path("o.qcow2"), w.path("o.qcow2.qemu")).unwrap();
    let (ok, line) = run_qemu(w.dir.path(), &qemu_command(op, "o.qcow2.qemu"));
    assert!(ok, "{line}");
    let taken = compressed_order(&w.path("o.qcow2.qemu"), &parse_op(op)).unwrap();
    // The same clusters, the first two the other way round.
    let mut wrong = taken.clone();
    wrong.swap(0, 1);
    let img = open_path(&w.path("o.qcow2")).unwrap();
    let real = open_path(&w.path("o.qcow2.qemu")).unwrap();
    let l2_of = |order: Vec<GuestOffset>| {
        let mut sim = Sim::new(&img, &w.path("o.qcow2")).unwrap();
        sim.place_compressed_in(order);
        sim.apply(&parse_op(op));
        assert!(sim.records[0].error.is_none());
        let simulated = sim.image().unwrap();
        let upto = simulated.file_len().max(real.file_len());
        (meta(&simulated, upto).unwrap(), upto)
    };
    let (followed, upto) = l2_of(taken);
    let b = meta(&real, upto).unwrap();
    assert!(followed.l2 == b.l2 && followed.refcounts == b.refcounts);
    let (other, _) = l2_of(wrong);
    assert!(other.l2 != b.l2, "a swapped order went unnoticed");
}

/// A request of at most 8 clusters over an allocated one: QEMU starts every
/// cluster's task before any ends, so it places the others and then fails
/// the request (EIO); the simulation does the same.
#[test]
fn an_allocated_cluster_fails_the_request_after_the_others_are_placed() {
    let w = Work::new();
    for at in ["0", "8k", "12k"] {
        let name = format!("a{}.qcow2", at.trim_end_matches('k'));
        create(&w, &name, 4096);
        w.qemu_io(&name, &[&format!("write {at} 4k")]);
        let sim = compare(w.dir.path(), &name, &["write-compressed:0:16384"])
            .unwrap_or_else(|e| panic!("allocated at {at}: {e}"));
        let rec = &sim.records[0];
        assert!(
            rec.error
                .as_deref()
                .is_some_and(|e| e.starts_with("write failed: Input/output error")),
            "{:?}",
            rec.error
        );
        // Three compressed clusters placed, one cluster's refcount taken.
        let placed = sim
            .allocated
            .iter()
            .filter(|a| a.2.starts_with("compressed data"))
            .count();
        assert_eq!(placed, 3, "allocated at {at}");
    }
}

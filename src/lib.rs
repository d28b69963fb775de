//! # qinspect — a read-only qcow2 inspector
//!
//! This library is the core of qinspect: it decodes every on-disk structure of a
//! qcow2 image, follows backing chains, and resolves guest reads the way QEMU does.
//! It has no user-interface code; the `qinspect` binary's CLI and TUI sit on top.
//!
//! ## Promises
//!
//! * **Read-only.** Files are only ever opened for reading, and no lock is taken.
//! * **No panics on bad input.** Every value read from disk is checked before it is
//!   used as an index, a size or an offset; errors name the structure and the byte
//!   offset they come from (see [`Error`]).
//! * **Bounded work.** Tables are size-checked against the file and QEMU's own
//!   limits before anything is allocated; backing chains are depth-limited and
//!   checked for loops.
//!
//! ## A tour of qcow2, by layer
//!
//! ```text
//!  analysis   lookup · map · info · check · simulate      what it means, what QEMU says
//!     │
//!  opened     io::Source → image::Qcow2 → chain::Chain    files, images, backing chains
//!     │       crypto (LUKS, legacy AES)
//!  format     header · tables · refcount · snapshot       bytes → raw + decoded values
//!             bitmap · compress · types · bytes
//! ```
//!
//! [`format`](mod@format) — the on-disk structures, decoded from bytes:
//!
//! * [`types`] — guest and host offsets, clusters, and the geometry that turns a
//!   guest offset into an L1 index, an L2 index and an offset in the cluster.
//! * [`header`] — the header at byte 0 (its field layout, written once in
//!   [`header::Field`]), the header extensions after it and the feature bits.
//! * [`tables`] — L1 and L2 entries (raw value plus decoded meaning),
//!   compressed-cluster descriptors, extended-L2 subcluster bitmaps.
//! * [`refcount`] — the refcount table and refcount blocks.
//! * [`snapshot`] — the internal snapshot table.
//! * [`bitmap`] — the persistent dirty-bitmap directory.
//!
//! [`opened`] — files and what is built from them:
//!
//! * [`io`] — the read-only source every byte comes through.
//! * [`image`] — an opened qcow2 file: header, L1, snapshots, bitmaps together.
//! * [`chain`] — layers (qcow2 or raw), backing files and external data files.
//! * [`crypto`] — encrypted images: the LUKS header, key slots, decrypting data.
//!
//! [`analysis`] — answers about an opened chain:
//!
//! * [`lookup`] — how one guest read is resolved, step by step, through the chain.
//! * [`map`] — the guest address space as extents, like `qemu-img map`.
//! * [`info`] — the summary `qemu-img info` prints.
//! * [`check`] — refcount consistency, the way `qemu-img check` sees it, and more.
//! * [`simulate`] — what QEMU's snapshot operations and writes would change, in memory.
//!
//! Every module is also reachable at the crate root (`qinspect::header`,
//! `qinspect::lookup`, ...), which is the path the examples use.
//!
//! ## Examples
//!
//! These run as doctests on the demo images in `assets/` (built by
//! `assets/make-demo-images.sh` with qemu-img and qemu-io). A project that writes
//! qcow2 images can do the same in its own tests: open what it wrote and compare with
//! what QEMU would make of it.
//!
//! Open an image with its backing chain and trace how one guest offset resolves:
//!
//! ```
//! use qinspect::chain::{Chain, OpenOptions};
//! use qinspect::lookup::{StepKind, trace};
//! use qinspect::types::{GuestOffset, HostOffset};
//!
//! let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-top.qcow2");
//! let chain = Chain::open(&path, &OpenOptions::default())?;
//! assert_eq!(chain.layers.len(), 3); // demo-top -> demo-mid -> demo-base.raw
//!
//! let t = trace(&chain, GuestOffset(0));
//! for step in &t.steps {
//!     println!("layer {}: {}", step.depth, step.explanation);
//! }
//! // Guest byte 0 is data of the top layer, at host offset 0x30000.
//! let last = t.steps.last().map(|s| &s.kind);
//! assert!(matches!(last, Some(StepKind::Data { host_offset, .. }) if *host_offset == HostOffset(0x30000)));
//! # Ok::<(), qinspect::Error>(())
//! ```
//!
//! Run the check `qemu-img check` runs, and go through what it found:
//!
//! ```
//! use qinspect::check::{CheckOptions, FindingKind, check};
//! use qinspect::image::{Qcow2, Strictness};
//! use qinspect::io::FileSource;
//! use std::sync::Arc;
//!
//! let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-corrupt.qcow2");
//! let img = Qcow2::open(Arc::new(FileSource::open(&path)?), Strictness::Lenient)?;
//! let report = check(&img, &CheckOptions::default());
//! // What `qemu-img check` says: 2 corruptions, 1 leak, exit code 2.
//! assert_eq!((report.corruptions, report.leaks, report.exit_code()), (2, 1, 2));
//! for f in &report.findings {
//!     println!("{:?} [{}] {}", f.kind, f.category, f.message);
//!     for who in &f.referrers {
//!         println!("    referenced by {}", who.describe());
//!     }
//! }
//! let leak = report.findings.iter().find(|f| f.kind == FindingKind::Leak);
//! assert_eq!(leak.and_then(|f| f.cluster), Some(5));
//! # Ok::<(), qinspect::Error>(())
//! ```
//!
//! Simulate `qemu-img snapshot -c` in memory and list what it would change (the file
//! itself is only read):
//!
//! ```
//! use qinspect::check::{CheckOptions, check};
//! use qinspect::image::{Qcow2, Strictness};
//! use qinspect::io::FileSource;
//! use qinspect::simulate::{Op, Target, simulate};
//! use std::sync::Arc;
//!
//! let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-top.qcow2");
//! let img = Qcow2::open(Arc::new(FileSource::open(&path)?), Strictness::Qemu)?;
//! let sim = simulate(&img, &path, &[Op::SnapshotCreate { name: "nightly".into() }])?;
//! let record = &sim.records[0];
//! assert_eq!(record.error, None, "QEMU would do it");
//! for change in &record.steps {
//!     println!("{}", change.describe());
//! }
//! // The new snapshot's L1 table gets a cluster of its own: refcount 0 -> 1.
//! assert!(record.steps.iter().any(|c| {
//!     matches!(c.target, Target::Refcount { .. }) && (c.before, c.after) == (0, 1)
//! }));
//! // The image as it would be afterwards checks clean.
//! assert_eq!(check(&sim.image()?, &CheckOptions::default()).exit_code(), 0);
//! # Ok::<(), qinspect::Error>(())
//! ```
#![deny(missing_docs, unreachable_pub)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod analysis;
pub mod error;
pub mod format;
pub mod opened;
#[cfg(test)]
pub(crate) mod testing;

// Every module keeps its path at the crate root (`qinspect::header`, `crate::tables`, ...).
pub use analysis::{check, compare, info, locate, lookup, map, simulate};
pub use format::{bitmap, bytes, compress, header, refcount, snapshot, tables, types};
pub use opened::{chain, crypto, image, io};

pub use error::{CorruptKind, Error, Result};

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
//! ## A tour of qcow2, by module
//!
//! * [`types`] — guest and host offsets, clusters, and the geometry that turns a
//!   guest offset into an L1 index, an L2 index and an offset in the cluster.
//! * [`header`] — the header at byte 0 and the header extensions after it.
//! * [`tables`] — L1 and L2 entries (raw value plus decoded meaning),
//!   compressed-cluster descriptors, extended-L2 subcluster bitmaps.
//! * [`refcount`] — the refcount table and refcount blocks.
//! * [`snapshot`] — the internal snapshot table.
//! * [`bitmap`] — the persistent dirty-bitmap directory.
//! * [`image`] — an opened qcow2 file: header, L1, snapshots, bitmaps together.
//! * [`chain`] — layers (qcow2 or raw), backing files and external data files.
//! * [`lookup`] — how one guest read is resolved, step by step, through the chain.
//! * [`map`] — the guest address space as extents, like `qemu-img map`.
//! * [`info`] — the summary `qemu-img info` prints.
//! * [`check`] — refcount consistency, the way `qemu-img check` sees it, and more.
//! * [`crypto`] — encrypted images: the LUKS header, key slots, decrypting data.
#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod bitmap;
pub mod bytes;
pub mod chain;
pub mod check;
pub mod compress;
pub mod crypto;
pub mod error;
pub mod header;
pub mod image;
pub mod info;
pub mod io;
pub mod lookup;
pub mod map;
pub mod refcount;
pub mod simulate;
pub mod snapshot;
pub mod tables;
pub mod types;

pub use error::{Error, Result};

//! Analyses: what the opened objects mean for a guest, and what QEMU would say
//! about them.
//!
//! * [`lookup`] — how one guest read is resolved, step by step, through the chain.
//! * [`map`] — the guest address space as extents, like `qemu-img map`.
//! * [`info`] — the summary `qemu-img info` prints.
//! * [`compare`] — two states of an image (active, snapshots, a simulation) guest
//!   cluster by guest cluster.
//! * [`locate`] — which structure (header field, table entry, snapshot record) a
//!   host offset belongs to.
//!
//! The two larger analyses, [`check`](crate::check) (refcount consistency the way
//! `qemu-img check` sees it) and [`simulate`](crate::simulate) (what QEMU's writes
//! would change, in memory), still sit at the crate root; they belong to this layer
//! and keep their paths when they move here.

pub mod compare;
pub mod info;
pub mod locate;
pub mod lookup;
pub mod map;

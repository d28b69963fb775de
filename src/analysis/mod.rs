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
//! * [`check`] — refcount consistency the way `qemu-img check` sees it: the walk
//!   that counts references, the comparison with the stored refcounts, COPIED flags
//!   and overlaps.
//! * [`simulate`] — what QEMU's writes, discards and snapshot operations would
//!   change, in memory, with every refcount change and its reason.

pub mod check;
pub mod compare;
pub mod info;
pub mod locate;
pub mod lookup;
pub mod map;
pub mod simulate;

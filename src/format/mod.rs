//! The on-disk format: every structure of a qcow2 file, decoded from bytes and
//! nothing else.
//!
//! Nothing here opens a file. Each module takes bytes (or a [`Source`](crate::io::Source)
//! to read a table from) and returns the structure as stored (the raw value) together
//! with what it means (the decoded value), the way gimli and object pair raw and
//! decoded forms.
//!
//! * [`types`] — guest and host offsets, cluster numbers and the [`Geometry`](types::Geometry)
//!   that does all cluster arithmetic.
//! * [`bytes`] — bounds-checked big-endian reads from a buffer.
//! * [`header`] — the header at byte 0, its field layout, the header extensions and
//!   the feature bits.
//! * [`tables`] — L1 and L2 entries (the raw [`L1Entry`](tables::L1Entry) and
//!   [`L2Entry`](tables::L2Entry), decoded into [`L1Mapping`](tables::L1Mapping) and
//!   [`L2Mapping`](tables::L2Mapping)), compressed descriptors and extended-L2
//!   subcluster bitmaps.
//! * [`refcount`] — the refcount table and refcount blocks.
//! * [`snapshot`] — the internal snapshot table.
//! * [`bitmap`] — the persistent dirty-bitmap directory and bitmap tables.
//! * [`compress`] — inflating a compressed cluster (deflate or zstd).

pub mod bitmap;
pub mod bytes;
pub mod compress;
pub mod header;
pub mod refcount;
pub mod snapshot;
pub mod tables;
pub mod types;

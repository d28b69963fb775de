//! Opened objects: files read through a [`Source`](io::Source), and the images and
//! chains built from them.
//!
//! * [`io`] — the read-only [`Source`](io::Source) trait, files and in-memory buffers.
//! * [`image`] — one opened qcow2 file: its header, extensions, active L1 table,
//!   snapshots and bitmaps, checked the way QEMU checks them when it opens an image.
//! * [`chain`] — the layers a guest read goes through: qcow2 or raw images, their
//!   backing files (depth-limited, loop-checked) and external data files.
//! * [`crypto`] — encrypted images: the LUKS header, key slots and decrypting data.

pub mod chain;
pub mod crypto;
pub mod image;
pub mod io;

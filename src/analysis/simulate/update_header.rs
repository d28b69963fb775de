//! `qcow2_update_header`: QEMU writes the whole header cluster anew from what
//! its open read, not the fields it changed. It does so when it drops the
//! bitmaps extension of an image a program without bitmap support changed
//! ([`Sim::drop_ignored_bitmaps`]), when it marks an image corrupt
//! (`qcow2_mark_corrupt`, [`Sim::mark_corrupt`]), when a read-write open
//! marks bitmaps in use or clears autoclear bits it does not know
//! ([`Sim::open_header_update`]), and when it marks one clean or
//! consistent (`qcow2_mark_clean`, `qcow2_mark_consistent`,
//! [`Sim::clear_features`]). What it writes:
//!
//! 1. the header: 72 bytes for version 2, 112 for version 3 (the size QEMU
//!    knows, `header_length` saying so), with the disk size in whole sectors
//!    and, for version 3, autoclear bits QEMU does not know cleared; then the
//!    header fields past 112 bytes it does not know, as they were;
//! 2. the extensions, in this order: the backing format, the data file name
//!    (when the image has one), the crypto header pointer, its own feature
//!    name table (version 3, clusters over 4 KiB: whatever table the image
//!    had, or none), the bitmaps extension (when QEMU uses the bitmaps: the
//!    autoclear bit for them is set), the extensions it does not know, in
//!    their order; the end mark;
//! 3. the backing file name, to its first NUL byte; zeros to the end of the
//!    cluster.
//!
//! It has one cluster for all of it: each part must fit whole in what is
//! left (an extension with its padding, the name without a NUL), or it writes
//! nothing and fails with ENOSPC, "No space left on device". The file's own
//! header always fits its cluster (QEMU's open checks that), but the rewrite
//! can be longer: QEMU adds its feature name table to a version 3 image with
//! clusters over 4 KiB and an end mark to extensions that ran to their end
//! without one.

use super::{Sim, SimError, SimResult};
use crate::bytes::{align8, c_string};
use crate::header::{ExtensionKind, Field, Header};
use crate::types::HostOffset;

/// The text of `qcow2_update_header`'s failure when the header does not fit.
pub(super) const NO_SPACE: &str = "No space left on device";

/// How qemu-img check words a check whose marking clean does not fit the
/// header cluster; the repair on open says "Could not repair dirty image:
/// No space left on device" instead ([`Sim::repair_on_open_words`]).
pub(super) const REPAIR_NO_SPACE: &str = "Check failed: No space left on device";

/// One header extension as `header_ext_add` writes it: type, length, the data
/// padded to 8 bytes; `None` (ENOSPC, nothing added) when that does not fit
/// whole in a cluster of `cs` bytes after what `out` holds.
fn push_extension(out: &mut Vec<u8>, ext_type: u32, data: &[u8], cs: u64) -> Option<()> {
    let len = 8u64.checked_add(align8(data.len() as u64))?;
    if cs.checked_sub(out.len() as u64)? < len {
        return None;
    }
    out.extend_from_slice(&ext_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(align8(out.len() as u64) as usize, 0);
    Some(())
}

/// The feature name table QEMU writes (48 bytes a feature: type, bit, name).
fn feature_table() -> Vec<u8> {
    let mut t = Vec::new();
    for (group, bit, name) in crate::header::BUILTIN_FEATURE_NAMES {
        let mut e = [0u8; 48];
        e[0] = group.table_type();
        e[1] = *bit;
        for (d, s) in e.iter_mut().skip(2).zip(name.bytes()) {
            *d = s;
        }
        t.extend_from_slice(&e);
    }
    t
}

/// The fixed header and the fields past it QEMU does not know, as
/// `qcow2_update_header` writes them from header `h` read from `c0`.
fn fixed_part(h: &Header, c0: &[u8]) -> Vec<u8> {
    let (fixed, unknown) = if h.version >= 3 {
        let qemu = crate::header::V3_QEMU_HEADER_LEN as usize;
        (qemu, (h.header_length as usize).saturating_sub(qemu))
    } else {
        (crate::header::V2_HEADER_LEN as usize, 0)
    };
    let mut out: Vec<u8> = c0
        .iter()
        .copied()
        .take(fixed.saturating_add(unknown))
        .collect();
    out.resize(fixed.saturating_add(unknown), 0);
    Field::BackingFileOffset.write(&mut out, 0);
    Field::BackingFileSize.write(&mut out, 0);
    // bs->total_sectors * BDRV_SECTOR_SIZE.
    Field::Size.write(&mut out, h.size & !511);
    if h.version >= 3 {
        // compression_type (zlib, 0, for a 104-byte header), then padding.
        for b in out
            .iter_mut()
            .take(fixed)
            .skip(Field::CompressionType.offset() as usize)
        {
            *b = 0;
        }
        Field::CompressionType.write(&mut out, u64::from(h.compression_type_raw));
        Field::HeaderLength.write(&mut out, fixed.saturating_add(unknown) as u64);
        Field::AutoclearFeatures.write(
            &mut out,
            h.autoclear_features
                & (crate::header::AUTOCLEAR_BITMAPS | crate::header::AUTOCLEAR_DATA_FILE_RAW),
        );
    }
    out
}

impl Sim {
    /// The header cluster `qcow2_update_header` writes now, from the header
    /// cluster as it is (see the module's comment); `None` when it does not
    /// fit the cluster (the update fails with ENOSPC and writes nothing).
    pub(super) fn qemu_header_cluster(&mut self) -> SimResult<Option<Vec<u8>>> {
        let c0 = self.read_bytes(HostOffset(0), self.cs);
        self.qemu_header_cluster_from(&c0)
    }

    /// [`Sim::qemu_header_cluster`] from `c0`, the header cluster as it is.
    fn qemu_header_cluster_from(&self, c0: &[u8]) -> SimResult<Option<Vec<u8>>> {
        let h = Header::parse(c0)?;
        let (exts, _) = crate::header::parse_extensions(&h, c0);
        let cs = self.cs;
        let mut out = fixed_part(&h, c0);
        if out.len() as u64 > cs {
            return Ok(None);
        }
        let find = |t: u32| exts.iter().find(|e| e.ext_type == t);
        let mut parts: Vec<(u32, &[u8])> = Vec::new();
        if let Some(e) = find(crate::header::EXT_BACKING_FORMAT) {
            parts.push((e.ext_type, c_string(&e.data)));
        }
        if let Some(e) = find(crate::header::EXT_DATA_FILE).filter(|_| h.has_data_file()) {
            parts.push((e.ext_type, c_string(&e.data)));
        }
        if let Some(e) = find(crate::header::EXT_CRYPTO) {
            parts.push((e.ext_type, &e.data));
        }
        let features = feature_table();
        if h.version >= 3 && cs > 4096 {
            parts.push((crate::header::EXT_FEATURE_TABLE, &features));
        }
        if h.autoclear_features & crate::header::AUTOCLEAR_BITMAPS != 0
            && let Some(e) = find(crate::header::EXT_BITMAPS)
        {
            parts.push((e.ext_type, &e.data));
        }
        for e in exts
            .iter()
            .filter(|e| matches!(e.kind, ExtensionKind::Unknown))
        {
            parts.push((e.ext_type, &e.data));
        }
        // The end mark.
        parts.push((0, &[]));
        for (t, data) in parts {
            if push_extension(&mut out, t, data, cs).is_none() {
                return Ok(None);
            }
        }
        if h.backing_file_offset.get() != 0 {
            let name = crate::bytes::slice(
                c0,
                h.backing_file_offset.get() as usize,
                h.backing_file_size as usize,
            );
            let name = c_string(name);
            let name_at = out.len() as u64;
            // The name needs no NUL after it: it may end the cluster.
            if cs.saturating_sub(name_at) < name.len() as u64 {
                return Ok(None);
            }
            Field::BackingFileOffset.write(&mut out, name_at);
            Field::BackingFileSize.write(&mut out, name.len() as u64);
            out.extend_from_slice(name);
        }
        out.resize(cs as usize, 0);
        Ok(Some(out))
    }

    /// `qcow2_mark_corrupt` for the reason `why` (QEMU's words): the corrupt
    /// bit set, and the header cluster written anew by
    /// `qcow2_update_header`: the bit and a disk size cut to whole sectors
    /// are recorded as field changes, any other byte QEMU writes differently
    /// (a feature name table put back, a header length of 112, ...) as a
    /// note and the bytes themselves. When this operation marked an image
    /// with lazy refcounts dirty ([`Sim::l2_link`]), the dirty bit QEMU
    /// wrote then stays: the image is never closed to clear it.
    ///
    /// When the header does not fit its cluster the update fails and
    /// nothing is written; QEMU does not look at that failure
    /// (`qcow2_signal_corruption` makes the image unusable all the same): the
    /// corrupt bit lives in its memory only, for this one command, and the
    /// next open does not see it.
    pub(super) fn mark_corrupt(&mut self, why: String) -> SimResult<()> {
        let mut features = self.header_field(Field::IncompatibleFeatures);
        if self.lazy_dirtied() && features & crate::header::INCOMPAT_DIRTY == 0 {
            features |= crate::header::INCOMPAT_DIRTY;
            let saved = self.reason.clone();
            self.why("qcow2_mark_dirty: a write's L2 entries were linked on an image with lazy refcounts (the bit stays, QEMU never closes the image to clear it)");
            let r = self.set_header(Field::IncompatibleFeatures, features);
            self.reason = saved;
            r?;
        }
        let saved = self.reason.clone();
        self.why(why);
        if self.qemu_header_cluster()?.is_none() {
            self.note(format!(
                "QEMU sets the corrupt bit and writes the header cluster again (qcow2_update_header), but what it writes does not fit the cluster: the update fails ({NO_SPACE}) and writes nothing, so the bit stays in its memory for this command only"
            ));
            self.unstored_features = features | crate::header::INCOMPAT_CORRUPT;
            self.reason = saved;
            return Ok(());
        }
        let mut r = self.set_header(
            Field::IncompatibleFeatures,
            features | crate::header::INCOMPAT_CORRUPT,
        );
        let size = self.header_field(Field::Size);
        if r.is_ok() && size & 511 != 0 {
            r = self.set_header(Field::Size, size & !511);
        }
        if r.is_ok() {
            r = self.rewrite_header_rest();
        }
        self.reason = saved;
        r
    }

    /// `qcow2_mark_clean` and `qcow2_mark_consistent`: each first writes
    /// QEMU's caches back (`qcow2_flush_caches`; the check left nothing in
    /// the L2 cache), when its bit is set, then writes the header again
    /// ([`Sim::clear_features`]). Where that does not fit its cluster the
    /// check fails with ENOSPC (`qcow2_co_check_locked` returns the error):
    /// qemu-img check's "Check failed", or the repair on open's "Could not
    /// repair dirty image" ([`REPAIR_NO_SPACE`]).
    pub(super) fn mark_clean(&mut self) -> SimResult<()> {
        let bits = crate::header::INCOMPAT_DIRTY | crate::header::INCOMPAT_CORRUPT;
        if self.header_field(Field::IncompatibleFeatures) & bits != 0 {
            self.refcounts_flushed();
            self.why("no corruption left: the image is marked clean and consistent");
            if !self.clear_features(bits)? {
                return Err(SimError::Qemu(REPAIR_NO_SPACE.into()));
            }
        }
        Ok(())
    }

    /// The repair on open of a dirty image (`qcow2_do_open`): a failure to
    /// mark it clean (`result`'s [`REPAIR_NO_SPACE`]) fails the open, in
    /// the words of `op`'s command.
    pub(super) fn repair_on_open_words(
        &self,
        op: &super::Op,
        result: SimResult<()>,
    ) -> SimResult<()> {
        match result {
            Err(SimError::Qemu(m)) if m == REPAIR_NO_SPACE => {
                Err(SimError::Qemu(super::backing::open_words(
                    op,
                    &self.path,
                    &format!("Could not repair dirty image: {}", NO_SPACE),
                )))
            }
            r => r,
        }
    }

    /// `qcow2_mark_clean` (`bits` the dirty bit) and `qcow2_mark_consistent`
    /// (the corrupt bit): QEMU clears the bits in its memory and writes the
    /// header cluster anew with `qcow2_update_header`. `false` when what it
    /// writes does not fit the cluster: the update fails (ENOSPC) and writes
    /// nothing, so the bits stay on disk. The caller says what QEMU does with
    /// that failure: the check's repair fails, the close ignores it.
    pub(super) fn clear_features(&mut self, bits: u64) -> SimResult<bool> {
        let features = self.header_field(Field::IncompatibleFeatures);
        if self.qemu_header_cluster()?.is_none() {
            self.note(format!(
                "QEMU clears the dirty or corrupt bit by writing the header cluster again (qcow2_update_header), but what it writes does not fit the cluster: the update fails ({NO_SPACE}) and writes nothing, so the bit stays on disk"
            ));
            return Ok(false);
        }
        self.set_header(Field::IncompatibleFeatures, features & !bits)?;
        self.rewrite_header_rest()?;
        Ok(true)
    }

    /// Write the bytes of cluster 0 that `qcow2_update_header` writes
    /// differently from what the file holds, with a note saying so.
    pub(super) fn rewrite_header_rest(&mut self) -> SimResult<()> {
        let have = self.read_bytes(HostOffset(0), self.cs);
        // The caller found that it fits.
        let Some(want) = self.qemu_header_cluster_from(&have)? else {
            return Ok(());
        };
        let differs = |(a, b): (&u8, &u8)| a != b;
        let Some(first) = want.iter().zip(&have).position(differs) else {
            return Ok(());
        };
        let last = want.iter().zip(&have).rposition(differs).unwrap_or(first);
        let bytes = want
            .get(first..=last)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        self.note(format!(
            "QEMU writes the whole header cluster again from what its open read (qcow2_update_header): bytes {first:#x}..{:#x} of it differ from the file's",
            last.saturating_add(1)
        ));
        self.write_bytes(HostOffset(first as u64), &bytes)
    }

    /// The autoclear bits of the header that QEMU 10.0.2 does not know: all
    /// but bit 0 (bitmaps) and bit 1 (raw external data file). A version 2
    /// header has no autoclear field (QEMU reads it as 0).
    pub(super) fn unknown_autoclear(&mut self) -> u64 {
        self.header_field(Field::AutoclearFeatures)
            & !(crate::header::AUTOCLEAR_BITMAPS | crate::header::AUTOCLEAR_DATA_FILE_RAW)
    }

    /// The header update of a read-write open that keeps the bitmaps
    /// extension. The open clears the autoclear bits QEMU does not know: an
    /// autoclear bit says that the data it describes is valid only while
    /// every program that writes the image knows the bit, and QEMU, which
    /// does not, changes the image. It drops them from its copy of the
    /// header, and the header cluster is written again
    /// (`qcow2_update_header`): by the bitmaps' marking in use, which does
    /// so for every image with bitmaps to mark, or else by the open's own
    /// header update. The rewrite may move the bitmaps extension (QEMU adds
    /// its feature name table before it, where the image had none): the
    /// close repoints the extension where it now is. The caller has checked
    /// that the rewrite fits the cluster.
    pub(super) fn open_header_update(&mut self) -> SimResult<()> {
        let unknown = self.unknown_autoclear();
        if unknown == 0 && !self.marks_bitmaps() {
            return Ok(());
        }
        let saved = self.reason.clone();
        let mut r = Ok(());
        if unknown == 0 {
            self.why("the bitmaps' marking in use writes the header again");
        } else {
            self.note(format!(
                "the header has autoclear bits QEMU does not know ({unknown:#x}): its read-write open clears them and writes the header again"
            ));
            self.why("autoclear bits QEMU does not know are cleared on open");
            let autoclear = self.header_field(Field::AutoclearFeatures);
            r = self.set_header(Field::AutoclearFeatures, autoclear & !unknown);
        }
        if r.is_ok() {
            r = self.rewrite_header_rest();
        }
        self.reason = saved;
        r?;
        let c0 = self.read_bytes(HostOffset(0), self.cs);
        let h = Header::parse(&c0)?;
        let (exts, _) = crate::header::parse_extensions(&h, &c0);
        if let (Some(b), Some(e)) = (
            self.bitmaps.as_mut(),
            exts.iter()
                .find(|e| e.ext_type == crate::header::EXT_BITMAPS),
        ) {
            b.ext_offset = e.offset;
        }
        Ok(())
    }
}

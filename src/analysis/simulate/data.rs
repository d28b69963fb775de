//! Guest data in the simulated image, described rather than held.
//!
//! Every host range a simulated write puts data into gets a short description
//! (a [`Piece`]): a byte repeated (qemu-io's pattern, zeros), bytes of a
//! read-only file at some offset (the image's own clusters before the
//! simulation), the guest bytes of the view below this layer (copy-on-read,
//! copy-on-write from a backing file), or a few bytes held in memory (a
//! decompressed cluster, a cluster the simulation also keeps as metadata).
//! A gigabyte write is one entry. Reading the simulated image lays these over
//! the metadata clusters and the original file, so a guest read through it
//! returns what QEMU's image would return.
//!
//! In an encrypted image a write describes whole sectors of plaintext, which
//! read encrypted ([`Sealed`]; a copy-on-write reads stored sectors through
//! [`Opened`]), as QEMU stores them.
//!
//! The descriptions are exact copies of the guest's view at the moment of the
//! write: copy-on-write reads the guest range of the current layer (data,
//! zeros or the layer below), as QEMU's `perform_cow` does.

use super::{Sim, SimError, SimResult};
use crate::chain::{Chain, Layer, LayerKind, OpenOptions};
use crate::error::{Error, Result};
use crate::header::{CompressionType, Field};
use crate::io::SharedSource;
use crate::lookup::{ReadCache, read};
use crate::tables::{L2Entry, SubclusterType};
use crate::types::{GuestOffset, HostOffset};
use std::sync::Arc;

mod map;
mod sealed;
pub use map::DataMap;
pub use sealed::{Opened, Sealed};

/// qemu-io's pattern when `write` is given no `-P`.
pub const DEFAULT_PATTERN: u8 = 0xcd;

/// What one run of host bytes holds.
#[derive(Clone, Debug)]
pub enum Piece {
    /// One byte, repeated.
    Fill(u8),
    /// The bytes of a read-only file from `at` (zeros past its end).
    File {
        /// The file.
        src: SharedSource,
        /// Where the run starts in it.
        at: u64,
    },
    /// The guest bytes of the view below this layer, from guest offset `.0`.
    Below(u64),
    /// Bytes in memory, from index `.1`.
    Bytes(Arc<[u8]>, u64),
    /// Plaintext stored encrypted (an encrypted image's guest data), from
    /// byte `.1` of it.
    Sealed(Arc<Sealed>, u64),
    /// Stored bytes read as plaintext (a copy-on-write in an encrypted
    /// image), from byte `.1` of them.
    Opened(Arc<Opened>, u64),
}

impl Piece {
    /// The same piece, `n` bytes further on.
    fn skip(&self, n: u64) -> Piece {
        match self {
            Piece::Fill(b) => Piece::Fill(*b),
            Piece::File { src, at } => Piece::File {
                src: src.clone(),
                at: at.saturating_add(n),
            },
            Piece::Below(g) => Piece::Below(g.saturating_add(n)),
            Piece::Bytes(b, o) => Piece::Bytes(b.clone(), o.saturating_add(n)),
            Piece::Sealed(s, o) => Piece::Sealed(s.clone(), o.saturating_add(n)),
            Piece::Opened(s, o) => Piece::Opened(s.clone(), o.saturating_add(n)),
        }
    }

    /// Whether `next` continues this piece after `len` bytes.
    fn continued_by(&self, len: u64, next: &Piece) -> bool {
        match (self, next) {
            (Piece::Fill(a), Piece::Fill(b)) => a == b,
            (Piece::Below(a), Piece::Below(b)) => a.saturating_add(len) == *b,
            (Piece::File { src: s, at: a }, Piece::File { src: t, at: b }) => {
                Arc::ptr_eq(s, t) && a.saturating_add(len) == *b
            }
            (Piece::Sealed(s, a), Piece::Sealed(t, b)) => {
                Arc::ptr_eq(s, t) && a.saturating_add(len) == *b
            }
            (Piece::Opened(s, a), Piece::Opened(t, b)) => {
                Arc::ptr_eq(s, t) && a.saturating_add(len) == *b
            }
            _ => false,
        }
    }

    /// Fill `dst` with this piece's bytes; `below` is the view under the layer.
    pub fn fill(&self, dst: &mut [u8], below: Option<&Chain>) -> std::io::Result<()> {
        match self {
            Piece::Fill(b) => dst.fill(*b),
            Piece::File { src, at } => {
                dst.fill(0);
                src.read_at(dst, *at)?;
            }
            Piece::Below(g) => match below {
                Some(chain) => read(chain, GuestOffset(*g), dst, &mut ReadCache::default())
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
                None => dst.fill(0),
            },
            Piece::Bytes(b, o) => {
                dst.fill(0);
                let from =
                    crate::bytes::slice(b, usize::try_from(*o).unwrap_or(usize::MAX), dst.len());
                if let Some(d) = dst.get_mut(..from.len()) {
                    d.copy_from_slice(from);
                }
            }
            Piece::Sealed(s, o) => s.fill(*o, dst, below)?,
            Piece::Opened(s, o) => s.fill(*o, dst, below)?,
        }
        Ok(())
    }
}

/// What a guest write puts into its clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NewData {
    /// qemu-io's pattern byte (0 for the zeros of a write-zeroes fallback).
    Fill(u8),
    /// What the view below holds there (copy-on-read).
    Below,
}

/// The simulation's guest data.
#[derive(Debug)]
pub(super) struct Data {
    pub(super) map: DataMap,
    pub(super) new: NewData,
    /// The view below (opened on first use): `Some(None)` when there is none.
    below: Option<Option<Arc<Chain>>>,
    /// Why the guest bytes cannot be predicted, if they cannot.
    pub(super) unknown: Option<String>,
    /// The data key of an encrypted image: its guest data is written
    /// encrypted.
    pub(super) key: Option<crate::crypto::DataKey>,
    /// For an overlay over an encrypted image: that image's key.
    pub(super) below_key: Option<crate::crypto::DataKey>,
    /// The note that the data is stored encrypted, and the step it was put at.
    pub(super) sealed_note: Option<(String, usize)>,
}

impl Default for Data {
    fn default() -> Self {
        Data {
            map: DataMap::default(),
            new: NewData::Fill(DEFAULT_PATTERN),
            below: None,
            unknown: None,
            key: None,
            below_key: None,
            sealed_note: None,
        }
    }
}

impl Data {
    /// Guest data for an image with this data key (none: not encrypted).
    pub(super) fn with_key(key: Option<crate::crypto::DataKey>) -> Data {
        Data {
            key,
            ..Default::default()
        }
    }

    /// The pattern a write of this operation uses.
    pub(super) fn pattern(&self) -> u8 {
        match self.new {
            NewData::Fill(b) => b,
            NewData::Below => 0,
        }
    }

    /// The view below, if it was opened.
    pub(super) fn below(&self) -> Option<Arc<Chain>> {
        self.below.clone().flatten()
    }
}

impl Sim {
    /// Open the view under this layer: for an overlay the image (or its
    /// snapshot, at the image's disk size, as `qemu-nbd -l` shows it), else
    /// the image's backing chain.
    fn open_below(&self) -> Result<Option<Chain>> {
        if let Some((base, snap)) = &self.overlay_of {
            let opts = OpenOptions {
                snapshot: snap.clone(),
                snapshot_active_size: true,
                ..Default::default()
            };
            let c = Chain::open(base, &opts)?;
            // An encrypted image under the overlay reads with its key.
            if let (Some(k), Some(img)) = (
                &self.data.below_key,
                c.layers.first().and_then(|l| l.qcow2()),
            ) {
                img.set_data_key(k.clone());
            }
            return Ok(Some(c));
        }
        if !self.backing_named {
            return Ok(None);
        }
        let mut c = Chain::open(&self.path, &Default::default())?;
        if c.layers.is_empty() {
            return Ok(None);
        }
        c.layers.remove(0);
        Ok(Some(c))
    }

    /// The view below, opened once; a failure makes the guest bytes unknown
    /// (the metadata does not depend on it).
    fn below_view(&mut self) -> Option<Arc<Chain>> {
        if self.data.below.is_none() {
            let v = match self.open_below() {
                Ok(v) => v.map(Arc::new),
                Err(e) => {
                    self.data_unknown(format!("the backing file cannot be read: {e}"));
                    None
                }
            };
            self.data.below = Some(v);
        }
        self.data.below()
    }

    fn data_unknown(&mut self, why: String) {
        self.data.unknown.get_or_insert(why);
    }

    /// A write puts its new data at `host..host + len` (guest `guest..`); the
    /// file grows to hold it.
    pub(super) fn data_written(&mut self, host: HostOffset, guest: GuestOffset, len: u64) {
        if self.has_data_file {
            self.data_unknown("the data is in an external data file".into());
            return;
        }
        self.data_lands(host, len);
        let piece = match self.data.new {
            NewData::Fill(b) => Piece::Fill(b),
            NewData::Below => match self.below_view() {
                Some(_) => Piece::Below(guest.get()),
                None => Piece::Fill(0),
            },
        };
        self.data_put(host.get(), guest.get(), vec![(len, piece)]);
    }

    /// Copy-on-write: the guest bytes `guest..guest + len` of this layer, as
    /// they read now, go to `host..`.
    pub(super) fn data_copied(
        &mut self,
        guest: GuestOffset,
        len: u64,
        host: HostOffset,
    ) -> SimResult<()> {
        if self.has_data_file {
            self.data_unknown("the data is in an external data file".into());
            return Ok(());
        }
        self.data_lands(host, len);
        let pieces = self.guest_pieces(guest.get(), len)?;
        self.data_put(host.get(), guest.get(), pieces);
        Ok(())
    }

    /// Data written at `host..host + len` in the image file: the file
    /// reaches its end. QEMU's allocation of data clusters does not grow
    /// the file; the write of the data and of what copy-on-write fills in
    /// does (zeros too, when the copy reads as zeros: QEMU writes zeros
    /// over the copy-on-write area), so with extended L2 entries the file
    /// can end at the last subcluster written.
    fn data_lands(&mut self, host: HostOffset, len: u64) {
        if len > 0 {
            self.file_len = self.file_len.max(host.saturating_add(len).get());
        }
    }

    /// For an in-place write of `a..b` (relative to the cluster at guest
    /// `g0`, host `h0`): the parts of its first and last subclusters that
    /// the write does not cover, when those subclusters are not data yet
    /// (zeros, or unallocated with a host cluster), keep reading as they did.
    pub(super) fn data_keep_around(
        &mut self,
        l2: HostOffset,
        index: u64,
        g0: GuestOffset,
        h0: HostOffset,
        (a, b): (u64, u64),
    ) -> SimResult<()> {
        if a >= b {
            return Ok(());
        }
        let bits = self.geo.subcluster_bits();
        let scs = self.geo.subcluster_size();
        let (raw, bitmap) = self.l2_entry_at(l2, index);
        let e = L2Entry { raw, bitmap };
        let first = (a >> bits) as u32;
        let last = (b.saturating_sub(1) >> bits) as u32;
        if e.subcluster_type(&self.geo, self.has_data_file, first) != SubclusterType::Normal {
            let from = u64::from(first) << bits;
            self.data_copied(
                g0.saturating_add(from),
                a.saturating_sub(from),
                h0.saturating_add(from),
            )?;
        }
        if e.subcluster_type(&self.geo, self.has_data_file, last) != SubclusterType::Normal {
            let to = (u64::from(last) << bits).saturating_add(scs);
            self.data_copied(
                g0.saturating_add(b),
                to.saturating_sub(b),
                h0.saturating_add(b),
            )?;
        }
        Ok(())
    }

    /// What guest bytes `g..g + len` of this layer read now, as pieces.
    fn guest_pieces(&mut self, g: u64, len: u64) -> SimResult<Vec<(u64, Piece)>> {
        let mut out: Vec<(u64, Piece)> = Vec::new();
        let unit = self.geo.subcluster_size().max(1);
        let end = g.saturating_add(len);
        let mut pos = g;
        while pos < end {
            let in_unit = pos.checked_rem(unit).unwrap_or(0);
            let n = unit
                .saturating_sub(in_unit)
                .min(end.saturating_sub(pos))
                .max(1);
            let (raw, bitmap) = match self.l2_table_of(GuestOffset(pos)) {
                None => (0, 0),
                Some(l2) => self.l2_entry_at(l2, self.geo.l2_index(GuestOffset(pos))),
            };
            let sc = (self.within(pos) >> self.geo.subcluster_bits()) as u32;
            let e = L2Entry { raw, bitmap };
            match e.subcluster_type(&self.geo, self.has_data_file, sc) {
                SubclusterType::Normal => {
                    let host = L2Entry::from_word(raw)
                        .host_offset()
                        .0
                        .saturating_add(self.within(pos));
                    out.extend(self.host_plain(host, n, pos));
                }
                SubclusterType::ZeroPlain | SubclusterType::ZeroAlloc => {
                    out.push((n, Piece::Fill(0)));
                }
                SubclusterType::UnallocatedPlain | SubclusterType::UnallocatedAlloc => {
                    let p = match self.below_view() {
                        Some(_) => Piece::Below(pos),
                        None => Piece::Fill(0),
                    };
                    out.push((n, p));
                }
                SubclusterType::Compressed => {
                    let bytes = self.inflate(raw, pos)?;
                    out.push((n, Piece::Bytes(bytes, self.within(pos))));
                }
                SubclusterType::Invalid => {
                    return Err(SimError::Qemu(format!(
                        "write failed: Input/output error (the copy-on-write reads guest {pos:#x}, whose L2 entry has contradictory bits)"
                    )));
                }
            }
            pos = pos.saturating_add(n);
        }
        Ok(out)
    }

    /// The header's compression type: its `compression_type` field when the
    /// header (v3) is long enough to hold it, else deflate.
    pub(super) fn compression_type(&mut self) -> CompressionType {
        let header_length = self.header_field(Field::HeaderLength);
        if self.version < 3 || header_length <= Field::CompressionType.offset() {
            return CompressionType::Deflate;
        }
        match self.header_field(Field::CompressionType) {
            0 => CompressionType::Deflate,
            1 => CompressionType::Zstd,
            // A one-byte field.
            n => CompressionType::Unknown(u8::try_from(n).unwrap_or(u8::MAX)),
        }
    }

    /// The compressed cluster `raw` names, inflated.
    fn inflate(&mut self, raw: u64, guest: u64) -> SimResult<Arc<[u8]>> {
        let Some(d) = (L2Entry { raw, bitmap: 0 }).compressed_descriptor(&self.geo) else {
            return Err(SimError::Qemu(format!(
                "guest {guest:#x} is not a compressed cluster"
            )));
        };
        let buf = self.read_bytes(d.offset, d.size.min(self.cs.saturating_mul(2)));
        let kind = self.compression_type();
        let out = crate::compress::decompress(kind, &buf, self.cs as usize).map_err(|e| {
            SimError::Qemu(format!(
                "write failed: Input/output error (the copy-on-write reads the compressed cluster of guest {guest:#x} at host {:#x}: {e})",
                d.offset.0
            ))
        })?;
        Ok(Arc::from(out))
    }

    /// Host bytes `host..host + n` as they are now.
    fn host_pieces(&self, host: u64, n: u64, out: &mut Vec<(u64, Piece)>) {
        let end = host.saturating_add(n);
        let mut at = host;
        for (s, l, p) in self.data.map.within(host, n) {
            if s > at {
                self.file_pieces(at, s.saturating_sub(at), out);
            }
            out.push((l, p));
            at = s.saturating_add(l);
        }
        if at < end {
            self.file_pieces(at, end.saturating_sub(at), out);
        }
    }

    /// Host bytes no data description covers: a cluster the simulation
    /// holds, or the original file (zeros past a cut or the end).
    fn file_pieces(&self, host: u64, n: u64, out: &mut Vec<(u64, Piece)>) {
        let end = host.saturating_add(n);
        let mut at = host;
        while at < end {
            let c = self.cluster_of(at);
            let within = self.within(at);
            let m = self
                .cs
                .saturating_sub(within)
                .min(end.saturating_sub(at))
                .max(1);
            let p = match self.clusters.held(c, &self.base, self.zero_from) {
                Some(cl) => Piece::Bytes(
                    Arc::from(crate::bytes::slice(&cl, within as usize, m as usize)),
                    0,
                ),
                None if at >= self.zero_from || at >= self.file_len => Piece::Fill(0),
                None => Piece::File {
                    src: self.base.clone(),
                    at,
                },
            };
            match out.last_mut() {
                Some((l, last)) if last.continued_by(*l, &p) => *l = l.saturating_add(m),
                _ => out.push((m, p)),
            }
            at = at.saturating_add(m);
        }
    }

    /// The guest disk this layer would show: the simulated image over the
    /// view below it. Fails when the guest bytes cannot be predicted.
    pub fn guest_chain(&mut self) -> Result<Chain> {
        if let Some(why) = self.guest_bytes_unknown() {
            return Err(Error::unsupported("the simulated guest bytes", why));
        }
        let image = self.image()?;
        let view = image.active_view();
        let mut layers = vec![Layer {
            path: self.path.clone(),
            src: self.source(),
            kind: LayerKind::Qcow2 {
                image: Box::new(image),
                view,
                data_file: None,
            },
        }];
        if let Some(below) = self.open_below()? {
            layers.extend(below.layers);
        }
        Ok(Chain {
            layers,
            notes: Vec::new(),
        })
    }

    /// Why the guest bytes of this layer cannot be predicted, if they cannot
    /// (an external data file, a backing file that cannot be read).
    pub fn guest_bytes_unknown(&mut self) -> Option<String> {
        if self.has_data_file {
            self.data_unknown("the data is in an external data file".into());
        }
        let _ = self.below_view();
        self.data.unknown.clone()
    }

    /// How many described host runs the simulation keeps for guest data.
    pub fn data_runs(&self) -> usize {
        self.data.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::{DataMap, Piece};

    fn fills(m: &DataMap, start: u64, len: u64) -> Vec<(u64, u64, u8)> {
        m.within(start, len)
            .into_iter()
            .map(|(s, l, p)| {
                let b = match p {
                    Piece::Fill(b) => b,
                    _ => 0xff,
                };
                (s, l, b)
            })
            .collect()
    }

    #[test]
    fn runs_split_merge_and_clip() {
        let mut m = DataMap::default();
        m.put(0, 100, Piece::Fill(1));
        m.put(100, 50, Piece::Fill(1));
        assert_eq!(
            m.len(),
            1,
            "a run of the same byte continues the one before"
        );
        m.put(40, 20, Piece::Fill(2));
        assert_eq!(
            fills(&m, 0, 200),
            vec![(0, 40, 1), (40, 20, 2), (60, 90, 1)]
        );
        assert_eq!(fills(&m, 50, 20), vec![(50, 10, 2), (60, 10, 1)]);
        m.remove(30, 40);
        assert_eq!(fills(&m, 0, 200), vec![(0, 30, 1), (70, 80, 1)]);
        m.cut(100);
        assert_eq!(fills(&m, 0, 200), vec![(0, 30, 1), (70, 30, 1)]);
    }

    #[test]
    fn below_runs_advance_when_split() {
        let mut m = DataMap::default();
        m.put(4096, 8192, Piece::Below(65536));
        let parts = m.within(8192, 100);
        assert!(matches!(
            parts.as_slice(),
            [(8192, 100, Piece::Below(69632))]
        ));
    }
}

//! Guest data of an encrypted image, described: QEMU encrypts each 512-byte
//! sector it writes with the data key, so a simulated write describes whole
//! sectors of plaintext that are encrypted when they are read
//! ([`Sealed`]), and a copy-on-write reads bytes of the file as plaintext,
//! decrypting them when they are read ([`Opened`]).

use super::Piece;
use crate::analysis::simulate::Sim;
use crate::chain::Chain;
use crate::crypto::DataKey;
use crate::crypto::cipher::SECTOR_SIZE;
use crate::types::{GuestOffset, HostOffset};
use std::sync::Arc;

/// `x` rounded down to its sector's start.
pub(super) fn sector_floor(x: u64) -> u64 {
    x.saturating_sub(x.checked_rem(SECTOR_SIZE).unwrap_or(0))
}

/// `x` rounded up to a sector's end.
pub(super) fn sector_ceil(x: u64) -> u64 {
    x.div_ceil(SECTOR_SIZE).saturating_mul(SECTOR_SIZE)
}

/// Whole sectors of plaintext, stored encrypted at `host` (sector-aligned)
/// for guest offset `guest`.
#[derive(Debug)]
pub struct Sealed {
    host: u64,
    guest: u64,
    len: u64,
    plain: Vec<(u64, Piece)>,
    key: DataKey,
}

impl Sealed {
    /// Plaintext `plain` (lengths and pieces, whole sectors together) stored
    /// encrypted with `key` at `host` for `guest`.
    pub(super) fn new(host: u64, guest: u64, plain: Vec<(u64, Piece)>, key: DataKey) -> Sealed {
        let len = plain.iter().fold(0u64, |a, (l, _)| a.saturating_add(*l));
        Sealed {
            host,
            guest,
            len,
            plain,
            key,
        }
    }

    /// How many bytes it describes.
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The plaintext of bytes `off..off + n` of it.
    pub(super) fn plain_within(&self, off: u64, n: u64) -> Vec<(u64, Piece)> {
        clip(&self.plain, off, n)
    }

    /// Fill `dst` with its stored (encrypted) bytes from byte `off`.
    pub(super) fn fill(
        &self,
        off: u64,
        dst: &mut [u8],
        below: Option<&Chain>,
    ) -> std::io::Result<()> {
        let a = sector_floor(off);
        let end = off.saturating_add(dst.len() as u64);
        let b = sector_ceil(end).min(self.len).max(a);
        let mut buf = vec![0u8; usize::try_from(b.saturating_sub(a)).unwrap_or(0)];
        let mut at = 0usize;
        for (l, p) in clip(&self.plain, a, b.saturating_sub(a)) {
            let n = usize::try_from(l).unwrap_or(usize::MAX);
            let to = at.saturating_add(n).min(buf.len());
            if let Some(d) = buf.get_mut(at..to) {
                p.fill(d, below)?;
            }
            at = to;
        }
        self.key.encrypt(
            HostOffset(self.host.saturating_add(a)),
            GuestOffset(self.guest.saturating_add(a)),
            &mut buf,
        );
        copy_out(&buf, off.saturating_sub(a), dst);
        Ok(())
    }
}

/// Stored (encrypted) bytes read as plaintext: `cipher` holds the file's
/// bytes from `host` (sector-aligned) on, for guest offset `guest`.
#[derive(Debug)]
pub struct Opened {
    host: u64,
    guest: u64,
    cipher: Piece,
    key: DataKey,
}

impl Opened {
    /// The plaintext of the stored bytes `cipher` describes from `host`.
    pub(super) fn new(host: u64, guest: u64, cipher: Piece, key: DataKey) -> Opened {
        Opened {
            host,
            guest,
            cipher,
            key,
        }
    }

    /// Fill `dst` with its plaintext from byte `off`: the whole sectors
    /// around it are decrypted (the file's bytes past the described run, to
    /// its sector's end, come from the same description).
    pub(super) fn fill(
        &self,
        off: u64,
        dst: &mut [u8],
        below: Option<&Chain>,
    ) -> std::io::Result<()> {
        let a = sector_floor(off);
        let b = sector_ceil(off.saturating_add(dst.len() as u64));
        let mut buf = vec![0u8; usize::try_from(b.saturating_sub(a)).unwrap_or(0)];
        self.cipher.skip(a).fill(&mut buf, below)?;
        self.key.decrypt(
            HostOffset(self.host.saturating_add(a)),
            GuestOffset(self.guest.saturating_add(a)),
            &mut buf,
        );
        copy_out(&buf, off.saturating_sub(a), dst);
        Ok(())
    }
}

impl Sim {
    /// `host..` (guest `guest..`) now holds the guest bytes `pieces`: as
    /// they are for an image that is not encrypted; for an encrypted one,
    /// the whole sectors around them encrypted, the rest of those sectors
    /// keeping the plaintext they held (QEMU reads and writes an encrypted
    /// image in whole sectors).
    pub(in crate::analysis::simulate) fn data_put(
        &mut self,
        host: u64,
        guest: u64,
        pieces: Vec<(u64, Piece)>,
    ) {
        let Some(key) = self.data.key.clone() else {
            let mut at = host;
            for (l, p) in pieces {
                self.data.map.put(at, l, p);
                at = at.saturating_add(l);
            }
            return;
        };
        let len = pieces.iter().fold(0u64, |a, (l, _)| a.saturating_add(*l));
        if len == 0 {
            return;
        }
        let end = host.saturating_add(len);
        let (a, b) = (sector_floor(host), sector_ceil(end));
        let head = host.saturating_sub(a);
        let mut plain = self.host_plain(a, head, guest.saturating_sub(head));
        plain.extend(pieces);
        plain.extend(self.host_plain(end, b.saturating_sub(end), guest.saturating_add(len)));
        self.note_sealed(&key);
        let s = Sealed::new(a, guest.saturating_sub(head), plain, key);
        let n = s.len();
        self.data.map.put(a, n, Piece::Sealed(Arc::new(s), 0));
    }

    /// Say once in this operation that the data is stored encrypted with
    /// `key`. The sentence is made on the first put, and is looked for at
    /// the step it was last put at before the steps are searched.
    fn note_sealed(&mut self, key: &crate::crypto::DataKey) {
        let (text, at) = self.data.sealed_note.get_or_insert_with(|| {
            let text = format!(
                "the data is stored encrypted ({}, each 512-byte sector with its {} sector number as IV), as QEMU stores it",
                key.cipher_name(),
                key.source().iv_from().name()
            );
            (text, usize::MAX)
        });
        let same = |c: &super::super::change::Change| c.reason == *text;
        if self.steps.get(*at).is_some_and(same) {
            return;
        }
        match self.steps.iter().position(same) {
            Some(i) => *at = i,
            None => {
                *at = self.steps.len();
                let text = text.clone();
                self.note(text);
            }
        }
    }

    /// The plaintext host bytes `host..host + n` (guest `guest..`) of an
    /// encrypted image hold now: what a write sealed, or the stored bytes
    /// decrypted.
    pub(super) fn host_plain(&self, host: u64, n: u64, guest: u64) -> Vec<(u64, Piece)> {
        let Some(key) = self.data.key.clone() else {
            let mut out = Vec::new();
            self.host_pieces(host, n, &mut out);
            return out;
        };
        if n == 0 {
            return Vec::new();
        }
        let (a, b) = (sector_floor(host), sector_ceil(host.saturating_add(n)));
        let g = guest.saturating_sub(host.saturating_sub(a));
        let mut stored = Vec::new();
        self.host_pieces(a, b.saturating_sub(a), &mut stored);
        let mut plain = Vec::new();
        let mut at = a;
        for (l, p) in stored {
            let p = match p {
                Piece::Sealed(s, o) => {
                    plain.extend(s.plain_within(o, l));
                    at = at.saturating_add(l);
                    continue;
                }
                // Stored bytes: the run starts a sector (a description
                // or a cluster begins there), and its sectors decrypt.
                p => Piece::Opened(
                    Arc::new(Opened::new(
                        at,
                        g.saturating_add(at.saturating_sub(a)),
                        p,
                        key.clone(),
                    )),
                    0,
                ),
            };
            plain.push((l, p));
            at = at.saturating_add(l);
        }
        clip(&plain, host.saturating_sub(a), n)
    }
}

/// `dst` gets `buf` from `from` on (zeros where `buf` ends first).
fn copy_out(buf: &[u8], from: u64, dst: &mut [u8]) {
    dst.fill(0);
    let src = crate::bytes::slice(buf, usize::try_from(from).unwrap_or(usize::MAX), dst.len());
    if let Some(d) = dst.get_mut(..src.len()) {
        d.copy_from_slice(src);
    }
}

/// The part `off..off + n` of a list of runs.
pub(super) fn clip(list: &[(u64, Piece)], off: u64, n: u64) -> Vec<(u64, Piece)> {
    let end = off.saturating_add(n);
    let mut out = Vec::new();
    let mut at = 0u64;
    for (l, p) in list {
        let e = at.saturating_add(*l);
        if e > off && at < end {
            let from = off.max(at);
            let to = end.min(e);
            out.push((to.saturating_sub(from), p.skip(from.saturating_sub(at))));
        }
        if e >= end {
            break;
        }
        at = e;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Arc, Opened, Piece, Sealed};
    use crate::crypto::DataKey;

    #[test]
    fn sector_rounding() {
        assert_eq!(super::sector_floor(1023), 512);
        assert_eq!(super::sector_ceil(513), 1024);
        assert_eq!(super::sector_ceil(512), 512);
    }

    #[test]
    fn clip_takes_the_middle_of_runs() {
        let list = vec![(100, Piece::Fill(1)), (100, Piece::Below(1000))];
        let got = super::clip(&list, 50, 100);
        assert!(matches!(
            got.as_slice(),
            [(50, Piece::Fill(1)), (50, Piece::Below(1000))]
        ));
        let got = super::clip(&list, 150, 10);
        assert!(matches!(got.as_slice(), [(10, Piece::Below(1050))]));
    }

    /// A sealed run reads back, opened, as the plaintext it seals, from any
    /// byte on.
    #[test]
    fn opened_reverses_sealed() {
        let key = DataKey::for_tests();
        let plain: Vec<(u64, Piece)> = vec![(700, Piece::Fill(0xaa)), (324, Piece::Fill(0x11))];
        let s = Arc::new(Sealed::new(4096, 8192, plain, key.clone()));
        let mut stored = vec![0u8; 1024];
        let r = s.fill(0, &mut stored, None);
        assert!(r.is_ok());
        assert!(stored.iter().any(|&b| b != 0xaa && b != 0x11));
        let mut part = vec![0u8; 30];
        assert!(s.fill(600, &mut part, None).is_ok());
        assert_eq!(part.as_slice(), stored.get(600..630).unwrap_or_default());
        let o = Opened::new(
            4096,
            8192,
            Piece::Bytes(Arc::from(stored.as_slice()), 0),
            key,
        );
        let mut back = vec![0u8; 20];
        assert!(o.fill(690, &mut back, None).is_ok());
        let mut want = vec![0xaau8; 10];
        want.extend([0x11u8; 10]);
        assert_eq!(back, want);
    }
}

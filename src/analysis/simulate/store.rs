//! Where the simulated host bytes live: a bounded cache of recently used
//! clusters as they read now, and every other changed cluster as its
//! difference from the file, XORed and deflated.
//!
//! A walk over a 1 TiB image changes every L2 table and refcount block (160 MiB),
//! but each change flips the same bits in every entry (COPIED, or a refcount
//! going from 1 to 2), so the difference of a changed 64 KiB cluster from the
//! file deflates to a few hundred bytes. Clusters read and not changed are not
//! kept past the cache: they are read from the file again.

use super::bytes::ClusterHasher;
use super::bytes::ClusterMap;
use crate::io::SharedSource;
use flate2::Compression;
use std::collections::HashMap;
use std::io::Read;
use std::io::Write;
use std::sync::Arc;
use std::sync::Mutex;

type BuildHasher = std::hash::BuildHasherDefault<ClusterHasher>;

/// Changed clusters by index: the deflated XOR of each with the file's bytes,
/// or nothing (an empty entry, which deflate never makes) for a cluster that
/// reads as zeros.
pub(super) type PackedMap = HashMap<u64, Box<[u8]>, BuildHasher>;

/// The cache holds about this many bytes of clusters.
const CACHE_BYTES: u64 = 1 << 20;

/// How many recently used slots are tried before the index.
const RECENT: usize = 4;

/// No cluster: an index past any a file can hold.
const NONE: (u64, usize) = (u64::MAX, usize::MAX);

/// A cached cluster.
struct Cached {
    /// Its index.
    c: u64,
    data: Box<[u8]>,
    /// Changed since it was read (from the file or from its packed form).
    changed: bool,
    /// When it was last used (a counter).
    used: u64,
}

/// The simulation's clusters.
pub(super) struct Store {
    cs: u64,
    /// How many clusters the cache holds at most.
    cap: usize,
    /// The cache, and where each cluster sits in it.
    slots: Vec<Cached>,
    index: HashMap<u64, usize, BuildHasher>,
    /// The slots used last, and which of them to replace next: a walk goes
    /// from an L2 entry to the refcount table to a refcount block and back.
    recent: [(u64, usize); RECENT],
    next: usize,
    packed: Arc<PackedMap>,
    tick: u64,
}

impl Store {
    pub(super) fn new(cs: u64) -> Store {
        let cap = usize::try_from(CACHE_BYTES.checked_div(cs).unwrap_or(0))
            .unwrap_or(usize::MAX)
            .clamp(8, 8192);
        Store {
            cs,
            cap,
            slots: Vec::new(),
            index: HashMap::default(),
            recent: [NONE; RECENT],
            next: 0,
            packed: Arc::new(PackedMap::default()),
            tick: 0,
        }
    }

    /// Cluster `c` as it reads now; `change` when the caller is about to
    /// change it. Bytes at or past `zero_from` read as zeros unless written.
    #[inline]
    pub(super) fn get(
        &mut self,
        c: u64,
        base: &SharedSource,
        zero_from: u64,
        change: bool,
    ) -> &mut [u8] {
        let i = self.slot(c, base, zero_from);
        self.at(i, change)
    }

    /// Where cluster `c` sits in the cache, read into it if need be. The slot
    /// stays valid until the next call that may read a cluster into the
    /// cache ([`Store::get`], [`Store::slot`]) or empty it.
    #[inline]
    pub(super) fn slot(&mut self, c: u64, base: &SharedSource, zero_from: u64) -> usize {
        for &(rc, ri) in &self.recent {
            if rc == c && self.slots.get(ri).is_some_and(|e| e.c == c) {
                return ri;
            }
        }
        self.slot_from_index(c, base, zero_from)
    }

    /// [`Store::slot`] for a cluster not used lately.
    #[inline(never)]
    fn slot_from_index(&mut self, c: u64, base: &SharedSource, zero_from: u64) -> usize {
        let i = match self.index.get(&c).copied() {
            Some(i) => i,
            None => self.insert(c, base, zero_from),
        };
        if let Some(r) = self.recent.get_mut(self.next) {
            *r = (c, i);
        }
        self.next = self.next.wrapping_add(1) % RECENT;
        i
    }

    /// The cluster in slot `i` (from [`Store::slot`]); `change` when the
    /// caller is about to change it.
    #[inline]
    pub(super) fn at(&mut self, i: usize, change: bool) -> &mut [u8] {
        self.tick = self.tick.wrapping_add(1);
        let tick = self.tick;
        match self.slots.get_mut(i) {
            Some(e) => {
                e.used = tick;
                e.changed |= change;
                &mut e.data
            }
            // Every index in `index` and `recent` names a slot.
            None => &mut [],
        }
    }

    /// Cluster `c` as the simulation holds it, without touching the cache: a
    /// cached copy, or a packed change applied to the file's bytes; None when
    /// the simulation holds nothing of it (it reads as the file).
    pub(super) fn held(&self, c: u64, base: &SharedSource, zero_from: u64) -> Option<Box<[u8]>> {
        if let Some(e) = self.index.get(&c).and_then(|&i| self.slots.get(i)) {
            return Some(e.data.clone());
        }
        self.packed
            .contains_key(&c)
            .then(|| self.load(c, base, zero_from))
    }

    /// Pack every changed cluster in the cache and empty it (of all but a
    /// cluster that could not be packed, see [`Store::pack`]).
    pub(super) fn settle(&mut self, base: &SharedSource, zero_from: u64) {
        let all = std::mem::take(&mut self.slots);
        self.leave(all, base, zero_from);
        self.reindex();
    }

    /// `gone` leave the cache: the changed ones are packed; one that cannot
    /// be packed stays in the cache, so that no change is ever lost.
    fn leave(&mut self, gone: Vec<Cached>, base: &SharedSource, zero_from: u64) {
        for e in gone {
            if e.changed && !self.pack(e.c, &e.data, base, zero_from) {
                self.slots.push(e);
            }
        }
    }

    /// Read cluster `c` into the cache: its slot.
    fn insert(&mut self, c: u64, base: &SharedSource, zero_from: u64) -> usize {
        let data = self.load(c, base, zero_from);
        if self.slots.len() >= self.cap {
            self.evict(base, zero_from);
        }
        self.index.insert(c, self.slots.len());
        self.slots.push(Cached {
            c,
            data,
            changed: false,
            used: 0,
        });
        self.slots.len().saturating_sub(1)
    }

    /// Cluster `c` reads as zeros from now on (a hole punched in the file),
    /// without reading it: an empty packed entry, or zeros in its cached copy.
    pub(super) fn zero(&mut self, c: u64) {
        if let Some(e) = self.index.get(&c).and_then(|&i| self.slots.get_mut(i)) {
            e.data.fill(0);
            e.changed = true;
        } else {
            Arc::make_mut(&mut self.packed).insert(c, Box::default());
        }
    }

    /// Drop every cluster from `first` on (the file was cut there).
    pub(super) fn forget_from(&mut self, first: u64) {
        self.slots.retain(|e| e.c < first);
        self.reindex();
        if self.packed.keys().any(|&c| c >= first) {
            Arc::make_mut(&mut self.packed).retain(|&c, _| c < first);
        }
    }

    /// What an overlay of the current state needs: the packed clusters
    /// (shared) and a copy of the changed clusters in the cache.
    pub(super) fn snapshot(&self) -> (Arc<PackedMap>, ClusterMap) {
        let fresh = self
            .slots
            .iter()
            .filter(|e| e.changed)
            .map(|e| (e.c, e.data.clone()))
            .collect();
        (self.packed.clone(), fresh)
    }

    fn load(&self, c: u64, base: &SharedSource, zero_from: u64) -> Box<[u8]> {
        let at = c.saturating_mul(self.cs);
        let mut buf = vec![0u8; self.cs as usize].into_boxed_slice();
        if let Some(p) = self.packed.get(&c) {
            if !p.is_empty() {
                let _ = base.read_at(&mut buf, at);
                unpack(p, &mut buf);
            }
        } else if at < zero_from {
            let _ = base.read_at(&mut buf, at);
            // A cluster the cut went through keeps only its head.
            let keep = zero_from.saturating_sub(at).min(self.cs) as usize;
            if let Some(tail) = buf.get_mut(keep..) {
                tail.fill(0);
            }
        }
        buf
    }

    /// Make room: the less recently used half of the cache leaves it, changed
    /// clusters packed.
    fn evict(&mut self, base: &SharedSource, zero_from: u64) {
        let mut ages: Vec<u64> = self.slots.iter().map(|e| e.used).collect();
        let mid = ages.len() / 2;
        let (_, &mut cut, _) = ages.select_nth_unstable(mid);
        let (old, keep): (Vec<Cached>, Vec<Cached>) = std::mem::take(&mut self.slots)
            .into_iter()
            .partition(|e| e.used <= cut);
        self.slots = keep;
        self.leave(old, base, zero_from);
        self.reindex();
    }

    fn reindex(&mut self) {
        self.index.clear();
        for (i, e) in self.slots.iter().enumerate() {
            self.index.insert(e.c, i);
        }
        self.recent = [NONE; RECENT];
    }

    /// Keep cluster `c`, which reads `data`, as its deflated difference from
    /// the file. False, with nothing kept, if deflating fails (it writes
    /// into memory, which does not fail): the caller keeps the cluster.
    fn pack(&mut self, c: u64, data: &[u8], base: &SharedSource, zero_from: u64) -> bool {
        let at = c.saturating_mul(self.cs);
        let mut diff = vec![0u8; data.len()];
        let _ = base.read_at(&mut diff, at);
        for (d, b) in diff.iter_mut().zip(data) {
            *d ^= b;
        }
        let packed = Arc::make_mut(&mut self.packed);
        // The same bytes as the file, where the file is not cut: nothing to keep.
        if diff.iter().all(|&b| b == 0) && at.saturating_add(self.cs) <= zero_from {
            packed.remove(&c);
            return true;
        }
        if data.iter().all(|&b| b == 0) {
            packed.insert(c, Box::default());
            return true;
        }
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), Compression::fast());
        match enc.write_all(&diff).and_then(|()| enc.finish()) {
            Ok(out) => {
                packed.insert(c, out.into_boxed_slice());
                true
            }
            Err(_) => false,
        }
    }
}

/// XOR the packed difference `p` into `buf` (which holds the file's bytes).
fn unpack(p: &[u8], buf: &mut [u8]) {
    let mut diff = vec![0u8; buf.len()];
    if flate2::read::DeflateDecoder::new(p)
        .read_exact(&mut diff)
        .is_ok()
    {
        for (b, d) in buf.iter_mut().zip(&diff) {
            *b ^= d;
        }
    }
}

/// Packed clusters as an overlay reads them, with a few decoded ones kept.
#[derive(Debug)]
pub(super) struct PackedReader {
    pub(super) packed: Arc<PackedMap>,
    decoded: Mutex<Vec<(u64, Arc<[u8]>)>>,
}

/// How many decoded clusters a [`PackedReader`] keeps.
const DECODED: usize = 2;

impl PackedReader {
    pub(super) fn new(packed: Arc<PackedMap>) -> PackedReader {
        PackedReader {
            packed,
            decoded: Mutex::new(Vec::new()),
        }
    }

    /// Cluster `c` (of `cs` bytes) if it is packed: the file's bytes with the
    /// difference applied.
    pub(super) fn cluster(
        &self,
        c: u64,
        cs: u64,
        base: &SharedSource,
    ) -> std::io::Result<Option<Arc<[u8]>>> {
        let Some(p) = self.packed.get(&c) else {
            return Ok(None);
        };
        if let Ok(d) = self.decoded.lock()
            && let Some((_, data)) = d.iter().find(|(k, _)| *k == c)
        {
            return Ok(Some(data.clone()));
        }
        let mut buf = vec![0u8; cs as usize];
        if !p.is_empty() {
            base.read_at(&mut buf, c.saturating_mul(cs))?;
            unpack(p, &mut buf);
        }
        let data: Arc<[u8]> = buf.into();
        if let Ok(mut d) = self.decoded.lock() {
            if d.len() >= DECODED {
                d.remove(0);
            }
            d.push((c, data.clone()));
        }
        Ok(Some(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemSource;

    const CS: u64 = 65536;

    /// A file of `n` clusters, cluster `i` filled with byte `i`.
    fn file(n: u64) -> SharedSource {
        let bytes = (0..n)
            .flat_map(|i| std::iter::repeat_n(i as u8, CS as usize))
            .collect();
        Arc::new(MemSource::new("f", bytes))
    }

    #[test]
    fn zeroed_clusters_read_as_zeros_and_take_no_room() {
        let n = 40u64;
        let base = file(n);
        let mut st = Store::new(CS);
        // Cluster 3 is cached (changed) when zeroed, 5 is not cached, and 7
        // is written as zeros by hand, then packed; 1 is left alone.
        if let Some(b) = st.get(3, &base, u64::MAX, true).first_mut() {
            *b = 0x55;
        }
        st.zero(3);
        st.zero(5);
        st.get(7, &base, u64::MAX, true).fill(0);
        for c in [3u64, 5, 7] {
            assert!(st.get(c, &base, u64::MAX, false).iter().all(|&b| b == 0));
        }
        st.settle(&base, u64::MAX);
        assert_eq!(st.packed.len(), 3);
        assert!(st.packed.values().all(|p| p.is_empty()));
        let reader = PackedReader::new(st.snapshot().0);
        for c in [3u64, 5, 7] {
            let d = reader.cluster(c, CS, &base).ok().flatten();
            assert!(d.is_some_and(|d| d.iter().all(|&b| b == 0)), "cluster {c}");
            let held = st.held(c, &base, u64::MAX);
            assert!(
                held.is_some_and(|d| d.iter().all(|&b| b == 0)),
                "cluster {c}"
            );
            assert!(st.get(c, &base, u64::MAX, false).iter().all(|&b| b == 0));
        }
        assert!(st.held(1, &base, u64::MAX).is_none());
        assert_eq!(st.get(9, &base, u64::MAX, false).first().copied(), Some(9));
    }

    #[test]
    fn changes_outlive_the_cache_and_reads_do_not_stay() {
        let n = 200u64;
        let base = file(n);
        let mut st = Store::new(CS);
        assert!(st.cap < n as usize, "the test must overflow the cache");
        // Every even cluster gets its first byte flipped; odd ones are only read.
        for c in 0..n {
            let d = st.get(c, &base, u64::MAX, c % 2 == 0);
            assert_eq!(d.first().copied(), Some(c as u8));
            if c % 2 == 0
                && let Some(b) = d.first_mut()
            {
                *b ^= 0x80;
            }
        }
        // Cluster 0 is changed back to the file's bytes.
        if let Some(b) = st.get(0, &base, u64::MAX, true).first_mut() {
            *b ^= 0x80;
        }
        for c in (0..n).rev() {
            st.get(c, &base, u64::MAX, false);
        }
        assert!(st.slots.len() <= st.cap);
        // Only changed clusters are packed, each far smaller than a cluster;
        // cluster 0, the same as the file again, is not kept.
        assert!(!st.packed.contains_key(&0));
        assert!(st.packed.keys().all(|c| c % 2 == 0));
        assert!(st.packed.values().all(|p| p.len() < 1024));
        for c in 1..n {
            let d = st.get(c, &base, u64::MAX, false);
            let want = if c % 2 == 0 { c as u8 ^ 0x80 } else { c as u8 };
            assert_eq!(d.first().copied(), Some(want), "cluster {c}");
            assert!(d.get(1..).is_some_and(|t| t.iter().all(|&b| b == c as u8)));
        }
        // An overlay of this state reads the same bytes.
        let (packed, fresh) = st.snapshot();
        let reader = PackedReader::new(packed);
        for c in 2..n {
            let want = if c % 2 == 0 { c as u8 ^ 0x80 } else { c as u8 };
            let got = match fresh.get(&c) {
                Some(d) => d.first().copied(),
                None => reader
                    .cluster(c, CS, &base)
                    .ok()
                    .flatten()
                    .and_then(|d| d.first().copied()),
            };
            let got = got.or_else(|| (c % 2 == 1).then_some(c as u8));
            assert_eq!(got, Some(want), "cluster {c} through the overlay");
        }
        // Settled: the cache is empty, nothing is copied to an overlay, and
        // every change is still there.
        st.settle(&base, u64::MAX);
        assert!(st.slots.is_empty() && st.snapshot().1.is_empty());
        for c in 1..n {
            let want = if c % 2 == 0 { c as u8 ^ 0x80 } else { c as u8 };
            assert_eq!(
                st.get(c, &base, u64::MAX, false).first().copied(),
                Some(want)
            );
        }
    }

    #[test]
    fn a_cut_file_reads_zeros_unless_written() {
        let base = file(4);
        let mut st = Store::new(CS);
        let cut = 2 * CS;
        assert!(st.get(3, &base, cut, false).iter().all(|&b| b == 0));
        st.get(2, &base, cut, true).fill(2);
        st.forget_from(3);
        // Pushed out of the cache: cluster 2 holds the file's bytes again, but
        // the file is cut there, so the change is kept.
        for c in 10..10 + st.cap as u64 + 1 {
            st.get(c, &base, cut, false);
        }
        assert!(st.packed.contains_key(&2));
        assert!(st.get(2, &base, cut, false).iter().all(|&b| b == 2));
    }
}

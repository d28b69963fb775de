//! The in-memory refcount table (IMRT) the recount fills.

/// Reference counts of one chunk of clusters, as narrow as the counts allow.
#[derive(Clone, Debug)]
pub(super) enum Counts {
    U8(Box<[u8]>),
    U16(Box<[u16]>),
    U64(Box<[u64]>),
}

impl Counts {
    pub(super) fn get(&self, i: usize) -> u64 {
        match self {
            Counts::U8(v) => v.get(i).map_or(0, |x| u64::from(*x)),
            Counts::U16(v) => v.get(i).map_or(0, |x| u64::from(*x)),
            Counts::U64(v) => v.get(i).copied().unwrap_or(0),
        }
    }

    /// Store `v`, widening the whole chunk first if it does not fit.
    pub(super) fn set(&mut self, i: usize, v: u64) {
        if v > u64::from(u16::MAX) && !matches!(self, Counts::U64(_)) {
            let wide: Vec<u64> = (0..CHUNK as usize).map(|j| self.get(j)).collect();
            *self = Counts::U64(wide.into_boxed_slice());
        } else if v > u64::from(u8::MAX) && matches!(self, Counts::U8(_)) {
            let wide: Vec<u16> = (0..CHUNK as usize).map(|j| self.get(j) as u16).collect();
            *self = Counts::U16(wide.into_boxed_slice());
        }
        match self {
            Counts::U8(a) => {
                if let Some(x) = a.get_mut(i) {
                    *x = v as u8;
                }
            }
            Counts::U16(a) => {
                if let Some(x) = a.get_mut(i) {
                    *x = v as u16;
                }
            }
            Counts::U64(a) => {
                if let Some(x) = a.get_mut(i) {
                    *x = v;
                }
            }
        }
    }
}

/// One chunk: counts plus two bits per cluster (referenced as metadata, as data).
#[derive(Clone, Debug)]
pub(super) struct Chunk {
    pub(super) counts: Counts,
    pub(super) kinds: Box<[u8]>,
}

/// The in-memory refcount table: computed references per host cluster, in chunks
/// of 64Ki clusters allocated only where something is referenced, one byte per
/// cluster until a count needs more.
#[derive(Clone, Debug, Default)]
pub struct Imrt {
    pub(super) chunks: Vec<Option<Chunk>>,
    /// Number of clusters covered (the file's, plus any reference just past it).
    pub nb_clusters: u64,
}

pub(super) const CHUNK_BITS: u32 = 16;
pub(super) const CHUNK: u64 = 1 << CHUNK_BITS;

impl Imrt {
    pub(super) fn new(nb_clusters: u64) -> Self {
        let slots = ((nb_clusters >> CHUNK_BITS) as usize).saturating_add(2);
        let mut chunks = Vec::new();
        chunks.resize_with(slots, || None);
        Imrt {
            chunks,
            nb_clusters,
        }
    }

    pub(super) fn chunk(&self, c: u64) -> Option<&Chunk> {
        self.chunks
            .get((c >> CHUNK_BITS) as usize)
            .and_then(Option::as_ref)
    }

    pub(super) fn chunk_mut(&mut self, c: u64) -> Option<&mut Chunk> {
        let i = (c >> CHUNK_BITS) as usize;
        if i >= self.chunks.len() {
            // Only a reference just past the end of the file gets here.
            self.chunks.resize_with(i.saturating_add(1), || None);
        }
        let slot = self.chunks.get_mut(i)?;
        Some(slot.get_or_insert_with(|| Chunk {
            counts: Counts::U8(vec![0u8; CHUNK as usize].into_boxed_slice()),
            kinds: vec![0u8; (CHUNK / 4) as usize].into_boxed_slice(),
        }))
    }

    /// Set the computed references of cluster `c` to `v` (the count QEMU
    /// holds where it counts differently from this walk).
    pub(crate) fn set(&mut self, c: u64, v: u64) {
        if v == 0 && self.get(c) == 0 {
            return;
        }
        if c >= self.nb_clusters {
            self.nb_clusters = c.saturating_add(1);
        }
        if let Some(ch) = self.chunk_mut(c) {
            ch.counts.set((c & (CHUNK - 1)) as usize, v);
        }
    }

    /// The ranges `start..end` of clusters, in order and within
    /// `nb_clusters`, whose counts may be other than 0: every other
    /// cluster's is 0.
    pub fn counted_ranges(&self) -> Vec<(u64, u64)> {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, ch)| ch.is_some())
            .map(|(i, _)| {
                let start = (i as u64) << CHUNK_BITS;
                (start, start.saturating_add(CHUNK).min(self.nb_clusters))
            })
            .filter(|(start, end)| start < end)
            .collect()
    }

    /// The first cluster from `from` whose count is other than 0, if any:
    /// the chunks nothing is counted in are skipped whole.
    pub(crate) fn next_counted(&self, from: u64) -> Option<u64> {
        let mut i = usize::try_from(from >> CHUNK_BITS).ok()?;
        let mut lo = (from & (CHUNK - 1)) as usize;
        while let Some(slot) = self.chunks.get(i) {
            let found = slot.as_ref().and_then(|ch| match &ch.counts {
                Counts::U8(a) => a.get(lo..)?.iter().position(|x| *x != 0),
                Counts::U16(a) => a.get(lo..)?.iter().position(|x| *x != 0),
                Counts::U64(a) => a.get(lo..)?.iter().position(|x| *x != 0),
            });
            if let Some(p) = found {
                // lo + p is inside the chunk: below CHUNK.
                return Some(((i as u64) << CHUNK_BITS) | lo.saturating_add(p) as u64);
            }
            i = i.saturating_add(1);
            lo = 0;
        }
        None
    }

    /// Computed references of a cluster.
    pub fn get(&self, c: u64) -> u64 {
        self.chunk(c)
            .map_or(0, |ch| ch.counts.get((c & (CHUNK - 1)) as usize))
    }

    /// 1: referenced as metadata; 2: as data; 3: both.
    pub(super) fn kinds(&self, c: u64) -> u8 {
        let i = (c & (CHUNK - 1)) as usize;
        self.chunk(c)
            .and_then(|ch| ch.kinds.get(i / 4))
            .map_or(0, |b| (b >> kind_shift(i)) & 3)
    }

    /// Add `w` data references to each of `n` clusters from `first`; returns how
    /// many did not fit under `max`.
    pub(super) fn add_run(&mut self, first: u64, n: u64, w: u64, max: u64) -> u64 {
        let mut over = 0u64;
        let mut c = first;
        let end = first.saturating_add(n);
        while c < end {
            // The start of the next chunk (c < end, so c is not u64::MAX).
            let stop = end.min((c | (CHUNK - 1)).saturating_add(1));
            if stop > self.nb_clusters {
                self.nb_clusters = stop;
            }
            let Some(ch) = self.chunk_mut(c) else {
                return over;
            };
            let lo = (c & (CHUNK - 1)) as usize;
            // stop - c is at most CHUNK - lo: hi stays inside the chunk.
            let hi = lo.saturating_add(stop.saturating_sub(c) as usize);
            mark_data(&mut ch.kinds, lo, hi);
            let fast = match &mut ch.counts {
                Counts::U8(a) if w < 255 && max >= 255 => a.get_mut(lo..hi).map(|s| {
                    // Every count is below 255 - w, so adding w cannot saturate.
                    let w8 = w as u8;
                    let limit = u8::MAX.saturating_sub(w8);
                    s.iter().all(|x| *x < limit) && {
                        s.iter_mut().for_each(|x| *x = x.saturating_add(w8));
                        true
                    }
                }),
                _ => None,
            };
            if fast != Some(true) {
                for i in lo..hi {
                    let cur = ch.counts.get(i);
                    let room = max.saturating_sub(cur);
                    let added = w.min(room);
                    over = over.saturating_add(w.saturating_sub(added));
                    if added > 0 {
                        // added <= max - cur: the sum is at most max.
                        ch.counts.set(i, cur.saturating_add(added));
                    }
                }
            }
            c = stop;
        }
        over
    }

    /// Whether adding `other`'s counts to these keeps every count at most `max`.
    pub(super) fn fits(&self, other: &Imrt, max: u64) -> bool {
        self.chunks
            .iter()
            .zip(&other.chunks)
            .all(|pair| match pair {
                (Some(a), Some(b)) => match (&a.counts, &b.counts) {
                    // Two u8 counts sum to at most 510.
                    (Counts::U8(_), Counts::U8(_)) if max >= 510 => true,
                    (x, y) => (0..CHUNK as usize).all(|i| x.get(i).saturating_add(y.get(i)) <= max),
                },
                _ => true,
            })
    }

    /// Add `other`'s counts and kinds to these (see [`Imrt::fits`] first: sums
    /// are not saturated).
    pub(super) fn merge(&mut self, other: Imrt) {
        self.nb_clusters = self.nb_clusters.max(other.nb_clusters);
        if self.chunks.len() < other.chunks.len() {
            self.chunks.resize_with(other.chunks.len(), || None);
        }
        for (mine, theirs) in self.chunks.iter_mut().zip(other.chunks) {
            let Some(theirs) = theirs else {
                continue;
            };
            let Some(ch) = mine else {
                *mine = Some(theirs);
                continue;
            };
            for (k, t) in ch.kinds.iter_mut().zip(theirs.kinds.iter()) {
                *k |= *t;
            }
            let fast = match (&mut ch.counts, &theirs.counts) {
                (Counts::U8(a), Counts::U8(b)) => a
                    .iter()
                    .zip(b.iter())
                    .all(|(x, y)| x.checked_add(*y).is_some())
                    .then(|| {
                        a.iter_mut()
                            .zip(b.iter())
                            .for_each(|(x, y)| *x = x.saturating_add(*y));
                    })
                    .is_some(),
                _ => false,
            };
            if !fast {
                for i in 0..CHUNK as usize {
                    let add = theirs.counts.get(i);
                    if add > 0 {
                        let cur = ch.counts.get(i);
                        ch.counts.set(i, cur.saturating_add(add));
                    }
                }
            }
        }
    }

    /// Add `w` references of one kind, saturating at `max`; returns how many did not fit.
    pub(super) fn add(&mut self, c: u64, w: u64, max: u64, metadata: bool) -> u64 {
        if c >= self.nb_clusters {
            self.nb_clusters = c.saturating_add(1);
        }
        let i = (c & (CHUNK - 1)) as usize;
        let Some(ch) = self.chunk_mut(c) else {
            return 0;
        };
        if let Some(b) = ch.kinds.get_mut(i / 4) {
            *b |= (if metadata { 1 } else { 2 }) << kind_shift(i);
        }
        let cur = ch.counts.get(i);
        let room = max.saturating_sub(cur);
        let added = w.min(room);
        if added > 0 {
            // added <= max - cur: the sum is at most max.
            ch.counts.set(i, cur.saturating_add(added));
        }
        w.saturating_sub(added)
    }
}

/// Set the data bit of clusters `lo..hi` of a chunk: whole bytes at once,
/// cluster by cluster only at the two ends.
fn mark_data(kinds: &mut [u8], lo: usize, hi: usize) {
    let (a, b) = (lo.div_ceil(4), hi / 4);
    if a >= b {
        for i in lo..hi {
            if let Some(k) = kinds.get_mut(i / 4) {
                *k |= 2 << kind_shift(i);
            }
        }
        return;
    }
    for i in (lo..a.saturating_mul(4)).chain(b.saturating_mul(4)..hi) {
        if let Some(k) = kinds.get_mut(i / 4) {
            *k |= 2 << kind_shift(i);
        }
    }
    if let Some(whole) = kinds.get_mut(a..b) {
        whole.iter_mut().for_each(|k| *k |= 0xaa);
    }
}

/// Where the two kind bits of the `i`th cluster of a chunk sit in their byte
/// (four clusters per byte): 0, 2, 4 or 6.
#[inline]
pub(super) fn kind_shift(i: usize) -> usize {
    (i & 3) << 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects)]

    use super::{CHUNK, Imrt};

    #[test]
    fn next_counted_skips_zeros_and_empty_chunks() {
        let mut imrt = Imrt::new(10 * CHUNK);
        assert_eq!(imrt.next_counted(0), None);
        imrt.set(5, 1);
        imrt.set(3 * CHUNK + 7, 300);
        imrt.set(3 * CHUNK + 9, 1 << 20);
        assert_eq!(imrt.next_counted(0), Some(5));
        assert_eq!(imrt.next_counted(5), Some(5));
        assert_eq!(imrt.next_counted(6), Some(3 * CHUNK + 7));
        assert_eq!(imrt.next_counted(3 * CHUNK + 8), Some(3 * CHUNK + 9));
        assert_eq!(imrt.next_counted(3 * CHUNK + 10), None);
        // A count set back to 0 is not counted.
        imrt.set(5, 0);
        assert_eq!(imrt.next_counted(0), Some(3 * CHUNK + 7));
        // Past the table's chunks.
        assert_eq!(imrt.next_counted(u64::MAX), None);
    }
}

//! The L2 entries [`layer_run`](super::layer_run) looks at: a decoded table from the
//! image's cache, or the table's bytes as stored, read into one reused buffer
//! ([`L2Walker`]) by a walk that visits each table once, in guest order (`map`).
//!
//! For standard L2 entries a run is a comparison per entry: every entry of a run
//! has the same bits under one mask (compressed, zero, offset, and for an
//! unallocated run with a data file, COPIED), with the offset stepping by one
//! cluster for types with a host cluster ([`RunKey`]). That scan reads the raw
//! words straight from the table bytes, without building decoded entries.

use crate::error::Result;
use crate::image::Qcow2;
use crate::io::{Source, read_into};
use crate::tables::{
    L2E_OFFSET_MASK, L2Entry, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SubclusterType,
};
use crate::types::{Geometry, HostOffset};
use std::sync::{Arc, Weak};

/// An L2 table as [`layer_run`](super::layer_run) reads it.
pub(super) trait L2Slots {
    /// Entry `i`; an unallocated entry past the table's end.
    fn entry(&self, i: u64) -> L2Entry;
    /// Number of entries in the table.
    fn count(&self) -> u64;
    /// Standard L2: how many entries of `start..end` (clamped to the table) form
    /// one run with the first, which always counts (0 for an empty range).
    fn standard_run(
        &self,
        start: u64,
        end: u64,
        geo: &Geometry,
        has_df: bool,
        first: SubclusterType,
    ) -> u64;
}

/// The bits every entry of a standard-L2 run shares: `raw & mask` is `want` for
/// the entry after the first, and steps by `step` (one cluster for types with a
/// host cluster, else 0) from entry to entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunKey {
    mask: u64,
    want: u64,
    step: u64,
}

impl RunKey {
    /// The key of a run that starts with `first` (of type `first_type`), or `None`
    /// for types a standard entry cannot have on this path (compressed, invalid,
    /// the extended-only ones): those go through the decoded entries.
    pub(super) fn new(
        first: L2Entry,
        first_type: SubclusterType,
        geo: &Geometry,
        has_df: bool,
    ) -> Option<RunKey> {
        if geo.extended_l2 {
            return None;
        }
        let base = OFLAG_COMPRESSED | OFLAG_ZERO | L2E_OFFSET_MASK;
        let cs = geo.cluster_size();
        let host = first.raw & L2E_OFFSET_MASK;
        // The next entry's offset bits. A run's host clusters are aligned (layer_run
        // fails unaligned ones first) and below 2^56, so adding one cluster neither
        // wraps nor reaches the flag bits; a value past bit 55 matches no entry.
        let next = host.wrapping_add(cs);
        let key = match first_type {
            // Not compressed, no zero flag, offset bits the next cluster: with a
            // non-zero offset that is a data entry, with or without a data file.
            SubclusterType::Normal => RunKey {
                mask: base,
                want: next,
                step: cs,
            },
            SubclusterType::ZeroAlloc => RunKey {
                mask: base,
                want: next | OFLAG_ZERO,
                step: cs,
            },
            SubclusterType::ZeroPlain => RunKey {
                mask: base,
                want: OFLAG_ZERO,
                step: 0,
            },
            // With a data file, offset 0 plus COPIED is data at the guest offset.
            SubclusterType::UnallocatedPlain => RunKey {
                mask: if has_df { base | OFLAG_COPIED } else { base },
                want: 0,
                step: 0,
            },
            _ => return None,
        };
        Some(key)
    }

    /// How many of `words` (standard L2 entries, the first being the run's first)
    /// belong to the run: the first, and each following word whose masked bits
    /// are the key's, stepping from entry to entry (0 for no words).
    pub(super) fn run_len(self, words: impl Iterator<Item = u64>) -> u64 {
        let mut words = words;
        if words.next().is_none() {
            return 0;
        }
        let mut want = self.want;
        let rest = words
            .take_while(|w| {
                let hit = w & self.mask == want;
                want = want.wrapping_add(self.step);
                hit
            })
            .count();
        // The words of one table: far fewer than 2^64.
        (rest as u64).saturating_add(1)
    }
}

/// The run length through decoded entries, for the types [`RunKey`] leaves out:
/// the same subcluster type and, for types with a host cluster, consecutive host
/// clusters.
pub(super) fn decoded_run_len(
    entries: impl Iterator<Item = L2Entry>,
    geo: &Geometry,
    has_df: bool,
    first_type: SubclusterType,
) -> u64 {
    let cs = geo.cluster_size();
    let mut entries = entries.peekable();
    let Some(first) = entries.next() else {
        return 0;
    };
    let mut expected = first.host_offset().0;
    let mut n: u64 = 1;
    for e in entries {
        if e.subcluster_type(geo, has_df, 0) != first_type {
            return n;
        }
        if first_type.has_host_cluster() {
            expected = expected.wrapping_add(cs);
            if e.host_offset().0 != expected {
                return n;
            }
        }
        n = n.saturating_add(1);
    }
    n
}

fn standard_run_of(
    words: impl Iterator<Item = u64> + Clone,
    geo: &Geometry,
    has_df: bool,
    first_type: SubclusterType,
) -> u64 {
    let first = words
        .clone()
        .next()
        .map_or(L2Entry::from_word(0), L2Entry::from_word);
    match RunKey::new(first, first_type, geo, has_df) {
        Some(key) => key.run_len(words),
        None => decoded_run_len(words.map(L2Entry::from_word), geo, has_df, first_type),
    }
}

impl L2Slots for Arc<Vec<L2Entry>> {
    fn entry(&self, i: u64) -> L2Entry {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.get(i))
            .copied()
            .unwrap_or(L2Entry::from_word(0))
    }
    fn count(&self) -> u64 {
        self.len() as u64
    }
    fn standard_run(
        &self,
        start: u64,
        end: u64,
        geo: &Geometry,
        has_df: bool,
        first: SubclusterType,
    ) -> u64 {
        let start = usize::try_from(start).unwrap_or(usize::MAX);
        let end = usize::try_from(end).unwrap_or(usize::MAX).min(self.len());
        let slice = self.get(start..end).unwrap_or(&[]);
        standard_run_of(slice.iter().map(|e| e.raw), geo, has_df, first)
    }
}

/// An L2 table's bytes as stored.
pub(super) struct RawL2<'a> {
    bytes: &'a [u8],
    extended: bool,
}

impl RawL2<'_> {
    fn width(&self) -> usize {
        if self.extended { 16 } else { 8 }
    }
}

fn be_word(c: &[u8]) -> u64 {
    c.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl L2Slots for RawL2<'_> {
    fn entry(&self, i: u64) -> L2Entry {
        let w = self.width();
        let at = usize::try_from(i).ok().and_then(|i| i.checked_mul(w));
        let Some(c) = at.and_then(|a| self.bytes.get(a..a.saturating_add(w))) else {
            return L2Entry::from_word(0);
        };
        L2Entry {
            raw: c.get(..8).map_or(0, be_word),
            bitmap: if self.extended {
                c.get(8..).map_or(0, be_word)
            } else {
                0
            },
        }
    }
    fn count(&self) -> u64 {
        self.bytes.len().checked_div(self.width()).unwrap_or(0) as u64
    }
    fn standard_run(
        &self,
        start: u64,
        end: u64,
        geo: &Geometry,
        has_df: bool,
        first: SubclusterType,
    ) -> u64 {
        if self.extended {
            // Not a standard table: decode entry by entry.
            let end = end.min(self.count());
            return decoded_run_len((start..end).map(|i| self.entry(i)), geo, has_df, first);
        }
        let byte = |i: u64| usize::try_from(i).ok().and_then(|i| i.checked_mul(8));
        let len = self.bytes.len();
        let (Some(s), Some(e)) = (byte(start), byte(end)) else {
            return 0;
        };
        let slice = self.bytes.get(s.min(len)..e.min(len)).unwrap_or(&[]);
        let (words, _) = slice.as_chunks::<8>();
        standard_run_of(
            words.iter().map(|w| u64::from_be_bytes(*w)),
            geo,
            has_df,
            first,
        )
    }
}

/// One layer's L2 tables, read one at a time into a buffer that is reused: for a
/// walk that asks for each table in turn (as `map` does), with no cache of decoded
/// tables and no allocation per table. Holds the last table read; asking again for
/// it (the same file, offset and cluster size) reads nothing.
#[derive(Debug, Default)]
pub struct L2Walker {
    /// The file and table offset the buffer holds. The weak reference keeps the
    /// file's allocation, so no other file opened later can have its address.
    held: Option<(Weak<dyn Source>, HostOffset)>,
    buf: Vec<u8>,
}

impl L2Walker {
    /// An empty walker.
    pub fn new() -> Self {
        Self::default()
    }

    /// The table at `offset` of `img` (one cluster; zeros past EOF, as QEMU).
    pub(super) fn load(&mut self, img: &Qcow2, offset: HostOffset) -> Result<RawL2<'_>> {
        let geo = img.geometry();
        // The header check keeps cluster sizes at 2 MiB or below.
        let cs = usize::try_from(geo.cluster_size()).unwrap_or(0);
        let holds = self.held.as_ref().is_some_and(|(src, at)| {
            *at == offset && std::ptr::addr_eq(src.as_ptr(), Arc::as_ptr(&img.src))
        });
        if !holds || self.buf.len() != cs {
            self.held = None;
            self.buf.resize(cs, 0);
            read_into(img.src.as_ref(), "L2 table", offset, &mut self.buf)?;
            self.held = Some((Arc::downgrade(&img.src), offset));
        }
        Ok(RawL2 {
            bytes: &self.buf,
            extended: geo.extended_l2,
        })
    }
}

#[cfg(test)]
mod tests {
    // Test arithmetic on offsets the test chose.
    #![allow(clippy::arithmetic_side_effects)]

    use super::*;
    use proptest::prelude::*;

    /// Standard L2 words near a run: data, zero and unallocated entries, most of
    /// them of the first entry's kind with the next cluster's offset, some off by
    /// clusters or unaligned, with COPIED, reserved and compressed bits mixed in.
    fn words() -> impl Strategy<Value = Vec<(u8, u8, u64)>> {
        (
            0u8..8,
            proptest::collection::vec((any::<bool>(), 0u8..8, 0u8..4, 0u64..4), 1..40),
        )
            .prop_map(|(first, rest)| {
                rest.into_iter()
                    .enumerate()
                    .map(|(i, (same, kind, flags, skew))| {
                        let kind = if same || i == 0 { first } else { kind };
                        (kind, flags, skew)
                    })
                    .collect()
            })
    }

    fn build(cs: u64, start: u64, spec: &[(u8, u8, u64)]) -> Vec<u64> {
        spec.iter()
            .enumerate()
            .map(|(i, &(kind, flags, skew))| {
                let host =
                    (start + i as u64 * cs + if kind == 7 { skew } else { 0 }) & L2E_OFFSET_MASK;
                let mut w = match kind {
                    0 | 1 | 7 => host,
                    2 => host | OFLAG_ZERO,
                    3 => OFLAG_ZERO,
                    4 => 0,
                    5 => OFLAG_COMPRESSED | host | 0x1234,
                    _ => host | 0x200,
                };
                if flags & 1 != 0 {
                    w |= OFLAG_COPIED;
                }
                if flags & 2 != 0 && kind != 5 {
                    w |= 1 << 57 | 0x10;
                }
                w
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The masked scan counts exactly the entries the decoded types and
        /// offsets put in the run, for every first type, with and without a
        /// data file.
        #[test]
        fn masked_scan_agrees_with_decoded_entries(
            bits in 9u32..=21,
            start in 0u64..(1 << 20),
            has_df: bool,
            spec in words(),
        ) {
            let geo = Geometry::new(bits, false);
            let cs = geo.cluster_size();
            let words = build(cs, start * cs, &spec);
            let first = L2Entry::from_word(words[0]);
            let t = first.subcluster_type(&geo, has_df, 0);
            let decoded = decoded_run_len(words.iter().map(|&w| L2Entry::from_word(w)), &geo, has_df, t);
            // layer_run fails unaligned host clusters before counting a run.
            prop_assume!(!t.has_host_cluster() || geo.is_cluster_aligned(first.host_offset().0));
            if let Some(key) = RunKey::new(first, t, &geo, has_df) {
                prop_assert_eq!(key.run_len(words.iter().copied()), decoded);
            }
            prop_assert_eq!(standard_run_of(words.iter().copied(), &geo, has_df, t), decoded);
            let raw: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let table = RawL2 { bytes: &raw, extended: false };
            prop_assert_eq!(table.standard_run(0, words.len() as u64, &geo, has_df, t), decoded);
            let cached = Arc::new(words.iter().map(|&w| L2Entry::from_word(w)).collect::<Vec<_>>());
            prop_assert_eq!(cached.standard_run(0, words.len() as u64, &geo, has_df, t), decoded);
        }
    }

    #[test]
    fn masked_runs_count_what_the_entries_say() {
        // 64 KiB clusters: data at 0x50000, 0x60000, 0x70000 (COPIED or not), then
        // a jump to 0x90000: a run of three.
        let geo = Geometry::new(16, false);
        let data = [
            OFLAG_COPIED | 0x5_0000,
            OFLAG_COPIED | 0x6_0000,
            0x7_0000,
            OFLAG_COPIED | 0x9_0000,
        ];
        // Zero entries (bit 0), then an unallocated one; an unallocated run, then
        // COPIED with offset 0, which is data at the guest offset with a data file.
        let zeros = [OFLAG_ZERO, OFLAG_ZERO, 0];
        let unalloc = [0, 0, OFLAG_COPIED];
        for (words, has_df, t, n) in [
            (&data[..], false, SubclusterType::Normal, 3),
            (&zeros[..], false, SubclusterType::ZeroPlain, 2),
            (&unalloc[..], false, SubclusterType::UnallocatedPlain, 3),
            (&unalloc[..], true, SubclusterType::UnallocatedPlain, 2),
            (&[][..], false, SubclusterType::UnallocatedPlain, 0),
        ] {
            let first = L2Entry::from_word(words.first().copied().unwrap_or(0));
            let key = RunKey::new(first, t, &geo, has_df).expect("a standard run type");
            assert_eq!(key.run_len(words.iter().copied()), n, "{words:x?}");
            let entries = words.iter().map(|&w| L2Entry::from_word(w));
            assert_eq!(decoded_run_len(entries, &geo, has_df, t), n, "{words:x?}");
        }
    }

    #[test]
    fn a_walker_does_not_take_one_image_for_another_at_the_same_address() {
        use crate::tables::OFLAG_COPIED;
        use crate::testing::ImageBuilder;
        let mut a = ImageBuilder::new(16, 1 << 20);
        let da = a.cluster(&[0xaa; 8]);
        let a = a.l2(0, OFLAG_COPIED | da.0, 0);
        let b = ImageBuilder::new(16, 1 << 20).l2(0, OFLAG_ZERO, 0);
        let mut walker = L2Walker::new();
        let mut seen = Vec::new();
        // Each image is opened in turn into the same local, so the second can sit
        // where the first was; its table is at the same file offset.
        for built in [&a, &b, &a] {
            let img = built.open();
            let off = img.l1[0].l2_offset().expect("an L2 table");
            let own = img.l2_table(off).expect("the table")[0];
            let walked = walker.load(&img, off).expect("the table").entry(0);
            assert_eq!(walked, own);
            seen.push((off, walked.raw));
        }
        assert_eq!(seen[0].0, seen[1].0, "both tables at one offset");
        assert_eq!(seen[0].1, OFLAG_COPIED | da.0);
        assert_eq!(seen[1].1, OFLAG_ZERO);
    }

    #[test]
    fn raw_entries_read_both_words_and_nothing_past_the_end() {
        let bytes: Vec<u8> = [1u64, 2, 3, 4]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        let ext = RawL2 {
            bytes: &bytes,
            extended: true,
        };
        assert_eq!(ext.count(), 2);
        assert_eq!(ext.entry(1), L2Entry { raw: 3, bitmap: 4 });
        assert_eq!(ext.entry(2), L2Entry::from_word(0));
        let std = RawL2 {
            bytes: &bytes,
            extended: false,
        };
        assert_eq!(std.count(), 4);
        assert_eq!(std.entry(3), L2Entry::from_word(4));
        assert_eq!(std.entry(u64::MAX), L2Entry::from_word(0));
        assert_eq!(
            std.standard_run(
                9,
                12,
                &Geometry::new(16, false),
                false,
                SubclusterType::UnallocatedPlain
            ),
            0
        );
    }
}

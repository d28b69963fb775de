//! The described host ranges of the simulated file: which [`Piece`] each
//! range of guest data holds, with a journal that takes a write piece's data
//! back when QEMU would not have written it.

use super::Piece;
use std::collections::BTreeMap;

/// Described host ranges: start -> (length, piece), never overlapping.
#[derive(Clone, Debug, Default)]
pub struct DataMap {
    runs: BTreeMap<u64, (u64, Piece)>,
    /// While a piece of a write request is allocated: what each `put` covered
    /// before it, so that the piece's data can be taken back.
    journal: Option<Vec<Saved>>,
}

/// A range as it was described before a `put`: its start, length and parts.
type Saved = (u64, u64, Vec<(u64, u64, Piece)>);

impl DataMap {
    /// Forget the descriptions of `start..start + len` (metadata goes there).
    pub fn remove(&mut self, start: u64, len: u64) {
        if len == 0 || self.runs.is_empty() {
            return;
        }
        let end = start.saturating_add(len);
        let mut touched: Vec<u64> = Vec::new();
        if let Some((&s, (l, _))) = self.runs.range(..start).next_back()
            && s.saturating_add(*l) > start
        {
            touched.push(s);
        }
        touched.extend(self.runs.range(start..end).map(|(&s, _)| s));
        for s in touched {
            let Some((l, p)) = self.runs.remove(&s) else {
                continue;
            };
            let e = s.saturating_add(l);
            if s < start {
                self.runs.insert(s, (start.saturating_sub(s), p.clone()));
            }
            if e > end {
                self.runs
                    .insert(end, (e.saturating_sub(end), p.skip(end.saturating_sub(s))));
            }
        }
    }

    /// `start..start + len` now holds `piece`.
    pub fn put(&mut self, start: u64, len: u64, piece: Piece) {
        if len == 0 {
            return;
        }
        if self.journal.is_some() {
            let before = self.within(start, len);
            if let Some(j) = &mut self.journal {
                j.push((start, len, before));
            }
        }
        self.remove(start, len);
        if let Some((&s, (l, p))) = self.runs.range_mut(..start).next_back()
            && s.saturating_add(*l) == start
            && p.continued_by(*l, &piece)
        {
            *l = l.saturating_add(len);
            return;
        }
        self.runs.insert(start, (len, piece));
    }

    /// The described parts of `start..start + len`, clipped to it, in order.
    pub fn within(&self, start: u64, len: u64) -> Vec<(u64, u64, Piece)> {
        let end = start.saturating_add(len);
        let mut out = Vec::new();
        if len == 0 || self.runs.is_empty() {
            return out;
        }
        if let Some((&s, (l, p))) = self.runs.range(..start).next_back() {
            let e = s.saturating_add(*l);
            if e > start {
                out.push((
                    start,
                    e.min(end).saturating_sub(start),
                    p.skip(start.saturating_sub(s)),
                ));
            }
        }
        for (&s, (l, p)) in self.runs.range(start..end) {
            let e = s.saturating_add(*l).min(end);
            out.push((s, e.saturating_sub(s), p.clone()));
        }
        out
    }

    /// Keep what each `put` from now on replaces, until [`DataMap::keep`] or
    /// [`DataMap::take_back`].
    pub(in crate::analysis::simulate) fn journal(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// What was put since [`DataMap::journal`] stays.
    pub(in crate::analysis::simulate) fn keep(&mut self) {
        self.journal = None;
    }

    /// What was put since [`DataMap::journal`] is taken back: each range
    /// reads as it did before.
    pub(in crate::analysis::simulate) fn take_back(&mut self) {
        for (start, len, before) in self.journal.take().unwrap_or_default().into_iter().rev() {
            self.remove(start, len);
            for (s, l, p) in before {
                self.runs.insert(s, (l, p));
            }
        }
    }

    /// The file is cut at `from`: nothing from there on is described.
    pub fn cut(&mut self, from: u64) {
        self.remove(from, u64::MAX.saturating_sub(from));
    }

    /// How many runs are described.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether nothing is described.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

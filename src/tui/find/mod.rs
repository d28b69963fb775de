//! Find in lists, once for every list: `/` asks for a name, an offset or a raw
//! value, `n`/`N` move between the matches, `}`/`{` jump to the next row that
//! matters, and `u` hides the rows that hold nothing.
//!
//! A pane does not search; it only says what each of its rows shows, one row at a
//! time, through [`Rows`]. The search itself ([`Find`]) lives in the list's
//! [`ListView`](crate::tui::widgets::ListView) and scans a few milliseconds at a time between frames, so a list of
//! millions of rows never freezes the screen and never exists as strings at once:
//! one row's text is built, compared and forgotten.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one frame may spend searching.
pub(super) const BUDGET: Duration = Duration::from_millis(25);
/// How long `}`/`{` may look for the next row that matters.
pub(super) const MATTERS_BUDGET: Duration = Duration::from_millis(500);

/// What one row offers to a search.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// Its words, as on screen (names, kinds, descriptions).
    pub text: String,
    /// Numbers it names exactly: offsets, raw values, cluster numbers, ids.
    pub values: Vec<u64>,
    /// Ranges it covers, start inclusive, end exclusive (guest or host bytes).
    pub ranges: Vec<(u64, u64)>,
}

impl Row {
    fn clear(&mut self) {
        self.text.clear();
        self.values.clear();
        self.ranges.clear();
    }

    /// Add a number the row names.
    pub fn value(&mut self, v: u64) {
        self.values.push(v);
    }

    /// Add a range the row covers: `len` bytes from `start`.
    pub fn range(&mut self, start: u64, len: u64) {
        self.ranges.push((start, start.saturating_add(len)));
    }

    /// Add words.
    pub fn words(&mut self, s: &str) {
        self.text.push_str(s);
        self.text.push(' ');
    }

    /// Add formatted words.
    pub fn write(&mut self, args: std::fmt::Arguments) {
        let _ = self.text.write_fmt(args);
        self.text.push(' ');
    }
}

/// A list's rows, one at a time, as a search sees them.
pub trait Rows {
    /// How many rows there are now.
    fn len(&self) -> usize;
    /// Which list this is (an L2 table's offset, a block's index): a search or
    /// a filter made for another list starts again.
    fn id(&self) -> u64 {
        0
    }
    /// Fill `out` (cleared before) with what row `i` shows; with `text` false only
    /// the numbers are needed.
    fn row(&self, i: usize, text: bool, out: &mut Row);
    /// Whether row `i` is one `}`/`{` stops at.
    fn matters(&self, i: usize) -> bool {
        let _ = i;
        false
    }
    /// What a row that matters is, in words ("allocated entry"); None: no row
    /// matters more than another in this list.
    fn matters_what(&self) -> Option<&'static str> {
        None
    }
    /// Whether row `i` holds nothing (unallocated, refcount 0), so that `u` can
    /// hide it.
    fn empty(&self, i: usize) -> bool {
        let _ = i;
        false
    }
    /// What a row that holds nothing is called in the title ("unallocated").
    fn empty_what(&self) -> Option<&'static str> {
        None
    }
}

/// What is looked for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Needle {
    /// An offset or a value: equal to a number of the row, or inside a range.
    Number(u64),
    /// Words, without regard to case.
    Text(String),
}

impl Needle {
    fn parse(q: &str) -> Needle {
        match super::app::parse_number(q) {
            Ok(n) => Needle::Number(n),
            Err(_) => Needle::Text(q.to_lowercase()),
        }
    }

    fn hits(&self, r: &Row) -> bool {
        match self {
            Needle::Number(n) => {
                r.values.contains(n) || r.ranges.iter().any(|(a, b)| a <= n && n < b)
            }
            Needle::Text(t) => r.text.to_lowercase().contains(t.as_str()),
        }
    }
}

/// A search in one list: the rows it matched so far, and where it goes on.
#[derive(Clone, Debug)]
pub struct Find {
    /// What was typed.
    pub query: String,
    needle: Needle,
    /// Rows that match, in scan order while scanning, sorted once done.
    found: Vec<usize>,
    /// The row the scan started at (the selection when it began).
    start: usize,
    /// The next row to look at.
    pos: usize,
    /// The scan passed the last row and goes on from row 0 up to `start`.
    wrapped: bool,
    /// Rows in the list when the scan began.
    len: usize,
    /// The list searched ([`Rows::id`]).
    id: Option<u64>,
    /// Select the first match as soon as it is found (Enter was pressed).
    pub jump: bool,
    done: bool,
}

/// How far a step of a search got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Every row has been looked at.
    Done,
    /// The time is up; more next frame.
    Working,
    /// The known rows are all looked at and the list can grow (the Map).
    NeedRows,
}

impl Find {
    /// A search for `query` that starts at row `start`; None for empty text.
    pub fn new(query: &str, start: usize) -> Option<Find> {
        let q = query.trim();
        (!q.is_empty()).then(|| Find {
            query: q.to_string(),
            needle: Needle::parse(q),
            found: Vec::new(),
            start,
            pos: start,
            wrapped: false,
            len: 0,
            id: None,
            jump: false,
            done: false,
        })
    }

    /// Whether every row has been looked at.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The rows that match (sorted once the search is done).
    pub fn matches(&self) -> &[usize] {
        &self.found
    }

    /// Look at rows for up to `budget`; `more` says whether the list can still
    /// grow past its last row. `skip` leaves out hidden rows.
    pub fn step(
        &mut self,
        rows: &dyn Rows,
        more: bool,
        skip: Option<&[usize]>,
        budget: Duration,
    ) -> Progress {
        if self.done {
            return Progress::Done;
        }
        let len = rows.len();
        let id = Some(rows.id());
        if len < self.len || (self.id.is_some() && self.id != id) {
            // Another list, or one that shrank (a reload): search it again.
            self.found.clear();
            self.start = self.start.min(len.saturating_sub(1));
            self.pos = self.start;
            self.wrapped = false;
        }
        self.len = len;
        self.id = id;
        let t0 = Instant::now();
        let text = matches!(self.needle, Needle::Text(_));
        let mut row = Row::default();
        let mut n = 0u32;
        loop {
            let end = if self.wrapped { self.start } else { len };
            if self.pos >= end {
                if !self.wrapped && more {
                    return Progress::NeedRows;
                }
                if self.wrapped || self.start == 0 {
                    self.finish();
                    return Progress::Done;
                }
                self.wrapped = true;
                self.pos = 0;
                continue;
            }
            let i = self.pos;
            self.pos = i.saturating_add(1);
            if skip.is_some_and(|v| v.binary_search(&i).is_err()) {
                continue;
            }
            row.clear();
            rows.row(i, text, &mut row);
            if self.needle.hits(&row) {
                self.found.push(i);
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(256) && t0.elapsed() >= budget {
                return Progress::Working;
            }
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.found.sort_unstable();
        self.found.dedup();
    }

    /// The row to select now that Enter was pressed: the first match at or after
    /// the row the search started at (the scan begins there).
    pub fn take_jump(&mut self) -> Option<usize> {
        if !self.jump {
            return None;
        }
        let first = if self.done {
            let k = self.found.partition_point(|r| *r < self.start);
            self.found.get(k).or_else(|| self.found.first()).copied()
        } else {
            self.found.first().copied()
        };
        if first.is_some() || self.done {
            self.jump = false;
        }
        first
    }

    /// The match after (or before) row `sel`, going round at the ends.
    pub fn next(&self, sel: usize, forward: bool) -> Option<usize> {
        let after = self.found.iter().filter(|r| **r > sel).min();
        let before = self.found.iter().filter(|r| **r < sel).max();
        if forward {
            after.or_else(|| self.found.iter().min())
        } else {
            before.or_else(|| self.found.iter().max())
        }
        .copied()
    }

    /// "3/17 matches for …", "no match for …" or how far the search is.
    pub fn status(&self, sel: usize) -> String {
        let q = &self.query;
        let n = self.found.len();
        if !self.done {
            return format!("searching for {q}… {n} found so far (Esc stops)");
        }
        if n == 0 {
            return format!("no match for {q}");
        }
        let word = if n == 1 { "match" } else { "matches" };
        match self.found.binary_search(&sel) {
            Ok(k) => format!("{}/{n} {word} for {q} · n/N next/previous", k + 1),
            Err(_) => format!("{n} {word} for {q} · n/N next/previous"),
        }
    }
}

/// Rows hidden by `u`: the rows still shown, and how many are hidden.
#[derive(Clone, Debug)]
pub struct Hidden {
    /// The rows shown, in order.
    pub shown: Arc<Vec<usize>>,
    /// Rows looked at (the list may grow: the Map).
    pub of: usize,
    /// The list ([`Rows::id`]).
    pub id: u64,
    /// What the hidden rows are ("unallocated").
    pub what: &'static str,
    /// The app's event count and the list's length when the rows were last
    /// looked at: while neither moves, the list is the same and so are these.
    pub seen: Option<(u64, usize)>,
    /// How many times the list's rows were looked at for this filter.
    pub builds: u64,
}

impl Hidden {
    /// How many rows are hidden.
    pub fn count(&self) -> usize {
        self.of.saturating_sub(self.shown.len())
    }
}

mod app_side;
pub use app_side::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows 0..n, row i names the value i*16 and covers bytes [i*16, i*16+16).
    struct Numbers(usize);

    impl Rows for Numbers {
        fn len(&self) -> usize {
            self.0
        }
        fn row(&self, i: usize, text: bool, out: &mut Row) {
            out.value(i as u64 * 16);
            out.range(i as u64 * 16, 16);
            if text {
                out.write(format_args!("row {i}"));
            }
        }
    }

    fn run(f: &mut Find, rows: &dyn Rows) {
        while f.step(rows, false, None, Duration::from_secs(1)) != Progress::Done {}
    }

    #[test]
    fn offsets_match_values_and_ranges_and_words_ignore_case() {
        let rows = Numbers(100);
        let mut f = Find::new("0x35", 0).unwrap();
        run(&mut f, &rows);
        assert_eq!(f.matches(), &[3], "0x35 is inside row 3's 0x30..0x40");
        let mut f = Find::new("ROW 9", 0).unwrap();
        run(&mut f, &rows);
        assert_eq!(
            f.matches(),
            &[9, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99],
            "words match as text"
        );
        let mut f = Find::new("4096", 0).unwrap();
        run(&mut f, &rows);
        assert!(f.matches().is_empty());
        assert_eq!(f.status(0), "no match for 4096");
    }

    #[test]
    fn enter_selects_the_first_match_at_or_after_the_start_and_n_goes_round() {
        let rows = Numbers(100);
        let mut f = Find::new("row 5", 52).unwrap();
        f.jump = true;
        run(&mut f, &rows);
        assert_eq!(f.matches(), &[5, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59]);
        assert_eq!(f.take_jump(), Some(52), "at or after the start");
        assert_eq!(f.next(52, true), Some(53));
        assert_eq!(f.next(52, false), Some(51));
        assert_eq!(f.next(59, true), Some(5), "past the last match: the first");
        assert_eq!(f.next(5, false), Some(59), "before the first: the last");
        assert_eq!(f.status(50), "2/11 matches for row 5 · n/N next/previous");
        assert_eq!(f.status(20), "11 matches for row 5 · n/N next/previous");
        let mut f = Find::new("row 5", 60).unwrap();
        f.jump = true;
        run(&mut f, &rows);
        assert_eq!(f.take_jump(), Some(5), "none after the start: from the top");
    }

    #[test]
    fn a_search_of_a_long_list_goes_on_over_several_steps() {
        let rows = Numbers(1_000_000);
        let mut f = Find::new("row 999999", 0).unwrap();
        let mut steps = 0;
        while f.step(&rows, false, None, Duration::ZERO) == Progress::Working {
            steps += 1;
            assert!(!f.done());
        }
        assert!(steps > 1000, "each step looks at a few hundred rows only");
        assert_eq!(f.matches(), &[999_999]);
    }

    #[test]
    fn hidden_rows_are_not_matched() {
        let rows = Numbers(10);
        let mut f = Find::new("row", 0).unwrap();
        let shown = [1usize, 4, 7];
        while f.step(&rows, false, Some(&shown), Duration::from_secs(1)) != Progress::Done {}
        assert_eq!(f.matches(), &shown);
    }
}

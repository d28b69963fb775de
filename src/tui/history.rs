//! Where the viewer has been: every jump (Enter on a pointer, `g`, a simulation
//! started) remembers the place it left, so Backspace/Ctrl-O go back and
//! Ctrl-I/Alt-→ go forward again, each place with its selection and scroll.

use super::ctx::Pane;
use super::panes::Panes;
use super::widgets::ListView;
use qinspect::io::SharedSource;
use qinspect::lookup::Trace;
use qinspect::types::HostOffset;

/// A pane and what was selected and scrolled in it.
#[derive(Clone)]
pub struct Place {
    /// The pane.
    pub pane: Pane,
    saved: Saved,
}

/// The part of a pane's state that says where it is.
#[derive(Clone)]
enum Saved {
    Overview(ListView),
    Layout(u64, u64, ListView, bool),
    Tables(super::panes::tables::Level, ListView, ListView),
    Refcounts(super::panes::refcounts::Level, ListView, ListView),
    Snapshots(ListView, ListView),
    Trace(Option<Trace>, usize, ListView, ListView),
    Check(ListView, ListView, bool),
    Simulate(ListView, ListView),
    Hex(
        Option<SharedSource>,
        HostOffset,
        Option<(HostOffset, String)>,
        Option<(HostOffset, HostOffset)>,
        HostOffset,
    ),
    Map(ListView),
}

impl Place {
    /// Where pane `pane` is now.
    pub fn of(panes: &Panes, pane: Pane) -> Place {
        let saved = match pane {
            Pane::Overview => Saved::Overview(panes.overview.view.clone()),
            Pane::Layout => {
                let l = &panes.layout;
                Saved::Layout(l.sel, l.first_row, l.refs.clone(), l.focus_refs)
            }
            Pane::Tables => {
                let t = &panes.tables;
                Saved::Tables(t.level, t.l1.clone(), t.l2.clone())
            }
            Pane::Refcounts => {
                let r = &panes.refcounts;
                Saved::Refcounts(r.level, r.table.clone(), r.block.clone())
            }
            Pane::Snapshots => {
                let s = &panes.snapshots;
                Saved::Snapshots(s.list.clone(), s.diff_view.clone())
            }
            Pane::Trace => {
                let t = &panes.trace;
                Saved::Trace(t.trace.clone(), t.step, t.list.clone(), t.detail.clone())
            }
            Pane::Check => {
                let c = &panes.check;
                Saved::Check(c.list.clone(), c.detail.clone(), c.focus_detail)
            }
            Pane::Simulate => {
                let s = &panes.simulate;
                Saved::Simulate(s.menu.clone(), s.steps.clone())
            }
            Pane::Hex => {
                let h = &panes.hex;
                Saved::Hex(h.src.clone(), h.top, h.target.clone(), h.mark, h.cursor)
            }
            Pane::Map => Saved::Map(panes.map.list.clone()),
        };
        Place { pane, saved }
    }

    /// Put the pane back where it was.
    pub fn restore(self, panes: &mut Panes) {
        match self.saved {
            Saved::Overview(v) => panes.overview.view = v,
            Saved::Layout(sel, first, refs, focus) => {
                let l = &mut panes.layout;
                (l.sel, l.first_row, l.refs, l.focus_refs) = (sel, first, refs, focus);
            }
            Saved::Tables(level, l1, l2) => {
                let t = &mut panes.tables;
                (t.level, t.l1, t.l2) = (level, l1, l2);
            }
            Saved::Refcounts(level, table, block) => {
                let r = &mut panes.refcounts;
                (r.level, r.table, r.block) = (level, table, block);
            }
            Saved::Snapshots(list, diff) => {
                let s = &mut panes.snapshots;
                (s.list, s.diff_view) = (list, diff);
            }
            Saved::Trace(trace, step, list, detail) => {
                let t = &mut panes.trace;
                (t.trace, t.step, t.list, t.detail) = (trace, step, list, detail);
            }
            Saved::Check(list, detail, focus) => {
                let c = &mut panes.check;
                (c.list, c.detail, c.focus_detail) = (list, detail, focus);
            }
            Saved::Simulate(menu, steps) => {
                let s = &mut panes.simulate;
                (s.menu, s.steps) = (menu, steps);
            }
            Saved::Hex(src, top, target, mark, cursor) => {
                let h = &mut panes.hex;
                (h.src, h.top, h.target, h.mark, h.cursor) = (src, top, target, mark, cursor);
            }
            Saved::Map(list) => panes.map.list = list,
        }
    }

    /// Whether two places show the same thing (the same pane, selection and view).
    fn same(&self, other: &Place) -> bool {
        self.pane == other.pane && self.key() == other.key()
    }

    /// What identifies the place: the selected row and first visible row of
    /// each list, the Hex offset.
    fn key(&self) -> Vec<u64> {
        let lv = |v: &ListView| [v.sel as u64, v.offset as u64];
        match &self.saved {
            Saved::Overview(v) => lv(v).to_vec(),
            Saved::Layout(sel, first, _, _) => vec![*sel, *first],
            Saved::Tables(level, l1, l2) => {
                let lvl = match level {
                    super::panes::tables::Level::L1 => u64::MAX,
                    super::panes::tables::Level::L2(i) => *i as u64,
                };
                [vec![lvl], lv(l1).to_vec(), lv(l2).to_vec()].concat()
            }
            Saved::Refcounts(level, t, b) => {
                let lvl = match level {
                    super::panes::refcounts::Level::Table => u64::MAX,
                    super::panes::refcounts::Level::Block(i) => *i as u64,
                };
                [vec![lvl], lv(t).to_vec(), lv(b).to_vec()].concat()
            }
            Saved::Snapshots(l, d) => [lv(l), lv(d)].concat(),
            Saved::Trace(t, step, _, _) => vec![
                t.as_ref().map_or(u64::MAX, |t| t.guest_offset.get()),
                *step as u64,
            ],
            Saved::Check(l, d, _) => [lv(l), lv(d)].concat(),
            Saved::Simulate(m, s) => [lv(m), lv(s)].concat(),
            Saved::Map(l) => lv(l).to_vec(),
            Saved::Hex(_, top, target, _, _) => {
                vec![top.get(), target.as_ref().map_or(u64::MAX, |t| t.0.get())]
            }
        }
    }
}

/// The places behind and ahead of the current one.
#[derive(Clone, Default)]
pub struct History {
    /// Places left by jumps, the latest last.
    pub back: Vec<Place>,
    /// Places gone back from, the nearest last.
    pub forward: Vec<Place>,
}

/// How many places are kept each way.
const DEPTH: usize = 64;

impl History {
    /// A jump left `from` for `to`: remember `from` (unless nothing moved) and
    /// forget the way forward.
    pub fn jumped(&mut self, from: Place, to: &Place) {
        if from.same(to) {
            return;
        }
        self.back.push(from);
        if self.back.len() > DEPTH {
            self.back.remove(0);
        }
        self.forward.clear();
    }

    /// Go back from `here`: the place to show, if any.
    pub fn back(&mut self, here: Place) -> Option<Place> {
        let p = self.back.pop()?;
        self.forward.push(here);
        Some(p)
    }

    /// Go forward from `here`.
    pub fn forward(&mut self, here: Place) -> Option<Place> {
        let p = self.forward.pop()?;
        self.back.push(here);
        Some(p)
    }
}

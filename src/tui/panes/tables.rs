//! Pane 3: the L1 table, and the L2 table behind an entry. The COPIED and refcount
//! columns come before the descriptions, so narrow terminals cut descriptions first;
//! a COPIED flag that contradicts the stored refcount is marked in red.

use super::datafile::{data_file_sentence, in_data_file};
use super::{PaneState, color};
use crate::tui::ctx::{Ctx, Effect, OffsetKind};
use crate::tui::keymap::Action;
use crate::tui::widgets::{ListView, boxed};
use qinspect::image::View;
use qinspect::tables::{ClusterType, L2Entry, L2Mapping, SubclusterType};
use qinspect::types::Geometry;
use qinspect::types::GuestOffset;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};

/// Which table is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Level {
    /// The L1 table.
    #[default]
    L1,
    /// The L2 table behind an L1 entry.
    L2(usize),
}

/// Tables' state.
#[derive(Default)]
pub struct State {
    /// Which table.
    pub level: Level,
    /// The L1 list.
    pub l1: ListView,
    /// The L2 list.
    pub l2: ListView,
}

/// What the COPIED flag of an entry says next to the stored refcount of the
/// cluster it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copied {
    /// The flag matches the refcount (set exactly when it is 1).
    Agrees,
    /// It contradicts it: qemu-img check reports OFLAG_COPIED.
    Contradicts,
    /// The flag is meaningless here (a snapshot's table, or no cluster).
    Meaningless,
}

/// Judge a COPIED flag against a stored refcount, as check does, in the active
/// tables only.
pub fn judge(active: bool, copied: bool, refcount: Option<u64>) -> Copied {
    match refcount {
        Some(r) if active => {
            if (r == 1) == copied {
                Copied::Agrees
            } else {
                Copied::Contradicts
            }
        }
        _ => Copied::Meaningless,
    }
}

/// The host cluster an L2 entry's COPIED flag is about (`m`: its mapping), if
/// any.
fn l2_cluster(m: &L2Mapping, geo: &Geometry) -> Option<u64> {
    m.host_cluster().map(|host| geo.cluster_of(host.0))
}

/// The refcount column of L2 entry `e` (`m`: its mapping) and how its COPIED
/// flag stands: a cluster of the data file has none to show, and is judged as
/// refcount 1, as check does.
fn l2_refcount(e: &L2Entry, m: &L2Mapping, ctx: &Ctx, active: bool) -> (Option<u64>, Copied) {
    let Some(img) = ctx.img.as_ref() else {
        return (None, Copied::Meaningless);
    };
    if in_data_file(m, img.header.has_data_file()) {
        return (None, judge(active, e.copied(), Some(1)));
    }
    match l2_cluster(m, &img.geometry()) {
        Some(c) => {
            let rc = ctx.stored_refcount(c);
            (rc, judge(active, e.copied(), rc))
        }
        None => (None, Copied::Meaningless),
    }
}

fn columns(copied: bool, rc: Option<u64>, j: Copied) -> Vec<Span<'static>> {
    let bad = Style::new().fg(color::BAD);
    let (c_st, r_st) = match j {
        Copied::Contradicts => (bad, bad),
        _ => (Style::new(), Style::new()),
    };
    vec![
        Span::styled(if copied { "COPIED " } else { "       " }, c_st),
        Span::styled(
            format!(
                "rc {:<3}{} ",
                rc.map_or("-".into(), |r| r.to_string()),
                if j == Copied::Contradicts { "!" } else { " " }
            ),
            r_st,
        ),
    ]
}

impl State {
    /// Open the L1 table, or the L2 table behind L1 entry `i` at row `j`.
    pub fn open(&mut self, at: Option<(usize, usize)>, ctx: &Ctx) {
        let l1_len = ctx.view().map_or(0, |v| v.l1.len());
        match at {
            None => self.level = Level::L1,
            Some((i, j)) => {
                self.l1.set(i, l1_len);
                self.level = Level::L2(i);
                let n = ctx
                    .img
                    .as_ref()
                    .map_or(0, |i| i.geometry().l2_entries() as usize);
                self.l2.set(j, n);
            }
        }
    }

    /// Show the L1 table with entry `i` selected.
    pub fn select_l1(&mut self, i: usize, ctx: &Ctx) {
        let l1_len = ctx.view().map_or(0, |v| v.l1.len());
        self.level = Level::L1;
        self.l1.set(i, l1_len);
    }

    /// The L2 table of L1 entry `i` in the current view.
    fn l2_table(
        ctx: &Ctx,
        view: &View,
        i: usize,
    ) -> Result<(u64, std::sync::Arc<Vec<L2Entry>>), String> {
        let img = ctx.img.as_ref().ok_or_else(|| ctx.unopened())?;
        let off = view.l1.get(i).and_then(|e| e.l2_offset()).ok_or_else(|| {
            format!(
                "{}[{i}] has no L2 table: the whole range {}",
                view.label(),
                ctx.fall_through()
            )
        })?;
        let t = img.l2_table(off).map_err(|e| e.to_string())?;
        Ok((off.0, t))
    }

    fn render_l1(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx, view: &View) {
        let Some(img) = ctx.img.as_ref() else { return };
        let geo = img.geometry();
        let active = view.snapshot.is_none();
        let cs_bits = geo.cluster_bits;
        let title = ctx.titled(format!(
            "{} at {:#x}{} — Enter opens an L2 table",
            view.label(),
            view.l1_offset,
            ctx.view_word()
        ));
        let l1 = view.l1.clone();
        let l1_offset = view.l1_offset;
        self.l1
            .render_list(f, area, boxed(title), l1.len(), true, |r| {
                l1[r.clone()]
                    .iter()
                    .zip(r)
                    .map(|(e, i)| {
                        let st = if e.0 == 0 {
                            color::dim()
                        } else {
                            Style::new().fg(color::TABLE)
                        };
                        let rc = e
                            .l2_offset()
                            .and_then(|o| ctx.stored_refcount(o.0 >> cs_bits));
                        let j = if e.l2_offset().is_some() {
                            judge(active, e.copied(), rc)
                        } else {
                            Copied::Meaningless
                        };
                        let mut spans = vec![
                            Span::raw(format!(
                                "{i:>6} {:>#9x} ",
                                l1_offset.saturating_entry(i as u64, 8)
                            )),
                            Span::styled(format!("{:#018x} ", e.0), st),
                        ];
                        spans.extend(columns(e.copied(), rc, j));
                        if let Some(was) = active.then(|| ctx.l1_was(i, *e)).flatten() {
                            spans.push(Span::styled(
                                format!("was {:#x}→ ", was.0),
                                Style::new().fg(color::REFCOUNT),
                            ));
                        }
                        spans.push(Span::raw(e.describe(&geo, active)));
                        Line::from(spans)
                    })
                    .collect()
            });
    }

    fn render_l2(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx, view: &View, i: usize) {
        let Some(img) = ctx.img.as_ref() else { return };
        let (off, table) = match Self::l2_table(ctx, view, i) {
            Ok(t) => t,
            Err(e) => return super::nothing(f, area, &format!("{}[{i}]", view.label()), e),
        };
        let geo = img.geometry();
        let has_df = img.header.has_data_file();
        let active = view.snapshot.is_none();
        let around = img.surroundings(view.size);
        let title = ctx.titled(format!(
            "L2 table at {off:#x} (from {}[{i}]){} — Enter: trace it, x: in Hex, Bksp: back",
            view.label(),
            ctx.view_word()
        ));
        self.l2
            .render_list(f, area, boxed(title), table.len(), true, |r| {
                table[r.clone()]
                    .iter()
                    .zip(r)
                    .map(|(e, j)| {
                        let g = geo.guest_offset(i as u64, j as u64, 0).map_or(0, |g| g.0);
                        // Decoded once for the row: every column reads it.
                        let m = e.mapping(&geo, has_df);
                        let ct = m.cluster_type();
                        let st = match ct {
                            ClusterType::Normal => Style::new().fg(color::DATA),
                            ClusterType::Compressed => Style::new().fg(color::COMPRESSED),
                            ClusterType::Unallocated if e.bitmap == 0 => color::dim(),
                            _ => Style::new().fg(color::META),
                        };
                        let (rc, jd) = l2_refcount(e, &m, ctx, active);
                        let mut spans = vec![
                            Span::raw(format!("{j:>5} {g:>#11x} ")),
                            Span::styled(format!("{:#018x} ", e.raw), st),
                        ];
                        spans.extend(columns(e.copied(), rc, jd));
                        if geo.extended_l2 {
                            let map: String = (0..32)
                                .map(|s| match m.subcluster_type(s) {
                                    SubclusterType::Normal => 'D',
                                    SubclusterType::ZeroAlloc | SubclusterType::ZeroPlain => '0',
                                    SubclusterType::Invalid => '!',
                                    SubclusterType::Compressed => 'C',
                                    _ => '.',
                                })
                                .collect();
                            spans.push(Span::raw(format!("[{map}] ")));
                        }
                        let d = e.describe_in(&m, &geo, GuestOffset(g), &around);
                        if let Some(was) = active.then(|| ctx.l2_was(i, j, e.raw)).flatten() {
                            spans.push(Span::styled(
                                format!("was {was:#x}→ "),
                                Style::new().fg(color::REFCOUNT),
                            ));
                        }
                        spans.push(Span::raw(d));
                        Line::from(spans)
                    })
                    .collect()
            });
    }

    fn copied_sentence(
        what: &str,
        active: bool,
        copied: bool,
        rc: Option<u64>,
        in_place: &str,
        copy: &str,
    ) -> String {
        let rcs = rc.map_or("unreadable".into(), |r| r.to_string());
        if !active {
            return format!(
                "COPIED is {} here, but in a snapshot's tables the flag has no meaning (the qcow2 spec uses it only in the active L1 and L2 tables); {what}'s stored refcount is {rcs}.",
                if copied { "set" } else { "clear" }
            );
        }
        match (judge(active, copied, rc), copied) {
            (Copied::Agrees, true) => {
                format!("COPIED is set and {what}'s stored refcount is 1: {in_place}.")
            }
            (Copied::Agrees, false) => format!(
                "COPIED is clear and {what}'s stored refcount is {rcs}: it is shared (typically with a snapshot), so {copy}."
            ),
            (Copied::Contradicts, true) => format!(
                "COPIED is set but {what}'s stored refcount is {rcs}, not 1: the flag contradicts the refcount, which qemu-img check reports as an OFLAG_COPIED corruption."
            ),
            (Copied::Contradicts, false) => format!(
                "COPIED is clear but {what}'s stored refcount is 1: the flag contradicts the refcount (qemu-img check reports OFLAG_COPIED); QEMU would copy it on the next write although nothing shares it."
            ),
            (Copied::Meaningless, _) => format!("{what}'s stored refcount cannot be read."),
        }
    }
}

impl PaneState for State {
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx) {
        if ctx.img.is_none() {
            return super::nothing(f, area, &ctx.titled("Tables".into()), ctx.unopened());
        }
        if let Some(why) = ctx.l1_unread() {
            return super::nothing(f, area, "Tables", why);
        }
        let Some(view) = ctx.view() else {
            return super::nothing(
                f,
                area,
                "Tables",
                "the snapshot's L1 table cannot be read".into(),
            );
        };
        match self.level {
            Level::L1 => self.render_l1(f, area, ctx, &view),
            Level::L2(i) => self.render_l2(f, area, ctx, &view, i),
        }
    }

    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool {
        let Some(view) = ctx.view() else { return false };
        match (self.level, action) {
            (Level::L1, Action::Enter) => {
                self.level = Level::L2(self.l1.sel);
                self.l2 = ListView::default();
            }
            (Level::L2(i), Action::Enter) => {
                // The entry maps a guest cluster: follow it the way a read does.
                let Some(img) = ctx.img.as_ref() else {
                    return false;
                };
                let geo = img.geometry();
                let j = self.l2.sel as u64;
                // The disk this table maps: the viewed snapshot's, whose size can
                // differ from the active disk's.
                match geo.guest_offset(i as u64, j, 0) {
                    Some(g) if g.0 < view.size => q.push(Effect::Trace(g)),
                    // Nothing to trace: say why rather than do nothing.
                    g => {
                        let at = g.map_or_else(|| "offset".to_string(), |g| format!("{g}"));
                        let why = match ctx.viewed_name() {
                            None => ", no read reaches this entry".to_string(),
                            // A temporary load of the snapshot keeps the current
                            // size: past the snapshot's end it may still read here.
                            Some(s) => {
                                let current = ctx.disk_size();
                                let loaded = if g.is_some_and(|g| g.0 < current) {
                                    format!(
                                        "; a temporary load (qemu-nbd -l, qemu-img convert -l) keeps the current disk of {current} bytes and does read it"
                                    )
                                } else {
                                    String::new()
                                };
                                format!(
                                    " of snapshot {s}: once it is applied (qemu-img snapshot -a) no read reaches this entry{loaded}"
                                )
                            }
                        };
                        q.push(Effect::Status(format!(
                            "nothing to trace: guest {at} is past the end of the disk ({} bytes){why}",
                            view.size,
                        )));
                    }
                }
            }
            (Level::L2(i), Action::Hex) => {
                let Some(img) = ctx.img.as_ref() else {
                    return false;
                };
                let geo = img.geometry();
                let Ok((o, t)) = Self::l2_table(ctx, &view, i) else {
                    return true;
                };
                let j = self.l2.sel;
                let entry_off = o + j as u64 * geo.l2_entry_size();
                let Some(en) = t.get(j) else { return true };
                let g = geo.guest_offset(i as u64, j as u64, 0).map_or(0, |g| g.0);
                let effect = match en.compressed_descriptor(&geo) {
                    Some(d) if en.compressed() => {
                        let (a, b) = d.range();
                        Effect::ShowHost {
                            offset: qinspect::types::HostOffset(a),
                            label: format!(
                                "compressed data of guest {g:#x} (L2 {o:#x}[{j}]): {} bytes, {} sectors",
                                d.size, d.sectors
                            ),
                            mark: Some((
                                qinspect::types::HostOffset(a),
                                qinspect::types::HostOffset(b),
                            )),
                            src: None,
                        }
                    }
                    _ if en.host_offset().0 != 0 => {
                        let h = en.host_offset();
                        Effect::ShowHost {
                            offset: h,
                            label: format!("data of guest {g:#x} (L2 {o:#x}[{j}])"),
                            mark: Some((h, h.saturating_add(16))),
                            src: None,
                        }
                    }
                    _ => Effect::ShowHost {
                        offset: qinspect::types::HostOffset(entry_off),
                        label: format!("L2 {o:#x}[{j}], the entry of guest {g:#x}"),
                        mark: Some((
                            qinspect::types::HostOffset(entry_off),
                            qinspect::types::HostOffset(entry_off + geo.l2_entry_size()),
                        )),
                        src: None,
                    },
                };
                q.push(effect);
            }
            (Level::L2(i), Action::Inflate) => {
                let Some(img) = ctx.img.as_ref() else {
                    return false;
                };
                let Ok((o, t)) = Self::l2_table(ctx, &view, i) else {
                    return true;
                };
                let j = self.l2.sel;
                if let Some(e) = t.get(j) {
                    q.push(super::hex::inflated(img, o, i as u64, j as u64, e));
                }
            }
            (Level::L1, Action::Hex) => {
                let i = self.l1.sel as u64;
                let at = view.l1_offset.saturating_entry(i, 8);
                q.push(Effect::ShowHost {
                    offset: at,
                    label: format!("{}[{i}]", view.label()),
                    mark: Some((at, at.saturating_add(8))),
                    src: None,
                });
            }
            (Level::L2(_), Action::Back) => self.level = Level::L1,
            (Level::L1, Action::Inflate) => q.push(Effect::Status(
                "z inflates a compressed L2 entry: open an L2 table first (Enter)".into(),
            )),
            (Level::L1, a) => return self.l1.select(a, view.l1.len()),
            (Level::L2(i), a) => {
                let n = Self::l2_table(ctx, &view, i).map_or(0, |t| t.1.len());
                return self.l2.select(a, n);
            }
        }
        true
    }

    fn explain(&self, ctx: &Ctx) -> String {
        let general = "An L1 entry names an L2 table; an L2 entry maps one guest cluster: to a host offset (data), to zeros (bit 0), to compressed bytes (bit 62), or to nothing. Bit 63 (COPIED) of an active entry says the cluster it names has refcount exactly 1, so QEMU may write it in place.";
        let Some(img) = ctx.img.as_ref() else {
            return general.into();
        };
        let Some(view) = ctx.view() else {
            return general.into();
        };
        let geo = img.geometry();
        let active = view.snapshot.is_none();
        let sel = match self.level {
            Level::L1 => view.l1.get(self.l1.sel).map(|e| {
                let what = match e.l2_offset() {
                    None => format!("No L2 table offset in this entry, so the whole range {}.", ctx.fall_through()),
                    Some(o) => Self::copied_sentence(
                        "the L2 table",
                        active,
                        e.copied(),
                        ctx.stored_refcount(o.0 >> geo.cluster_bits),
                        "QEMU may change it in place",
                        "the next write copies it first",
                    ),
                };
                format!("{}[{}] = {:#018x}: {}. {what}", view.label(), self.l1.sel, e.0, e.describe(&geo, active))
            }),
            Level::L2(i) => Self::l2_table(ctx, &view, i).ok().and_then(|(off, t)| {
                let e = t.get(self.l2.sel)?;
                let has_df = img.header.has_data_file();
                let guest = geo.guest_offset(i as u64, self.l2.sel as u64, 0).unwrap_or(GuestOffset(u64::MAX));
                let past_end = guest.get() >= view.size;
                let m = e.mapping(&geo, has_df);
                let around = img.surroundings(view.size);
                let why = match m.cluster_type() {
                    ClusterType::Normal | ClusterType::ZeroAlloc if in_data_file(&m, has_df) => data_file_sentence(active, e.copied(), around.data_file.unwrap_or_default()),
                    ClusterType::Normal | ClusterType::ZeroAlloc => Self::copied_sentence(
                        "the cluster",
                        active,
                        e.copied(),
                        l2_cluster(&m, &geo).and_then(|c| ctx.stored_refcount(c)),
                        "a write goes straight into this cluster",
                        "a write allocates a new cluster and copies it",
                    ),
                    ClusterType::Compressed => "Compressed clusters are never written in place: a write always allocates a new cluster.".into(),
                    ClusterType::ZeroPlain => if ctx.has_backing() {
                        "The zero flag: reads return zeros without asking the backing file.".into()
                    } else {
                        "The zero flag: reads return zeros.".into()
                    },
                    ClusterType::Unallocated if past_end => format!("No guest read reaches this entry: its cluster is past the end of the disk. (An unallocated entry inside the disk: {}.)", ctx.fall_through()),
                    ClusterType::Unallocated => format!("Unallocated: {}.", ctx.fall_through()),
                };
                let d = e.describe_in(&m, &geo, guest, &around);
                Some(format!("L2 {off:#x}[{}] = {:#018x}: {d}. {why}", self.l2.sel, e.raw))
            }),
        };
        match sel {
            Some(s) => format!("{s}  —  {general}"),
            None => general.into(),
        }
    }

    fn offset_kind(&self) -> Option<OffsetKind> {
        Some(OffsetKind::Guest)
    }

    fn goto(&mut self, offset: u64, ctx: &Ctx, _: &mut Vec<Effect>) {
        let Some(img) = ctx.img.as_ref() else { return };
        let g = img.geometry();
        let go = qinspect::types::GuestOffset(offset);
        self.open(
            Some((g.l1_index(go) as usize, g.l2_index(go) as usize)),
            ctx,
        );
    }

    fn click(&mut self, x: u16, y: u16, _: &Ctx, _: &mut Vec<Effect>) {
        let v = match self.level {
            Level::L1 => &mut self.l1,
            Level::L2(_) => &mut self.l2,
        };
        if let Some(r) = v.row_at(x, y) {
            v.sel = r;
        }
    }

    fn rows<'a>(&'a self, ctx: &'a Ctx) -> Option<Box<dyn crate::tui::find::Rows + 'a>> {
        super::rows::tables(self, ctx)
    }

    fn list(&mut self) -> Option<&mut ListView> {
        Some(match self.level {
            Level::L1 => &mut self.l1,
            Level::L2(_) => &mut self.l2,
        })
    }

    fn list_ref(&self) -> Option<&ListView> {
        Some(match self.level {
            Level::L1 => &self.l1,
            Level::L2(_) => &self.l2,
        })
    }
}

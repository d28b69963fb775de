//! One module per pane. Each owns its state and implements [`PaneState`]: it draws
//! itself from the shared [`Ctx`], turns actions into changes of its own state and
//! [`Effect`]s for the app, explains what is selected, and jumps to an offset.

pub mod check;
pub mod datafile;
pub mod hex;
pub mod hexsearch;
pub mod layout;
pub mod map;
pub mod overview;
pub mod refcounts;
pub mod rows;
pub mod simulate;
pub mod snapshots;
pub mod tables;
pub mod trace;

use super::ctx::{Ctx, Effect, OffsetKind, Pane};
use super::find::Rows;
use super::keymap::Action;
use super::widgets::ListView;
use qinspect::types::GuestOffset;
use ratatui::Frame;
use ratatui::layout::Rect;

/// What every pane does.
pub trait PaneState {
    /// Draw into `area`.
    fn render(&mut self, f: &mut Frame, area: Rect, ctx: &Ctx);
    /// Handle an action; push what the app must do onto `q`. False if the action
    /// means nothing here.
    fn handle(&mut self, action: Action, ctx: &Ctx, q: &mut Vec<Effect>) -> bool;
    /// A sentence about what is selected, then about the pane.
    fn explain(&self, ctx: &Ctx) -> String;
    /// What `g` asks for here (None: a guest offset, traced in Trace).
    fn offset_kind(&self) -> Option<OffsetKind> {
        None
    }
    /// Jump to an offset of [`PaneState::offset_kind`] (already checked against
    /// the disk or file size).
    fn goto(&mut self, offset: u64, ctx: &Ctx, q: &mut Vec<Effect>) {
        let _ = ctx;
        q.push(Effect::Trace(GuestOffset(offset)));
    }
    /// A mouse click at a screen position.
    fn click(&mut self, x: u16, y: u16, ctx: &Ctx, q: &mut Vec<Effect>) {
        let _ = (x, y, ctx, q);
    }
    /// The rows of the list shown now, as `/`, `}` and `u` see them (None: no
    /// list here).
    fn rows<'a>(&'a self, ctx: &'a Ctx) -> Option<Box<dyn Rows + 'a>> {
        let _ = ctx;
        None
    }
    /// The list shown now, whose selection a search moves.
    fn list(&mut self) -> Option<&mut ListView> {
        None
    }
    /// The list shown now, to read.
    fn list_ref(&self) -> Option<&ListView> {
        None
    }
    /// Whether the list can still grow past its last row (rows found lazily).
    fn can_grow(&self, ctx: &Ctx) -> bool {
        let _ = ctx;
        false
    }
    /// Find more rows for a search that reached the last one.
    fn grow(&mut self, ctx: &Ctx) {
        let _ = ctx;
    }
}

/// The ten panes' states.
#[derive(Default)]
pub struct Panes {
    /// The Overview pane: the header, its extensions and the chain.
    pub overview: overview::State,
    /// The Layout pane: the host file cluster by cluster.
    pub layout: layout::State,
    /// The Tables pane: L1 and L2 tables.
    pub tables: tables::State,
    /// The Refcounts pane: the refcount table and blocks.
    pub refcounts: refcounts::State,
    /// The Snapshots pane: the snapshot table.
    pub snapshots: snapshots::State,
    /// The Trace pane: how a guest offset resolves.
    pub trace: trace::State,
    /// The Check pane: the refcount check's findings.
    pub check: check::State,
    /// The Simulate pane: simulated operations and their changes.
    pub simulate: simulate::State,
    /// The Hex pane: the file's bytes, decoded under the cursor.
    pub hex: hex::State,
    /// The Map pane: the guest disk as qemu-img map extents.
    pub map: map::State,
}

impl Panes {
    /// The state of pane `p`.
    pub fn get(&self, p: Pane) -> &dyn PaneState {
        match p {
            Pane::Overview => &self.overview,
            Pane::Layout => &self.layout,
            Pane::Tables => &self.tables,
            Pane::Refcounts => &self.refcounts,
            Pane::Snapshots => &self.snapshots,
            Pane::Trace => &self.trace,
            Pane::Check => &self.check,
            Pane::Simulate => &self.simulate,
            Pane::Hex => &self.hex,
            Pane::Map => &self.map,
        }
    }

    /// The state of pane `p`, to change.
    pub fn get_mut(&mut self, p: Pane) -> &mut dyn PaneState {
        match p {
            Pane::Overview => &mut self.overview,
            Pane::Layout => &mut self.layout,
            Pane::Tables => &mut self.tables,
            Pane::Refcounts => &mut self.refcounts,
            Pane::Snapshots => &mut self.snapshots,
            Pane::Trace => &mut self.trace,
            Pane::Check => &mut self.check,
            Pane::Simulate => &mut self.simulate,
            Pane::Hex => &mut self.hex,
            Pane::Map => &mut self.map,
        }
    }
}

/// Follow a referrer to the table entry it names: the L2 entry (or the L1 entry of
/// an L2 table) in Tables, in the snapshot's view when it is a snapshot's table
/// (the snapshot record the referrer carries, so of two records with one ID and
/// name the one the check walked). False when it names no table entry (a
/// refcount or bitmap structure) or a record the table no longer holds.
pub fn follow_referrer(ctx: &Ctx, r: &qinspect::check::Referrer, q: &mut Vec<Effect>) -> bool {
    use qinspect::check::L1Id;
    let Some(i) = r.l1_index.and_then(|i| usize::try_from(i).ok()) else {
        return false;
    };
    let view = match r.l1_table {
        Some(L1Id::Active) => None,
        Some(L1Id::Snapshot { index }) => {
            let records = ctx
                .img
                .as_ref()
                .map_or(0, |img| img.snapshots.snapshots.len());
            if index >= records {
                return false;
            }
            Some(index)
        }
        None => return false,
    };
    if view != ctx.view_snapshot {
        q.push(Effect::View(view));
    }
    match r.l2_index.and_then(|j| usize::try_from(j).ok()) {
        Some(j) if r.l2_table.is_some() => q.push(Effect::Table(Some((i, j)))),
        _ => q.push(Effect::L1Entry(i)),
    }
    true
}

/// A line saying why a pane has nothing to show.
pub fn nothing(f: &mut Frame, area: Rect, title: &str, why: String) {
    use ratatui::widgets::{Paragraph, Wrap};
    f.render_widget(
        Paragraph::new(ratatui::text::Line::styled(
            why,
            ratatui::style::Style::new().fg(color::BAD),
        ))
        .wrap(Wrap { trim: true })
        .block(super::widgets::boxed(title)),
        area,
    );
}

/// Styles that carry meaning, shared by the panes. Colours that sit side by side
/// in the Layout legend differ in hue, not only in brightness.
pub mod color {
    use ratatui::style::{Color, Modifier, Style};
    /// Header and metadata.
    pub const META: Color = Color::Cyan;
    /// L1/L2 tables.
    pub const TABLE: Color = Color::Blue;
    /// Guest data.
    pub const DATA: Color = Color::Green;
    /// Compressed data.
    pub const COMPRESSED: Color = Color::Magenta;
    /// Refcount structures.
    pub const REFCOUNT: Color = Color::Yellow;
    /// Snapshot structures.
    pub const SNAPSHOT: Color = Color::White;
    /// Persistent-bitmap clusters (directory and tables).
    pub const BITMAP: Color = Color::Indexed(137);
    /// Free space.
    pub const FREE: Color = Color::DarkGray;
    /// Clusters past the role map (not classified).
    pub const UNCLASSIFIED: Color = Color::Gray;
    /// Leaked (stored refcount above references): orange.
    pub const LEAK: Color = Color::Indexed(208);
    /// Over-referenced (stored refcount below references), or a flag that
    /// contradicts the refcount: a corruption.
    pub const BAD: Color = Color::Red;
    /// The style of headings and column titles.
    pub fn head() -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }
    /// Dim text.
    pub fn dim() -> Style {
        Style::new().fg(Color::DarkGray)
    }
}

//! The update function: actions from the keymap, and the effects panes ask for,
//! applied to the state in order.

use super::{App, Bg, Input, InputFor, Popup, changes_shown};
use crate::tui::ctx::{Effect, Job, Pane};
use crate::tui::keymap::Action;
use crate::tui::widgets::ListView;
use std::sync::atomic::Ordering;

impl App {
    /// Apply one action (one event, with the effects it asks for).
    pub fn update(&mut self, action: Action) {
        self.event(|a| a.act(action));
    }

    fn act(&mut self, action: Action) {
        if let Some(Popup::Help(v)) = &mut self.popup {
            match action {
                Action::Help | Action::Escape => self.popup = None,
                Action::Quit => self.quit = true,
                a => {
                    v.scroll(a);
                }
            }
            return;
        }
        if let Some(Popup::Changes(v)) = &mut self.popup {
            let shown = changes_shown(&self.ctx, &self.changes).map(|(c, _)| c);
            let n = shown.map_or(0, |c| c.len());
            let searching = v.find.is_some();
            match action {
                Action::Escape if searching => v.find = None,
                Action::FindInList => crate::tui::find::prompt(self),
                Action::NextStep | Action::PrevStep | Action::PrevMatch if searching => {
                    crate::tui::find::next(self, action == Action::NextStep)
                }
                Action::Changes | Action::Escape => self.popup = None,
                Action::Quit => self.quit = true,
                Action::Enter => {
                    let c = shown.and_then(|c| c.get(v.sel)).cloned();
                    if let Some(e) = c.as_ref().and_then(crate::tui::changes::follow) {
                        self.popup = None;
                        self.apply(e);
                    }
                }
                a => {
                    v.select(a, n);
                }
            }
            return;
        }
        self.status.clear();
        match action {
            Action::Quit => self.quit = true,
            Action::Pane(p) => self.switch(p),
            Action::NextPane => self.switch(self.pane.cycle(true)),
            Action::PrevPane => self.switch(self.pane.cycle(false)),
            Action::Help => self.popup = Some(Popup::Help(ListView::default())),
            Action::Escape if self.sim_job.is_none() && crate::tui::find::active(self) => {
                crate::tui::find::clear(self);
            }
            Action::Escape => {
                if self.panes.simulate.cancel() {
                    if let Some(j) = self.sim_job.take() {
                        j.cancel.store(true, Ordering::Relaxed);
                    }
                    self.status = "simulation cancelled".into();
                } else if self.panes.hex.cancel_search() {
                    self.status = "search cancelled".into();
                } else {
                    self.explain = false;
                    self.tour = None;
                }
            }
            Action::Explain => {
                self.explain = !self.explain;
                self.explain_view = ListView::default();
            }
            Action::ExplainUp | Action::ExplainDown if self.explain || self.tour.is_some() => {
                self.explain_view.scroll(action);
            }
            Action::Reload => {
                self.load();
                self.status = "reloaded".into();
            }
            Action::Goto => {
                self.popup = Some(Popup::Input(InputFor::Goto, Input::default()));
            }
            Action::Tour => crate::tui::tour::start(self),
            Action::HistoryForward => self.go_forward(),
            Action::Layer => self.next_layer(),
            Action::SimView => self.toggle_simulated(),
            Action::Compare => self.popup = Some(Popup::Compare),
            Action::Changes => match self.changes_shown() {
                Some(_) => self.popup = Some(Popup::Changes(ListView::default())),
                None => {
                    self.status =
                        "nothing to compare yet: after r or a --watch reload, c lists what changed on disk".into()
                }
            },
            Action::NextStep | Action::PrevStep if self.tour.is_some() => {
                crate::tui::tour::step(self, action == Action::NextStep);
            }
            // While a search is on, n/p (and N) move between its matches.
            Action::NextStep | Action::PrevStep if crate::tui::find::active(self) => {
                crate::tui::find::next(self, action == Action::NextStep);
            }
            Action::PrevMatch => crate::tui::find::next(self, false),
            // In Hex, `/` finds bytes in the file: the pane asks for them.
            Action::FindInList if self.pane == Pane::Hex => {
                let mut q = Vec::new();
                let _ = self
                    .panes
                    .get_mut(self.pane)
                    .handle(Action::Find, &self.ctx, &mut q);
                self.apply_all(q);
            }
            Action::FindInList => crate::tui::find::prompt(self),
            Action::NextMatters | Action::PrevMatters
                if crate::tui::find::matters(self, action == Action::NextMatters) => {}
            Action::HideEmpty if crate::tui::find::toggle_hidden(self) => {}
            // Backspace goes back along the history; with none, it backs out of
            // the pane's current level.
            Action::Back if !self.history.back.is_empty() => self.go_back(),
            a => {
                // Enter that drills in inside a pane (an L1 entry's L2 table) is a
                // step of the history too.
                let from = (a == Action::Enter).then(|| self.place());
                let mut q = Vec::new();
                let handled = self.panes.get_mut(self.pane).handle(a, &self.ctx, &mut q);
                // A pane of qcow2 structures on a raw layer has nothing for its keys:
                // say so rather than do nothing.
                if !handled
                    && q.is_empty()
                    && self.pane.needs_qcow2()
                    && self.ctx.is_raw_layer()
                {
                    self.status = self.ctx.unopened();
                }
                let jumps = q.iter().any(Effect::is_jump);
                self.apply_all(q);
                if let Some(from) = from
                    && !jumps
                {
                    let to = self.place();
                    self.history.jumped(from, &to);
                }
            }
        }
    }

    /// Apply effects in order.
    pub fn apply_all(&mut self, q: Vec<Effect>) {
        for e in q {
            self.apply(e);
        }
    }

    /// Apply one effect. A jump remembers the place it leaves.
    pub fn apply(&mut self, e: Effect) {
        self.event(|a| {
            let jumps = e.is_jump();
            let from = jumps.then(|| a.place());
            a.apply_effect(e);
            if let Some(from) = from {
                let to = a.place();
                a.history.jumped(from, &to);
            }
        });
    }

    fn apply_effect(&mut self, e: Effect) {
        match e {
            Effect::ShowHost {
                offset,
                label,
                mark,
                src,
            } => {
                self.panes.hex.show(offset, label, mark, src);
                self.switch(Pane::Hex);
            }
            Effect::Trace(off) => {
                match self.panes.trace.run(off, &self.ctx) {
                    Ok(()) => {}
                    Err(e) => self.status = e,
                }
                self.switch(Pane::Trace);
            }
            Effect::Cluster(c) => {
                self.panes.layout.select(c);
                self.switch(Pane::Layout);
            }
            Effect::Refcount(c) => {
                self.panes.refcounts.select(c, &self.ctx);
                self.switch(Pane::Refcounts);
            }
            Effect::Table(at) => {
                self.panes.tables.open(at, &self.ctx);
                self.switch(Pane::Tables);
            }
            Effect::L1Entry(i) => {
                self.panes.tables.select_l1(i, &self.ctx);
                self.switch(Pane::Tables);
            }
            Effect::Switch(p) | Effect::Jump(p) => self.switch(p),
            Effect::RefcountTable => {
                self.panes.refcounts.level = crate::tui::panes::refcounts::Level::Table;
                self.switch(Pane::Refcounts);
            }
            Effect::Input(purpose, text) => {
                self.popup = Some(Popup::Input(purpose, Input::new(text)));
            }
            Effect::View(v) => {
                self.ctx.view_snapshot = v;
                self.ctx.open_chain();
                self.panes.tables.open(None, &self.ctx);
                self.panes.tables.l1 = ListView::default();
                self.status = match self.ctx.viewed_name() {
                    Some(s) => format!("Tables, Trace and Hex now use snapshot {s}"),
                    None => "back to the active L1 table".into(),
                };
            }
            Effect::Reload => self.load(),
            Effect::Status(s) => self.status = s,
            Effect::SimulatedView(on) => {
                if on != self.ctx.simulated_view() {
                    self.toggle_simulated();
                }
            }
            Effect::Start(Job::Diff(a, b)) => self.compute_diff(a, b),
            Effect::Start(Job::Simulate(text)) => self.start_simulation(text),
            Effect::Start(Job::Lookup(c)) => {
                let Some(img) = self.ctx.img.clone() else {
                    return;
                };
                let (tx, generation) = (self.tx.clone(), self.generation);
                std::thread::spawn(move || {
                    let (refs, roles) = crate::tui::panes::layout::lookup(&img, c);
                    let _ = tx.send(Bg::Lookup(c, refs, roles, generation));
                });
            }
        }
    }
}

//! The interactive terminal UI (`qinspect IMAGE`), built with ratatui and crossterm
//! on top of the core library, the checker and the simulator.
//!
//! Elm shape: [`app::App`] is the state, [`keymap::Action`] the messages,
//! `App::update` the update function and [`view::draw`] the view. One module per
//! pane in [`panes`]; one key table ([`keymap::KEYMAP`]) for both the footer and
//! the `?` help.

pub mod app;
pub mod keymap;
pub mod panes;
pub mod tour;
pub mod view;

#[cfg(test)]
mod tests;

use app::{App, Options, Popup};
use keymap::{Action, action_for};
use ratatui::crossterm::event::{self, Event, KeyEventKind, MouseButton, MouseEventKind};
use ratatui::crossterm::execute;
use std::path::PathBuf;
use std::time::Duration;

/// Open the TUI on `path`; returns when the user quits. The terminal is restored
/// on quit, on error and on panic.
pub fn run(path: PathBuf, opts: Options) -> color_eyre::Result<()> {
    let mouse = opts.mouse;
    let mut terminal = ratatui::try_init()?;
    if mouse {
        let _ = execute!(std::io::stdout(), event::EnableMouseCapture);
        // ratatui's panic hook restores the terminal; mouse capture is ours to undo.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = execute!(std::io::stdout(), event::DisableMouseCapture);
            prev(info);
        }));
    }
    let result = (|| -> color_eyre::Result<()> {
        let mut app = App::new(path, opts);
        while !app.quit {
            app.poll_background();
            app.check_watch();
            terminal.draw(|f| view::draw(f, &mut app))?;
            if event::poll(Duration::from_millis(100))? {
                handle_event(&mut app, event::read()?);
            }
        }
        Ok(())
    })();
    if mouse {
        let _ = execute!(std::io::stdout(), event::DisableMouseCapture);
    }
    ratatui::restore();
    result
}

/// Turn one terminal event into actions (also used by tests).
pub fn handle_event(app: &mut App, ev: Event) {
    match ev {
        Event::Key(k) if k.kind != KeyEventKind::Release => {
            if matches!(app.popup, Some(Popup::Input(..))) {
                app.input_key(k.code);
            } else if k.code == event::KeyCode::Char('i') && app.pane == keymap::pane::LAYOUT {
                panes::layout::lookup(app);
            } else if let Some(a) = action_for(&k, app.pane) {
                app.update(a);
            }
        }
        Event::Mouse(m) => match m.kind {
            MouseEventKind::ScrollDown => app.update(Action::Down),
            MouseEventKind::ScrollUp => app.update(Action::Up),
            MouseEventKind::Down(MouseButton::Left) => click(app, m.column, m.row),
            _ => {}
        },
        _ => {}
    }
}

fn click(app: &mut App, x: u16, y: u16) {
    let hit =
        |r: &ratatui::layout::Rect| x >= r.x && x < r.x + r.width && y >= r.y && y < r.y + r.height;
    if let Some((_, i)) = app.areas.tabs.iter().find(|(r, _)| hit(r)) {
        app.pane = *i;
        return;
    }
    if let Some((r, first)) = app.areas.list
        && hit(&r)
        && y > r.y
    {
        let row = first + (y - r.y - 1) as usize;
        match app.pane {
            keymap::pane::TABLES => match app.tables_level {
                app::TablesLevel::L1 => app.l1_sel = row,
                app::TablesLevel::L2(_) => app.l2_sel = row,
            },
            keymap::pane::REFCOUNTS => match app.ref_level {
                app::RefLevel::Table => app.rt_sel = row,
                app::RefLevel::Block(_) => app.rb_sel = row,
            },
            keymap::pane::SNAPSHOTS => app.snap_sel = row.saturating_sub(1),
            keymap::pane::CHECK => app.finding_sel = row,
            keymap::pane::SIMULATE => app.sim_choice = (y - r.y - 1) as usize,
            keymap::pane::LAYOUT => {
                let col = x.saturating_sub(r.x + 1 + 10) as u64;
                app.layout_sel = (first as u64 + (y - r.y - 2) as u64) * app.layout_per_row + col;
            }
            _ => {}
        }
    }
}

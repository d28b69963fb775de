//! The interactive terminal UI (`qinspect IMAGE`), built with ratatui and crossterm
//! on top of the core library, the checker and the simulator.
//!
//! Elm shape: [`app::App`] is the state, [`keymap::Action`] the messages,
//! `App::update` the update function and [`view::draw`] the view. Each pane in
//! [`panes`] owns its state and reads the shared [`ctx::Ctx`]; what it wants done
//! elsewhere it returns as [`ctx::Effect`]s. One key table ([`keymap::KEYMAP`])
//! for the keys, the footer and the `?` help; one list widget
//! ([`widgets::ListView`]) for every list and scrolling text.

pub mod app;
pub mod changes;
pub mod compare;
pub mod ctx;
pub mod find;
pub mod history;
pub mod keymap;
pub mod panes;
pub mod tour;
pub mod view;
pub mod widgets;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_hidden;
#[cfg(test)]
mod tests_snapshots;
#[cfg(test)]
mod tests_views;

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
            // A search that is still scanning gets the time no key is pressed.
            let wait = if find::running(&app) { 0 } else { 100 };
            if event::poll(Duration::from_millis(wait))? {
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
    // One event, counted once, whatever it sets off.
    app.event(|app| match ev {
        Event::Key(k) if k.kind != KeyEventKind::Release => {
            let ctrl_c = k.code == event::KeyCode::Char('c')
                && k.modifiers.contains(event::KeyModifiers::CONTROL);
            let in_list_popup = matches!(app.popup, Some(Popup::Changes(_)));
            if matches!(app.popup, Some(Popup::Input(..))) && !ctrl_c {
                app.input_key(&k);
            } else if matches!(app.popup, Some(Popup::Compare)) && !ctrl_c {
                app.compare_key(&k);
            } else if let Some(a) = in_list_popup
                .then(|| keymap::list_action(&k))
                .flatten()
                .or_else(|| action_for(&k, app.pane))
            {
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
    });
}

fn click(app: &mut App, x: u16, y: u16) {
    let hit =
        |r: &ratatui::layout::Rect| x >= r.x && x < r.x + r.width && y >= r.y && y < r.y + r.height;
    if let Some((_, p)) = app.areas.tabs.iter().find(|(r, _)| hit(r)) {
        app.update(Action::Pane(*p));
        return;
    }
    if app.popup.is_none() && hit(&app.areas.pane) {
        let mut q = Vec::new();
        app.panes.get_mut(app.pane).click(x, y, &app.ctx, &mut q);
        app.apply_all(q);
    }
}

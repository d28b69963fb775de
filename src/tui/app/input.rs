//! Text prompts: the one-line field, what it is for, and what Enter does with
//! it (a jump to an offset, a simulation, a search).

use super::{App, Popup, parse_number};
use crate::tui::ctx::{Effect, Job, OffsetKind, Pane};
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// What a line-editing popup is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputFor {
    /// An offset to jump to.
    Goto,
    /// A simulate operation.
    Simulate,
    /// What to find in the current list.
    FindInList,
    /// Bytes or text to find in Hex.
    HexSearch,
}

/// A one-line text field with a cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Input {
    /// The text.
    pub text: String,
    /// The cursor, in characters.
    pub cursor: usize,
}

impl Input {
    /// A field holding `text`, the cursor at its end.
    pub fn new(text: String) -> Input {
        let cursor = text.chars().count();
        Input { text, cursor }
    }

    fn byte(&self, c: usize) -> usize {
        self.text
            .char_indices()
            .nth(c)
            .map_or(self.text.len(), |(i, _)| i)
    }

    /// Edit with one key: characters are inserted at the cursor, Ctrl-U clears,
    /// ←/→/Home/End move, Backspace/Delete remove; other control keys do nothing.
    pub fn key(&mut self, k: &KeyEvent) {
        let ctrl =
            k.modifiers.contains(KeyModifiers::CONTROL) || k.modifiers.contains(KeyModifiers::ALT);
        let n = self.text.chars().count();
        match k.code {
            KeyCode::Char('u') if ctrl => {
                self.text.clear();
                self.cursor = 0;
            }
            KeyCode::Char('a') if ctrl => self.cursor = 0,
            KeyCode::Char('e') if ctrl => self.cursor = n,
            KeyCode::Char(_) if ctrl => {}
            KeyCode::Char(c) => {
                let at = self.byte(self.cursor);
                self.text.insert(at, c);
                self.cursor += 1;
            }
            KeyCode::Backspace if self.cursor > 0 => {
                let at = self.byte(self.cursor - 1);
                self.text.remove(at);
                self.cursor -= 1;
            }
            KeyCode::Delete if self.cursor < n => {
                let at = self.byte(self.cursor);
                self.text.remove(at);
            }
            KeyCode::Left => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Right => self.cursor = (self.cursor + 1).min(n),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = n,
            _ => {}
        }
    }
}

impl App {
    /// Handle a key while a text field is open.
    pub fn input_key(&mut self, k: &KeyEvent) {
        let Some(Popup::Input(purpose, input)) = &mut self.popup else {
            return;
        };
        match k.code {
            KeyCode::Esc if *purpose == InputFor::FindInList => {
                self.popup = None;
                crate::tui::find::clear(self);
            }
            KeyCode::Esc => self.popup = None,
            KeyCode::Enter if *purpose == InputFor::FindInList => {
                self.popup = None;
                crate::tui::find::submit(self);
            }
            _ if *purpose == InputFor::FindInList => {
                input.key(k);
                crate::tui::find::typed(self);
            }
            KeyCode::Enter => {
                let (purpose, text) = (purpose.clone(), input.text.trim().to_string());
                self.popup = None;
                match purpose {
                    InputFor::Goto => self.goto(&text),
                    InputFor::Simulate if !text.is_empty() => {
                        self.apply(Effect::Start(Job::Simulate(text)))
                    }
                    InputFor::Simulate | InputFor::FindInList => {}
                    InputFor::HexSearch => self.panes.hex.start_search(&text, &self.ctx),
                }
            }
            _ => input.key(k),
        }
    }

    /// Jump to an offset, as the current pane understands it, after checking it
    /// against the size of what it is an offset in.
    pub fn goto(&mut self, text: &str) {
        let Ok(off) = parse_number(text) else {
            self.status = format!("'{text}' is not an offset (try 0x10000, 64k or 65536)");
            return;
        };
        let kind = self.panes.get(self.pane).offset_kind();
        let (limit, what) = match kind {
            Some(OffsetKind::Host) if self.pane == Pane::Hex => {
                (self.panes.hex.limit(&self.ctx), "the file")
            }
            Some(OffsetKind::Host) => (self.ctx.file_len(), "the file"),
            _ => (self.ctx.view_disk_size(), "the disk"),
        };
        let what = match self.ctx.viewed_name() {
            Some(s) if kind != Some(OffsetKind::Host) => format!("{what} of snapshot {s}"),
            _ => what.to_string(),
        };
        if self.ctx.img.is_none() && kind != Some(OffsetKind::Host) {
            self.status = format!("cannot follow a guest offset: {}", self.ctx.unopened());
            return;
        }
        if off >= limit {
            self.status = format!(
                "{off:#x} is past the end of {what} ({limit} bytes, offsets 0 to {:#x})",
                limit.saturating_sub(1)
            );
            return;
        }
        let from = self.place();
        let mut q = Vec::new();
        self.panes.get_mut(self.pane).goto(off, &self.ctx, &mut q);
        let jumps = q.iter().any(Effect::is_jump);
        self.apply_all(q);
        if !jumps {
            let to = self.place();
            self.history.jumped(from, &to);
        }
    }
}

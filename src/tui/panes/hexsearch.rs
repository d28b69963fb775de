//! Finding bytes in the file Hex shows: a hex byte string (`de ad be ef`,
//! `0xdeadbeef`) or text in quotes (`"QFI"`), searched on a worker thread in
//! chunks so that a big file never holds up a key, and cancelled with Esc.

use qinspect::io::{SharedSource, read_into};
use qinspect::types::HostOffset;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, channel};

/// Bytes read per step of the search.
const CHUNK: u64 = 1 << 20;

/// What to look for, parsed from what was typed.
pub fn parse(text: &str) -> Result<Vec<u8>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err(
            "type bytes in hex (de ad be ef, 0xdeadbeef) or text in quotes (\"QFI\")".into(),
        );
    }
    if let Some(inner) = t
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .or_else(|| t.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
    {
        if inner.is_empty() {
            return Err("the text in quotes is empty".into());
        }
        return Ok(inner.as_bytes().to_vec());
    }
    let digits: String = t
        .split_whitespace()
        .map(|w| w.strip_prefix("0x").or(w.strip_prefix("0X")).unwrap_or(w))
        .collect();
    if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "'{t}' is neither hex bytes (de ad be ef, 0xdeadbeef) nor text in quotes (\"QFI\")"
        ));
    }
    if !digits.len().is_multiple_of(2) {
        return Err(format!(
            "'{t}' has an odd number of hex digits: each byte is two"
        ));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            digits
                .get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("'{t}' is not hex"))
        })
        .collect()
}

/// How the pattern is shown: text in quotes when it is all printable, else hex.
pub fn show(p: &[u8]) -> String {
    if p.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("\"{}\"", String::from_utf8_lossy(p))
    } else {
        p.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A message from the worker.
pub enum Msg {
    /// Bytes looked at so far, of how many.
    Progress(u64, u64),
    /// Where the pattern starts (None: not found in that direction).
    Done(Option<u64>),
    /// The file could not be read.
    Failed(String),
}

/// A search on a worker thread.
pub struct Running {
    /// What is searched for.
    pub pattern: Vec<u8>,
    /// Forward (towards the end of the file) or backward.
    pub forward: bool,
    /// Where it started.
    pub from: HostOffset,
    /// Bytes looked at, of how many.
    pub progress: (u64, u64),
    rx: Receiver<Msg>,
    cancel: Arc<AtomicBool>,
}

impl Running {
    /// Search `src` for `pattern` starting at `from` (forward: the first match at
    /// or after it; backward: the last match that starts before it).
    pub fn start(src: SharedSource, pattern: Vec<u8>, from: HostOffset, forward: bool) -> Running {
        let (tx, rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let p = pattern.clone();
        let at = from.get();
        std::thread::spawn(move || {
            let r = if forward {
                find_forward(&src, &p, at, &stop, &|d, t| {
                    let _ = tx.send(Msg::Progress(d, t));
                })
            } else {
                find_backward(&src, &p, at, &stop, &|d, t| {
                    let _ = tx.send(Msg::Progress(d, t));
                })
            };
            if !stop.load(Ordering::Relaxed) {
                let _ = tx.send(match r {
                    Ok(at) => Msg::Done(at),
                    Err(e) => Msg::Failed(e),
                });
            }
        });
        Running {
            pattern,
            forward,
            from,
            progress: (0, 0),
            rx,
            cancel,
        }
    }

    /// Where the search has got to: past `from` by the bytes looked at (before
    /// it, backward).
    pub fn at(&self) -> HostOffset {
        let (from, done) = (self.from.get(), self.progress.0);
        HostOffset(if self.forward {
            from.saturating_add(done)
        } else {
            from.saturating_sub(done)
        })
    }

    /// Stop the worker.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// The worker's messages so far; the last one that ends it, if any.
    pub fn poll(&mut self) -> Option<Result<Option<HostOffset>, String>> {
        while let Ok(m) = self.rx.try_recv() {
            match m {
                Msg::Progress(d, t) => self.progress = (d, t),
                Msg::Done(at) => return Some(Ok(at.map(HostOffset))),
                Msg::Failed(e) => return Some(Err(e)),
            }
        }
        None
    }

    /// Wait for the end (tests).
    #[cfg(test)]
    pub fn wait(&mut self) -> Result<Option<HostOffset>, String> {
        loop {
            match self.rx.recv_timeout(std::time::Duration::from_secs(60)) {
                Ok(Msg::Progress(d, t)) => self.progress = (d, t),
                Ok(Msg::Done(at)) => return Ok(at.map(HostOffset)),
                Ok(Msg::Failed(e)) => return Err(e),
                Err(_) => return Err("the search worker stopped".into()),
            }
        }
    }
}

fn chunk(src: &SharedSource, at: u64, len: u64) -> Result<Vec<u8>, String> {
    let n = usize::try_from(len).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; n];
    let got =
        read_into(src.as_ref(), "search", HostOffset(at), &mut buf).map_err(|e| e.to_string())?;
    buf.truncate(got);
    Ok(buf)
}

/// The first match at or after `from`.
pub fn find_forward(
    src: &SharedSource,
    p: &[u8],
    from: u64,
    stop: &AtomicBool,
    tick: &dyn Fn(u64, u64),
) -> Result<Option<u64>, String> {
    let len = src.len();
    let finder = memchr::memmem::Finder::new(p);
    let overlap = p.len().saturating_sub(1) as u64;
    let mut at = from;
    while at < len {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = CHUNK.saturating_add(overlap).min(len - at);
        let buf = chunk(src, at, n)?;
        if let Some(i) = finder.find(&buf) {
            return Ok(Some(at + i as u64));
        }
        if at.saturating_add(n) >= len {
            break;
        }
        at += CHUNK;
        tick(at - from, len - from);
    }
    Ok(None)
}

/// The last match that starts before `from`.
pub fn find_backward(
    src: &SharedSource,
    p: &[u8],
    from: u64,
    stop: &AtomicBool,
    tick: &dyn Fn(u64, u64),
) -> Result<Option<u64>, String> {
    let finder = memchr::memmem::FinderRev::new(p);
    let plen = p.len() as u64;
    // A match starts before `from`, so it ends before from + len - 1.
    let mut end = from.saturating_add(plen.saturating_sub(1)).min(src.len());
    while end >= plen {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let start = end.saturating_sub(CHUNK.saturating_add(plen.saturating_sub(1)));
        let buf = chunk(src, start, end - start)?;
        if let Some(i) = finder.rfind(&buf) {
            return Ok(Some(start + i as u64));
        }
        if start == 0 {
            break;
        }
        end = start + plen.saturating_sub(1);
        tick(from.saturating_sub(start), from);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qinspect::io::MemSource;

    #[test]
    fn patterns_in_hex_and_in_quotes() {
        assert_eq!(parse("de ad be ef"), Ok(vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(parse("0xdeadbeef"), Ok(vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(parse("\"QFI\""), Ok(b"QFI".to_vec()));
        assert!(parse("abc").is_err(), "odd digits");
        assert!(parse("QFI").is_err(), "text needs quotes");
        assert_eq!(show(b"QFI"), "\"QFI\"");
        assert_eq!(show(&[0xde, 0xad]), "de ad");
    }

    #[test]
    fn matches_across_chunk_boundaries_both_ways() {
        let len = (CHUNK * 3) as usize;
        let mut b = vec![0u8; len];
        let spots = [5u64, CHUNK - 2, 2 * CHUNK + 7];
        for s in spots {
            b[s as usize..s as usize + 4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        }
        let src: SharedSource = Arc::new(MemSource::new("m", b));
        let stop = AtomicBool::new(false);
        let p = [0xde, 0xad, 0xbe, 0xef];
        let none = |_: u64, _: u64| {};
        let mut at = 0;
        let mut found = Vec::new();
        while let Some(x) = find_forward(&src, &p, at, &stop, &none).unwrap() {
            found.push(x);
            at = x + 1;
        }
        assert_eq!(found, spots);
        let mut back = Vec::new();
        let mut at = len as u64;
        while let Some(x) = find_backward(&src, &p, at, &stop, &none).unwrap() {
            back.push(x);
            at = x;
        }
        back.reverse();
        assert_eq!(back, spots);
    }
}

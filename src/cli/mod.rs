//! The command-line front end: one module per subcommand, each a thin layer over
//! the `qinspect` library.

pub mod check;
pub mod check_many;
pub mod clusters;
pub mod compare;
pub mod dump;
pub mod hexdump;
pub mod info;
pub mod map;
pub mod num;
pub mod read;
pub mod secret;
pub mod simulate;
pub mod trace;

use anstyle::{AnsiColor, Style};
use qinspect::chain::{Chain, OpenOptions};
use qinspect::image::Strictness;
use std::io::Write;
use std::path::Path;

/// Result of a subcommand: the process exit code.
pub type CmdResult = color_eyre::Result<i32>;

/// Styles that carry meaning in readable output.
pub mod style {
    use super::*;
    /// Section headings (bold).
    pub const HEAD: Style = Style::new().bold();
    /// Guest data present in this layer.
    pub const DATA: Style = AnsiColor::Green.on_default();
    /// Guest ranges that read as zeros (zero entries, unallocated without backing).
    pub const ZERO: Style = AnsiColor::Blue.on_default();
    /// Falls through to a lower layer.
    pub const BACKING: Style = AnsiColor::Yellow.on_default();
    /// Guest data stored in a compressed cluster.
    pub const COMPRESSED: Style = AnsiColor::Magenta.on_default();
    /// Something wrong.
    pub const BAD: Style = AnsiColor::Red.on_default().bold();
    /// Less important.
    pub const DIM: Style = Style::new().dimmed();
}

/// Print an error and its causes to stderr.
pub fn report_error(e: &color_eyre::Report) {
    let mut err = anstream::stderr();
    let bad = style::BAD;
    let _ = write!(err, "{bad}qinspect: error:{bad:#} {}", error_text(e));
    let _ = writeln!(err);
}

/// An error and its causes as `report_error` prints them (without the prefix): a
/// cause whose words the message already says (an I/O error quoted by the error
/// that wraps it) is not said again.
pub fn error_text(e: &color_eyre::Report) -> String {
    let mut said = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !said.contains(&c) {
            said.push_str("\n  caused by: ");
            said.push_str(&c);
        }
    }
    said
}

/// Open an image and its backing chain.
pub fn open_chain(
    path: &Path,
    snapshot: Option<&str>,
    strictness: Strictness,
) -> color_eyre::Result<Chain> {
    let opts = OpenOptions {
        snapshot: snapshot.map(str::to_string),
        strictness,
        ..Default::default()
    };
    let chain = Chain::open(path, &opts)?;
    warn_notes(&chain);
    Ok(chain)
}

/// Print where opening the chain had to differ from QEMU, as warnings on stderr.
pub fn warn_notes(chain: &Chain) {
    for n in &chain.notes {
        warn(n);
    }
}

/// Print `text` on stderr as a warning: `qinspect: warning: TEXT`, the
/// prefix coloured when stderr is a terminal.
pub fn warn(text: impl std::fmt::Display) {
    let bad = style::BAD;
    let _ = writeln!(anstream::stderr(), "{bad}qinspect: warning:{bad:#} {text}");
}

/// Standard output through a buffer (stdout alone is line-buffered: one write
/// per line), with colours when it is a terminal, as `anstream::stdout` decides.
/// The colour filter keeps its state across writes, so escape sequences split
/// between two flushes of the buffer are still removed.
pub fn buffered_stdout() -> std::io::BufWriter<anstream::AutoStream<std::io::StdoutLock<'static>>> {
    let choice = anstream::AutoStream::choice(&std::io::stdout());
    std::io::BufWriter::with_capacity(
        1 << 16,
        anstream::AutoStream::new(std::io::stdout().lock(), choice),
    )
}

/// Write JSON to stdout, pretty-printed.
pub fn print_json(v: &impl serde::Serialize) -> color_eyre::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Whether `e` comes from writing to a closed pipe (`qinspect ... | head`): an
/// I/O error, or a JSON writer's (serde_json keeps the I/O error to itself: its
/// `source` skips it, so it is asked for the kind).
pub fn is_broken_pipe(e: &color_eyre::Report) -> bool {
    let broken = std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == broken)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(broken))
    })
}

#[cfg(test)]
mod tests {
    use super::error_text;
    use std::path::Path;

    #[test]
    fn a_missing_file_is_said_once() {
        let Err(e) = qinspect::io::FileSource::open(Path::new("/nonexistent/nothere.qcow2")) else {
            panic!("the file does not exist");
        };
        assert!(matches!(e, qinspect::Error::Io { .. }), "{e:?}");
        let text = error_text(&color_eyre::Report::new(e));
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
        assert!(!text.contains("caused by"), "{text}");
    }

    /// `compare --closest --json | head`, `dump l2 --json | head`: the JSON
    /// writer's error on a closed pipe is a closed pipe too, ended quietly.
    #[test]
    fn a_json_write_into_a_closed_pipe_is_a_closed_pipe() {
        struct Closed;
        impl std::io::Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let Err(e) = serde_json::to_writer_pretty(Closed, &[1, 2, 3]) else {
            panic!("a closed pipe takes no bytes");
        };
        assert!(super::is_broken_pipe(&color_eyre::Report::new(e)));
        // A JSON error of another kind is not.
        let Err(e) = serde_json::from_str::<u8>("x") else {
            panic!("'x' is no number");
        };
        assert!(!super::is_broken_pipe(&color_eyre::Report::new(e)));
    }

    #[test]
    fn a_cause_with_words_of_its_own_is_still_said() {
        let e = color_eyre::Report::msg("inner reason").wrap_err("outer");
        assert_eq!(error_text(&e), "outer\n  caused by: inner reason");
    }
}

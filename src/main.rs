//! `qinspect`: look inside qcow2 disk images.

mod cli;
mod tui;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Look inside qcow2 disk images: header, tables, refcounts, snapshots, and how
/// every guest read resolves through the backing chain. Read-only, always.
///
/// Numbers (offsets, lengths) accept decimal, 0x-hex and k/M/G/T/P/E suffixes
/// (powers of 1024), like qemu-io: 65536, 0x10000, 64k and 64K are the same.
#[derive(Parser, Debug)]
#[command(name = "qinspect", version, propagate_version = true)]
#[command(after_help = "Examples:\n  \
    qinspect info disk.qcow2                 header, features, snapshots, bitmaps\n  \
    qinspect map --json disk.qcow2           same extents as `qemu-img map --output=json`\n  \
    qinspect trace disk.qcow2 1M             how guest offset 1 MiB resolves, step by step\n  \
    qinspect read disk.qcow2 -o disk.raw     guest bytes, like `qemu-img convert -O raw`\n  \
    qinspect check disk.qcow2                same verdict as `qemu-img check`, with owners\n  \
    qinspect clusters disk.qcow2 --host 64k  who points at host offset 64 KiB\n  \
    qinspect dump l2 disk.qcow2 0            the L2 table behind L1 entry 0\n  \
    qinspect hexdump disk.qcow2 --guest 64k  the bytes a guest read at 64 KiB returns")]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Image to open in the interactive viewer when no subcommand is given.
    image: Option<PathBuf>,
    /// Do not capture the mouse (so the terminal can select text).
    #[arg(long)]
    no_mouse: bool,
    /// Reload by itself when the image file changes (someone ran qemu-img on it).
    #[arg(long)]
    watch: bool,
    #[command(flatten)]
    key: cli::secret::KeyArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Summarise an image (like `qemu-img info`; --json gives the same keys and more).
    Info(cli::info::Args),
    /// List how the guest address space is mapped (like `qemu-img map`).
    Map(cli::map::Args),
    /// Show every step of resolving one guest offset through the backing chain.
    Trace(cli::trace::Args),
    /// Read guest bytes through the backing chain (like `qemu-img convert -O raw`).
    Read(cli::read::Args),
    /// Check refcount consistency like `qemu-img check`, naming every cluster involved.
    Check(cli::check::Args),
    /// List host clusters with their roles, refcounts and who references them.
    Clusters(cli::clusters::Args),
    /// Simulate snapshot operations, writes, discards and refcount walks in memory.
    Simulate(cli::simulate::Args),
    /// Compare two states (active, snapshots) guest cluster by guest cluster, or find the closest snapshot.
    Compare(cli::compare::Args),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
    /// Print an on-disk table with each entry's file offset, raw value and meaning.
    Dump(cli::dump::Args),
    /// Hex dump of host bytes, or of the bytes a guest read returns.
    Hexdump(cli::hexdump::Args),
}

fn main() {
    if let Err(e) = color_eyre::install() {
        eprintln!("qinspect: {e}");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Info(a)) => cli::info::run(a),
        Some(Command::Map(a)) => cli::map::run(a),
        Some(Command::Trace(a)) => cli::trace::run(a),
        Some(Command::Read(a)) => cli::read::run(a),
        Some(Command::Dump(a)) => cli::dump::run(a),
        Some(Command::Check(a)) => cli::check::run(a),
        Some(Command::Clusters(a)) => cli::clusters::run(a),
        Some(Command::Simulate(a)) => cli::simulate::run(a),
        Some(Command::Compare(a)) => cli::compare::run(a),
        Some(Command::Hexdump(a)) => cli::hexdump::run(a),
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            use std::io::Write;
            // Written into a buffer first: clap_complete panics on a failed write, and
            // a closed pipe (`| head`) must end quietly as it does for the other commands.
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "qinspect", &mut buf);
            std::io::stdout()
                .lock()
                .write_all(&buf)
                .map(|()| 0)
                .map_err(Into::into)
        }
        Some(Command::Man) => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map(|_| 0)
                .map_err(Into::into)
        }
        None => match cli.image {
            Some(mut image) => {
                use std::io::IsTerminal;
                match cli.key.resolve(&mut image) {
                    Err(e) => Err(e),
                    Ok(keys) if std::io::stdout().is_terminal() => {
                        match keys.into_viewer_passphrase(&image) {
                            Ok(passphrase) => {
                                let opts = tui::app::Options {
                                    mouse: !cli.no_mouse,
                                    watch: cli.watch,
                                    passphrase,
                                };
                                tui::run(image, opts).map(|_| 0)
                            }
                            Err(e) => Err(e),
                        }
                    }
                    // Not a terminal: print the summary instead of drawing screens.
                    Ok(_) => cli::info::run(cli::info::Args::for_image(image)),
                }
            }
            None => {
                use clap::CommandFactory;
                let _ = Cli::command().print_help();
                Ok(2)
            }
        },
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // A closed pipe (`qinspect ... | head`) is not an error worth reporting.
            if cli::is_broken_pipe(&e) {
                std::process::exit(0);
            }
            cli::report_error(&e);
            std::process::exit(1);
        }
    }
}

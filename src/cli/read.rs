//! `qinspect read`: guest bytes through the chain.

use super::{CmdResult, num::parse_size, open_chain};
use qinspect::image::Strictness;
use qinspect::lookup::{ReadCache, read};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `qinspect read`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Bytes are exactly what a guest reads, and what \
`qemu-img convert -O raw [-l snapshot.name=S]` writes: data from whichever layer holds it, \
zeros for zero clusters, unallocated ranges and anything past the end of a shorter backing \
file. Compressed clusters are inflated.\n\n\
Examples:\n  qinspect read disk.qcow2 -o disk.raw\n  qinspect read disk.qcow2 --offset 1M --length 4k | xxd | head")]
pub struct Args {
    /// The image file (top of the chain).
    pub image: PathBuf,
    /// Read through this internal snapshot (ID or name) instead of the active L1.
    #[arg(long, short = 's')]
    pub snapshot: Option<String>,
    /// First guest byte to read.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub offset: u64,
    /// How many bytes (default: to the end of the disk).
    #[arg(long, short = 'l', value_parser = parse_size)]
    pub length: Option<u64>,
    /// Write to this file instead of standard output.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

const CHUNK: usize = 4 << 20;

/// Run `qinspect read`.
pub fn run(a: Args) -> CmdResult {
    let chain = open_chain(&a.image, a.snapshot.as_deref(), Strictness::Qemu)?;
    let size = chain.size();
    if a.offset > size {
        color_eyre::eyre::bail!(
            "offset {:#x} is past the end of the disk ({size} bytes)",
            a.offset
        );
    }
    let len = a.length.unwrap_or(size - a.offset).min(size - a.offset);
    let mut sink: Box<dyn Write> = match &a.output {
        Some(p) => {
            if let Ok(canon) = std::fs::canonicalize(p) {
                for l in &chain.layers {
                    if std::fs::canonicalize(&l.path).ok().as_ref() == Some(&canon) {
                        color_eyre::eyre::bail!(
                            "refusing to write to {}: it is a layer of the chain being read",
                            p.display()
                        );
                    }
                }
            }
            Box::new(std::fs::File::create(p)?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut buf = vec![0u8; CHUNK.min(len as usize).max(1)];
    let mut cache = ReadCache::default();
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        let chunk = &mut buf[..n];
        read(&chain, a.offset + pos, chunk, &mut cache)?;
        match sink.write_all(chunk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            Err(e) => return Err(e.into()),
        }
        pos += n as u64;
    }
    sink.flush()?;
    Ok(0)
}

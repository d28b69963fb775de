//! `qinspect read`: guest bytes through the chain.

use super::{CmdResult, num::parse_size, open_chain};
use qinspect::image::Strictness;
use qinspect::lookup::{ReadCache, Segment, for_each_segment, read};
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
    #[command(flatten)]
    pub key: super::secret::KeyArgs,
}

const CHUNK: usize = 4 << 20;

/// Run `qinspect read`.
pub fn run(mut a: Args) -> CmdResult {
    let keys = a.key.resolve(&mut a.image)?;
    let chain = open_chain(&a.image, a.snapshot.as_deref(), Strictness::Qemu)?;
    keys.unlock(&chain)?;
    super::secret::Keys::require(&chain)?;
    let size = chain.size();
    if a.offset > size {
        color_eyre::eyre::bail!(
            "offset {:#x} is past the end of the disk ({size} bytes)",
            a.offset
        );
    }
    let len = a.length.unwrap_or(size - a.offset).min(size - a.offset);
    if let Some(p) = &a.output {
        refuse_chain_member(&chain, p)?;
        let file = std::fs::File::create(p)?;
        if file.metadata()?.file_type().is_file() {
            // One thread: the in-kernel copy is bound by memory bandwidth, and
            // more threads measured slower here.
            write_sparse(&chain, a.offset, 0, len, &file)?;
            file.set_len(len)?;
            return Ok(0);
        }
        return stream(&chain, a.offset, len, Box::new(file));
    }
    stream(&chain, a.offset, len, Box::new(std::io::stdout().lock()))
}

/// Never write over a file the chain is read from.
fn refuse_chain_member(
    chain: &qinspect::chain::Chain,
    p: &std::path::Path,
) -> color_eyre::Result<()> {
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
    Ok(())
}

/// Write to a pipe or terminal through a buffer.
fn stream(
    chain: &qinspect::chain::Chain,
    offset: u64,
    len: u64,
    mut sink: Box<dyn Write + '_>,
) -> CmdResult {
    let mut buf = vec![0u8; CHUNK.min(len as usize).max(1)];
    let mut cache = ReadCache::default();
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        let chunk = &mut buf[..n];
        read(chain, offset + pos, chunk, &mut cache)?;
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

/// Write to a regular file: data copied file-to-file inside the kernel where it
/// can be, zeros left as holes (like `qemu-img convert`'s sparse output).
fn write_sparse(
    chain: &qinspect::chain::Chain,
    offset: u64,
    out_pos: u64,
    len: u64,
    out: &std::fs::File,
) -> color_eyre::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut cache = ReadCache::default();
    let mut pos = out_pos;
    let mut buf = vec![0u8; CHUNK];
    for_each_segment(chain, offset, len, &mut cache, &mut |seg| {
        let n = seg.len();
        match seg {
            Segment::Zero { .. } => {}
            Segment::Bytes(b) => out.write_all_at(b, pos).map_err(|e| io_err(e, "write"))?,
            Segment::Data { src, host, len } => {
                // Only the part inside the source file; the rest reads as zeros.
                let stored = len.min(src.len().saturating_sub(host));
                let mut done = 0u64;
                if let Some(f) = src.file() {
                    while done < stored {
                        let mut off_in = host + done;
                        let mut off_out = pos + done;
                        let want = (stored - done).min(1 << 30) as usize;
                        match rustix::fs::copy_file_range(
                            f,
                            Some(&mut off_in),
                            out,
                            Some(&mut off_out),
                            want,
                        ) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => done += k as u64,
                        }
                    }
                }
                // Fallback: read and write through a buffer.
                while done < stored {
                    let k = ((stored - done) as usize).min(buf.len());
                    let chunk = &mut buf[..k];
                    qinspect::io::read_into(src, "guest data", host + done, chunk)?;
                    out.write_all_at(chunk, pos + done)
                        .map_err(|e| io_err(e, "write"))?;
                    done += k as u64;
                }
            }
        }
        pos += n;
        Ok(())
    })?;
    Ok(())
}

fn io_err(e: std::io::Error, what: &str) -> qinspect::Error {
    qinspect::Error::Io {
        file: "output".into(),
        what: what.into(),
        source: e,
    }
}

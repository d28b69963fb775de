//! `qinspect read`: guest bytes through the chain.

mod pipe;
mod sparse;

use super::CmdResult;
use super::num::{parse_guest, parse_size};
use color_eyre::eyre::{bail, eyre};
use qinspect::chain::{Chain, OpenOptions};
use qinspect::image::Strictness;
use qinspect::io::FileId;
use qinspect::lookup::{ReadCache, read};
use qinspect::types::GuestOffset;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use pipe::stream_to_pipe;
use sparse::{SPARSE_BLOCK, allocate_first_block, io_err, write_parallel};

/// Arguments of `qinspect read`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Bytes are exactly what a guest reads, and what \
`qemu-img convert -O raw [-l snapshot.name=S]` writes: data from whichever layer holds it, \
zeros for zero clusters, unallocated ranges and anything past the end of a shorter backing \
file. Compressed clusters are inflated.\n\n\
Through a snapshot (-s S, or -s snapshot.name=S to match a name only) the disk keeps its \
current size, as with `qemu-img convert -l`: zeros (or the backing file) past the end of a \
smaller snapshot, cut where the disk has shrunk since.\n\n\
Written to a file, the output is sparse where qemu-img's is: unallocated ranges, zero \
clusters, holes of the source and 4 KiB blocks of zero data are left as holes. An existing \
output file is written over in place (holes punched where the new output has them), which \
reuses its pages in the page cache and gives the same bytes, holes and size as a new file. \
The output may not be any file the chain reads (compared by device and inode).\n\n\
Examples:\n  qinspect read disk.qcow2 -o disk.raw\n  qinspect read disk.qcow2 --offset 1M --length 4k | xxd | head")]
pub struct Args {
    /// The image file (top of the chain).
    pub image: PathBuf,
    /// Read through this internal snapshot (ID or name) instead of the active L1.
    ///
    /// A bare ID_OR_NAME is tried as an ID, then as a name; `snapshot.name=NAME`,
    /// `snapshot.id=ID` (or both, comma-separated) match exactly, as in
    /// `qemu-img convert -l`.
    #[arg(long, short = 's')]
    pub snapshot: Option<String>,
    /// First guest byte to read.
    #[arg(long, value_parser = parse_guest, default_value = "0")]
    pub offset: GuestOffset,
    /// How many bytes (default: to the end of the disk; a length past the end is
    /// cut there, with a warning).
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
    let opts = OpenOptions {
        snapshot: a.snapshot.clone(),
        snapshot_active_size: true,
        strictness: Strictness::Qemu,
        ..Default::default()
    };
    let chain = Chain::open(&a.image, &opts)?;
    super::warn_notes(&chain);
    keys.unlock(&chain)?;
    super::secret::Keys::require(&chain)?;
    let size = chain.size();
    if a.offset.get() > size {
        color_eyre::eyre::bail!(
            "offset {:#x} is past the end of the disk ({size} bytes)",
            a.offset
        );
    }
    let rest = size - a.offset.get();
    let len = a.length.unwrap_or(rest).min(rest);
    if let Some(asked) = a.length.filter(|&l| l > rest) {
        // Cut at the end of the disk; said, so a short output is not a surprise.
        super::warn(format_args!(
            "the disk ends at {size:#x}: {len} of the {asked} bytes asked for are read"
        ));
    }
    if let Some(p) = &a.output {
        let file = open_output(&chain, p)?;
        return write_output(&chain, a.offset, len, file);
    }
    let out = std::io::stdout().lock();
    if refuse_stdout_member(&chain)?.file_type().is_fifo() {
        return stream_to_pipe(&chain, a.offset, len, out);
    }
    stream(&chain, a.offset, len, Box::new(out))
}

/// Write `len` guest bytes from `offset` into an output [`open_output`] opened:
/// a regular file sparse and in place, anything else as a stream.
pub(super) fn write_output(
    chain: &Chain,
    offset: GuestOffset,
    len: u64,
    file: std::fs::File,
) -> CmdResult {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        // An existing file is overwritten in place when it can be: writing
        // into pages the page cache already holds costs a tenth of filling
        // fresh ones (see `reuse_output`). Otherwise it is emptied, and given
        // its whole size first, as qemu-img creates its output: writes then
        // never extend the file (no size update per write).
        let reuse = meta.len() > 0 && reuse_output(&file, len)?;
        if !reuse {
            // Only a file that holds something is cut to nothing: on ext4 a
            // truncation to size 0 makes the close write the file back
            // (`auto_da_alloc`, for programs that replace a file so), and
            // `strace -T` timed that close at 0.6 s for a new 1 GiB output.
            if meta.len() > 0 {
                file.set_len(0)?;
            }
            file.set_len(len)?;
        }
        allocate_first_block(&file, len)?;
        write_parallel(chain, offset, len, &file, reuse)?;
        // The last 4 KiB block may have been written whole.
        file.set_len(len)?;
        return Ok(0);
    }
    stream(chain, offset, len, Box::new(file))
}

/// Open the output file, never one the chain reads from.
///
/// The output's device and inode are compared with those of every file the chain
/// has open (each layer, raw layers, external data files), so a hard link, a
/// symlink or another spelling of the same path is caught. An existing file is
/// looked at before it is opened, opened without truncation and checked again on
/// the open descriptor; only then may it be changed.
pub(super) fn open_output(chain: &Chain, p: &Path) -> color_eyre::Result<std::fs::File> {
    if let Ok(meta) = std::fs::metadata(p) {
        refuse_member(chain, p, FileId::of(&meta))?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .map_err(|e| eyre!("cannot open {} for writing: {e}", p.display()))?;
    let meta = file.metadata()?;
    refuse_member(chain, p, FileId::of(&meta))?;
    Ok(file)
}

/// Prepare an existing regular output to be overwritten in place; false when it
/// cannot be (too small to bother, or a file system without hole punching), and
/// then the caller empties it as qemu-img does.
///
/// qemu-img truncates an existing output to nothing and writes it again, so every
/// page it writes is a fresh page-cache page. Filling fresh pages is what most of
/// the time of a read goes to: on a 2-core virtual machine, `perf record` puts
/// 86% of `read -o` of a 1 GiB image in `copy_folio_from_iter_atomic`, and `dd
/// bs=1M count=868` took 2.2–3.7 s of CPU into a new file against 0.21–0.26 s
/// over the same file with `conv=notrunc`. So the file is cut or extended to the
/// new length, and then every 4 KiB block of it is either written with the new
/// data or has a hole punched in it: the bytes, the holes and the allocated
/// blocks come out exactly as in a new file, while the data lands in the pages
/// already there.
fn reuse_output(out: &std::fs::File, len: u64) -> color_eyre::Result<bool> {
    if len < SPARSE_BLOCK as u64 {
        return Ok(false);
    }
    out.set_len(len)?;
    // The first block is written afterwards whatever it holds (as file-posix
    // does on create), so punching it probes for hole punching at no cost.
    match punch(out, 0, SPARSE_BLOCK as u64) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP => Ok(false),
        Err(e) => Err(io_err(e.into(), "punch a hole in").into()),
    }
}

/// Deallocate `len` bytes at `at` (they read as zeros after), keeping the size.
fn punch(out: &std::fs::File, at: u64, len: u64) -> rustix::io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    fallocate(
        out,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        at,
        len,
    )
}

/// Standard output redirected onto a file of the chain (`>> base.qcow2`); what
/// standard output is, otherwise.
fn refuse_stdout_member(chain: &Chain) -> color_eyre::Result<std::fs::Metadata> {
    use std::os::fd::AsFd;
    let out = std::io::stdout();
    let fd = out.as_fd().try_clone_to_owned()?;
    let meta = std::fs::File::from(fd).metadata()?;
    refuse_member(chain, Path::new("standard output"), FileId::of(&meta))?;
    Ok(meta)
}

fn refuse_member(chain: &Chain, p: &Path, id: FileId) -> color_eyre::Result<()> {
    if let Some(m) = chain.member(id) {
        bail!(
            "refusing to write to {}: it is {} of the chain being read ({}, device {} inode {}); nothing was written",
            p.display(),
            m.role,
            m.src.name().display(),
            id.dev,
            id.ino
        );
    }
    Ok(())
}

/// Write to a pipe or terminal through a buffer.
pub(super) fn stream(
    chain: &qinspect::chain::Chain,
    offset: GuestOffset,
    len: u64,
    mut sink: Box<dyn Write + '_>,
) -> CmdResult {
    let mut buf = vec![0u8; CHUNK.min(len as usize).max(1)];
    let mut cache = ReadCache::default();
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(buf.len());
        let chunk = &mut buf[..n];
        read(chain, offset.saturating_add(pos), chunk, &mut cache)?;
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

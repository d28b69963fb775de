//! `qinspect read`: guest bytes through the chain.

use super::{CmdResult, num::parse_size};
use color_eyre::eyre::{bail, eyre};
use qinspect::chain::{Chain, OpenOptions};
use qinspect::image::Strictness;
use qinspect::io::{Extent, FileId, Source};
use qinspect::lookup::{ReadCache, Segment, for_each_segment, read};
use std::io::Write;
use std::path::{Path, PathBuf};

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
clusters, holes of the source and 4 KiB blocks of zero data are left as holes. The output \
may not be any file the chain reads (compared by device and inode).\n\n\
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
    if a.offset > size {
        color_eyre::eyre::bail!(
            "offset {:#x} is past the end of the disk ({size} bytes)",
            a.offset
        );
    }
    let len = a.length.unwrap_or(size - a.offset).min(size - a.offset);
    if let Some(p) = &a.output {
        let file = open_output(&chain, p)?;
        if file.metadata()?.file_type().is_file() {
            // The whole size first, as qemu-img creates its output: writes then
            // never extend the file (no size update per write).
            file.set_len(len)?;
            allocate_first_block(&file, len)?;
            write_parallel(&chain, a.offset, len, &file)?;
            // The last 4 KiB block may have been written whole.
            file.set_len(len)?;
            return Ok(0);
        }
        return stream(&chain, a.offset, len, Box::new(file));
    }
    refuse_stdout_member(&chain)?;
    stream(&chain, a.offset, len, Box::new(std::io::stdout().lock()))
}

/// Open the output file, never one the chain reads from.
///
/// The output's device and inode are compared with those of every file the chain
/// has open (each layer, raw layers, external data files), so a hard link, a
/// symlink or another spelling of the same path is caught. An existing file is
/// looked at before it is opened, opened without truncation, checked again on the
/// open descriptor, and only then emptied.
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
    if meta.file_type().is_file() {
        file.set_len(0)?;
    }
    Ok(file)
}

/// Standard output redirected onto a file of the chain (`>> base.qcow2`).
fn refuse_stdout_member(chain: &Chain) -> color_eyre::Result<()> {
    use std::os::fd::AsFd;
    let out = std::io::stdout();
    let fd = out.as_fd().try_clone_to_owned()?;
    let meta = std::fs::File::from(fd).metadata()?;
    refuse_member(chain, Path::new("standard output"), FileId::of(&meta))
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

/// Write to a regular file the way `qemu-img convert -O raw` does: nothing is
/// written for zeros, so unallocated ranges, zero clusters, holes in the source
/// files and 4 KiB blocks of zero data all stay holes in the output.
///
/// Holes in a source file (a preallocated image's unwritten clusters) are found
/// with `SEEK_HOLE` and skipped without being read.
fn write_sparse(
    chain: &Chain,
    offset: u64,
    out_pos: u64,
    len: u64,
    out: &std::fs::File,
) -> color_eyre::Result<()> {
    let mut cache = ReadCache::default();
    let mut w = SparseWriter::new(out, out_pos);
    for_each_segment(chain, offset, len, &mut cache, &mut |seg| {
        match seg {
            Segment::Zero { len } => w.skip(len)?,
            Segment::Bytes(b) => w.put(b)?,
            Segment::Data { src, host, len } => {
                let mut done = 0u64;
                while done < len {
                    let at = host.saturating_add(done);
                    let rest = len - done;
                    match src.extent_at(at) {
                        Extent::Hole(0) => {
                            // Past the end of the source: zeros to the end.
                            w.skip(rest)?;
                            done = len;
                        }
                        Extent::Hole(n) => {
                            let n = n.min(rest);
                            w.skip(n)?;
                            done += n;
                        }
                        Extent::Data(n) => {
                            let n = n.clamp(1, rest);
                            w.copy_from(src, at, n)?;
                            done += n;
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    w.flush()?;
    Ok(())
}

/// Output is cut into chunks that worker threads take in turn, each resolving,
/// reading, zero-checking and writing its own chunk.
const CHUNK_BYTES: u64 = 16 << 20;

/// [`write_sparse`] on every core: chunk `i` of the output goes to whichever
/// worker asks next, so a run of holes does not leave one worker idle.
pub(super) fn write_parallel(
    chain: &Chain,
    offset: u64,
    len: u64,
    out: &std::fs::File,
) -> color_eyre::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let chunks = len.div_ceil(CHUNK_BYTES);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(usize::try_from(chunks).unwrap_or(usize::MAX))
        .max(1);
    let next = AtomicU64::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= chunks {
                        break;
                    }
                    let start = i * CHUNK_BYTES;
                    let n = CHUNK_BYTES.min(len - start);
                    if let Err(e) = write_sparse(chain, offset + start, start, n, out) {
                        // Stop everyone; keep the first error.
                        next.store(chunks, Ordering::Relaxed);
                        let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A new raw file from qemu-img has its first block written (file-posix does so
/// on create, to probe the alignment later): 4 KiB, or one 512-byte sector for
/// smaller files. Doing the same keeps the allocated size equal to qemu-img's.
pub(super) fn allocate_first_block(out: &std::fs::File, len: u64) -> color_eyre::Result<()> {
    use std::os::unix::fs::FileExt;
    if len == 0 {
        return Ok(());
    }
    let n = if len < SPARSE_BLOCK as u64 {
        512
    } else {
        SPARSE_BLOCK
    };
    out.write_all_at(&vec![0u8; n], 0)
        .map_err(|e| io_err(e, "write"))?;
    Ok(())
}

/// qemu-img convert's zero detection (`-S 4k`): a block of this many bytes,
/// aligned in the output, that holds only zeros is not written.
const SPARSE_BLOCK: usize = 4096;
/// How much output is staged before its non-zero blocks are written.
const WINDOW: usize = 1 << 20;

/// Stages output in an aligned window and writes only its non-zero blocks.
struct SparseWriter<'a> {
    out: &'a std::fs::File,
    buf: Vec<u8>,
    /// Output offset of `buf[0]` (a multiple of `WINDOW`).
    start: u64,
    /// Output offset of the next byte.
    pos: u64,
    /// `buf` holds something other than zeros.
    dirty: bool,
}

impl<'a> SparseWriter<'a> {
    fn new(out: &'a std::fs::File, pos: u64) -> Self {
        SparseWriter {
            out,
            buf: vec![0u8; WINDOW],
            start: pos - pos % WINDOW as u64,
            pos,
            dirty: false,
        }
    }

    fn window_end(&self) -> u64 {
        self.start + WINDOW as u64
    }

    /// Move to output offset `to`, writing out the window if `to` leaves it.
    fn seek(&mut self, to: u64) -> qinspect::Result<()> {
        if to >= self.window_end() {
            self.flush()?;
            self.start = to - to % WINDOW as u64;
        }
        self.pos = to;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> qinspect::Result<()> {
        self.seek(self.pos + n)
    }

    /// The staging slice from `pos` to the end of the window, at most `n` bytes.
    fn room(&mut self, n: u64) -> &mut [u8] {
        let at = (self.pos - self.start) as usize;
        let k = (WINDOW - at).min(usize::try_from(n).unwrap_or(usize::MAX));
        self.dirty = true;
        &mut self.buf[at..at + k]
    }

    fn put(&mut self, mut b: &[u8]) -> qinspect::Result<()> {
        while !b.is_empty() {
            let dst = self.room(b.len() as u64);
            let k = dst.len();
            dst.copy_from_slice(&b[..k]);
            b = &b[k..];
            self.skip(k as u64)?;
        }
        Ok(())
    }

    fn copy_from(&mut self, src: &dyn Source, mut at: u64, mut n: u64) -> qinspect::Result<()> {
        while n > 0 {
            let dst = self.room(n);
            let k = dst.len();
            qinspect::io::read_into(src, "guest data", at, dst)?;
            at += k as u64;
            n -= k as u64;
            self.skip(k as u64)?;
        }
        Ok(())
    }

    /// Write the window's non-zero blocks, in runs, and clear it.
    fn flush(&mut self) -> qinspect::Result<()> {
        use std::os::unix::fs::FileExt;
        if !self.dirty {
            return Ok(());
        }
        let blocks: Vec<bool> = self.buf.chunks(SPARSE_BLOCK).map(|c| !is_zero(c)).collect();
        let mut i = 0;
        while i < blocks.len() {
            if !blocks[i] {
                i += 1;
                continue;
            }
            let j = (i..blocks.len())
                .find(|&j| !blocks[j])
                .unwrap_or(blocks.len());
            let bytes = &self.buf[i * SPARSE_BLOCK..(j * SPARSE_BLOCK).min(WINDOW)];
            self.out
                .write_all_at(bytes, self.start + (i * SPARSE_BLOCK) as u64)
                .map_err(|e| io_err(e, "write"))?;
            i = j;
        }
        self.buf.fill(0);
        self.dirty = false;
        Ok(())
    }
}

/// All bytes zero: compared with a block of zeros (`memcmp`, which the C library
/// vectorises).
fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; SPARSE_BLOCK] = [0; SPARSE_BLOCK];
    b.chunks(SPARSE_BLOCK).all(|c| c == &ZEROS[..c.len()])
}

fn io_err(e: std::io::Error, what: &str) -> qinspect::Error {
    qinspect::Error::Io {
        file: "output".into(),
        what: what.into(),
        source: std::sync::Arc::new(e),
    }
}

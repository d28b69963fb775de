//! `read -o` into a regular file as `qemu-img convert -O raw` writes it: zero
//! blocks left as holes, chunks written by worker threads, an output that held
//! other contents reused in place.

use super::punch;
use qinspect::chain::Chain;
use qinspect::io::{Extent, Source};
use qinspect::lookup::{ReadCache, Segment, for_each_segment};
use qinspect::types::{GuestOffset, HostOffset};
use std::sync::Mutex;

/// Write to a regular file the way `qemu-img convert -O raw` does: nothing is
/// written for zeros, so unallocated ranges, zero clusters, holes in the source
/// files and 4 KiB blocks of zero data all stay holes in the output.
///
/// Holes in a source file (a preallocated image's unwritten clusters) are found
/// with `SEEK_HOLE` and skipped without being read.
///
/// With `reuse`, the output held other contents before: every block of
/// `out_pos..out_pos + len` not written has a hole punched in it, except the
/// first block of the file (see [`reuse_output`](super::reuse_output)).
fn write_sparse(
    chain: &Chain,
    offset: GuestOffset,
    out_pos: u64,
    len: u64,
    out: &Mutex<&std::fs::File>,
    reuse: bool,
) -> color_eyre::Result<()> {
    let mut cache = ReadCache::default();
    let mut w = SparseWriter::new(out, out_pos, reuse);
    for_each_segment(chain, offset, len, &mut cache, &mut |seg| {
        match seg {
            Segment::Zero { len } => w.skip(len)?,
            Segment::Bytes(b) => w.put(b)?,
            Segment::Data { src, host, len } => {
                let mut done = 0u64;
                while done < len {
                    let at = host.get().saturating_add(done);
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
    // A last partial block is punched whole (past the end of the file, which a
    // punch with KEEP_SIZE allows), as it would be a hole in a new file.
    w.replace_to((out_pos + len).next_multiple_of(SPARSE_BLOCK as u64))?;
    Ok(())
}

/// Output is cut into chunks that worker threads take in turn, each resolving,
/// reading, zero-checking and writing its own chunk.
const CHUNK_BYTES: u64 = 16 << 20;

/// [`write_sparse`] on every core: chunk `i` of the output goes to whichever
/// worker asks next, so a run of holes does not leave one worker idle.
pub(super) fn write_parallel(
    chain: &Chain,
    offset: GuestOffset,
    len: u64,
    out: &std::fs::File,
    reuse: bool,
) -> color_eyre::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    // Workers read and zero-check in parallel but write one at a time, as
    // qemu-img convert writes in order: with both writing into fresh
    // page-cache pages at once, `read -o` to a new file took 1.18 s of CPU
    // against 0.55–0.64 s for qemu-img (`perf stat -e task-clock`, four rounds).
    let out = Mutex::new(out);
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
                    if let Err(e) =
                        write_sparse(chain, offset.saturating_add(start), start, n, &out, reuse)
                    {
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
pub(super) const SPARSE_BLOCK: usize = 4096;
/// How much output is staged before its non-zero blocks are written: reads and
/// writes of 256 KiB took the least CPU time (`perf stat -e task-clock`, four
/// rounds of 64 KiB to 1 MiB; 4 MiB was a quarter slower), the buffer staying in
/// the core's L2 cache between the read into it, the zero check and the write.
const WINDOW: usize = 256 << 10;

/// Stages output in an aligned window and writes only its non-zero blocks.
struct SparseWriter<'a, 'f> {
    out: &'a Mutex<&'f std::fs::File>,
    buf: Vec<u8>,
    /// Output offset of `buf[0]` (a multiple of `WINDOW`).
    start: u64,
    /// Output offset of the next byte.
    pos: u64,
    /// `buf[..pos - start]` holds the window's bytes; nothing after `pos` is
    /// defined, so the buffer is never cleared as a whole. False: the window
    /// holds only zeros so far, and `buf` nothing.
    dirty: bool,
    /// Overwriting an existing file: old contents not written over are punched
    /// out.
    reuse: bool,
    /// With `reuse`, output before this offset holds its new contents.
    replaced: u64,
}

impl<'a, 'f> SparseWriter<'a, 'f> {
    fn new(out: &'a Mutex<&'f std::fs::File>, pos: u64, reuse: bool) -> Self {
        SparseWriter {
            out,
            buf: vec![0u8; WINDOW],
            start: pos - pos % WINDOW as u64,
            pos,
            dirty: false,
            reuse,
            // The first block of the file is always written.
            replaced: pos.max(SPARSE_BLOCK as u64),
        }
    }

    /// With `reuse`, punch out the old contents from `replaced` up to `to`.
    fn replace_to(&mut self, to: u64) -> qinspect::Result<()> {
        if self.reuse && to > self.replaced {
            punch(&self.file(), self.replaced, to - self.replaced)
                .map_err(|e| io_err(e.into(), "punch a hole in"))?;
        }
        self.replaced = self.replaced.max(to);
        Ok(())
    }

    /// The output, for one write.
    fn file(&self) -> std::sync::MutexGuard<'_, &'f std::fs::File> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn window_end(&self) -> u64 {
        self.start + WINDOW as u64
    }

    /// `n` bytes of zeros.
    fn skip(&mut self, n: u64) -> qinspect::Result<()> {
        let to = self.pos + n;
        if to >= self.window_end() {
            self.flush()?;
            self.start = to - to % WINDOW as u64;
        } else if self.dirty {
            let (a, b) = (self.pos - self.start, to - self.start);
            self.buf[a as usize..b as usize].fill(0);
        }
        self.pos = to;
        Ok(())
    }

    /// The staging slice from `pos` to the end of the window, at most `n` bytes;
    /// [`Self::advance`] says how much of it was filled.
    fn room(&mut self, n: u64) -> &mut [u8] {
        let at = (self.pos - self.start) as usize;
        if !self.dirty {
            self.buf[..at].fill(0);
            self.dirty = true;
        }
        let k = (WINDOW - at).min(usize::try_from(n).unwrap_or(usize::MAX));
        &mut self.buf[at..at + k]
    }

    /// `k` bytes were filled through [`Self::room`].
    fn advance(&mut self, k: usize) -> qinspect::Result<()> {
        self.pos += k as u64;
        if self.pos == self.window_end() {
            self.flush()?;
            self.start = self.pos;
        }
        Ok(())
    }

    fn put(&mut self, mut b: &[u8]) -> qinspect::Result<()> {
        while !b.is_empty() {
            let dst = self.room(b.len() as u64);
            let k = dst.len();
            dst.copy_from_slice(&b[..k]);
            b = &b[k..];
            self.advance(k)?;
        }
        Ok(())
    }

    fn copy_from(&mut self, src: &dyn Source, mut at: u64, mut n: u64) -> qinspect::Result<()> {
        while n > 0 {
            let dst = self.room(n);
            let k = dst.len();
            qinspect::io::read_into(src, "guest data", HostOffset(at), dst)?;
            at += k as u64;
            n -= k as u64;
            self.advance(k)?;
        }
        Ok(())
    }

    /// Write the window's non-zero blocks, in runs.
    fn flush(&mut self) -> qinspect::Result<()> {
        use std::os::unix::fs::FileExt;
        if !self.dirty {
            return Ok(());
        }
        self.dirty = false;
        // The defined bytes, and zeros to the end of the last block they touch.
        let end = (self.pos - self.start) as usize;
        let blocks_end = end.next_multiple_of(SPARSE_BLOCK).min(WINDOW);
        self.buf[end..blocks_end].fill(0);
        let mut from = 0;
        while let Some((a, b)) = next_run(&self.buf[..blocks_end], from) {
            let at = self.start + a as u64;
            self.replace_to(at)?;
            self.file()
                .write_all_at(&self.buf[a..b], at)
                .map_err(|e| io_err(e, "write"))?;
            self.replaced = self.replaced.max(at + (b - a) as u64);
            from = b;
        }
        Ok(())
    }
}

/// The next run of blocks of `buf` that are not all zeros, from `from` (a block
/// boundary) on: its byte range.
fn next_run(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let is_data = |at: usize| !is_zero(&buf[at..(at + SPARSE_BLOCK).min(buf.len())]);
    let a = (from..buf.len())
        .step_by(SPARSE_BLOCK)
        .find(|&at| is_data(at))?;
    let b = (a..buf.len())
        .step_by(SPARSE_BLOCK)
        .find(|&at| !is_data(at))
        .unwrap_or(buf.len());
    Some((a, b))
}

/// All bytes zero: compared with a block of zeros (`memcmp`, which the C library
/// vectorises).
fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; SPARSE_BLOCK] = [0; SPARSE_BLOCK];
    b.chunks(SPARSE_BLOCK).all(|c| c == &ZEROS[..c.len()])
}

pub(super) fn io_err(e: std::io::Error, what: &str) -> qinspect::Error {
    qinspect::Error::Io {
        file: "output".into(),
        what: what.into(),
        source: std::sync::Arc::new(e),
    }
}

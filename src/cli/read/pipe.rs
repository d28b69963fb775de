//! `read` into a pipe: file data spliced from the page cache, zeros spliced
//! from the hole of a memory file, the writer paced while the pipe is full.

use super::CHUNK;
use crate::cli::CmdResult;
use qinspect::chain::Chain;
use qinspect::lookup::{ReadCache, Segment, for_each_segment};
use qinspect::types::{GuestOffset, HostOffset};
use std::io::Write;
use std::path::Path;

/// The pipe buffer asked for (the default `/proc/sys/fs/pipe-max-size`): with
/// the default 64 KiB the reader is woken sixteen times as often.
const PIPE_SIZE: usize = 1 << 20;

/// Write to a pipe: data stored in a file is spliced from the file's page cache
/// into the pipe, so the bytes are never copied through this process (the
/// reader's copy out of the pipe is the only one); zeros and inflated or
/// decrypted bytes are written.
///
/// The splices do not block: when the pipe is full this process sleeps (see
/// [`Pacer`]) instead of waiting in the kernel, where the reader would have to
/// wake it after every read it makes. Zeros are spliced too, from the hole of
/// a memory file, when the kernel can (else they are written).
pub(super) fn stream_to_pipe(
    chain: &Chain,
    start: GuestOffset,
    len: u64,
    out: std::io::StdoutLock,
) -> CmdResult {
    use std::os::fd::AsFd;
    let pipe = out.as_fd();
    // A smaller pipe when the limit is lower (EPERM) is no reason to stop.
    let _ = rustix::pipe::fcntl_setpipe_size(pipe, PIPE_SIZE);
    let size = rustix::pipe::fcntl_getpipe_size(pipe).unwrap_or(PIPE_SIZE);
    let mut pacer = Pacer::new(size);
    let zero_file = zero_file();
    let zeros = vec![0u8; PIPE_SIZE];
    let mut buf = Vec::new();
    let mut sink = std::fs::File::from(pipe.try_clone_to_owned()?);
    let mut write = |b: &[u8]| {
        sink.write_all(b).map_err(|e| qinspect::Error::Io {
            file: "standard output".into(),
            what: "write".into(),
            source: std::sync::Arc::new(e),
        })
    };
    let mut cache = ReadCache::default();
    let done = for_each_segment(chain, start, len, &mut cache, &mut |seg| match seg {
        Segment::Zero { mut len } => {
            if let Some(z) = &zero_file {
                len = splice_zeros(z, len, pipe, &mut pacer)?;
            }
            while len > 0 {
                let n = len.min(zeros.len() as u64) as usize;
                write(&zeros[..n])?;
                len -= n as u64;
            }
            Ok(())
        }
        Segment::Bytes(b) => write(b),
        Segment::Data { src, host, len } => {
            let rest = match src.file() {
                Some(f) => splice_to(f, src.name(), host.get(), len, pipe, &mut pacer)?,
                None => len,
            };
            // Past the end of the file (zeros), or a source that cannot splice.
            let mut at = host.get() + (len - rest);
            let mut rest = rest;
            while rest > 0 {
                let n = rest.min(CHUNK as u64) as usize;
                buf.resize(n, 0);
                qinspect::io::read_into(src, "guest data", HostOffset(at), &mut buf)?;
                write(&buf)?;
                at += n as u64;
                rest -= n as u64;
            }
            Ok(())
        }
    });
    match done {
        Ok(()) => Ok(0),
        Err(qinspect::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(0)
        }
        Err(e) => Err(e.into()),
    }
}

/// Splice `len` bytes of `file` at `at` into `pipe`; how many are left (at the
/// end of the file, or when the file system cannot splice).
fn splice_to(
    file: &std::fs::File,
    name: &Path,
    mut at: u64,
    mut len: u64,
    pipe: std::os::fd::BorrowedFd,
    pacer: &mut Pacer,
) -> qinspect::Result<u64> {
    use rustix::io::Errno;
    use rustix::pipe::{SpliceFlags, splice};
    let flags = SpliceFlags::MORE | SpliceFlags::NONBLOCK;
    while len > 0 {
        let want = usize::try_from(len).unwrap_or(usize::MAX).min(1 << 30);
        match splice(file, Some(&mut at), pipe, None, want, flags) {
            Ok(0) => break,
            Ok(n) => len -= n as u64,
            Err(Errno::AGAIN) => pacer.wait(pipe),
            Err(Errno::INTR) => {}
            Err(Errno::INVAL) => break,
            Err(e) => {
                // EPIPE is the reader gone; anything else is the file's.
                let file = match e {
                    Errno::PIPE => "standard output".into(),
                    _ => name.to_path_buf(),
                };
                return Err(qinspect::Error::Io {
                    file,
                    what: format!("splice of the bytes at {at:#x} to standard output"),
                    source: std::sync::Arc::new(e.into()),
                });
            }
        }
    }
    Ok(len)
}

/// Sleeps while a pipe is full, for about as long as its reader takes to
/// empty half of it: the pause halves when the pipe was found empty (the
/// reader waited) and doubles when it was still more than half full.
struct Pacer {
    pause: std::time::Duration,
    size: usize,
}

impl Pacer {
    const MIN: std::time::Duration = std::time::Duration::from_micros(20);
    const MAX: std::time::Duration = std::time::Duration::from_millis(5);

    fn new(size: usize) -> Self {
        Pacer {
            pause: std::time::Duration::from_micros(200),
            size,
        }
    }

    fn wait(&mut self, pipe: std::os::fd::BorrowedFd) {
        std::thread::sleep(self.pause);
        match rustix::io::ioctl_fionread(pipe) {
            Ok(0) => self.pause = (self.pause / 2).max(Self::MIN),
            Ok(q) if usize::try_from(q).unwrap_or(usize::MAX) > self.size / 2 => {
                self.pause = (self.pause * 2).min(Self::MAX)
            }
            _ => {}
        }
    }
}

/// A memory file of `PIPE_SIZE` bytes that is all hole: splicing from it puts
/// the kernel's zero page into the pipe (on kernels that splice shmem holes
/// so; older ones copy zeros). None when it cannot be made.
fn zero_file() -> Option<std::fs::File> {
    use rustix::fs::{MemfdFlags, ftruncate, memfd_create};
    let fd = memfd_create("qinspect-zeros", MemfdFlags::CLOEXEC).ok()?;
    ftruncate(&fd, PIPE_SIZE as u64).ok()?;
    Some(std::fs::File::from(fd))
}

/// Splice `len` zeros from `zeros` (see [`zero_file`]) into `pipe`, its
/// whole length at a time; how many are left when the kernel cannot splice
/// from it.
fn splice_zeros(
    zeros: &std::fs::File,
    mut len: u64,
    pipe: std::os::fd::BorrowedFd,
    pacer: &mut Pacer,
) -> qinspect::Result<u64> {
    let name = Path::new("the memory file of zeros");
    while len > 0 {
        let n = len.min(PIPE_SIZE as u64);
        let left = splice_to(zeros, name, 0, n, pipe, pacer)?;
        len -= n - left;
        if left > 0 {
            break;
        }
    }
    Ok(len)
}

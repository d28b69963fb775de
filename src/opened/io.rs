//! Reading bytes at offsets, from files or from memory.
//!
//! Everything qinspect reads goes through [`Source`]. Files are opened with
//! `O_RDONLY` and never locked, so an image in use by a VM can be inspected; an
//! in-memory source lets tests and fuzzers run the whole core without touching disk.

use crate::error::{Error, Result};
use crate::types::HostOffset;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a region of a file stands, as `lseek(SEEK_DATA/SEEK_HOLE)` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// `len` bytes that the file system stores.
    Data(u64),
    /// `len` bytes of hole: they read as zeros and take no space.
    Hole(u64),
}

/// Random-access, read-only bytes.
pub trait Source: Send + Sync + std::fmt::Debug {
    /// Fill `buf` from `offset`. Bytes past the end of the source read as zeros; the
    /// return value is how many bytes came from the source itself.
    ///
    /// The boundary with the operating system (`pread`), so a bare byte offset:
    /// code that reads a structure goes through [`read_exact`] or [`read_into`],
    /// which take a [`HostOffset`] and name the structure in their errors.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
    /// Length in bytes.
    fn len(&self) -> u64;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes the file system really stores for this source (`st_blocks * 512`).
    fn allocated_size(&self) -> u64 {
        self.len()
    }
    /// Whether `offset` starts data or a hole, and for how long (never past the end).
    fn extent_at(&self, offset: u64) -> Extent {
        Extent::Data(self.len().saturating_sub(offset))
    }
    /// A name for messages.
    fn name(&self) -> &Path;
    /// The open file behind this source, if there is one (for in-kernel copies).
    fn file(&self) -> Option<&File> {
        None
    }
    /// The device and inode of the file behind this source, if there is one: what
    /// makes two paths (a hard link, a symlink, `dir/../x`) the same file.
    fn identity(&self) -> Option<FileId> {
        None
    }
}

/// A file's identity on this machine: its device and inode numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// The device number (`st_dev` from fstat).
    pub dev: u64,
    /// The inode number (`st_ino` from fstat).
    pub ino: u64,
}

impl FileId {
    /// The identity of an open file or of the metadata of a path.
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// A file opened read-only.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    len: u64,
    allocated: u64,
    id: FileId,
}

impl FileSource {
    /// Open `path` for reading only. No lock is taken.
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let io = |what: &str, source: std::io::Error| Error::Io {
            file: path.to_path_buf(),
            what: what.to_string(),
            source: Arc::new(source),
        };
        let file = File::open(path).map_err(|e| io("open", e))?;
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        if meta.is_dir() {
            return Err(io(
                "open",
                std::io::Error::other("is a directory, not an image file"),
            ));
        }
        let len = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report 0 in st_size; ask the device itself.
            use std::io::{Seek, SeekFrom};
            let mut f = &file;
            f.seek(SeekFrom::End(0)).map_err(|e| io("seek", e))?
        };
        Ok(FileSource {
            file,
            path: path.to_path_buf(),
            len,
            allocated: meta.blocks().saturating_mul(512),
            id: FileId::of(&meta),
        })
    }
}

impl Source for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            let Some(pos) = offset.checked_add(done as u64) else {
                break;
            };
            let Some(rest) = buf.get_mut(done..) else {
                break;
            };
            match self.file.read_at(rest, pos) {
                Ok(0) => break,
                Ok(n) => done = done.saturating_add(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(rest) = buf.get_mut(done..) {
            rest.fill(0);
        }
        Ok(done)
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn allocated_size(&self) -> u64 {
        self.allocated
    }

    fn extent_at(&self, offset: u64) -> Extent {
        use rustix::fs::{SeekFrom, seek};
        let rest = self.len.saturating_sub(offset);
        if rest == 0 {
            return Extent::Hole(0);
        }
        let Ok(data) = seek(&self.file, SeekFrom::Data(offset)) else {
            // ENXIO: no data after offset, so the rest is a hole. Other errors: the
            // file system cannot tell, so treat everything as data.
            return match rustix::io::Errno::from_io_error(&std::io::Error::last_os_error()) {
                _ if seek(&self.file, SeekFrom::Hole(offset)).is_ok() => Extent::Hole(rest),
                _ => Extent::Data(rest),
            };
        };
        if data > offset {
            return Extent::Hole(data.saturating_sub(offset).min(rest));
        }
        match seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(hole) if hole > offset => Extent::Data(hole.saturating_sub(offset).min(rest)),
            _ => Extent::Data(rest),
        }
    }

    fn name(&self) -> &Path {
        &self.path
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn identity(&self) -> Option<FileId> {
        Some(self.id)
    }
}

/// Bytes in memory, for tests and fuzzing.
#[derive(Debug)]
pub struct MemSource {
    bytes: Vec<u8>,
    name: PathBuf,
}

impl MemSource {
    /// Wrap `bytes` under a display `name`.
    pub fn new(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Self {
        MemSource {
            bytes,
            name: name.into(),
        }
    }
}

impl Source for MemSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let avail = self.bytes.get(start..).unwrap_or(&[]);
        let n = avail.len().min(buf.len());
        let (head, tail) = buf.split_at_mut(n);
        head.copy_from_slice(avail.get(..n).unwrap_or(&[]));
        tail.fill(0);
        Ok(n)
    }

    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn name(&self) -> &Path {
        &self.name
    }
}

/// A shared source.
pub type SharedSource = Arc<dyn Source>;

/// Read exactly `len` bytes of structure `what` at `offset`, failing with
/// [`Error::Truncated`] if the file is shorter. `len` must already be checked
/// against sane limits by the caller.
pub fn read_exact(src: &dyn Source, what: &str, offset: HostOffset, len: u64) -> Result<Vec<u8>> {
    let end = offset.get().checked_add(len);
    if end.is_none_or(|e| e > src.len()) {
        return Err(Error::Truncated {
            what: what.to_string(),
            offset,
            len,
            file_len: src.len(),
        });
    }
    let size = usize::try_from(len).map_err(|_| Error::invalid(what, offset, "too large"))?;
    let mut buf = vec![0u8; size];
    read_into(src, what, offset, &mut buf)?;
    Ok(buf)
}

/// Fill `buf` at `offset`; bytes past the end of the source read as zeros.
pub fn read_into(
    src: &dyn Source,
    what: &str,
    offset: HostOffset,
    buf: &mut [u8],
) -> Result<usize> {
    src.read_at(buf, offset.get()).map_err(|e| Error::Io {
        file: src.name().to_path_buf(),
        what: format!("read of {what} at {offset:#x}"),
        source: Arc::new(e),
    })
}

/// Whether `len` bytes from `offset` would end past
/// [`BDRV_MAX_LENGTH`](crate::types::BDRV_MAX_LENGTH), where QEMU's block layer
/// fails a read (EIO) instead of making it.
pub fn ends_past_limit(offset: HostOffset, len: u64) -> bool {
    offset
        .get()
        .checked_add(len)
        .is_none_or(|end| end > crate::types::BDRV_MAX_LENGTH)
}

/// QEMU's failure to read `len` bytes of structure `what` at `offset` when
/// they would end past [`BDRV_MAX_LENGTH`](crate::types::BDRV_MAX_LENGTH)
/// ([`ends_past_limit`]), in the words [`read_as_qemu`] fails with.
pub fn within_limit(what: &str, offset: HostOffset, len: u64) -> Result<()> {
    if ends_past_limit(offset, len) {
        return Err(Error::invalid(
            what,
            offset,
            format!(
                "{len} bytes from here end past {:#x}, the largest offset QEMU reads (Input/output error)",
                crate::types::BDRV_MAX_LENGTH
            ),
        ));
    }
    Ok(())
}

/// `len` bytes of structure `what` at `offset` as QEMU's block layer reads
/// them: those past the end of the file (its length when it was opened) are
/// zeros, and a read that would end
/// past [`BDRV_MAX_LENGTH`](crate::types::BDRV_MAX_LENGTH) fails (an
/// [`Error::Invalid`] saying so, QEMU's Input/output error). `len` must
/// already be checked against sane limits by the caller: the zeros past the
/// end of the file are made in memory.
pub fn read_as_qemu(src: &dyn Source, what: &str, offset: HostOffset, len: u64) -> Result<Vec<u8>> {
    within_limit(what, offset, len)?;
    let size = usize::try_from(len).map_err(|_| Error::invalid(what, offset, "too large"))?;
    let mut buf = vec![0u8; size];
    let inside = src.len().saturating_sub(offset.get()).min(len) as usize;
    if let Some(head) = buf.get_mut(..inside).filter(|h| !h.is_empty()) {
        read_into(src, what, offset, head)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// What QEMU's block layer reads: the file's bytes, zeros past its end,
    /// and a failure for a read ending past `BDRV_MAX_LENGTH`.
    #[test]
    fn reads_as_qemu_zeros_past_the_end_and_fails_past_the_limit() {
        let src = MemSource::new("m", vec![1, 2, 3, 4]);
        assert_eq!(
            read_as_qemu(&src, "t", HostOffset(2), 4).unwrap(),
            [3, 4, 0, 0]
        );
        assert_eq!(
            read_as_qemu(&src, "t", HostOffset(1 << 40), 2).unwrap(),
            [0, 0]
        );
        let limit = crate::types::BDRV_MAX_LENGTH;
        assert!(!ends_past_limit(HostOffset(limit - 8), 8));
        assert!(ends_past_limit(HostOffset(limit - 8), 9));
        assert!(ends_past_limit(HostOffset(u64::MAX), 1));
        assert!(matches!(
            read_as_qemu(&src, "t", HostOffset(limit - 8), 16),
            Err(Error::Invalid { offset, .. }) if offset == HostOffset(limit - 8)
        ));
    }
}

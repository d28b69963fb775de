//! Big-endian field access on byte buffers that never panics.
//!
//! All qcow2 integers are big-endian. A read past the end of the buffer yields zero
//! bytes for the missing part; callers check buffer lengths against the structure's
//! size before decoding, so this only matters for hostile input.

/// `N` bytes at `off`, zero-filled where the buffer ends early.
#[inline]
pub fn array<const N: usize>(buf: &[u8], off: usize) -> [u8; N] {
    if let Some(whole) = buf.get(off..off.saturating_add(N))
        && let Ok(a) = whole.try_into()
    {
        return a;
    }
    let mut out = [0u8; N];
    if let Some(src) = buf.get(off..) {
        let n = src.len().min(N);
        if let (Some(dst), Some(src)) = (out.get_mut(..n), src.get(..n)) {
            dst.copy_from_slice(src);
        }
    }
    out
}

/// Big-endian u64 at `off`.
#[inline]
pub fn be64(buf: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(array(buf, off))
}

/// Big-endian u32 at `off`.
#[inline]
pub fn be32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(array(buf, off))
}

/// Big-endian u16 at `off`.
#[inline]
pub fn be16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(array(buf, off))
}

/// The byte at `off` (0 past the end).
pub fn u8_at(buf: &[u8], off: usize) -> u8 {
    buf.get(off).copied().unwrap_or(0)
}

/// `len` bytes at `off`, cut short at the end of the buffer.
pub fn slice(buf: &[u8], off: usize, len: usize) -> &[u8] {
    let start = off.min(buf.len());
    let end = off.saturating_add(len).min(buf.len());
    buf.get(start..end).unwrap_or(&[])
}

/// Bytes as text, replacing anything that is not UTF-8.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `bytes` up to their first NUL byte (all of them without one): a name as
/// QEMU keeps it, a C string.
pub fn c_string(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or(bytes)
}

/// [`c_string`] of `bytes` as text, replacing anything that is not UTF-8.
pub fn c_text(bytes: &[u8]) -> String {
    text(c_string(bytes))
}

/// Round `n` up to a multiple of 8 (saturating).
pub fn align8(n: u64) -> u64 {
    n.saturating_add(7) & !7
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_big_endian_and_zero_fills() {
        let b = [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3];
        assert_eq!(be32(&b, 0), 0x514649fb);
        assert_eq!(be64(&b, 0), 0x514649fb_00000003);
        assert_eq!(be16(&b, 6), 3);
        assert_eq!(be32(&b, 6), 0x0003_0000);
        assert_eq!(be64(&b, 100), 0);
        assert_eq!(slice(&b, 6, 10), &[0, 3]);
        assert_eq!(align8(13), 16);
    }

    #[test]
    fn c_strings_end_at_the_first_nul() {
        assert_eq!(c_string(b"qcow2\0zz"), b"qcow2");
        assert_eq!(c_string(b"\0qcow2"), b"");
        assert_eq!(c_string(b"raw"), b"raw");
        assert_eq!(c_string(b""), b"");
        assert_eq!(c_text(b"d.raw\0\0\0"), "d.raw");
    }
}

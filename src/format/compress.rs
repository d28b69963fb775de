//! Decompressing compressed clusters, and compressing one as QEMU does when it
//! writes it (`qcow2_co_compress`).
//!
//! A compressed cluster is stored as raw deflate (no zlib header, QEMU's default,
//! called "zlib") or as zstd frames, depending on the header's compression type. The
//! stored bytes must inflate to exactly one cluster; trailing input is ignored, as
//! QEMU does. Output is never allowed to grow past one cluster, so a hostile stream
//! cannot make qinspect allocate more.

use crate::header::CompressionType;
use std::io::Read;

/// Why a compressed cluster could not be decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecompressError {
    /// The stream ended before a whole cluster came out.
    #[error("the compressed data inflates to {got} bytes, not a whole cluster of {want}")]
    Short {
        /// Bytes produced.
        got: usize,
        /// Cluster size.
        want: usize,
    },
    /// The stream is not valid.
    #[error("the compressed data is not a valid {method} stream: {detail}")]
    Corrupt {
        /// "deflate" or "zstd".
        method: &'static str,
        /// Decoder's message.
        detail: String,
    },
    /// The header's compression type is not one QEMU knows.
    #[error("unknown compression type {0}")]
    UnknownType(u8),
}

/// Decompress `input` into exactly `cluster_size` bytes.
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    cluster_size: usize,
) -> Result<Vec<u8>, DecompressError> {
    match kind {
        CompressionType::Deflate => inflate(input, cluster_size),
        CompressionType::Zstd => unzstd(input, cluster_size),
        CompressionType::Unknown(n) => Err(DecompressError::UnknownType(n)),
    }
}

fn inflate(input: &[u8], cluster_size: usize) -> Result<Vec<u8>, DecompressError> {
    let mut out = vec![0u8; cluster_size];
    let mut d = flate2::Decompress::new(false);
    match d.decompress(input, &mut out, flate2::FlushDecompress::Finish) {
        // QEMU accepts Z_STREAM_END or Z_BUF_ERROR as long as the output is full.
        Ok(_) | Err(_) if d.total_out() as usize == cluster_size => Ok(out),
        Ok(_) => Err(DecompressError::Short {
            got: d.total_out() as usize,
            want: cluster_size,
        }),
        Err(e) => Err(DecompressError::Corrupt {
            method: "deflate",
            detail: e.to_string(),
        }),
    }
}

fn unzstd(input: &[u8], cluster_size: usize) -> Result<Vec<u8>, DecompressError> {
    let mut out = vec![0u8; cluster_size];
    let mut got = 0usize;
    let mut rest = input;
    // One or more frames, until the cluster is full.
    while got < cluster_size {
        let before = rest.len();
        let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut rest).map_err(|e| {
            DecompressError::Corrupt {
                method: "zstd",
                detail: e.to_string(),
            }
        })?;
        let mut progressed = false;
        while let Some(dst) = out.get_mut(got..) {
            if dst.is_empty() {
                break;
            }
            match dec.read(dst) {
                Ok(0) => break,
                Ok(n) => {
                    // n <= dst.len(), so got stays <= out.len().
                    got = got.saturating_add(n);
                    progressed = true;
                }
                Err(e) => {
                    return Err(DecompressError::Corrupt {
                        method: "zstd",
                        detail: e.to_string(),
                    });
                }
            }
        }
        drop(dec);
        if !progressed && rest.len() >= before {
            break;
        }
        if rest.is_empty() {
            break;
        }
    }
    if got == cluster_size {
        Ok(out)
    } else {
        Err(DecompressError::Short {
            got,
            want: cluster_size,
        })
    }
}

/// One cluster compressed as QEMU's `qcow2_co_compress` compresses it for a
/// compressed write, into at most `room` bytes (QEMU passes one cluster less one
/// byte). `None` when the result does not fit: QEMU then writes the cluster
/// uncompressed. An unknown type is refused as an error.
///
/// deflate is `qcow2_zlib_compress`: raw deflate, level 6, a 4 KiB window and
/// `Z_FINISH` in one call. zstd is `qcow2_zstd_compress`: a fresh context with
/// libzstd's defaults (level 3, content size in the frame header, no checksum)
/// and one `ZSTD_compressStream2(..., ZSTD_e_end)` call into `room` bytes; it fits
/// only when that call returns 0. The zstd size is the one the linked libzstd
/// computes (see [`zstd_library_version`]).
pub fn compress(
    kind: CompressionType,
    data: &[u8],
    room: usize,
) -> Result<Option<Vec<u8>>, DecompressError> {
    match kind {
        CompressionType::Deflate => Ok(deflate(data, room)),
        CompressionType::Zstd => zstd_frame(data, room),
        CompressionType::Unknown(n) => Err(DecompressError::UnknownType(n)),
    }
}

/// The version of the libzstd that [`compress`] uses, as `ZSTD_versionString`
/// gives it ("1.5.7").
pub fn zstd_library_version() -> &'static str {
    zstd::zstd_safe::version_string()
}

fn deflate(data: &[u8], room: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; room];
    let mut c = flate2::Compress::new_with_window_bits(flate2::Compression::new(6), false, 12);
    match c.compress(data, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) => {
            out.truncate(usize::try_from(c.total_out()).unwrap_or(room));
            Some(out)
        }
        _ => None,
    }
}

fn zstd_frame(data: &[u8], room: usize) -> Result<Option<Vec<u8>>, DecompressError> {
    use zstd::zstd_safe::{CCtx, InBuffer, OutBuffer, zstd_sys::ZSTD_EndDirective};
    let failed = |detail: String| DecompressError::Corrupt {
        method: "zstd",
        detail,
    };
    let mut cctx = CCtx::try_create().ok_or_else(|| failed("no compression context".into()))?;
    let mut out = vec![0u8; room];
    let mut output = OutBuffer::around(out.as_mut_slice());
    let mut input = InBuffer::around(data);
    // QEMU calls once; anything left to flush means the frame did not fit
    // (ENOMEM in QEMU, which then writes the cluster as it is). An error code
    // is larger than any room left, so it too reads as "does not fit".
    let left = cctx.compress_stream2(&mut output, &mut input, ZSTD_EndDirective::ZSTD_e_end);
    let written = output.pos();
    match left {
        Ok(0) => {
            out.truncate(written);
            Ok(Some(out))
        }
        Ok(_) | Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn inflates_raw_deflate_and_ignores_trailing_bytes() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut z = enc.finish().unwrap();
        z.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(
            decompress(CompressionType::Deflate, &z, 4096).unwrap(),
            data
        );
        // Asking for a bigger cluster than the stream holds fails.
        assert!(matches!(
            decompress(CompressionType::Deflate, &z, 8192),
            Err(DecompressError::Short {
                got: 4096,
                want: 8192
            })
        ));
        assert!(decompress(CompressionType::Deflate, &[0xff; 16], 4096).is_err());
        assert!(decompress(CompressionType::Unknown(7), &z, 4096).is_err());
    }

    #[test]
    fn zstd_garbage_is_an_error_not_a_panic() {
        assert!(decompress(CompressionType::Zstd, &[0u8; 64], 4096).is_err());
        assert!(decompress(CompressionType::Zstd, &[], 4096).is_err());
    }

    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn uniform_clusters_deflate_to_zlibs_sizes_and_noise_does_not_fit() {
        // Python's zlib.compressobj(6, DEFLATED, -12, 9) over 0xcd bytes.
        for (cs, want) in [(512usize, 8usize), (4096, 22), (65536, 79), (2 << 20, 2050)] {
            let d = compress(CompressionType::Deflate, &vec![0xcd; cs], cs - 1)
                .unwrap()
                .unwrap_or_default();
            assert_eq!(d.len(), want, "cluster size {cs}");
        }
        let d = compress(CompressionType::Deflate, &[0xcd; 65536], 65535)
            .unwrap()
            .unwrap();
        assert_eq!(
            decompress(CompressionType::Deflate, &d, 65536).unwrap(),
            vec![0xcd; 65536]
        );
        // Bytes that do not repeat do not compress into less than their size.
        let n = noise(4096);
        assert_eq!(compress(CompressionType::Deflate, &n, 4095), Ok(None));
        assert!(compress(CompressionType::Unknown(2), &n, 4095).is_err());
    }

    #[test]
    fn zstd_frames_decompress_to_the_cluster_and_noise_does_not_fit() {
        for cs in [512usize, 4096, 65536, 2 << 20] {
            let mut data = vec![0xcd; cs];
            // A cluster padded with zeros, as at the end of a disk.
            if let Some(tail) = data.get_mut(cs / 3..) {
                tail.fill(0);
            }
            let frame = compress(CompressionType::Zstd, &data, cs - 1)
                .unwrap()
                .unwrap();
            assert!(frame.len() < cs / 8, "cluster size {cs}: {}", frame.len());
            assert_eq!(frame.get(..4), Some(&[0x28, 0xb5, 0x2f, 0xfd][..]));
            assert_eq!(decompress(CompressionType::Zstd, &frame, cs).unwrap(), data);
            let n = noise(cs);
            assert_eq!(compress(CompressionType::Zstd, &n, cs - 1), Ok(None));
            // A room of exactly the frame's size is enough; one byte less is not.
            let exact = compress(CompressionType::Zstd, &data, frame.len()).unwrap();
            assert_eq!(exact.as_deref(), Some(&frame[..]));
            let short = compress(CompressionType::Zstd, &data, frame.len() - 1).unwrap();
            assert_eq!(short, None);
        }
        assert!(!zstd_library_version().is_empty());
    }
}

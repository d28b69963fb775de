//! Decompressing compressed clusters.
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
}

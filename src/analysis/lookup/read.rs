//! Guest reads through the whole chain: segments of data, zeros and inflated
//! compressed clusters, stitched from each layer's runs.

use super::{Status, eio, layer_run};
use crate::chain::{Chain, LayerKind};
use crate::compress;
use crate::error::Result;
use crate::image::Qcow2;
use crate::io::{Source, read_into};
use crate::tables::CompressedDescriptor;
use crate::types::{GuestOffset, HostOffset};

/// Decompress the compressed cluster described by `d` in `img`.
pub fn read_compressed(
    img: &Qcow2,
    d: &CompressedDescriptor,
    guest: GuestOffset,
    name: &str,
) -> Result<Vec<u8>> {
    let cs = img.geometry().cluster_size();
    // The descriptor can claim at most 2^(cluster_bits-8) sectors, i.e. 2 clusters.
    let mut buf = vec![0u8; d.size.min(cs.saturating_mul(2)) as usize];
    read_into(img.src.as_ref(), "compressed cluster", d.offset, &mut buf)?;
    compress::decompress(img.header.compression_type(), &buf, cs as usize).map_err(|e| {
        eio(
            guest,
            name,
            format!("compressed cluster at {} ({} bytes): {e}", d.offset, d.size),
        )
    })
}

/// A cache of the last decompressed cluster, so sequential reads inflate each
/// compressed cluster once. It knows a layer by its depth: use one per chain.
#[derive(Default)]
pub struct ReadCache {
    /// The layer's depth, where its compressed bytes are, and the cluster inflated.
    last: Option<(usize, HostOffset, Vec<u8>)>,
    /// Scratch space for decrypted sectors.
    decrypted: Vec<u8>,
}

/// A piece of guest data, as the chain resolves it.
pub enum Segment<'a> {
    /// `len` bytes stored at `host` in `src` (bytes past the end of `src` read as zeros).
    Data {
        /// The file holding them.
        src: &'a dyn Source,
        /// The host offset of the first byte in `src`.
        host: HostOffset,
        /// How many.
        len: u64,
    },
    /// `len` bytes of zeros.
    Zero {
        /// How many.
        len: u64,
    },
    /// Bytes produced in memory (a slice of a decompressed cluster).
    Bytes(&'a [u8]),
}

impl Segment<'_> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Data { len, .. } | Segment::Zero { len } => *len,
            Segment::Bytes(b) => b.len() as u64,
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Resolve guest bytes `guest..guest+len` into segments, in order, calling `f`
/// for each: data in some file, zeros, or decompressed bytes. Bytes past the end of
/// the guest disk, and past the end of shorter backing layers, are zeros.
pub fn for_each_segment(
    chain: &Chain,
    guest: GuestOffset,
    len: u64,
    cache: &mut ReadCache,
    f: &mut dyn FnMut(Segment) -> Result<()>,
) -> Result<()> {
    segments(chain, 0, guest, len, cache, f)
}

/// Read guest bytes of the chain at `guest` into `buf`, as QEMU would.
pub fn read(
    chain: &Chain,
    guest: GuestOffset,
    buf: &mut [u8],
    cache: &mut ReadCache,
) -> Result<()> {
    let mut pos = 0usize;
    for_each_segment(chain, guest, buf.len() as u64, cache, &mut |seg| {
        let n = seg.len() as usize;
        let Some(dst) = buf.get_mut(pos..pos.saturating_add(n)) else {
            return Ok(());
        };
        match seg {
            Segment::Data { src, host, .. } => {
                read_into(src, "guest data", host, dst)?;
            }
            Segment::Zero { .. } => dst.fill(0),
            Segment::Bytes(b) => dst.copy_from_slice(b),
        }
        pos = pos.saturating_add(n);
        Ok(())
    })
}

fn segments(
    chain: &Chain,
    depth: usize,
    guest: GuestOffset,
    len: u64,
    cache: &mut ReadCache,
    f: &mut dyn FnMut(Segment) -> Result<()>,
) -> Result<()> {
    let Some(layer) = chain.layers.get(depth) else {
        return if len > 0 {
            f(Segment::Zero { len })
        } else {
            Ok(())
        };
    };
    let in_range = len.min(layer.size().saturating_sub(guest.get()));
    let name = layer.path.display().to_string();
    match &layer.kind {
        LayerKind::Raw => {
            if in_range > 0 {
                // A raw layer's guest offsets are its file's offsets.
                f(Segment::Data {
                    src: layer.src.as_ref(),
                    host: HostOffset(guest.get()),
                    len: in_range,
                })?;
            }
        }
        LayerKind::Qcow2 {
            image,
            view,
            data_file,
        } => {
            let mut pos = 0u64;
            while pos < in_range {
                // pos < in_range <= layer size - guest: no overflow.
                let g = guest.saturating_add(pos);
                let want = in_range.saturating_sub(pos);
                let run = layer_run(image, view, g, want, &name)?;
                let n = run.len.min(want);
                match run.status {
                    Status::Data { host, in_data_file } => {
                        let src = match (in_data_file, data_file) {
                            (true, Some(df)) => df.as_ref(),
                            _ => layer.src.as_ref(),
                        };
                        if image.header.crypt_method != 0 {
                            crate::crypto::decrypted_segments(
                                image,
                                src,
                                host,
                                g,
                                n,
                                &mut cache.decrypted,
                                f,
                            )?;
                        } else {
                            f(Segment::Data { src, host, len: n })?;
                        }
                    }
                    Status::Zero { .. } => f(Segment::Zero { len: n })?,
                    Status::Unallocated { .. } => {
                        segments(chain, depth.saturating_add(1), g, n, cache, f)?
                    }
                    Status::Compressed {
                        descriptor,
                        in_cluster,
                    } => {
                        let hit = matches!(&cache.last, Some((d, off, _)) if *d == depth && *off == descriptor.offset);
                        if !hit {
                            let data = read_compressed(image, &descriptor, g, &name)?;
                            cache.last = Some((depth, descriptor.offset, data));
                        }
                        if let Some((_, _, data)) = &cache.last {
                            let s = crate::bytes::slice(data, in_cluster as usize, n as usize);
                            f(Segment::Bytes(s))?;
                        }
                    }
                }
                pos = pos.saturating_add(n);
            }
        }
    }
    if len > in_range {
        f(Segment::Zero {
            len: len.saturating_sub(in_range),
        })?;
    }
    Ok(())
}

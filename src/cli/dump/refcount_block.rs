//! `dump refcount-block INDEX`: one refcount block, streamed row by row.

use super::Args;
use crate::cli::{CmdResult, print_json, style};
use color_eyre::eyre::{bail, eyre};
use qinspect::image::Qcow2;
use qinspect::refcount::get_refcount;
use serde::Serialize;
use std::io::Write;

/// One refcount of `dump refcount-block --json`; its fields are in the order the
/// other tables' rows print theirs (sorted by name).
#[derive(Serialize)]
struct RefcountRow {
    cluster: u64,
    file_offset: u64,
    host_offset: u64,
    index: u64,
    meaning: String,
    raw: String,
    refcount: u64,
}

/// Every refcount of one block, in that block's order.
struct RefcountRows<'a> {
    block: &'a [u8],
    order: u32,
    first_cluster: u64,
    per: u64,
    bits: u64,
    block_offset: u64,
    cluster_bits: u32,
}

impl Serialize for RefcountRows<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.per as usize))?;
        for j in 0..self.per {
            let r = get_refcount(self.block, self.order, j);
            let cluster = self.first_cluster + j;
            let host = cluster << self.cluster_bits;
            seq.serialize_element(&RefcountRow {
                cluster,
                file_offset: self.block_offset + j * self.bits / 8,
                host_offset: host,
                index: j,
                meaning: format!("host cluster {cluster} (offset {host:#x}) has refcount {r}"),
                raw: r.to_string(),
                refcount: r,
            })?;
        }
        seq.end()
    }
}

/// `dump refcount-block INDEX`: written out as it is read, one line (or one
/// JSON object) per refcount, with no table of rows built first.
pub(super) fn run(a: &Args, img: &Qcow2) -> CmdResult {
    let i = a.index.ok_or_else(|| eyre!("dump refcount-block needs INDEX: the refcount table index (see `qinspect dump refcount-table`)"))?;
    let t = img.refcount_table()?;
    let e = t.get(i as usize).ok_or_else(|| {
        eyre!(
            "refcount table index {i} is past its end ({} entries)",
            t.len()
        )
    })?;
    let Some(off) = e.block_offset() else {
        bail!(
            "refcount table entry {i} is 0: no refcount block, every cluster it covers has refcount 0"
        );
    };
    let block = img.refcount_block(off)?;
    let rg = img.refcount_geometry();
    let per = rg.entries_per_block();
    let title = format!(
        "refcount block at {off} ({}-bit refcounts for clusters {}..{})",
        rg.bits(),
        i * per,
        (i + 1) * per
    );
    let rows = RefcountRows {
        block: &block,
        order: rg.order,
        first_cluster: i * per,
        per,
        bits: u64::from(rg.bits()),
        block_offset: off.0,
        cluster_bits: img.geometry().cluster_bits,
    };
    if a.json {
        #[derive(Serialize)]
        struct Out<'a> {
            entries: RefcountRows<'a>,
            table: String,
        }
        print_json(&Out {
            entries: rows,
            table: title,
        })?;
        return Ok(0);
    }
    let mut out = crate::cli::buffered_stdout();
    let (hd, dim) = (style::HEAD, style::DIM);
    writeln!(out, "{hd}{title}{hd:#}")?;
    writeln!(
        out,
        "{dim}{:>6}  {:>12}  {:>18}  meaning{dim:#}",
        "index", "file offset", "raw"
    )?;
    out.flush()?;
    // The rows carry no styles: written past the style filter, assembled in one
    // buffer that goes out a mebibyte at a time (no second copy through a
    // BufWriter).
    const CHUNK: usize = 1 << 20;
    let mut plain = std::io::stdout().lock();
    let mut any = false;
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + 256);
    let (mut dec, mut dec2, mut dec3) = (
        itoa::Buffer::new(),
        itoa::Buffer::new(),
        itoa::Buffer::new(),
    );
    for j in 0..per {
        let r = get_refcount(&block, rows.order, j);
        if r == 0 && !a.all {
            continue;
        }
        any = true;
        let cluster = rows.first_cluster + j;
        // The same text as `{j:>6}  {:>#12x}  {r:>18}  host cluster ...`,
        // assembled by hand: this loop runs once per cluster of the block.
        let r_text = dec2.format(r);
        push_right(&mut buf, dec.format(j).as_bytes(), 6);
        buf.extend_from_slice(b"  ");
        let at = rows.block_offset + j * rows.bits / 8;
        push_spaces(&mut buf, 12usize.saturating_sub(hex_len(at)));
        push_hex(&mut buf, at);
        buf.extend_from_slice(b"  ");
        push_right(&mut buf, r_text.as_bytes(), 18);
        buf.extend_from_slice(b"  host cluster ");
        buf.extend_from_slice(dec3.format(cluster).as_bytes());
        buf.extend_from_slice(b" (offset ");
        push_hex(&mut buf, cluster << rows.cluster_bits);
        buf.extend_from_slice(b") has refcount ");
        buf.extend_from_slice(r_text.as_bytes());
        buf.push(b'\n');
        if buf.len() >= CHUNK {
            plain.write_all(&buf)?;
            buf.clear();
        }
    }
    if !any {
        buf.extend_from_slice(b"  (no non-zero entries)\n");
    }
    plain.write_all(&buf)?;
    plain.flush()?;
    drop(plain);
    for p in &img.problems {
        writeln!(out, "{}warning:{:#} {p}", style::BAD, style::BAD)?;
    }
    Ok(0)
}

/// `text` right-aligned in `width` columns.
fn push_right(line: &mut Vec<u8>, text: &[u8], width: usize) {
    push_spaces(line, width.saturating_sub(text.len()));
    line.extend_from_slice(text);
}

/// Append `n` spaces (at most 32 at once: the widest column is 18).
fn push_spaces(line: &mut Vec<u8>, n: usize) {
    const SPACES: &[u8; 32] = b"                                ";
    line.extend_from_slice(&SPACES[..n.min(32)]);
}

/// Digits of `v` in hex, plus two for the `0x`.
fn hex_len(v: u64) -> usize {
    (64 - v.leading_zeros()).div_ceil(4).max(1) as usize + 2
}

/// Append `{:#x}` of `v`.
fn push_hex(line: &mut Vec<u8>, v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let n = hex_len(v) - 2;
    let mut digits = [0u8; 16];
    for (k, d) in digits[..n].iter_mut().rev().enumerate() {
        *d = DIGITS[((v >> (k * 4)) & 15) as usize];
    }
    line.extend_from_slice(b"0x");
    line.extend_from_slice(&digits[..n]);
}

//! `qinspect clusters`: who owns each host cluster.

use super::num::{parse_host, parse_size};
use super::{CmdResult, style};
use color_eyre::eyre::{bail, eyre};
use qinspect::check::{ClusterInfo, Referrer, Role, clusters, for_each_cluster};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, SharedSource};
use qinspect::types::HostOffset;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// The most clusters listed at once.
const MAX_ROWS: u64 = 1 << 20;

/// Arguments of `qinspect clusters`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Every host cluster in range with its roles (header, L1, L2, data, \
compressed, refcount table/block, snapshot table, bitmap directory/table/data, crypto \
header, or free), its stored refcount, the references counted the way qemu-img check counts \
them, and who makes each reference.\n\n\
Examples:\n  qinspect clusters disk.qcow2                 every cluster of a small file\n  \
qinspect clusters disk.qcow2 --range 4..7     host clusters 4 to 7\n  \
qinspect clusters disk.qcow2 --host 0x50000   who points at that host offset"
)]
pub struct Args {
    /// The image file.
    pub image: PathBuf,
    /// Host clusters FIRST..LAST (inclusive); default: the whole file, up to 1Mi clusters.
    #[arg(long)]
    pub range: Option<String>,
    /// Just the cluster holding this host offset.
    #[arg(long, value_parser = parse_host, conflicts_with = "range")]
    pub host: Option<HostOffset>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_range(s: &str) -> color_eyre::Result<(u64, u64)> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| eyre!("--range takes FIRST..LAST, e.g. 0..15"))?;
    let a = parse_size(a).map_err(|e| eyre!(e))?;
    let b = parse_size(b).map_err(|e| eyre!(e))?;
    if b < a {
        bail!("--range {s}: LAST is before FIRST");
    }
    Ok((a, b))
}

/// Run `qinspect clusters`.
pub fn run(a: Args) -> CmdResult {
    let src: SharedSource = Arc::new(FileSource::open(&a.image)?);
    let img = Qcow2::open(src, Strictness::Lenient)?;
    let cs = img.geometry().cluster_size();
    let file_clusters = img.file_len().div_ceil(cs).max(1);
    let (first, last) = match (&a.range, a.host) {
        (Some(r), _) => parse_range(r)?,
        (None, Some(h)) => {
            let c = img.geometry().host_cluster(h).get();
            (c, c)
        }
        (None, None) => (0, file_clusters - 1),
    };
    let mut last = last;
    let mut cut = false;
    if last - first >= MAX_ROWS {
        last = first + MAX_ROWS - 1;
        cut = true;
    }
    if a.json {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        write_json(&mut out, &img, cs, first, last, cut)?;
        out.flush()?;
        return Ok(0);
    }
    let rows = clusters(&img, first, last);
    let mut out = super::buffered_stdout();
    let (hd, bad, dim) = (style::HEAD, style::BAD, style::DIM);
    let unnamed = Unnamed {
        file_len: img.file_len(),
        l1_unread: img.l1_unread().map(|e| e.to_string()),
    };
    let mut by_role: BTreeMap<String, u64> = BTreeMap::new();
    for r in &rows {
        if r.roles.is_empty() {
            *by_role.entry(unnamed.word(r).into()).or_default() += 1;
        }
        for role in &r.roles {
            *by_role.entry(role_name(role)).or_default() += 1;
        }
    }
    writeln!(
        out,
        "{hd}host clusters {first}..={last} ({} bytes each){hd:#}",
        cs
    )?;
    for (role, n) in &by_role {
        writeln!(out, "  {role:<18} {n}")?;
    }
    if let Some(why) = &unnamed.l1_unread {
        writeln!(
            out,
            "{bad}the active L1 table is not read (QEMU refuses it: {why}), so neither it nor what it names is counted{bad:#}"
        )?;
    }
    writeln!(
        out,
        "\n{hd}{:>10} {:>14} {:>9} {:>9}  roles / referrers{hd:#}",
        "cluster", "offset", "refcount", "refs"
    )?;
    for r in &rows {
        print_row(&mut out, r, &unnamed, bad, dim)?;
    }
    if cut {
        writeln!(
            out,
            "(only the first {MAX_ROWS} clusters; use --range for more)"
        )?;
    }
    Ok(0)
}

fn role_name(r: &qinspect::check::Role) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What the listing calls a cluster nothing it reads names.
struct Unnamed {
    /// The file's length: a cluster at or past it is not in the file.
    file_len: u64,
    /// Why the active L1 table is not read, when it is not.
    l1_unread: Option<String>,
}

impl Unnamed {
    /// What to call a cluster nothing names: "free" only where that is known (in
    /// the file, with the active L1 table read).
    fn word(&self, r: &ClusterInfo) -> &'static str {
        if self.past_eof(r) {
            PAST_EOF
        } else if self.l1_unread.is_some() {
            "not counted"
        } else {
            "free"
        }
    }

    /// Whether the cluster starts at or past the end of the file.
    fn past_eof(&self, r: &ClusterInfo) -> bool {
        r.offset.get() >= self.file_len
    }
}

/// A cluster at or past the end of the file, in the listing's words.
const PAST_EOF: &str = "past the end of the file";

fn print_row(
    out: &mut impl Write,
    r: &ClusterInfo,
    unnamed: &Unnamed,
    bad: anstyle::Style,
    dim: anstyle::Style,
) -> std::io::Result<()> {
    let stored = r
        .refcount
        .map(|x| x.to_string())
        .unwrap_or_else(|| "?".into());
    let mismatch = r.refcount != Some(r.reference);
    let st = if mismatch { bad } else { anstyle::Style::new() };
    let roles = if r.roles.is_empty() {
        unnamed.word(r).to_string()
    } else {
        let named = r.roles.iter().map(role_name).collect::<Vec<_>>().join(", ");
        if unnamed.past_eof(r) {
            format!("{PAST_EOF}: {named}")
        } else {
            named
        }
    };
    writeln!(
        out,
        "{:>10} {:>#14x} {st}{:>9} {:>9}{st:#}  {}",
        r.cluster, r.offset, stored, r.reference, roles
    )?;
    for who in &r.referrers {
        writeln!(out, "{:>47}{dim}{}{dim:#}", "", who.describe())?;
    }
    Ok(())
}

/// `clusters --json`, written by hand as the clusters are described: the same
/// bytes serde_json's pretty printer gives for the listing (keys in sorted
/// order, as in every other JSON qinspect prints, two-space indentation), without
/// its per-key machinery, for a listing that can hold a million clusters.
fn write_json(
    out: &mut impl Write,
    img: &Qcow2,
    cs: u64,
    first: u64,
    last: u64,
    truncated: bool,
) -> std::io::Result<()> {
    let mut num = itoa::Buffer::new();
    out.write_all(b"{\n  \"cluster_size\": ")?;
    out.write_all(num.format(cs).as_bytes())?;
    out.write_all(b",\n  \"clusters\": [")?;
    let mut any = false;
    for_each_cluster(img, first, last, |c| {
        out.write_all(if any { b",\n    {" } else { b"\n    {" })?;
        any = true;
        write_row(out, &mut num, &c)
    })?;
    out.write_all(if any {
        b"\n  ],\n  \"first\": "
    } else {
        b"],\n  \"first\": "
    })?;
    out.write_all(num.format(first).as_bytes())?;
    out.write_all(b",\n  \"last\": ")?;
    out.write_all(num.format(last).as_bytes())?;
    out.write_all(if truncated {
        b",\n  \"truncated\": true\n}\n"
    } else {
        b",\n  \"truncated\": false\n}\n"
    })
}

/// One cluster of the listing, from after its opening brace to its closing one.
fn write_row(out: &mut impl Write, num: &mut itoa::Buffer, c: &ClusterInfo) -> std::io::Result<()> {
    out.write_all(b"\n      \"cluster\": ")?;
    out.write_all(num.format(c.cluster).as_bytes())?;
    out.write_all(b",\n      \"offset\": ")?;
    out.write_all(num.format(c.offset.get()).as_bytes())?;
    out.write_all(b",\n      \"refcount\": ")?;
    match c.refcount {
        Some(r) => out.write_all(num.format(r).as_bytes())?,
        None => out.write_all(b"null")?,
    }
    out.write_all(b",\n      \"reference\": ")?;
    out.write_all(num.format(c.reference).as_bytes())?;
    out.write_all(b",\n      \"referrers\": [")?;
    for (i, r) in c.referrers.iter().enumerate() {
        out.write_all(if i == 0 {
            b"\n        {"
        } else {
            b",\n        {"
        })?;
        write_referrer(out, num, r)?;
        out.write_all(b"\n        }")?;
    }
    out.write_all(if c.referrers.is_empty() {
        b"],\n      \"roles\": ["
    } else {
        b"\n      ],\n      \"roles\": ["
    })?;
    for (i, role) in c.roles.iter().enumerate() {
        out.write_all(if i == 0 {
            b"\n        "
        } else {
            b",\n        "
        })?;
        write_str(out, role_str(*role))?;
    }
    out.write_all(if c.roles.is_empty() {
        b"]\n    }"
    } else {
        b"\n      ]\n    }"
    })
}

/// A [`Referrer`]'s present keys, in sorted order.
fn write_referrer(
    out: &mut impl Write,
    num: &mut itoa::Buffer,
    r: &Referrer,
) -> std::io::Result<()> {
    if let Some(d) = &r.detail {
        out.write_all(REFERRER_KEY)?;
        out.write_all(b"detail\": ")?;
        write_str(out, d)?;
        out.write_all(b",")?;
    }
    number(out, num, b"guest_offset\": ", r.guest_offset.map(u64::from))?;
    if let Some(l1) = &r.l1 {
        out.write_all(REFERRER_KEY)?;
        out.write_all(b"l1\": ")?;
        write_str(out, l1)?;
        out.write_all(b",")?;
    }
    number(out, num, b"l1_index\": ", r.l1_index)?;
    number(out, num, b"l2_index\": ", r.l2_index)?;
    number(out, num, b"l2_table\": ", r.l2_table.map(u64::from))?;
    out.write_all(REFERRER_KEY)?;
    out.write_all(b"role\": ")?;
    write_str(out, role_str(r.role))
}

/// `"key": v,` on a line of its own, if there is a value.
fn number(
    out: &mut impl Write,
    num: &mut itoa::Buffer,
    key: &[u8],
    v: Option<u64>,
) -> std::io::Result<()> {
    if let Some(v) = v {
        out.write_all(REFERRER_KEY)?;
        out.write_all(key)?;
        out.write_all(num.format(v).as_bytes())?;
        out.write_all(b",")?;
    }
    Ok(())
}

/// What starts a key of a referrer: a new line, its indentation and the quote.
const REFERRER_KEY: &[u8] = b"\n          \"";

/// A JSON string, escaped as serde_json escapes it (only when it must be).
fn write_str(out: &mut impl Write, s: &str) -> std::io::Result<()> {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.write_all(b"\"")?;
        out.write_all(s.as_bytes())?;
        out.write_all(b"\"")
    } else {
        serde_json::to_writer(out, s).map_err(std::io::Error::other)
    }
}

/// A role's name in JSON (its serde name).
fn role_str(r: Role) -> &'static str {
    match r {
        Role::Header => "header",
        Role::L1Table => "l1-table",
        Role::L2Table => "l2-table",
        Role::Data => "data",
        Role::Compressed => "compressed",
        Role::SnapshotTable => "snapshot-table",
        Role::RefcountTable => "refcount-table",
        Role::RefcountBlock => "refcount-block",
        Role::CryptoHeader => "crypto-header",
        Role::BitmapDirectory => "bitmap-directory",
        Role::BitmapTable => "bitmap-table",
        Role::BitmapData => "bitmap-data",
        Role::VmState => "vm-state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qinspect::types::HostOffset;

    /// Every role's hand-written name is its serde name.
    #[test]
    fn role_names_are_the_serde_names() {
        for r in qinspect::check::ROLES {
            assert_eq!(
                serde_json::to_string(&r).ok(),
                Some(format!("\"{}\"", role_str(r)))
            );
        }
    }

    /// A referrer with every key, and strings that need escaping, come out as
    /// serde_json's pretty printer writes them.
    #[test]
    fn row_matches_serde_pretty() {
        let full = Referrer {
            role: Role::Data,
            l1: Some("snapshot 1 'a\"b\\c\u{1}é' L1".into()),
            l1_index: Some(3),
            l2_table: Some(HostOffset(0x40000)),
            l2_index: Some(7),
            guest_offset: Some(qinspect::types::GuestOffset(1 << 40)),
            detail: Some("tab\there".into()),
            l1_table: Some(qinspect::check::L1Id::Snapshot { index: 0 }),
        };
        let plain = Referrer {
            role: Role::RefcountBlock,
            l1: None,
            l1_index: None,
            l2_table: None,
            l2_index: None,
            guest_offset: None,
            detail: None,
            l1_table: None,
        };
        let rows = [
            ClusterInfo {
                cluster: 9,
                offset: HostOffset(9 << 16),
                roles: vec![Role::Data, Role::RefcountBlock],
                refcount: None,
                reference: 2,
                referrers: vec![full, plain],
            },
            ClusterInfo {
                cluster: 10,
                offset: HostOffset(10 << 16),
                roles: vec![],
                refcount: Some(u64::MAX),
                reference: 0,
                referrers: vec![],
            },
        ];
        for c in &rows {
            let mut mine = b"{".to_vec();
            let mut num = itoa::Buffer::new();
            write_row(&mut mine, &mut num, c).unwrap();
            // serde_json at the depth of a listing's rows: inside `{"clusters": [`.
            let want =
                serde_json::to_string_pretty(&serde_json::json!({ "clusters": [c] })).unwrap();
            let want = want
                .strip_prefix("{\n  \"clusters\": [\n    ")
                .and_then(|w| w.strip_suffix("\n  ]\n}"))
                .unwrap();
            assert_eq!(String::from_utf8(mine).unwrap(), want);
        }
    }
}

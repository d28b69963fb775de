//! `qinspect clusters`: who owns each host cluster.

use super::{CmdResult, num::parse_size, print_json, style};
use color_eyre::eyre::{bail, eyre};
use qinspect::check::{ClusterInfo, Referrer, Role, clusters, for_each_cluster};
use qinspect::image::{Qcow2, Strictness};
use qinspect::io::{FileSource, SharedSource};
use serde::Serialize;
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
Examples:\n  qinspect clusters disk.qcow2                  every cluster of a small file\n  \
qinspect clusters disk.qcow2 --range 4..7\n  \
qinspect clusters disk.qcow2 --host 0x50000     who points at host offset 0x50000?"
)]
pub struct Args {
    /// The image file.
    pub image: PathBuf,
    /// Host clusters FIRST..LAST (inclusive); default: the whole file, up to 1Mi clusters.
    #[arg(long)]
    pub range: Option<String>,
    /// Just the cluster holding this host offset.
    #[arg(long, value_parser = parse_size, conflicts_with = "range")]
    pub host: Option<u64>,
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
        (None, Some(h)) => (h / cs, h / cs),
        (None, None) => (0, file_clusters - 1),
    };
    let mut last = last;
    let mut cut = false;
    if last - first >= MAX_ROWS {
        last = first + MAX_ROWS - 1;
        cut = true;
    }
    if a.json {
        print_json(&Listing {
            cluster_size: cs,
            clusters: Rows {
                img: &img,
                first,
                last,
            },
            first,
            last,
            truncated: cut,
        })?;
        return Ok(0);
    }
    let rows = clusters(&img, first, last);
    let mut out = super::buffered_stdout();
    let (hd, bad, dim) = (style::HEAD, style::BAD, style::DIM);
    let mut by_role: BTreeMap<String, u64> = BTreeMap::new();
    for r in &rows {
        if r.roles.is_empty() {
            *by_role.entry("free".into()).or_default() += 1;
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
    writeln!(
        out,
        "\n{hd}{:>10} {:>14} {:>9} {:>9}  roles / referrers{hd:#}",
        "cluster", "offset", "refcount", "refs"
    )?;
    for r in &rows {
        print_row(&mut out, r, bad, dim)?;
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

fn print_row(
    out: &mut impl Write,
    r: &ClusterInfo,
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
        "free".to_string()
    } else {
        r.roles.iter().map(role_name).collect::<Vec<_>>().join(", ")
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

/// `clusters --json`, written as the clusters are described. Keys are in sorted
/// order, as in every other JSON qinspect prints.
#[derive(Serialize)]
struct Listing<'a> {
    cluster_size: u64,
    clusters: Rows<'a>,
    first: u64,
    last: u64,
    truncated: bool,
}

/// The clusters of a listing, described one at a time while being written.
struct Rows<'a> {
    img: &'a Qcow2,
    first: u64,
    last: u64,
}

impl Serialize for Rows<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(None)?;
        for_each_cluster(self.img, self.first, self.last, |c| {
            seq.serialize_element(&RowOut {
                cluster: c.cluster,
                offset: c.offset,
                refcount: c.refcount,
                reference: c.reference,
                referrers: c.referrers.iter().map(RefOut).collect(),
                roles: &c.roles,
            })
        })?;
        seq.end()
    }
}

/// A [`ClusterInfo`] with its keys in sorted order.
#[derive(Serialize)]
struct RowOut<'a> {
    cluster: u64,
    offset: u64,
    refcount: Option<u64>,
    reference: u64,
    referrers: Vec<RefOut<'a>>,
    roles: &'a [Role],
}

/// A [`Referrer`] with its keys in sorted order.
struct RefOut<'a>(&'a Referrer);

impl Serialize for RefOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.0;
        let mut m = s.serialize_map(None)?;
        if let Some(d) = &r.detail {
            m.serialize_entry("detail", d)?;
        }
        if let Some(g) = r.guest_offset {
            m.serialize_entry("guest_offset", &g)?;
        }
        if let Some(l1) = &r.l1 {
            m.serialize_entry("l1", l1)?;
        }
        if let Some(i) = r.l1_index {
            m.serialize_entry("l1_index", &i)?;
        }
        if let Some(i) = r.l2_index {
            m.serialize_entry("l2_index", &i)?;
        }
        if let Some(t) = r.l2_table {
            m.serialize_entry("l2_table", &t)?;
        }
        m.serialize_entry("role", &r.role)?;
        m.end()
    }
}

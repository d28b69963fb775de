//! The simulator against QEMU, operation by operation: each operation is run
//! for real on a copy by one qemu-img or qemu-io process, and simulated; after
//! each, everything QEMU wrote must be what the simulator predicted: the header,
//! the refcount table and every refcount, every L1 and L2 table reached, the
//! snapshot table, the bitmap directory, tables and data, which operations
//! fail (and QEMU's words for it), and `qemu-img check` of the result.
#![allow(dead_code)]

use qinspect::check::{CheckOptions, check};
use qinspect::image::{Qcow2, RefcountReader, Strictness};
use qinspect::simulate::{Op, Sim};
use qinspect::types::GuestOffset;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// A bitmap: name, table offset and size, flags, granularity bits, table
/// entries, and the bytes of each data cluster.
pub type BitmapMeta = (String, u64, u32, u32, u8, Vec<u64>, Vec<Vec<u8>>);

/// Everything compared, as read back through the library.
#[derive(Debug, PartialEq)]
pub struct Meta {
    pub header: BTreeMap<&'static str, u64>,
    /// The header extensions: type, length and data.
    pub extensions: Vec<(u32, u32, Vec<u8>)>,
    pub reftable: Vec<(usize, u64)>,
    pub refcounts: Vec<(u64, u64)>,
    pub l1s: Vec<Vec<u64>>,
    pub l2: BTreeMap<u64, Vec<(u64, u64, u64)>>,
    pub snapshots: Vec<(String, String, u64, u32, Option<u64>)>,
    pub bitmaps: Vec<BitmapMeta>,
}

pub fn meta(img: &Qcow2, upto: u64) -> Result<Meta, String> {
    let cs = img.geometry().cluster_size();
    let mut rr = RefcountReader::new(img);
    let reftable = rr
        .table
        .iter()
        .enumerate()
        .filter(|(_, e)| e.0 != 0)
        .map(|(i, e)| (i, e.0))
        .collect();
    let refcounts = (0..upto / cs + 64)
        .filter_map(|c| rr.get(c).ok().filter(|r| *r != 0).map(|r| (c, r)))
        .collect();
    let mut l2 = BTreeMap::new();
    let mut l1s: Vec<Vec<u64>> = vec![img.l1.iter().map(|e| e.0).collect()];
    for s in &img.snapshots.snapshots {
        // A snapshot L1 table QEMU cannot load (not cluster aligned) is
        // left as it is by both: its entry (offset and size) is compared
        // with the snapshot table below.
        if !img.geometry().is_cluster_aligned(s.l1_table_offset.get()) {
            l1s.push(Vec::new());
            continue;
        }
        let t = img
            .snapshot_l1(s)
            .map_err(|e| format!("snapshot L1: {e}"))?;
        l1s.push(t.iter().map(|e| e.0).collect());
    }
    for t in &l1s {
        for e in t {
            let off = e & qinspect::tables::L1E_OFFSET_MASK;
            if off != 0 && !l2.contains_key(&off) {
                let entries = img
                    .l2_table(qinspect::types::HostOffset(off))
                    .map_err(|e| format!("L2 table: {e}"))?;
                l2.insert(
                    off,
                    entries
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.raw != 0 || e.bitmap != 0)
                        .map(|(i, e)| (i as u64, e.raw, e.bitmap))
                        .collect(),
                );
            }
        }
    }
    let h = &img.header;
    let header = BTreeMap::from([
        ("size", h.size),
        ("l1_table_offset", h.l1_table_offset.get()),
        ("l1_size", u64::from(h.l1_size)),
        ("refcount_table_offset", h.refcount_table_offset.get()),
        (
            "refcount_table_clusters",
            u64::from(h.refcount_table_clusters),
        ),
        ("nb_snapshots", u64::from(h.nb_snapshots)),
        ("snapshots_offset", h.snapshots_offset.get()),
        ("incompatible_features", h.incompatible_features),
        ("autoclear_features", h.autoclear_features),
    ]);
    let mut bitmaps = Vec::new();
    if let Some(Ok(list)) = &img.bitmaps {
        for b in list {
            let table = qinspect::bitmap::read_table(img.src.as_ref(), b)
                .map_err(|e| format!("bitmap table: {e}"))?;
            let mut data = Vec::new();
            for t in &table {
                if let Some(off) = t.data_offset().map(|o| o.get()) {
                    let mut buf = vec![0u8; cs as usize];
                    img.src
                        .read_at(&mut buf, off)
                        .map_err(|e| format!("bitmap data: {e}"))?;
                    data.push(buf);
                }
            }
            bitmaps.push((
                b.name.clone(),
                b.table_offset.get(),
                b.table_size,
                b.flags,
                b.granularity_bits,
                table.iter().map(|t| t.0).collect(),
                data,
            ));
        }
    }
    // The feature name table only names feature bits for people (QEMU writes
    // it into every version 3 header it makes, the throw-away overlay's
    // included, which is compared with one `qemu-img create` made): left out.
    let extensions = img
        .extensions
        .iter()
        .filter(|e| e.ext_type != qinspect::header::EXT_FEATURE_TABLE)
        .map(|e| (e.ext_type, e.length, e.data.clone()))
        .collect();
    Ok(Meta {
        header,
        extensions,
        reftable,
        refcounts,
        l1s,
        l2,
        snapshots: img
            .snapshots
            .snapshots
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    s.name.clone(),
                    s.l1_table_offset.get(),
                    s.l1_size,
                    s.disk_size,
                )
            })
            .collect(),
        bitmaps,
    })
}

pub fn open_path(p: &Path) -> Result<Qcow2, String> {
    let src = Arc::new(qinspect::io::FileSource::open(p).map_err(|e| e.to_string())?);
    Qcow2::open(src, Strictness::Lenient).map_err(|e| e.to_string())
}

pub fn parse_op(s: &str) -> Op {
    Op::parse(s, &|n: &str| n.parse::<u64>().map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The QEMU command line for one operation on `img`.
pub fn qemu_command(op: &str, img: &str) -> Vec<String> {
    let parts: Vec<&str> = op.split(':').collect();
    let io = |cmd: String| -> Vec<String> {
        vec![
            "qemu-io".into(),
            "-f".into(),
            "qcow2".into(),
            "-c".into(),
            cmd,
            img.into(),
        ]
    };
    let img_cmd = |flag: &str, name: &str| -> Vec<String> {
        vec![
            "qemu-img".into(),
            "snapshot".into(),
            flag.into(),
            name.into(),
            img.into(),
        ]
    };
    match parts[0] {
        "snapshot-create" => img_cmd("-c", parts[1]),
        "snapshot-delete" => img_cmd("-d", parts[1]),
        "snapshot-apply" => img_cmd("-a", parts[1]),
        "write" => io(format!(
            "write{} {} {}",
            pattern_flag(&parts),
            parts[1],
            parts[2]
        )),
        "discard" => io(format!("discard {} {}", parts[1], parts[2])),
        "read" => vec![
            "qemu-io".into(),
            "-C".into(),
            "-f".into(),
            "qcow2".into(),
            "-c".into(),
            format!("read {} {}", parts[1], parts[2]),
            img.into(),
        ],
        "write-compressed" => io(format!(
            "write -c{} {} {}",
            pattern_flag(&parts),
            parts[1],
            parts[2]
        )),
        "write-zeroes" => io(format!(
            "write -z{} {} {}",
            if parts.get(3) == Some(&"unmap") {
                " -u"
            } else {
                ""
            },
            parts[1],
            parts[2]
        )),
        "repair" => vec![
            "qemu-img".into(),
            "check".into(),
            "-q".into(),
            "-r".into(),
            parts[1].into(),
            img.into(),
        ],
        "resize" => {
            let mut v: Vec<String> = vec!["qemu-img".into(), "resize".into(), "-q".into()];
            if parts.get(2) == Some(&"shrink") {
                v.push("--shrink".into());
            }
            v.extend([img.to_string(), parts[1].to_string()]);
            v
        }
        other => panic!("no QEMU command for {other}"),
    }
}

/// qemu-io's `-P N` for an op ending in `:P=N` (nothing: qemu-io's 0xcd).
fn pattern_flag(parts: &[&str]) -> String {
    match parts.get(3).and_then(|p| p.strip_prefix("P=")) {
        Some(p) => format!(" -P {p}"),
        None => String::new(),
    }
}

/// Write the guest disk of `chain` to `path` as a sparse raw file: zeros
/// are skipped, everything else written where it belongs.
pub fn write_raw(chain: &qinspect::chain::Chain, path: &Path) -> Result<(), String> {
    use qinspect::lookup::{ReadCache, Segment, for_each_segment};
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).map_err(|e| e.to_string())?;
    f.set_len(chain.size()).map_err(|e| e.to_string())?;
    let mut at = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut failed: Option<std::io::Error> = None;
    let mut put = |seg: Segment, at: u64| -> std::io::Result<()> {
        match seg {
            Segment::Zero { .. } => {}
            Segment::Bytes(b) => f.write_all_at(b, at)?,
            Segment::Data { src, host, len } => {
                let mut done = 0u64;
                while done < len {
                    let k = (len - done).min(buf.len() as u64) as usize;
                    buf[..k].fill(0);
                    src.read_at(&mut buf[..k], host.get() + done)?;
                    f.write_all_at(&buf[..k], at + done)?;
                    done += k as u64;
                }
            }
        }
        Ok(())
    };
    for_each_segment(
        chain,
        GuestOffset(0),
        chain.size(),
        &mut ReadCache::default(),
        &mut |seg| {
            let n = seg.len();
            if failed.is_none()
                && let Err(e) = put(seg, at)
            {
                failed = Some(e);
            }
            at += n;
            Ok(())
        },
    )
    .map_err(|e| e.to_string())?;
    match failed {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    }
}

/// The guest disk the simulation predicts against QEMU's reading of the real
/// image `real` (`qemu-img compare`), unless the simulation says it cannot
/// predict it (an external data file).
pub fn guest_matches(dir: &Path, sim: &mut Sim, real: &str) -> Result<(), String> {
    if sim.guest_bytes_unknown().is_some() {
        return Ok(());
    }
    let chain = sim
        .guest_chain()
        .map_err(|e| format!("the predicted guest disk: {e}"))?;
    let pred = format!("{real}.predicted.raw");
    write_raw(&chain, &dir.join(&pred))?;
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", &pred, real])
        .current_dir(dir)
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(dir.join(&pred));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the guest bytes differ from QEMU's: qemu-img compare says {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Run one QEMU command: did it succeed, and its last line of output.
pub fn run_qemu(dir: &Path, cmd: &[String]) -> (bool, String) {
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cmd[0]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed_line = text
        .lines()
        // A warning (a v2 image's bitmaps, say) comes before the error.
        .filter(|l| !l.contains(": warning: "))
        .find(|l| {
            l.contains("failed")
                || l.starts_with("qemu-")
                // qemu-io's own refusal of a request's length.
                || l.starts_with("length cannot exceed ")
        })
        .unwrap_or("")
        .to_string();
    // qemu-img check exits 2 or 3 when corruptions or leaks remain: the
    // repair still ran. 1 means it could not check.
    let ok = if cmd.get(1).map(String::as_str) == Some("check") {
        out.status.code() != Some(1)
    } else {
        out.status.success() && !text.contains(" failed: ")
    };
    (ok, failed_line)
}

/// The part of QEMU's error that names the cause (after the image name).
fn cause(line: &str) -> String {
    let l = line
        .trim_start_matches("qemu-img: ")
        .trim_start_matches("qemu-io: ");
    if let Some(rest) = l.strip_prefix("can't open device ") {
        return rest.split_once(": ").map_or(rest, |x| x.1).to_string();
    }
    if l.starts_with("Could not open '") {
        return l.split_once("': ").map_or(l, |x| x.1).to_string();
    }
    l.to_string()
}

/// Whether the simulation notes the `qcow2_free_clusters failed: CAUSE` line
/// QEMU printed (it goes on after one), with the same cause: QEMU's words or
/// their errno name.
fn freed_alike(line: &str, rec: &qinspect::simulate::OpRecord) -> bool {
    let Some(why) = line.split("qcow2_free_clusters failed: ").nth(1) else {
        return false;
    };
    let why = why.trim();
    let errno = match why {
        "Invalid argument" => "EINVAL",
        "File too large" => "EFBIG",
        "Input/output error" => "EIO",
        "Resource temporarily unavailable" => "EAGAIN",
        other => other,
    };
    rec.steps.iter().any(|c| {
        matches!(c.target, qinspect::simulate::Target::Note)
            && c.reason.starts_with("QEMU: qcow2_free_clusters failed: ")
            && (c.reason.contains(why) || c.reason.contains(&format!("({errno})")))
    })
}

/// `qemu-img check` of `img`: (corruptions, leaks, check errors).
pub fn qemu_check(dir: &Path, img: &str) -> (u64, u64, u64) {
    qemu_check_opened(dir, img).unwrap_or_default()
}

/// [`qemu_check`], or `None` when qemu-img check cannot open the image's
/// backing file (and so checks nothing).
pub fn qemu_check_opened(dir: &Path, img: &str) -> Option<(u64, u64, u64)> {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", img])
        .current_dir(dir)
        .output()
        .expect("qemu-img check");
    if out.stdout.is_empty()
        && String::from_utf8_lossy(&out.stderr).contains(": Could not open backing file: ")
    {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    Some((n("corruptions"), n("leaks"), n("check-errors")))
}

/// Run `ops` one by one on a copy of `image` in `dir` (one QEMU process each)
/// and in the simulator; `Err` names the first operation whose outcome or
/// resulting metadata differ. The original must stay unchanged.
pub fn compare(dir: &Path, image: &str, ops: &[&str]) -> Result<Sim, String> {
    compare_with(dir, image, ops, ops)
}

/// As [`compare`], with QEMU given `qemu_ops` (to show that a difference is caught).
pub fn compare_with(
    dir: &Path,
    image: &str,
    ops: &[&str],
    qemu_ops: &[&str],
) -> Result<Sim, String> {
    on_a_copy(dir, image, |sim, copy| {
        compare_sim(dir, sim, copy, ops, qemu_ops)
    })
}

/// `run` given a simulation of `image` in `dir` and the name of a copy of it
/// for QEMU (`IMAGE.qemu`); the original must not change meanwhile.
fn on_a_copy(
    dir: &Path,
    image: &str,
    run: impl FnOnce(Sim, &str) -> Result<Sim, String>,
) -> Result<Sim, String> {
    let before = std::fs::read(dir.join(image)).map_err(|e| e.to_string())?;
    let copy = format!("{image}.qemu");
    std::fs::copy(dir.join(image), dir.join(&copy)).map_err(|e| e.to_string())?;
    let img = open_path(&dir.join(image))?;
    let sim = Sim::new(&img, &dir.join(image)).map_err(|e| format!("Sim::new: {e}"))?;
    let sim = run(sim, &copy)?;
    if std::fs::read(dir.join(image)).map_err(|e| e.to_string())? != before {
        return Err("the original image changed".into());
    }
    Ok(sim)
}

/// Apply `ops` to `sim` and `qemu_ops` for real to the image `real` in `dir`,
/// comparing after each, then the guest bytes.
pub fn compare_sim(
    dir: &Path,
    sim: Sim,
    copy: &str,
    ops: &[&str],
    qemu_ops: &[&str],
) -> Result<Sim, String> {
    let mut sim = compare_ops(dir, sim, copy, ops, qemu_ops)?;
    guest_matches(dir, &mut sim, copy)
        .map_err(|e| format!("after the {} operations: {e}", ops.len()))?;
    Ok(sim)
}

/// As [`compare`], without comparing the guest bytes at the end (for a
/// simulation that cannot know them).
pub fn compare_metadata(dir: &Path, image: &str, ops: &[&str]) -> Result<Sim, String> {
    on_a_copy(dir, image, |sim, copy| {
        compare_ops(dir, sim, copy, ops, ops)
    })
}

/// The order QEMU's run of the compressed write `op` on the image at `real`
/// placed the request's clusters in, for the simulation to follow (QEMU's
/// compression threads finish in an order that varies between runs): their
/// guest offsets sorted by the host offset each landed at. Every new
/// cluster QEMU takes for them is found first fit and nothing is freed on
/// the way, so the host offsets grow in the order of placement; clusters
/// that got no host offset (a failure) come last. `None` for other
/// operations and for a request of one cluster.
pub fn compressed_order(real: &Path, op: &Op) -> Option<Vec<GuestOffset>> {
    let Op::WriteCompressed { offset, length, .. } = op else {
        return None;
    };
    let img = open_path(real).ok()?;
    let geo = img.geometry();
    let cs = geo.cluster_size();
    let end = offset.get().checked_add(*length)?;
    let mut keyed: Vec<(u64, GuestOffset)> = Vec::new();
    for g in (offset.get()..end).step_by(cs as usize).map(GuestOffset) {
        let l2 = img
            .l1
            .get(geo.l1_index(g) as usize)
            .and_then(|e| e.l2_offset())
            .filter(|o| o.get() != 0);
        let host = l2
            .and_then(|l2| img.l2_table(l2).ok())
            .and_then(|t| t.get(geo.l2_index(g) as usize).copied())
            .and_then(|e| match e.mapping(&geo, img.header.has_data_file()) {
                qinspect::tables::L2Mapping::Compressed { descriptor, .. } => {
                    Some(descriptor.offset.get())
                }
                qinspect::tables::L2Mapping::Data { host, .. } => Some(host.get()),
                _ => None,
            });
        keyed.push((host.unwrap_or(u64::MAX), g));
    }
    if keyed.len() < 2 {
        return None;
    }
    keyed.sort();
    Some(keyed.into_iter().map(|(_, g)| g).collect())
}

/// Apply `ops` to `sim` and `qemu_ops` for real to the image `real` in `dir`,
/// comparing the metadata after each.
pub fn compare_ops(
    dir: &Path,
    mut sim: Sim,
    copy: &str,
    ops: &[&str],
    qemu_ops: &[&str],
) -> Result<Sim, String> {
    let copy = copy.to_string();
    for (i, op) in ops.iter().enumerate() {
        let (ok, line) = run_qemu(dir, &qemu_command(qemu_ops[i], &copy));
        let parsed = parse_op(op);
        if let Some(order) = compressed_order(&dir.join(&copy), &parsed) {
            sim.place_compressed_in(order);
        }
        sim.apply(&parsed);
        let rec = sim.records.last().ok_or("no record")?;
        let at = format!("operation {} ({op})", i + 1);
        match (&rec.error, ok) {
            (Some(e), _) if e.starts_with("not simulated: ") => {
                return Err(format!("{at}: refused: {e}"));
            }
            // A release QEMU cannot make (a refcount already 0) is printed
            // and the operation goes on: the simulation must say the same.
            (None, false)
                if line.contains("qcow2_free_clusters failed: ") && freed_alike(&line, rec) => {}
            (None, false) => {
                return Err(format!(
                    "{at}: QEMU failed ({line}), the simulation did not"
                ));
            }
            (Some(e), true) => {
                return Err(format!("{at}: the simulation failed ({e}), QEMU did not"));
            }
            (Some(e), false) => {
                let c = cause(&line);
                if !e.contains(&c) {
                    return Err(format!("{at}: QEMU says '{line}', the simulation '{e}'"));
                }
            }
            (None, true) => {}
        }
        let simulated = sim
            .image()
            .map_err(|e| format!("{at}: simulated image: {e}"))?;
        let real = open_path(&dir.join(&copy))?;
        let upto = sim.file_len().max(real.file_len());
        let (a, b) = (meta(&simulated, upto)?, meta(&real, upto)?);
        let mut diffs: Vec<String> = Vec::new();
        macro_rules! same {
            ($f:ident) => {
                if a.$f != b.$f {
                    let x: Vec<String> = a.$f.iter().map(|e| format!("{e:?}")).collect();
                    let y: Vec<String> = b.$f.iter().map(|e| format!("{e:?}")).collect();
                    let i = (0..x.len().max(y.len()))
                        .find(|&i| x.get(i) != y.get(i))
                        .unwrap_or(0);
                    diffs.push(format!(
                        "{at}: {} differ from item {i} on ({} and {} items)\n simulated: {:.600}\n      qemu: {:.600}",
                        stringify!($f),
                        x.len(),
                        y.len(),
                        x.get(i..).map(|v| v.join(", ")).unwrap_or_default(),
                        y.get(i..).map(|v| v.join(", ")).unwrap_or_default(),
                    ));
                }
            };
        }

        same!(header);
        same!(extensions);
        same!(reftable);
        same!(refcounts);
        same!(l1s);
        same!(l2);
        same!(snapshots);
        same!(bitmaps);
        if !diffs.is_empty() {
            return Err(diffs.join("\n"));
        }
        let r = check(&simulated, &CheckOptions::default());
        // Nothing to compare where qemu-img check cannot open the backing
        // file: the metadata compared above is all there is.
        let Some(q) = qemu_check_opened(dir, &copy) else {
            continue;
        };
        if (r.corruptions, r.leaks, r.check_errors) != q {
            return Err(format!(
                "{at}: check of the simulation {:?}, qemu-img check {q:?}",
                (r.corruptions, r.leaks, r.check_errors)
            ));
        }
    }
    Ok(sim)
}

//! Throw-away overlays: what `qemu-nbd -s` (and `-s -l SNAPSHOT`) puts on top
//! of a read-only image, a fresh qcow2 file whose backing file is the image.
//!
//! The overlay starts as `qemu-img create -f qcow2 -b IMG -F qcow2` makes it:
//! 64 KiB clusters, 16-bit refcounts, compat 1.1; the header in cluster 0, the
//! refcount table in cluster 1, its one refcount block in cluster 2 and the
//! active L1 table from cluster 3. It lives in memory only; writes, discards
//! and resizes then act on it as on any image, with the image (or the
//! snapshot's view of it) as the backing file reads fall through to.

use super::Sim;
use crate::error::{Error, Result};
use crate::header::Field;
use crate::image::{Qcow2, Strictness};
use crate::io::MemSource;
use crate::tables::L2Entry;
use crate::types::{GuestOffset, HostOffset};
use std::path::Path;
use std::sync::Arc;

const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;

/// The bytes of a fresh overlay of a `size`-byte disk backed by `backing`.
fn fresh_image(size: u64, backing: &str) -> Result<Vec<u8>> {
    // One L2 table covers 8192 clusters of 64 KiB: 512 MiB.
    let l1_size = size.div_ceil(CS.saturating_mul(CS / 8));
    let l1_bytes = l1_size.saturating_mul(8);
    let l1_clusters = l1_bytes.div_ceil(CS);
    let meta_clusters = 3u64.saturating_add(l1_clusters);
    // (with l1_size 0 this is 3: header, refcount table, refcount block)
    // The one refcount block counts 32768 clusters; a larger L1 would need more.
    if meta_clusters > CS / 2 || backing.len() > 1023 {
        return Err(Error::unsupported(
            "overlay",
            "a disk this large needs more than one refcount block in a fresh overlay",
        ));
    }
    let mut b = vec![0u8; (3 * CS) as usize];
    let put64 = |b: &mut Vec<u8>, at: usize, v: u64| {
        if let Some(d) = b.get_mut(at..at.saturating_add(8)) {
            d.copy_from_slice(&v.to_be_bytes());
        }
    };
    let put32 = |b: &mut Vec<u8>, at: usize, v: u32| {
        if let Some(d) = b.get_mut(at..at.saturating_add(4)) {
            d.copy_from_slice(&v.to_be_bytes());
        }
    };
    // A header field: its low `size` bytes at its offset.
    let put = |b: &mut Vec<u8>, f: Field, v: u64| {
        let (at, n) = (f.offset() as usize, f.size() as usize);
        let bytes = v.to_be_bytes();
        if let (Some(d), Some(s)) = (
            b.get_mut(at..at.saturating_add(n)),
            bytes.get(8usize.saturating_sub(n)..),
        ) {
            d.copy_from_slice(s);
        }
    };
    put(&mut b, Field::Magic, u64::from(crate::header::QCOW2_MAGIC));
    put(&mut b, Field::Version, 3);
    put(&mut b, Field::ClusterBits, u64::from(CLUSTER_BITS));
    put(&mut b, Field::Size, size);
    put(&mut b, Field::L1Size, l1_size);
    // An empty L1 (a zero-size disk) has offset 0, as qemu-img writes it.
    put(
        &mut b,
        Field::L1TableOffset,
        if l1_size == 0 { 0 } else { 3 * CS },
    );
    put(&mut b, Field::RefcountTableOffset, CS);
    put(&mut b, Field::RefcountTableClusters, 1);
    put(&mut b, Field::RefcountOrder, 4);
    put(&mut b, Field::HeaderLength, 112);
    // Extensions at 112: the backing format, then the end.
    put32(&mut b, 112, 0xe279_2aca);
    put32(&mut b, 116, 5);
    if let Some(d) = b.get_mut(120..125) {
        d.copy_from_slice(b"qcow2");
    }
    // End of extensions at 128 (zeros); the backing file name after it.
    let name_at = 136usize;
    if let Some(d) = b.get_mut(name_at..name_at.saturating_add(backing.len())) {
        d.copy_from_slice(backing.as_bytes());
    }
    put(&mut b, Field::BackingFileOffset, name_at as u64);
    put(&mut b, Field::BackingFileSize, backing.len() as u64);
    // Refcount table entry 0 -> the block in cluster 2.
    put64(&mut b, CS as usize, 2 * CS);
    // Refcount 1 for the header, table, block and L1 clusters.
    for c in 0..meta_clusters {
        let at = (2 * CS).saturating_add(c.saturating_mul(2)) as usize;
        if let Some(d) = b.get_mut(at..at.saturating_add(2)) {
            d.copy_from_slice(&1u16.to_be_bytes());
        }
    }
    // The L1 table (all zeros), as long as qemu-img writes it.
    b.resize((3 * CS).saturating_add(l1_bytes) as usize, 0);
    Ok(b)
}

impl Sim {
    /// A throw-away overlay over the image at `base` (opened as `img`), or over
    /// its snapshot `snapshot` (ID or name, as `qemu-nbd -l` finds it).
    pub fn overlay(img: &Qcow2, base: &Path, snapshot: Option<&str>) -> Result<Sim> {
        // qemu-nbd -l loads the snapshot's L1 table in place of the active one
        // (bdrv_snapshot_load_tmp) and keeps the disk size of the image, not
        // the snapshot's: so does the overlay.
        let size = img.header.size & !511;
        if let Some(s) = snapshot {
            let _found = img
                .snapshots
                .snapshots
                .iter()
                .find(|x| x.id == s)
                .or_else(|| img.snapshots.snapshots.iter().find(|x| x.name == s))
                .ok_or_else(|| {
                    Error::unsupported(
                        "overlay",
                        format!("Can't find snapshot '{s}' to put an overlay on"),
                    )
                })?;
        }
        let name = base.to_string_lossy().into_owned();
        let bytes = fresh_image(size, &name)?;
        let label = match snapshot {
            Some(s) => format!("overlay over {name} snapshot {s}"),
            None => format!("overlay over {name}"),
        };
        let src = Arc::new(MemSource::new(label.clone(), bytes));
        let ov = Qcow2::open(src, Strictness::Lenient)?;
        let mut sim = Sim::new(&ov, Path::new(&label))?;
        sim.data.below_key = img.data_key().cloned();
        // qemu-nbd -s opens the image and its backing chain read-only.
        sim.backing_failure = None;
        match crate::chain::Chain::open_detailed(base, &Default::default()) {
            Ok(c) => sim.backing = Some(c),
            Err(f) if f.read_only_open_loops() => {
                return Err(Error::Request(format!(
                    "qemu-nbd -s would not start: its read-only open of {} follows the backing chain loop without end ({})",
                    base.display(),
                    f.error
                )));
            }
            Err(f) => match f.qemu_reason() {
                Some(why) => {
                    return Err(Error::Request(format!(
                        "qemu-nbd -s fails: Failed to blk_new_open '{}': {why}",
                        base.display()
                    )));
                }
                None => sim.backing_failure = Some(f),
            },
        }
        sim.backing_named = true;
        sim.overlay_of = Some((base.to_path_buf(), snapshot.map(str::to_string)));
        Ok(sim)
    }

    /// For an overlay: the image under it and the snapshot it shows, if any.
    pub fn overlay_of(&self) -> Option<(&Path, Option<&str>)> {
        self.overlay_of
            .as_ref()
            .map(|(p, s)| (p.as_path(), s.as_deref()))
    }
}

impl Sim {
    /// Where a guest read at `guest` comes from, layer by layer: this image's
    /// tables as simulated, then (for an overlay) the image under it as shown
    /// (its snapshot's L1 or its active one), as recorded notes.
    pub(super) fn trace(&mut self, guest: GuestOffset) -> super::SimResult<()> {
        use crate::tables::{ClusterType, L1Entry};
        if guest.get() >= self.size {
            self.note(format!(
                "guest {guest:#x} is past the end of the disk ({} bytes)",
                self.size
            ));
            return Ok(());
        }
        let top = match &self.overlay_of {
            Some(_) => "the overlay",
            None => "the image",
        };
        let i = self.geo.l1_index(guest);
        let mut falls = true;
        if let Some(l2) = self.l2_table_of(guest) {
            let j = self.geo.l2_index(guest);
            let (raw, bm) = self.l2_entry_at(l2, j);
            let e = L2Entry { raw, bitmap: bm };
            let at = format!("{top}: active L1[{i}] -> L2 {l2:#x}[{j}] = {raw:#x}");
            match e.cluster_type(&self.geo, self.has_data_file) {
                ClusterType::Normal => {
                    let host = L2Entry::from_word(raw)
                        .host_offset()
                        .saturating_add(self.within(guest));
                    self.note(format!("{at}: data at host {host:#x} of {top}"));
                    falls = false;
                }
                ClusterType::Compressed => {
                    self.note(format!("{at}: compressed data in {top}"));
                    falls = false;
                }
                ClusterType::ZeroPlain | ClusterType::ZeroAlloc => {
                    self.note(format!("{at}: a zero cluster, reads as zeros"));
                    falls = false;
                }
                ClusterType::Unallocated => {
                    self.note(format!("{at}: unallocated, the read falls through"));
                }
            }
        } else {
            self.note(format!(
                "{top}: active L1[{i}] is 0, no L2 table: the read falls through"
            ));
        }
        if !falls {
            return Ok(());
        }
        let Some((base, snap)) = self.overlay_of.clone() else {
            let to = if self.backing.is_some() {
                "to the backing file".to_string()
            } else if self.backing_named {
                format!(
                    "to the backing file, which qinspect could not open: {}",
                    self.backing_unread()
                )
            } else {
                "no backing file: reads as zeros".to_string()
            };
            self.note(to);
            return Ok(());
        };
        let src: crate::io::SharedSource = Arc::new(crate::io::FileSource::open(&base)?);
        let img = Qcow2::open(src, Strictness::Lenient)?;
        let (label, l1): (String, Vec<L1Entry>) = match &snap {
            Some(s) => {
                let sn = img
                    .snapshots
                    .snapshots
                    .iter()
                    .find(|x| &x.id == s)
                    .or_else(|| img.snapshots.snapshots.iter().find(|x| &x.name == s))
                    .ok_or_else(|| super::SimError::Qemu(format!("no snapshot '{s}'")))?;
                (
                    format!("snapshot '{}' of {}", sn.name, base.display()),
                    img.snapshot_l1(sn)?.to_vec(),
                )
            }
            None => (base.display().to_string(), img.l1.to_vec()),
        };
        let geo = img.geometry();
        let i = geo.l1_index(guest);
        let l2 = l1
            .get(i as usize)
            .and_then(L1Entry::l2_offset)
            .unwrap_or_default();
        if l2 == HostOffset(0) {
            self.note(format!(
                "{label}: L1[{i}] is 0: {}",
                if img.backing_name.is_some() {
                    "on to its backing file"
                } else {
                    "reads as zeros"
                }
            ));
            return Ok(());
        }
        let j = geo.l2_index(guest);
        let table = img.l2_table(l2)?;
        let e = table
            .get(j as usize)
            .copied()
            .unwrap_or(L2Entry { raw: 0, bitmap: 0 });
        let at = format!("{label}: L1[{i}] -> L2 {l2:#x}[{j}] = {:#x}", e.raw);
        let what = match e.cluster_type(&geo, img.header.has_data_file()) {
            ClusterType::Normal => format!(
                "data at host {:#x} of {}",
                e.host_offset().saturating_add(geo.in_cluster(guest)),
                base.display()
            ),
            ClusterType::Compressed => "compressed data".into(),
            ClusterType::ZeroPlain | ClusterType::ZeroAlloc => {
                "a zero cluster, reads as zeros".into()
            }
            ClusterType::Unallocated => {
                if img.backing_name.is_some() {
                    "unallocated: on to its backing file".into()
                } else {
                    "unallocated: reads as zeros".into()
                }
            }
        };
        self.note(format!("{at}: {what}"));
        Ok(())
    }
}

//! An opened qcow2 file: header, extensions, the active L1 table, snapshots and
//! bitmaps, plus on-demand access to L2 tables and refcounts.
//!
//! Opening reads only cluster 0, the active L1 table, the snapshot table and the
//! bitmap directory; L2 tables and refcount blocks are read when asked for. Every
//! size taken from the header is checked against QEMU's limits before anything is
//! allocated.

use crate::bitmap::BitmapEntry;
use crate::error::{CorruptKind, Error, Result};
use crate::header::{self, Extension, ExtensionKind, Feature, Header};
use crate::io::{SharedSource, Source, read_exact, read_into};
use crate::refcount::{self, RefTableEntry, RefcountGeometry};
use crate::snapshot::{self, Snapshot, SnapshotTable};
use crate::tables::{self, L1Entry, L2Entry, MAX_L1_ENTRIES};
use crate::types::{Geometry, HostCluster, HostOffset};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod bitmap_tables;
mod refcount_reader;
pub use bitmap_tables::{BitmapTable, BitmapTables, TABLE_READ_BUDGET};
pub use refcount_reader::RefcountReader;

/// How strictly to open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strictness {
    /// Refuse what QEMU refuses (commands that answer like QEMU: info, map, read).
    #[default]
    Qemu,
    /// Open whatever can be decoded and list the problems (dump, hexdump, TUI).
    Lenient,
}

/// Which L1 table a lookup uses: the active one or a snapshot's.
#[derive(Clone, Debug)]
pub struct View {
    /// The L1 entries.
    pub l1: Arc<Vec<L1Entry>>,
    /// Where the L1 table is in the file.
    pub l1_offset: HostOffset,
    /// Guest size this view describes.
    pub size: u64,
    /// The snapshot, if this is one.
    pub snapshot: Option<Snapshot>,
}

impl View {
    /// "active L1" or "snapshot 1 'name' L1".
    pub fn label(&self) -> String {
        match &self.snapshot {
            None => "active L1".into(),
            Some(s) => format!("snapshot {} '{}' L1", s.id, s.name),
        }
    }
}

/// An opened qcow2 image file.
#[derive(Debug)]
pub struct Qcow2 {
    /// The file.
    pub src: SharedSource,
    /// The decoded header.
    pub header: Header,
    /// Header extensions in file order.
    pub extensions: Vec<Extension>,
    /// Set feature bits with names.
    pub features: Vec<Feature>,
    /// The backing file name, as stored.
    pub backing_name: Option<String>,
    /// The backing format from the extension, if any.
    pub backing_format: Option<String>,
    /// The external data file name from the extension, if any.
    pub data_file_name: Option<String>,
    /// The active L1 table (zero-filled where it runs past the end of the file).
    pub l1: Arc<Vec<L1Entry>>,
    /// The snapshot table.
    pub snapshots: SnapshotTable,
    /// The bitmap directory: `None` without the extension.
    pub bitmaps: Option<Result<Vec<BitmapEntry>>>,
    /// The tables of the bitmaps in [`Qcow2::bitmaps`], read once by the open.
    pub bitmap_tables: BitmapTables,
    /// What QEMU would object to, found while opening (empty for a healthy image),
    /// in the order QEMU's open meets them. Only a [`Strictness::Lenient`] open
    /// gets this far with any; a [`Strictness::Qemu`] open fails with the first.
    pub problems: Vec<Error>,
    /// Why `qemu-img check`'s open (`BDRV_O_CHECK`) would fail on this file, if it
    /// would. It skips some of the checks behind [`Qcow2::problems`]: a missing
    /// refcount table and a bad snapshot table do not stop it.
    pub check_refusal: Option<Error>,
    /// Oddities QEMU accepts (an L1 table running past the end of the file).
    pub notes: Vec<String>,
    l2_cache: Mutex<HashMap<u64, Arc<Vec<L2Entry>>>>,
    reftable: Mutex<Option<Arc<Vec<RefTableEntry>>>>,
    refblock_cache: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    data_key: std::sync::OnceLock<crate::crypto::DataKey>,
    /// [`Qcow2::metadata_preallocated`], once asked.
    metadata_preallocated: std::sync::OnceLock<bool>,
}

const CACHE_LIMIT: usize = 256;

pub use crate::types::BDRV_MAX_LENGTH;

/// The backing file name stored in cluster 0 (`c0`), if the header names one,
/// to its first NUL byte (QEMU keeps it as a C string); an error if it is
/// longer than QEMU reads (1023 bytes, and within cluster 0).
fn backing_file_name(h: &Header, c0: &[u8]) -> Result<Option<String>> {
    let Some(at) = h.backing_file_name() else {
        return Ok(None);
    };
    let max = 1023u64.min(h.cluster_size().saturating_sub(at.get()));
    if u64::from(h.backing_file_size) > max {
        return Err(Error::corrupt(
            CorruptKind::BackingFileName,
            at,
            format!("Backing file name too long ({} bytes)", h.backing_file_size),
        ));
    }
    let name = crate::bytes::slice(c0, at.get() as usize, h.backing_file_size as usize);
    Ok(Some(crate::bytes::c_text(name)))
}

/// Something QEMU's open refuses, found while opening with `strict`: the open
/// fails with it under [`Strictness::Qemu`]; otherwise it is listed in `problems`
/// and, if it is the first, is why `qemu-img check`'s open would fail too.
fn refuse(
    problems: &mut Vec<Error>,
    check_refusal: &mut Option<Error>,
    strict: Strictness,
    e: Error,
) -> Result<()> {
    if strict == Strictness::Qemu {
        return Err(e);
    }
    check_refusal.get_or_insert_with(|| e.clone());
    problems.push(e);
    Ok(())
}

/// The active L1 table, and a note when it runs past the end of the file. QEMU
/// reads it even there (those bytes read as zeros); the size is bounded by
/// `validate()`. `l1_invalid`: validation already refused the table.
fn read_active_l1(
    src: &dyn Source,
    h: &Header,
    l1_invalid: bool,
    strict: Strictness,
    problems: &mut Vec<Error>,
    check_refusal: &mut Option<Error>,
) -> Result<(Arc<Vec<L1Entry>>, Option<String>)> {
    let file_len = src.len();
    let mut note = None;
    let l1_entries = u64::from(h.l1_size).min(MAX_L1_ENTRIES);
    let l1_bytes = l1_entries.saturating_mul(8);
    let mut l1_buf = vec![0u8; l1_bytes as usize];
    if l1_invalid {
        // Refused above (or listed, when lenient): nothing to read there.
    } else if l1_entries > 0 && h.l1_table_offset.get().saturating_add(l1_bytes) > BDRV_MAX_LENGTH {
        // QEMU's block layer fails any request past this length with EIO.
        let e = Error::Invalid {
            kind: CorruptKind::L1Table,
            what: "active L1 table".into(),
            offset: h.l1_table_offset,
            reason: "Could not read L1 table: Input/output error (the table ends past the block layer's maximum length, 2^63 - 2^30)".into(),
        };
        refuse(problems, check_refusal, strict, e)?;
    } else if let Err(e) = read_into(src, "active L1 table", h.l1_table_offset, &mut l1_buf) {
        refuse(problems, check_refusal, strict, e)?;
    }
    if h.l1_table_offset.get().saturating_add(l1_bytes) > file_len && l1_entries > 0 {
        note = Some(format!(
            "active L1 table at {} ({} entries) runs past the end of the file ({file_len} bytes); QEMU opens the image and reads the missing part as zeros",
            h.l1_table_offset, h.l1_size
        ));
    }
    Ok((Arc::new(tables::decode_l1(&l1_buf)), note))
}

impl Qcow2 {
    /// Open a qcow2 image from `src`.
    pub fn open(src: SharedSource, strict: Strictness) -> Result<Qcow2> {
        let file_len = src.len();
        let first = read_exact(
            src.as_ref(),
            "qcow2 header",
            HostOffset(0),
            file_len.min(u64::from(header::V3_MIN_HEADER_LEN).saturating_add(8)),
        )?;
        let h = Header::parse(&first)?;
        let mut problems: Vec<Error> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let invalid = h.validate(file_len);
        let invalid_kinds: Vec<CorruptKind> =
            invalid.iter().filter_map(Error::corrupt_kind).collect();
        let mut check_refusal = h
            .validate_for(file_len, header::OpenMode::Check)
            .into_iter()
            .next();
        // An unknown version or cluster size makes everything after the header
        // unreadable, whatever the strictness.
        let fatal = !matches!(h.version, 2 | 3)
            || !(crate::types::MIN_CLUSTER_BITS..=crate::types::MAX_CLUSTER_BITS)
                .contains(&h.cluster_bits);
        if let Some(first_err) = invalid.into_iter().next() {
            if strict == Strictness::Qemu || fatal {
                return Err(first_err);
            }
            problems.push(first_err);
        }
        let geo = h.geometry();
        let cs = geo.cluster_size();

        // Cluster 0 holds the extensions and the backing file name.
        let mut c0 = vec![0u8; cs as usize];
        read_into(src.as_ref(), "cluster 0", HostOffset(0), &mut c0)?;
        let (extensions, ext_err) = header::parse_extensions(&h, &c0);
        if let Some(e) = ext_err {
            refuse(&mut problems, &mut check_refusal, strict, e)?;
        }
        let features = header::named_features(&h, &extensions);
        let mut backing_format = None;
        let mut data_file_name = None;
        for e in &extensions {
            match &e.kind {
                ExtensionKind::BackingFormat { format } => backing_format = Some(format.clone()),
                ExtensionKind::DataFile { name } => data_file_name = Some(name.clone()),
                _ => {}
            }
        }
        let backing_name = match backing_file_name(&h, &c0) {
            Ok(name) => name,
            Err(e) => {
                refuse(&mut problems, &mut check_refusal, strict, e)?;
                None
            }
        };
        if h.data_file_raw() && !h.has_data_file() {
            let e = Error::header_field(
                header::Field::AutoclearFeatures,
                "data-file-raw requires a data file",
            );
            // Checked where QEMU opens data files: info opens the image, I/O fails.
            check_refusal.get_or_insert_with(|| e.clone());
            problems.push(e);
        }

        let l1_invalid = invalid_kinds.contains(&CorruptKind::L1Table);
        let (l1, l1_note) = read_active_l1(
            src.as_ref(),
            &h,
            l1_invalid,
            strict,
            &mut problems,
            &mut check_refusal,
        )?;
        notes.extend(l1_note);

        let snapshots = snapshot::read_table(src.as_ref(), h.snapshots_offset, h.nb_snapshots);
        if let Some(e) = &snapshots.error {
            if strict == Strictness::Qemu {
                return Err(Error::corrupt(
                    CorruptKind::SnapshotTable,
                    h.snapshots_offset,
                    e.to_string(),
                ));
            }
            problems.push(Error::corrupt(
                CorruptKind::SnapshotTable,
                h.snapshots_offset,
                e.to_string(),
            ));
        }

        let (bitmaps, bitmap_tables) = bitmap_tables::read_bitmaps(
            src.as_ref(),
            &h,
            &extensions,
            strict,
            &mut problems,
            &mut check_refusal,
            &mut notes,
        )?;

        Ok(Qcow2 {
            src,
            header: h,
            extensions,
            features,
            backing_name,
            backing_format,
            data_file_name,
            l1,
            snapshots,
            bitmaps,
            bitmap_tables,
            problems,
            check_refusal,
            notes,
            l2_cache: Mutex::new(HashMap::new()),
            reftable: Mutex::new(None),
            refblock_cache: Mutex::new(HashMap::new()),
            data_key: std::sync::OnceLock::new(),
            metadata_preallocated: std::sync::OnceLock::new(),
        })
    }

    /// Give the image the key that decrypts its data clusters (see
    /// [`crate::crypto`]). The first key given stays; `false` if one was already set.
    pub fn set_data_key(&self, key: crate::crypto::DataKey) -> bool {
        self.data_key.set(key).is_ok()
    }

    /// The key for the data clusters, if one was given.
    pub fn data_key(&self) -> Option<&crate::crypto::DataKey> {
        self.data_key.get()
    }

    /// Cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.header.geometry()
    }

    /// The external data file in words: its name as the header extension stores
    /// it (QEMU opens it relative to the working directory), or words saying the
    /// image names none; `None` when the image has no data file.
    pub fn data_file_words(&self) -> Option<&str> {
        self.header.has_data_file().then(|| {
            self.data_file_name
                .as_deref()
                .unwrap_or("the data file (the image names none)")
        })
    }

    /// The image around its L2 tables, for the words of an entry of a table
    /// that maps a disk of `disk_size` bytes ([`L2Entry::describe_in`]).
    pub fn surroundings(&self, disk_size: u64) -> tables::Surroundings<'_> {
        tables::Surroundings {
            data_file: self.data_file_words(),
            backing: self.backing_name.is_some(),
            disk_size,
        }
    }

    /// Refcount geometry.
    pub fn refcount_geometry(&self) -> RefcountGeometry {
        RefcountGeometry::new(&self.geometry(), self.header.refcount_order)
    }

    /// Length of the image file.
    pub fn file_len(&self) -> u64 {
        self.src.len()
    }

    /// Why the active L1 table was not read, when it was not: the header's L1
    /// fields are ones QEMU refuses (or the table would end past what QEMU's block
    /// layer can read), and a lenient open leaves the table all zeros rather than
    /// read it. `None` when the table was read.
    pub fn l1_unread(&self) -> Option<&Error> {
        self.problems
            .iter()
            .find(|e| e.corrupt_kind() == Some(CorruptKind::L1Table))
    }

    /// The view through the active L1 table.
    pub fn active_view(&self) -> View {
        View {
            l1: self.l1.clone(),
            l1_offset: self.header.l1_table_offset,
            size: self.header.size,
            snapshot: None,
        }
    }

    /// Find a snapshot by ID or name (ID first, like QEMU).
    ///
    /// `id_or_name` may also be `snapshot.id=ID`, `snapshot.name=NAME` or both,
    /// as `qemu-img convert -l` takes them (see [`snapshot::Selector`]).
    pub fn find_snapshot(&self, id_or_name: &str) -> Result<&Snapshot> {
        let sel = snapshot::Selector::parse(id_or_name)
            .map_err(|e| Error::Request(format!("snapshot '{id_or_name}': {e}")))?;
        self.snapshots.select(&sel).ok_or_else(|| {
            // A table that could not be read is the reason, not an absent name.
            if let Some(e) = &self.snapshots.error {
                return Error::Request(format!(
                    "no snapshot {id_or_name} in {}: {e}",
                    self.src.name().display()
                ));
            }
            let known: Vec<String> = self
                .snapshots
                .snapshots
                .iter()
                .map(|s| format!("{} ({})", s.id, s.name))
                .collect();
            Error::Request(format!(
                "no snapshot {} in {}; snapshots: {}",
                match &sel {
                    snapshot::Selector::IdOrName(s) => format!("with ID or name '{s}'"),
                    snapshot::Selector::Exact { .. } => format!("matching '{id_or_name}'"),
                },
                self.src.name().display(),
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    /// Read a snapshot's L1 table (checked: aligned and at most 4 Mi entries).
    pub fn snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<L1Entry>> {
        let what = format!("snapshot {} '{}' L1 table", sn.id, sn.name);
        if u64::from(sn.l1_size) > MAX_L1_ENTRIES {
            return Err(Error::invalid(
                what,
                sn.entry_offset.saturating_add(8),
                format!("Snapshot L1 table too large ({} entries)", sn.l1_size),
            ));
        }
        if !self.geometry().is_cluster_aligned(sn.l1_table_offset.get()) {
            return Err(Error::invalid(
                what,
                sn.l1_table_offset,
                "Snapshot L1 table offset invalid (not cluster-aligned)",
            ));
        }
        let buf = read_exact(
            self.src.as_ref(),
            &what,
            sn.l1_table_offset,
            u64::from(sn.l1_size) * 8,
        )?;
        Ok(tables::decode_l1(&buf))
    }

    /// The view through a snapshot's L1 table, with the snapshot's disk size (the
    /// disk as `qemu-img snapshot -a` would make it).
    pub fn snapshot_view(&self, id_or_name: &str) -> Result<View> {
        let sn = self.find_snapshot(id_or_name)?.clone();
        self.view_of(sn)
    }

    /// The view of record `index` of the snapshot table (0: the first record),
    /// whatever its ID: the one way to reach the second of two records that share
    /// an ID, which [`Qcow2::find_snapshot`] never returns (QEMU takes the first).
    pub fn snapshot_view_at(&self, index: usize) -> Result<View> {
        let sn = self
            .snapshots
            .snapshots
            .get(index)
            .cloned()
            .ok_or_else(|| {
                Error::Request(format!(
                    "no snapshot record {index} in {}: the table holds {}",
                    self.src.name().display(),
                    self.snapshots.snapshots.len()
                ))
            })?;
        self.view_of(sn)
    }

    /// The view of this snapshot record, as [`Qcow2::snapshot_view`] gives it.
    /// A corrupt table can hold two records with one ID; walking the table and
    /// asking by record, not by ID, keeps each record its own.
    pub fn view_of(&self, sn: Snapshot) -> Result<View> {
        let l1 = self.snapshot_l1(&sn)?;
        Ok(View {
            l1: Arc::new(l1),
            l1_offset: sn.l1_table_offset,
            size: sn.effective_disk_size(self.header.size),
            snapshot: Some(sn),
        })
    }

    /// The view `qemu-img convert -l` and `qemu-nbd -l` read: the snapshot's L1
    /// table, but the disk keeps the *active* size (`bdrv_snapshot_load_tmp`
    /// changes only the L1 table). Past the snapshot's own L1 the disk reads as
    /// unallocated, so it falls through to the backing file or reads zeros.
    pub fn snapshot_view_loaded(&self, id_or_name: &str) -> Result<View> {
        let mut v = self.snapshot_view(id_or_name)?;
        v.size = self.header.size;
        Ok(v)
    }

    /// Read and decode the L2 table at `offset` (one cluster; zeros past EOF, as QEMU).
    pub fn l2_table(&self, offset: HostOffset) -> Result<Arc<Vec<L2Entry>>> {
        if let Ok(cache) = self.l2_cache.lock()
            && let Some(t) = cache.get(&offset.0)
        {
            return Ok(t.clone());
        }
        let geo = self.geometry();
        let mut buf = vec![0u8; geo.cluster_size() as usize];
        read_into(self.src.as_ref(), "L2 table", offset, &mut buf)?;
        let t = Arc::new(tables::decode_l2(&buf, &geo));
        if let Ok(mut cache) = self.l2_cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(offset.0, t.clone());
        }
        Ok(t)
    }

    /// The refcount table (at most 8 MiB; zeros past EOF).
    pub fn refcount_table(&self) -> Result<Arc<Vec<RefTableEntry>>> {
        if let Ok(g) = self.reftable.lock()
            && let Some(t) = g.as_ref()
        {
            return Ok(t.clone());
        }
        let cs = self.geometry().cluster_size();
        let bytes = u64::from(self.header.refcount_table_clusters)
            .saturating_mul(cs)
            .min(refcount::MAX_REFTABLE_BYTES);
        let mut buf = vec![0u8; bytes as usize];
        read_into(
            self.src.as_ref(),
            "refcount table",
            self.header.refcount_table_offset,
            &mut buf,
        )?;
        let t = Arc::new(
            buf.chunks_exact(8)
                .map(|c| RefTableEntry(crate::bytes::be64(c, 0)))
                .collect::<Vec<_>>(),
        );
        if let Ok(mut g) = self.reftable.lock() {
            *g = Some(t.clone());
        }
        Ok(t)
    }

    /// The raw bytes of the refcount block at `offset` (one cluster; zeros past EOF).
    pub fn refcount_block(&self, offset: HostOffset) -> Result<Arc<Vec<u8>>> {
        if let Ok(cache) = self.refblock_cache.lock()
            && let Some(b) = cache.get(&offset.0)
        {
            return Ok(b.clone());
        }
        let mut buf = vec![0u8; self.geometry().cluster_size() as usize];
        read_into(self.src.as_ref(), "refcount block", offset, &mut buf)?;
        let b = Arc::new(buf);
        if let Ok(mut cache) = self.refblock_cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(offset.0, b.clone());
        }
        Ok(b)
    }

    /// The stored refcount of a host cluster (0 where the table has no block).
    pub fn refcount(&self, cluster: HostCluster) -> Result<u64> {
        let rg = self.refcount_geometry();
        let table = self.refcount_table()?;
        let Some(entry) = usize::try_from(rg.table_index(cluster))
            .ok()
            .and_then(|i| table.get(i))
        else {
            return Ok(0);
        };
        let Some(block) = entry.block_offset() else {
            return Ok(0);
        };
        if !self.geometry().is_cluster_aligned(block.0) {
            return Err(Error::corrupt(
                CorruptKind::RefcountTableEntry,
                self.header
                    .refcount_table_offset
                    .saturating_entry(rg.table_index(cluster), 8),
                format!("refcount block offset {block} is not cluster-aligned"),
            ));
        }
        let b = self.refcount_block(block)?;
        Ok(refcount::get_refcount(
            &b,
            rg.order,
            rg.block_index(cluster),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)] // Test fixtures build images with plain arithmetic.
mod tests;

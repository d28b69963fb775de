//! The snapshot table and the snapshot operations built on the refcount walk:
//! create, delete and apply (`qcow2-snapshot.c`).

use super::Sim;
use super::SimError;
use super::SimResult;
use super::SimSnapshot;
use super::alloc::Discard;
use super::change::Target;
use crate::header::Field;
use crate::tables::L1Entry;

impl Sim {
    // ---- snapshot table --------------------------------------------------------

    /// QEMU's `qcow2_write_snapshots`: a new table, then the header, then free the old.
    pub(super) fn write_snapshots(&mut self) -> SimResult<()> {
        let mut size = 0u64;
        for s in &self.snapshots {
            // Saturating: a sum past 64 MiB is refused just below anyway.
            size = crate::bytes::align8(size)
                .saturating_add(40)
                .saturating_add(u64::from(s.extra_data_size.max(24)))
                .saturating_add(s.id.len() as u64)
                .saturating_add(s.name.len() as u64);
        }
        if size > crate::snapshot::MAX_TABLE_BYTES {
            return Err(SimError::Qemu(
                "the snapshot table would exceed 64 MiB (EFBIG)".into(),
            ));
        }
        let off = if size > 0 {
            self.alloc_clusters(size, "the new snapshot table")?
        } else {
            // qcow2_alloc_clusters(0) counts nothing and returns the free-cluster
            // hint as it stands.
            self.cluster_start(self.free_cluster_index)
        };
        let mut buf = Vec::with_capacity(size as usize);
        for s in &self.snapshots {
            while buf.len() % 8 != 0 {
                buf.push(0);
            }
            buf.extend_from_slice(&s.l1_table_offset.get().to_be_bytes());
            buf.extend_from_slice(&s.l1_size.to_be_bytes());
            buf.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
            buf.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
            buf.extend_from_slice(&s.date_sec.to_be_bytes());
            buf.extend_from_slice(&s.date_nsec.to_be_bytes());
            buf.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
            let small = if s.vm_state_size <= 0xffff_ffff {
                s.vm_state_size as u32
            } else {
                0
            };
            buf.extend_from_slice(&small.to_be_bytes());
            buf.extend_from_slice(&s.extra_data_size.max(24).to_be_bytes());
            buf.extend_from_slice(&s.vm_state_size.to_be_bytes());
            buf.extend_from_slice(&s.disk_size.to_be_bytes());
            buf.extend_from_slice(&s.icount.to_be_bytes());
            if s.extra_data_size > 24 {
                buf.extend_from_slice(&s.unknown_extra);
            }
            buf.extend_from_slice(s.id.as_bytes());
            buf.extend_from_slice(s.name.as_bytes());
        }
        if !buf.is_empty() {
            // Stopped, the clusters stay allocated, but nothing was written
            // to them: the file does not grow.
            self.overlap_check(None, off, buf.len() as u64)?;
            self.write_bytes(off, &buf)?;
        }
        self.record(
            Target::SnapshotTable {
                offset: off,
                size,
                entries: self.snapshots.len() as u64,
            },
            0,
            0,
        );
        let (old_off, old_size) = (self.snapshots_offset, self.snapshots_size);
        self.why("the header points at the new snapshot table");
        self.set_header(Field::NbSnapshots, self.snapshots.len() as u64)?;
        self.set_header(Field::SnapshotsOffset, off)?;
        self.snapshots_offset = off;
        self.snapshots_size = size;
        if old_size > 0 {
            self.free_clusters(
                old_off,
                old_size,
                "the old snapshot table",
                Discard::Snapshot,
            );
        }
        Ok(())
    }

    pub(super) fn find_snapshot(&self, id_or_name: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
    }

    pub(super) fn check_snapshot_l1(&self, sn: &SimSnapshot) -> SimResult<()> {
        if u64::from(sn.l1_size) > crate::tables::MAX_L1_ENTRIES {
            return Err(SimError::Qemu("Snapshot L1 table too large (EFBIG)".into()));
        }
        if !sn.l1_table_offset.is_multiple_of(self.cs) {
            return Err(SimError::Qemu(
                "Snapshot L1 table offset invalid (EINVAL)".into(),
            ));
        }
        Ok(())
    }

    // ---- operations --------------------------------------------------------------

    pub(super) fn snapshot_create(&mut self, name: &str) -> SimResult<()> {
        if self.snapshots.len() as u64 >= crate::snapshot::MAX_SNAPSHOTS {
            return Err(SimError::Qemu(
                "the image already has 65536 snapshots (EFBIG)".into(),
            ));
        }
        if self.has_data_file {
            return Err(SimError::Qemu(
                "snapshots are not supported with an external data file (ENOTSUP)".into(),
            ));
        }
        let id_max = self
            .snapshots
            .iter()
            .map(|s| s.id.trim().parse::<u64>().unwrap_or(0))
            .max()
            .unwrap_or(0);
        let l1_size = self.l1.len() as u64;
        self.why("snapshot-create");
        let l1_bytes = l1_size.saturating_mul(8);
        let l1_off =
            self.alloc_clusters(l1_bytes, &format!("the L1 table of snapshot '{name}'"))?;
        let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.overlap_check(None, l1_off, l1_bytes)?;
        self.write_bytes(l1_off, &bytes)?;
        self.why("the active L1 table is copied as it is, COPIED flags included");
        self.record(
            Target::Copy {
                from: format!("active L1 at {:#x}", self.l1_table_offset),
                to: l1_off,
                length: l1_bytes,
            },
            0,
            0,
        );
        self.note("every L2 table and data cluster the active L1 reaches becomes shared with the new snapshot: +1 each".into());
        self.update_snapshot_refcount(self.l1_table_offset, l1_size, 1)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.snapshots.push(SimSnapshot {
            // QEMU's find_new_snapshot_id: id_max + 1 in an unsigned long, which wraps.
            id: id_max.wrapping_add(1).to_string(),
            name: name.to_string(),
            l1_table_offset: l1_off,
            l1_size: l1_size as u32,
            vm_state_size: 0,
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_micros().saturating_mul(1000),
            vm_clock_nsec: 0,
            disk_size: self.disk_end(),
            icount: 0,
            extra_data_size: 24,
            unknown_extra: Vec::new(),
        });
        self.why("snapshot-create: the snapshot table gets the new entry");
        if let Err(e) = self.write_snapshots() {
            self.snapshots.pop();
            return Err(e);
        }
        Ok(())
    }

    pub(super) fn snapshot_delete(&mut self, id_or_name: &str, by_id: bool) -> SimResult<()> {
        if self.has_data_file {
            return Err(SimError::Qemu(
                "snapshots are not supported with an external data file (ENOTSUP)".into(),
            ));
        }
        // qemu-img snapshot -d looks the snapshot up by name only
        // (bdrv_snapshot_find), the first match, and so does HMP's delvm;
        // QMP's blockdev-snapshot-delete-internal-sync takes an ID
        // (`snapshot-delete-id`).
        let i = if by_id {
            self.snapshots.iter().position(|s| s.id == id_or_name)
        } else {
            self.snapshots.iter().position(|s| s.name == id_or_name)
        };
        let Some(i) = i else {
            let hint = match self.snapshots.iter().find(|s| !by_id && s.id == id_or_name) {
                Some(s) => format!(
                    " ('{id_or_name}' is the ID of snapshot '{}': qemu-img snapshot -d matches names only; snapshot-delete-id:{id_or_name} models QMP's blockdev-snapshot-delete-internal-sync by ID)",
                    s.name
                ),
                None => String::new(),
            };
            return Err(SimError::Qemu(if by_id {
                // QEMU goes on "on device 'NAME'", the VM's name for the drive.
                format!("Snapshot with id '{id_or_name}' and name 'null' does not exist")
            } else {
                format!("Could not delete snapshot '{id_or_name}': snapshot not found{hint}")
            }));
        };
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| SimError::Qemu("no snapshot".into()))?;
        self.check_snapshot_l1(&sn)?;
        let label = format!("snapshot {} '{}' L1", sn.id, sn.name);
        self.snapshots.remove(i);
        self.why("snapshot-delete: the snapshot table without the entry");
        self.write_snapshots()?;
        self.note(format!(
            "everything the {label} reaches loses one reference: -1 each"
        ));
        // The label of the walk: the snapshot is no longer in the list. It
        // comes back with no L1 entries, since QEMU's overlap check no
        // longer knows its L1 table either.
        self.snapshots.push(SimSnapshot {
            l1_size: 0,
            ..sn.clone()
        });
        let r = self.update_snapshot_refcount(sn.l1_table_offset, u64::from(sn.l1_size), -1);
        self.snapshots.pop();
        r.map_err(|e| match e {
            SimError::Qemu(m) => SimError::Qemu(format!("{}{m}", super::ops::FREE_FAILED)),
            other => other,
        })?;
        self.free_clusters(
            sn.l1_table_offset,
            u64::from(sn.l1_size) * 8,
            &format!("the {label} table"),
            Discard::Snapshot,
        );
        self.note(
            "addend 0 over the active L1: no refcount changes, COPIED flags recomputed".into(),
        );
        self.update_snapshot_refcount(self.l1_table_offset, self.l1.len() as u64, 0)
    }

    pub(super) fn snapshot_apply(&mut self, id_or_name: &str) -> SimResult<()> {
        if self.has_bitmaps() {
            // bdrv_snapshot_goto refuses before looking the snapshot up.
            return Err(SimError::Qemu(format!(
                "Could not apply snapshot '{id_or_name}': Device has active dirty bitmaps"
            )));
        }
        if self.has_data_file {
            return Err(SimError::Qemu(
                "snapshots are not supported with an external data file (ENOTSUP)".into(),
            ));
        }
        let Some(i) = self.find_snapshot(id_or_name) else {
            return Err(SimError::Qemu(format!(
                "Could not apply snapshot '{id_or_name}': Failed to load snapshot: No such file or directory"
            )));
        };
        let sn = self
            .snapshots
            .get(i)
            .cloned()
            .ok_or_else(|| SimError::Qemu("no snapshot".into()))?;
        self.check_snapshot_l1(&sn)?;
        if sn.disk_size != self.disk_end() {
            self.note(format!(
                "the snapshot's disk is {} bytes, the current one {}: QEMU resizes the disk first",
                sn.disk_size, self.size
            ));
            self.truncate(sn.disk_size)?;
        }
        if u64::from(sn.l1_size) > self.l1.len() as u64 {
            self.why("the snapshot's L1 table is larger than the active one");
            self.grow_l1_table(u64::from(sn.l1_size), true)?;
        }
        let cur_len = self.l1.len() as u64;
        let cur_bytes = cur_len.saturating_mul(8);
        let mut buffer = self.read_bytes(sn.l1_table_offset, u64::from(sn.l1_size) * 8);
        buffer.resize(cur_bytes as usize, 0);
        self.note(format!(
            "everything snapshot {} '{}' reaches gains a reference: +1 each",
            sn.id, sn.name
        ));
        self.update_snapshot_refcount(sn.l1_table_offset, u64::from(sn.l1_size), 1)?;
        let active_off = self.l1_table_offset;
        self.why(
            "snapshot-apply: the snapshot's L1 (as read before the walk) replaces the active L1",
        );
        // The write over the active L1 table goes through the overlap
        // check, the active L1 aside: the table may also be an active L2
        // table, or lie on other metadata.
        self.overlap_check(Some(super::overlap::Meta::ActiveL1), active_off, cur_bytes)?;
        let old: Vec<u8> = self.read_bytes(active_off, cur_bytes);
        self.write_bytes(active_off, &buffer)?;
        for k in 0..cur_len {
            let at = k.saturating_mul(8) as usize;
            let b = crate::bytes::be64(&old, at);
            let a = crate::bytes::be64(&buffer, at);
            if a != b {
                self.record(
                    Target::L1Entry {
                        table: "active L1".into(),
                        table_offset: active_off,
                        index: k,
                        snapshot: None,
                    },
                    b,
                    a,
                );
            }
        }
        self.note("everything the old active L1 reached loses one reference: -1 each".into());
        let r = self.update_snapshot_refcount(active_off, cur_len, -1);
        self.l1 = buffer
            .chunks_exact(8)
            .map(|c| L1Entry(crate::bytes::be64(c, 0)))
            .collect();
        r?;
        self.note("addend 0 over the new active L1: COPIED flags recomputed".into());
        self.update_snapshot_refcount(active_off, cur_len, 0)
    }
}

impl SimSnapshot {
    /// The snapshots of `img`, as the simulator keeps them.
    pub(super) fn from_image(img: &crate::image::Qcow2) -> Vec<SimSnapshot> {
        let h = &img.header;
        img.snapshots
            .snapshots
            .iter()
            .map(|s| SimSnapshot {
                id: s.id.clone(),
                name: s.name.clone(),
                l1_table_offset: s.l1_table_offset,
                l1_size: s.l1_size,
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec,
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                disk_size: s.effective_disk_size(h.size & !511),
                icount: s.icount.unwrap_or(u64::MAX),
                extra_data_size: s.extra_data_size,
                unknown_extra: s.unknown_extra.clone(),
            })
            .collect()
    }
}

//! QEMU's L2 table cache as one operation uses it (`qcow2-cache.c`, the
//! `l2_table_cache`): [`Sim::l2_cache_entries`] entries of one slice each
//! ([`Sim::slice_entries`] entries of a table, a whole table unless the
//! cache cannot cover the disk). Every look at an L2 entry takes its slice
//! from the cache (`qcow2_cache_get`) and puts it back
//! (`qcow2_cache_put`), which stamps it with the next number of the cache's
//! counter; a slice not in the cache takes the place of the entry with the
//! lowest stamp that nobody holds (an entry never used has stamp 0, so the
//! empty ones go first), and that entry, if it was changed, is written back
//! first: after the refcount cache, when the L2 cache depends on it (linked
//! write entries, [`super::cache`]). A whole write-back
//! (`qcow2_cache_flush`) leaves every slice clean where it is; a cluster
//! whose refcount drops to 0 takes the slice at its start out of the cache
//! unwritten (`qcow2_cache_discard`, from `update_refcount`).
//!
//! Which empty entry a slice takes (QEMU's scan starts at an index derived
//! from the slice's offset) changes nothing that is written, so the model
//! keeps slices by offset only.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::super::Sim;
use crate::types::HostOffset;

/// QEMU's default L2 cache limit (`DEFAULT_L2_CACHE_MAX_SIZE`).
const L2_CACHE_MAX: u64 = 32 << 20;

/// One cached slice.
#[derive(Clone, Copy, Debug)]
struct Slot {
    /// Its stamp: the counter when it was last put back (until then, the
    /// stamp of the entry it replaced).
    stamp: u64,
    /// Gets not yet put back: such an entry is never replaced.
    refs: u32,
}

/// QEMU's L2 cache, for one operation (the cache starts empty at the open).
#[derive(Debug, Default)]
pub(in crate::analysis::simulate) struct L2Cache {
    /// Entries of the cache.
    capacity: usize,
    /// The cached slices, by their offset in the file.
    slots: HashMap<u64, Slot>,
    /// Every cached slice by (stamp, offset): the first one nobody holds
    /// is the one to replace.
    order: BTreeSet<(u64, u64)>,
    /// The slices changed since they were read or last written back.
    dirty: HashSet<u64>,
    counter: u64,
}

impl L2Cache {
    /// An empty cache of `capacity` slices (at least one).
    pub(in crate::analysis::simulate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            ..Self::default()
        }
    }

    /// `qcow2_cache_get` of the slice at `slice`: the slice it replaced,
    /// when that one was changed and so written back first.
    pub(in crate::analysis::simulate) fn get(&mut self, slice: u64) -> Option<u64> {
        if let Some(s) = self.slots.get_mut(&slice) {
            s.refs = s.refs.saturating_add(1);
            return None;
        }
        let mut stamp = 0;
        let mut written = None;
        if self.slots.len() >= self.capacity {
            let slots = &self.slots;
            let victim = self
                .order
                .iter()
                .find(|(_, o)| slots.get(o).is_some_and(|s| s.refs == 0))
                .copied();
            // Every entry held cannot happen: QEMU aborts there, and no
            // operation holds more than two slices at once.
            if let Some((st, v)) = victim {
                self.order.remove(&(st, v));
                self.slots.remove(&v);
                if self.dirty.remove(&v) {
                    written = Some(v);
                }
                stamp = st;
            }
        }
        self.slots.insert(slice, Slot { stamp, refs: 1 });
        self.order.insert((stamp, slice));
        written
    }

    /// `qcow2_cache_put` of the slice at `slice`, changed (`dirty`, which
    /// QEMU marks while it holds the slice) or not.
    pub(in crate::analysis::simulate) fn put(&mut self, slice: u64, dirty: bool) {
        let Some(s) = self.slots.get_mut(&slice) else {
            return;
        };
        if dirty {
            self.dirty.insert(slice);
        }
        s.refs = s.refs.saturating_sub(1);
        if s.refs == 0 {
            self.order.remove(&(s.stamp, slice));
            self.counter = self.counter.saturating_add(1);
            s.stamp = self.counter;
            self.order.insert((s.stamp, slice));
        }
    }

    /// The slice at `slice`, which QEMU holds, is changed; false when it
    /// is not in the cache.
    pub(in crate::analysis::simulate) fn mark_dirty(&mut self, slice: u64) -> bool {
        if !self.slots.contains_key(&slice) {
            return false;
        }
        self.dirty.insert(slice);
        true
    }

    /// The whole cache is written back: every slice clean, in its place.
    pub(in crate::analysis::simulate) fn flushed(&mut self) {
        self.dirty.clear();
    }

    /// Whether some slice holds changes not yet written back.
    pub(in crate::analysis::simulate) fn any_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// `qcow2_cache_discard` of the slice at `slice`, if cached: gone,
    /// its changes unwritten.
    pub(in crate::analysis::simulate) fn discard(&mut self, slice: u64) {
        if let Some(s) = self.slots.get(&slice)
            && s.refs == 0
        {
            self.order.remove(&(s.stamp, slice));
            self.slots.remove(&slice);
            self.dirty.remove(&slice);
        }
    }
}

impl Sim {
    /// Entries per L2 cache slice: a whole table, unless QEMU's default 32 MiB L2
    /// cache cannot cover the disk; then slices of a cluster or 4 KiB,
    /// whichever is smaller.
    pub(in crate::analysis::simulate) fn slice_entries(&self) -> u64 {
        let per_table = self.geo.l2_entries();
        if self.l2_cache_needed() > L2_CACHE_MAX {
            self.cs
                .min(4096)
                .checked_div(self.geo.l2_entry_size())
                .unwrap_or(per_table)
                .min(per_table)
        } else {
            per_table
        }
    }

    /// What QEMU's L2 cache would need to cover the whole disk
    /// (`read_cache_sizes`: one entry, 8 or 16 bytes, per guest cluster,
    /// rounded up to whole clusters).
    fn l2_cache_needed(&self) -> u64 {
        self.size
            .div_ceil(self.cs)
            .saturating_mul(self.geo.l2_entry_size())
            .div_ceil(self.cs)
            .saturating_mul(self.cs)
    }

    /// The L2 cache entries (slices) QEMU gives this image: what the disk
    /// needs, up to the 32 MiB default, and at least two.
    pub(in crate::analysis::simulate) fn l2_cache_entries(&self) -> u64 {
        self.l2_cache_needed()
            .min(L2_CACHE_MAX)
            .checked_div(
                self.slice_entries()
                    .saturating_mul(self.geo.l2_entry_size()),
            )
            .unwrap_or(0)
            .max(2)
    }

    /// The offset of the slice holding entry `index` of the L2 table at
    /// `l2`, QEMU's key for it in its L2 cache.
    pub(in crate::analysis::simulate) fn slice_key(&self, l2: HostOffset, index: u64) -> u64 {
        self.slice_of(l2, index).0.get()
    }

    /// `qcow2_cache_get` of the slice of entry `index` of the L2 table at
    /// `l2` (held until [`Sim::l2_slice_put`]).
    pub(in crate::analysis::simulate) fn l2_slice_get(&mut self, l2: HostOffset, index: u64) {
        if !self.unflushed.on {
            return;
        }
        let slice = self.slice_key(l2, index);
        if let Some(v) = self.unflushed.l2c.get(slice) {
            self.l2_slice_evicted(v);
        }
    }

    /// `qcow2_cache_put` of that slice, changed (`dirty`) or not.
    pub(in crate::analysis::simulate) fn l2_slice_put(
        &mut self,
        l2: HostOffset,
        index: u64,
        dirty: bool,
    ) {
        if !self.unflushed.on {
            return;
        }
        let slice = self.slice_key(l2, index);
        self.unflushed.l2c.put(slice, dirty);
    }

    /// A look at entry `index` of the L2 table at `l2` through QEMU's L2
    /// cache (get, then put), changing it (`dirty`) or not.
    pub(in crate::analysis::simulate) fn l2_slice_used(
        &mut self,
        l2: HostOffset,
        index: u64,
        dirty: bool,
    ) {
        self.l2_slice_get(l2, index);
        self.l2_slice_put(l2, index, dirty);
    }

    /// Entry `index` of the table at `l2` changes in the slice QEMU holds
    /// (looked at through the cache if, unexpectedly, it is not there).
    pub(in crate::analysis::simulate) fn l2_slice_changed(&mut self, l2: HostOffset, index: u64) {
        if !self.unflushed.on {
            return;
        }
        let slice = self.slice_key(l2, index);
        if !self.unflushed.l2c.mark_dirty(slice) {
            self.l2_slice_used(l2, index, true);
        }
    }

    /// The changed slice at `slice` is written back to make room: the
    /// refcount cache first if the L2 cache depends on it; a slice whose
    /// write-back the overlap check stops stops the operation there.
    fn l2_slice_evicted(&mut self, slice: u64) {
        let step = self.steps.len();
        self.unflushed.rc.l2_flushed(true, step);
        let held = self.held_l2.as_ref().is_some_and(|h| {
            h.iter()
                .any(|&(l2, index, ..)| self.slice_key(l2, index) == slice)
        });
        if held {
            self.unflushed.evicted_held.get_or_insert(slice);
        }
        self.unflushed.slice_written(slice);
    }

    /// Cluster `c`'s refcount dropped to 0: QEMU drops a cached L2 slice
    /// at its start.
    pub(in crate::analysis::simulate) fn l2_cluster_freed(&mut self, c: u64) {
        if !self.unflushed.on {
            return;
        }
        let at = c.saturating_mul(self.cs);
        self.unflushed.l2c.discard(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_put_slice_goes_and_a_changed_one_is_written_back() {
        let mut c = L2Cache::new(2);
        assert_eq!(c.get(10), None);
        c.put(10, true);
        assert_eq!(c.get(20), None);
        c.put(20, false);
        // 10 is older: it goes, written back.
        assert_eq!(c.get(30), Some(10));
        c.put(30, false);
        // 20 goes next, clean: nothing written; 30, used again, stays.
        assert_eq!(c.get(30), None);
        c.put(30, false);
        assert_eq!(c.get(40), None);
        c.put(40, true);
        assert_eq!(c.get(50), None);
        c.put(50, false);
        assert_eq!(c.get(60), Some(40));
    }

    #[test]
    fn a_held_slice_is_not_replaced_and_a_flush_cleans_all() {
        let mut c = L2Cache::new(2);
        c.get(1);
        c.put(1, true);
        // Slice 2 is held while 3 is fetched: 1 goes although 2 still has
        // the stamp 0 of the empty entry it took.
        c.get(2);
        assert_eq!(c.get(3), Some(1));
        c.put(3, true);
        c.put(2, true);
        assert!(c.any_dirty());
        c.flushed();
        assert!(!c.any_dirty());
        assert_eq!(c.get(4), None);
        c.put(4, true);
        // A freed table's slice leaves unwritten, making room.
        c.discard(4);
        assert!(!c.any_dirty());
        assert_eq!(c.get(5), None);
    }
}

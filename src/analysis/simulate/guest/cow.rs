//! What copy-on-write fills in around a guest write's new clusters
//! (`calculate_l2_meta`'s COW region, `perform_cow`), and the record of
//! where those bytes come from.

use super::super::Sim;
use super::super::change::Target;
use crate::tables::ClusterType;
use crate::tables::L2Entry;
use crate::tables::SubclusterType;
use crate::types::{GuestOffset, HostOffset};

impl Sim {
    /// The copy-on-write region `[from, to)` relative to the first cluster
    /// (`calculate_l2_meta` with keep_old = false).
    pub(super) fn cow_range(
        &mut self,
        l2: HostOffset,
        l2_index: u64,
        n: u64,
        in_c: u64,
        bytes: u64,
    ) -> (u64, u64) {
        let cs = self.cs;
        let sc_bits = self.geo.subcluster_bits();
        let scs = self.geo.subcluster_size();
        let (r, bm) = self.l2_entry_at(l2, l2_index);
        let first = L2Entry { raw: r, bitmap: bm }.subcluster_type(
            &self.geo,
            self.has_data_file,
            (in_c >> sc_bits) as u32,
        );
        let from = match first {
            SubclusterType::Compressed => 0,
            SubclusterType::Normal
            | SubclusterType::ZeroAlloc
            | SubclusterType::UnallocatedAlloc => {
                if self.geo.extended_l2 {
                    let alloc = (bm & 0xffff_ffff) as u32;
                    u64::from((in_c >> sc_bits) as u32).min(u64::from(alloc.trailing_zeros()))
                        << sc_bits
                } else {
                    0
                }
            }
            _ => (in_c >> sc_bits) << sc_bits,
        };
        // bytes >= 1 and n >= 1 (write() never asks for less).
        let end_in = in_c.saturating_add(bytes);
        let last_i = l2_index.saturating_add(n.saturating_sub(1));
        let (r, bm) = self.l2_entry_at(l2, last_i);
        let sc_last = (self.within(end_in.saturating_sub(1)) >> sc_bits) as u32;
        let last =
            L2Entry { raw: r, bitmap: bm }.subcluster_type(&self.geo, self.has_data_file, sc_last);
        let full = end_in.div_ceil(cs).saturating_mul(cs);
        let to = match last {
            SubclusterType::Compressed => full,
            SubclusterType::Normal
            | SubclusterType::ZeroAlloc
            | SubclusterType::UnallocatedAlloc => {
                if self.geo.extended_l2 {
                    let alloc = (bm & 0xffff_ffff) as u32;
                    // sc_last < 32, so skip <= 31 - sc_last: full stays above end_in.
                    let skip = u64::from(31u32.saturating_sub(sc_last).min(alloc.leading_zeros()));
                    full.saturating_sub(skip << sc_bits)
                } else {
                    full
                }
            }
            _ => end_in.div_ceil(scs).saturating_mul(scs),
        };
        (from, to)
    }

    /// Say what the copy-on-write reads to fill the rest of the new clusters.
    pub(super) fn cow_notes(
        &mut self,
        l2: HostOffset,
        l2_index: u64,
        n: u64,
        pos: GuestOffset,
        bytes: u64,
        host: HostOffset,
    ) {
        let in_c = self.within(pos);
        let (from, to) = self.cow_range(l2, l2_index, n, in_c, bytes);
        let guest0 = self.guest_cluster_start(pos);
        let (r, _) = self.l2_entry_at(l2, l2_index);
        let source = |me: &Self, raw: u64| -> String {
            match (L2Entry { raw, bitmap: 0 }).cluster_type(&me.geo, me.has_data_file) {
                ClusterType::Normal => format!(
                    "the old cluster at {:#x}",
                    L2Entry::from_word(raw).host_offset().0
                ),
                ClusterType::Compressed => "the decompressed old cluster".to_string(),
                ClusterType::ZeroAlloc | ClusterType::ZeroPlain => {
                    "zeros (zero cluster)".to_string()
                }
                ClusterType::Unallocated => {
                    if me.backing.is_some() {
                        "the backing file".to_string()
                    } else if me.backing_named {
                        "the backing file, which qinspect could not open (the bytes copied are not known)".to_string()
                    } else {
                        "zeros (unallocated, no backing file)".to_string()
                    }
                }
            }
        };
        if from < in_c {
            let src = source(self, r);
            self.why(format!("copy-on-write head, read from {src}"));
            self.record(
                Target::Copy {
                    from: format!("guest {:#x}", guest0.saturating_add(from)),
                    to: host.saturating_add(from),
                    length: in_c.saturating_sub(from),
                },
                0,
                0,
            );
        }
        let end_in = in_c.saturating_add(bytes);
        if to > end_in {
            let last_i = l2_index.saturating_add(n.saturating_sub(1));
            let (r_last, _) = self.l2_entry_at(l2, last_i);
            let src = source(self, r_last);
            self.why(format!("copy-on-write tail, read from {src}"));
            self.record(
                Target::Copy {
                    from: format!("guest {:#x}", guest0.saturating_add(end_in)),
                    to: host.saturating_add(end_in),
                    length: to.saturating_sub(end_in),
                },
                0,
                0,
            );
        }
        self.why("the guest's new data");
        self.record(
            Target::Copy {
                from: "the guest".into(),
                to: host.saturating_add(in_c),
                length: bytes,
            },
            0,
            0,
        );
    }
}

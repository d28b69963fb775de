//! Test support: small qcow2 images built in memory, byte by byte, so the core's
//! unit tests need neither qemu-img nor files.
//!
//! [`ImageBuilder`] lays out a version 3 image with one refcount block and one L2
//! table:
//!
//! ```text
//! cluster 0 header | 1 refcount table | 2 refcount block (16-bit) | 3 L1 table
//! cluster 4 the L2 table behind L1[0] | 5.. clusters added with `cluster`
//! ```
//!
//! Every cluster in use has refcount 1, so a builder image checks clean unless a
//! test sets entries that say otherwise. The integration tests keep comparing with
//! QEMU; these tests pin the core's own decisions on inputs QEMU would never write.

// Test-only code, working on values it made itself.
#![allow(
    clippy::arithmetic_side_effects,
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used
)]

use crate::chain::{Chain, OpenOptions};
use crate::header::{Field, INCOMPAT_EXTL2, QCOW2_MAGIC, V3_MIN_HEADER_LEN};
use crate::image::{Qcow2, Strictness};
use crate::io::MemSource;
use crate::types::{Geometry, HostOffset};
use std::path::Path;
use std::sync::Arc;

/// Where the builder puts its metadata, in clusters.
const REFTABLE: u64 = 1;
const REFBLOCK: u64 = 2;
const L1: u64 = 3;
const L2: u64 = 4;
const FIRST_DATA: u64 = 5;

/// A qcow2 image under construction (see the module doc for its layout).
#[derive(Clone, Debug)]
pub(crate) struct ImageBuilder {
    geo: Geometry,
    size: u64,
    /// L2 entries of the table behind L1[0]: (word, bitmap).
    l2: Vec<(u64, u64)>,
    /// Clusters after the metadata, in order, each `cluster_size` bytes.
    clusters: Vec<Vec<u8>>,
    /// The raw L1[0]; `None` means "the builder's L2 table, COPIED".
    l1_0: Option<u64>,
}

impl ImageBuilder {
    /// An image of `size` guest bytes with clusters of `2^cluster_bits` bytes; the
    /// size must fit one L2 table.
    pub(crate) fn new(cluster_bits: u32, size: u64) -> Self {
        let geo = Geometry::new(cluster_bits, false);
        assert!(size <= geo.l2_coverage(), "the builder has one L2 table");
        ImageBuilder {
            geo,
            size,
            l2: vec![(0, 0); geo.l2_entries() as usize],
            clusters: Vec::new(),
            l1_0: None,
        }
    }

    /// Use extended L2 entries (16 bytes, 32 subclusters; cluster_bits ≥ 14).
    pub(crate) fn extended_l2(mut self) -> Self {
        self.geo = Geometry::new(self.geo.cluster_bits, true);
        self.l2 = vec![(0, 0); self.geo.l2_entries() as usize];
        self
    }

    /// The image's geometry.
    pub(crate) fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Append a cluster holding `bytes` (zero-padded to the cluster size) and
    /// return its host offset.
    pub(crate) fn cluster(&mut self, bytes: &[u8]) -> HostOffset {
        let cs = self.geo.cluster_size() as usize;
        let mut c = bytes.to_vec();
        c.resize(cs, 0);
        let n = FIRST_DATA + self.clusters.len() as u64;
        self.clusters.push(c);
        HostOffset(self.geo.cluster_start(n))
    }

    /// Set entry `index` of the L2 table (the bitmap is used with extended L2 only).
    pub(crate) fn l2(mut self, index: usize, word: u64, bitmap: u64) -> Self {
        self.l2[index] = (word, bitmap);
        self
    }

    /// Store `raw` as L1[0] instead of the builder's own L2 table.
    pub(crate) fn l1_0(mut self, raw: u64) -> Self {
        self.l1_0 = Some(raw);
        self
    }

    /// The image file's bytes.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let cs = self.geo.cluster_size();
        let at = |c: u64| (c * cs) as usize;
        let clusters = FIRST_DATA + self.clusters.len() as u64;
        let mut b = vec![0u8; at(clusters)];
        let mut put = |off: u64, f: Field, v: u64| {
            let o = (off + f.offset()) as usize;
            let s = f.size() as usize;
            b[o..o + s].copy_from_slice(&v.to_be_bytes()[8 - s..]);
        };
        let l1_size = self.geo.l1_entries_for(self.size).max(1);
        put(0, Field::Magic, u64::from(QCOW2_MAGIC));
        put(0, Field::Version, 3);
        put(0, Field::ClusterBits, u64::from(self.geo.cluster_bits));
        put(0, Field::Size, self.size);
        put(0, Field::L1Size, l1_size);
        put(0, Field::L1TableOffset, self.geo.cluster_start(L1));
        put(
            0,
            Field::RefcountTableOffset,
            self.geo.cluster_start(REFTABLE),
        );
        put(0, Field::RefcountTableClusters, 1);
        if self.geo.extended_l2 {
            put(0, Field::IncompatibleFeatures, INCOMPAT_EXTL2);
        }
        put(0, Field::RefcountOrder, 4);
        put(0, Field::HeaderLength, u64::from(V3_MIN_HEADER_LEN));
        let word = |b: &mut Vec<u8>, off: usize, v: u64| {
            b[off..off + 8].copy_from_slice(&v.to_be_bytes());
        };
        word(&mut b, at(REFTABLE), self.geo.cluster_start(REFBLOCK));
        for c in 0..clusters {
            let o = at(REFBLOCK) + 2 * c as usize;
            b[o..o + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        let l1_0 = self
            .l1_0
            .unwrap_or(crate::tables::OFLAG_COPIED | self.geo.cluster_start(L2));
        word(&mut b, at(L1), l1_0);
        let esize = self.geo.l2_entry_size() as usize;
        for (j, &(w, bitmap)) in self.l2.iter().enumerate() {
            word(&mut b, at(L2) + j * esize, w);
            if self.geo.extended_l2 {
                word(&mut b, at(L2) + j * esize + 8, bitmap);
            }
        }
        for (i, c) in self.clusters.iter().enumerate() {
            let o = at(FIRST_DATA + i as u64);
            b[o..o + c.len()].copy_from_slice(c);
        }
        b
    }

    /// Open the image as QEMU would (strict).
    pub(crate) fn open(&self) -> Qcow2 {
        let src = Arc::new(MemSource::new("built.qcow2", self.bytes()));
        Qcow2::open(src, Strictness::Qemu).expect("a builder image opens")
    }

    /// The image as a one-layer chain.
    pub(crate) fn chain(&self) -> Chain {
        layer(
            Arc::new(MemSource::new("built.qcow2", self.bytes())),
            "qcow2",
        )
    }
}

/// A one-layer chain over `src`, named `name`.
pub(crate) fn layer(src: Arc<MemSource>, name: &str) -> Chain {
    Chain::from_source(src, Path::new(name), &OpenOptions::default()).expect("the layer opens")
}

/// A raw layer of `bytes`.
pub(crate) fn raw_layer(bytes: Vec<u8>) -> Chain {
    let opts = OpenOptions {
        format: Some(crate::chain::Format::Raw),
        ..OpenOptions::default()
    };
    Chain::from_source(
        Arc::new(MemSource::new("base.raw", bytes)),
        Path::new("base.raw"),
        &opts,
    )
    .expect("a raw layer opens")
}

/// Stack one-layer chains, top first, into one chain (as if each named the next as
/// its backing file).
pub(crate) fn stack(chains: Vec<Chain>) -> Chain {
    Chain {
        layers: chains.into_iter().flat_map(|c| c.layers).collect(),
        notes: Vec::new(),
    }
}

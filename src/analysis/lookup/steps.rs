//! What a trace records: its steps, each with a kind that carries the values the
//! step looked at, and the explanation a learner reads.

use crate::tables::CompressedDescriptor;
use crate::types::{GuestOffset, HostOffset};
use serde::Serialize;

/// One step of a traced lookup.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Which layer (0 = top).
    pub depth: usize,
    /// The layer's file.
    pub layer: String,
    /// What kind of step.
    #[serde(flatten)]
    pub kind: StepKind,
    /// A sentence explaining the step.
    pub explanation: String,
}

/// The kinds of steps in a lookup.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum StepKind {
    /// The layer is entered; the guest offset is split into indexes.
    Split {
        /// Format of the layer.
        format: String,
        /// Virtual size of the layer.
        layer_size: u64,
        /// Cluster size (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        cluster_size: Option<u64>,
        /// L1 index (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        l1_index: Option<u64>,
        /// L2 index (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        l2_index: Option<u64>,
        /// Offset in the cluster (qcow2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        in_cluster: Option<u64>,
        /// Subcluster index (extended L2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        subcluster: Option<u32>,
    },
    /// The offset is past the end of this layer.
    PastEnd {
        /// Layer size.
        layer_size: u64,
    },
    /// The L1 index is past the end of the L1 table.
    BeyondL1 {
        /// L1 index.
        l1_index: u64,
        /// L1 size.
        l1_size: u64,
    },
    /// An L1 entry was read.
    L1Entry {
        /// Which L1 table (active or snapshot).
        table: String,
        /// The entry's index in that table (guest offset / (cluster size × L2 entries)).
        index: u64,
        /// Where the entry is in the file.
        entry_offset: HostOffset,
        /// Raw value (hex).
        raw: String,
        /// Where the L2 table the entry names is (hex in JSON), or null.
        #[serde(serialize_with = "crate::types::hex_string_opt")]
        l2_offset: Option<HostOffset>,
        /// Bit 63: the L2 table's refcount is exactly 1, so it may be written in place.
        copied: bool,
        /// Reserved bits set (hex) or null.
        reserved: Option<String>,
    },
    /// An L2 entry was read.
    L2Entry {
        /// Where the L2 table is (hex in JSON).
        #[serde(serialize_with = "crate::types::hex_string")]
        table_offset: HostOffset,
        /// The entry's index in that L2 table.
        index: u64,
        /// Where the entry is in the file.
        entry_offset: HostOffset,
        /// Raw value (hex).
        raw: String,
        /// Subcluster bitmap (hex; extended L2 only).
        #[serde(skip_serializing_if = "Option::is_none")]
        bitmap: Option<String>,
        /// QEMU's cluster type.
        cluster_type: String,
        /// The state of the subcluster holding the offset.
        subcluster_type: String,
        /// The entry's host offset bits (hex in JSON) if meaningful.
        #[serde(
            serialize_with = "crate::types::hex_string_opt",
            skip_serializing_if = "Option::is_none"
        )]
        host_offset: Option<HostOffset>,
        /// Bit 63: the data cluster's refcount is exactly 1 (never set on compressed entries).
        copied: bool,
        /// Compressed descriptor.
        #[serde(skip_serializing_if = "Option::is_none")]
        compressed: Option<CompressedDescriptor>,
        /// Reserved bits set (hex) or null.
        reserved: Option<String>,
    },
    /// The lookup ends with data.
    Data {
        /// The file holding the byte.
        file: String,
        /// Host offset of the byte (hex in JSON).
        #[serde(serialize_with = "crate::types::hex_string")]
        host_offset: HostOffset,
        /// Whether the host offset is past the end of that file (reads zeros).
        past_eof: bool,
    },
    /// The lookup ends with a compressed cluster.
    Compressed {
        /// The file.
        file: String,
        /// The compressed cluster's host offset and sector count, decoded from the entry.
        descriptor: CompressedDescriptor,
        /// Offset inside the decompressed cluster.
        in_cluster: u64,
    },
    /// The lookup ends with zeros.
    Zero {
        /// Why the read gives zeros here (a zero entry, past the end of a backing file, ...).
        reason: String,
        /// The byte's place in the layer's file where it has one (a raw file's
        /// hole, a zero cluster that keeps its host cluster), as `qemu-img map`
        /// reports it (hex in JSON).
        #[serde(
            serialize_with = "crate::types::hex_string_opt",
            skip_serializing_if = "Option::is_none"
        )]
        host_offset: Option<HostOffset>,
    },
    /// Not here: go down one layer.
    FallThrough {
        /// Next layer's file, if any.
        next: Option<String>,
    },
    /// The data is decrypted: which sector number becomes the IV, which key.
    Decrypt(crate::crypto::DecryptStep),
    /// QEMU would fail the read.
    Error {
        /// QEMU's complaint.
        message: String,
    },
}

/// The full trace of one guest offset.
#[derive(Clone, Debug, Serialize)]
pub struct Trace {
    /// The guest offset traced.
    pub guest_offset: GuestOffset,
    /// Which L1 table the top layer uses.
    pub view: String,
    /// Steps in order.
    pub steps: Vec<Step>,
    /// One-sentence outcome.
    pub outcome: String,
    /// The answer `qemu-img map` gives for this byte (depth, present, zero, data,
    /// compressed, offset), from the same decision the map is made of; absent past
    /// the end of the disk or where the read fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<crate::map::MapEntry>,
    /// Why QEMU fails the read (EIO), if it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

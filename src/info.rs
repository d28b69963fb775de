//! The summary `qemu-img info` prints.

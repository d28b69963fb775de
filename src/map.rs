//! The guest address space as extents, like `qemu-img map`.

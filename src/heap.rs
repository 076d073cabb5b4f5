//! The process's heap: buffers of a tag change's body (up to `max_body_bytes`, 256 KiB by
//! default) are given back to the operating system when they are freed.
//!
//! glibc's malloc maps a large allocation on its own only until the first such mapping is freed;
//! then it raises its threshold to that size and serves later ones from its heaps, where a
//! freed buffer stays resident and a small allocation placed in its hole keeps the rest from
//! being reused for the next large one. Measured with the release binary: 500 connections idle
//! after a 256 KiB tag change each held 281 KiB each, though every buffer had been freed.
//! A fixed threshold keeps every allocation of 128 KiB or more on a mapping of its own, unmapped
//! when freed. Only a tag change's body is that large; buffers streamed through are 16 KiB.

/// The size from which an allocation is mapped on its own (glibc's default, made fixed).
pub const MAP_FROM_BYTES: usize = 128 * 1024;

/// Fixes glibc's mapping threshold at [`MAP_FROM_BYTES`]; elsewhere (musl, other systems,
/// whose allocators give large blocks back on their own) nothing. Process-wide: the binary calls
/// it at start; the library never does.
pub fn return_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt sets an allocator parameter (under the allocator's own locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MAP_FROM_BYTES as libc::c_int);
    }
}

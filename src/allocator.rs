//! The process allocator's settings for training.
//!
//! A training step frees and allocates the same activation-sized buffers every step. glibc's
//! defaults hand large freed blocks (above a threshold that grows to 32 MiB) and the top of the heap
//! back to the kernel, so every step pays the page faults and the kernel's zeroing of those pages
//! again, on whichever thread allocates: measured on a 2-core VM, 17 % of a DPO step's wall time
//! (benches/RESULTS.md, 2026-12-04). Keeping freed memory in the process for reuse removes that;
//! the peak resident memory stays the same, it is simply not given back until the process ends.

/// Keeps freed memory in the process for reuse instead of returning it to the kernel (glibc on
/// Linux; elsewhere the platform allocator already reuses and this does nothing). Call once, early,
/// from a program that trains or evaluates; `prefer`'s command line does.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the thresholds of glibc's allocator; any value is valid and
    // memory already allocated is unaffected.
    unsafe {
        // Blocks below 1 GiB come from the heap, not from their own mapping…
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        // …and the heap's free top is not trimmed back to the kernel.
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

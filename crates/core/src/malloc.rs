//! Process-wide tuning of the C allocator for the training loop.
//!
//! glibc serves every block above its mmap threshold (at most 32 MB) with a fresh `mmap`
//! and gives it back with `munmap` when freed. A training step allocates several such
//! buffers and frees them at its end (a 2048 x 4608 f32 matrix of pre-activations or
//! dense codes is 37.7 MB), so every step paid the page faults and zeroing of those
//! pages again and, at each `munmap`, a TLB shootdown to the other core, which in a VM is
//! an inter-processor interrupt trapping to the hypervisor. A profile of a ReLU + L1 SAE
//! (F = 4608) put 23% of its time in the kernel for this; keeping freed memory in the
//! heap made 40 of its steps take 16 s instead of 25 s (docs/benchmarks.md, session 8).
//!
//! [`keep_freed_memory`] turns `mmap` for large blocks off and raises the trim threshold,
//! so the step's buffers are reused from the heap. The cost is that memory freed in the
//! middle of a run is not returned to the system until the process ends (the peak is
//! what it was). Called at the start of `saelab` and of the benchmarks; a no-op on other
//! C libraries, and when `SAELAB_SYSTEM_MALLOC=1` (for comparing the two).

/// `SAELAB_SYSTEM_MALLOC=1`: leave the C library's defaults.
fn switched_off() -> bool {
    std::env::var_os("SAELAB_SYSTEM_MALLOC").is_some_and(|v| v == "1")
}

/// See the module docs. Returns whether the tuning was applied.
pub fn keep_freed_memory() -> bool {
    if switched_off() {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before any
        // other thread of ours exists (start of main), and takes plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Bytes glibc holds in blocks mapped with their own `mmap`.
    fn mapped() -> usize {
        // SAFETY: reads allocator statistics.
        unsafe { libc::mallinfo2().hblkhd }
    }

    /// Whether a live 40 MB block added to the separately mapped bytes.
    fn big_block_is_mapped() -> bool {
        let before = mapped();
        let a = std::hint::black_box(vec![1u8; 40 << 20]);
        let grew = mapped() >= before + (40 << 20);
        assert!(a.iter().all(|&x| x == 1));
        grew
    }

    #[test]
    fn large_blocks_come_from_the_heap_after_tuning() {
        if super::switched_off() {
            return;
        }
        // glibc's default: a 40 MB block gets its own mapping (unmapped when freed).
        // SAFETY: restores the documented default number of mmap'd blocks (65536).
        unsafe { libc::mallopt(libc::M_MMAP_MAX, 65536) };
        assert!(big_block_is_mapped());
        assert!(super::keep_freed_memory());
        assert!(!big_block_is_mapped());
    }
}

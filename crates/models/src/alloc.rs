//! The allocator setting a training process wants.
//!
//! The `dst` binary, the `train_fashion_mnist` example and the train benchmark use mimalloc as
//! the global allocator (`#[global_allocator] static GLOBAL: mimalloc::MiMalloc`). A training
//! step allocates and frees the same large tensors every step (a CIFAR ResNet-18 activation at
//! batch 128 is 32 MiB); by default mimalloc hands such memory back to the OS 10 ms after it
//! is freed, so the next step faults it in again and the kernel zeroes every page: 19% of a
//! ResNet-18 step under `perf` (docs/benchmarks.md, "Convolutions"). [`keep_freed_memory`]
//! keeps freed memory in the process for reuse instead; the resident size then stays at the
//! run's peak rather than shrinking between steps.
//!
//! ```
//! models::alloc::keep_freed_memory(); // first thing in `main` (`models::process::init` does it)
//! ```

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (`mimalloc.h`, v2 and v3): how long
/// freed memory waits before it is returned to the OS; `-1` = never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS (see the module docs). Call it at the
/// start of `main` in a binary whose global allocator is mimalloc; with another allocator it
/// has no effect.
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores the value of a valid option index; mimalloc reads
    // the option whenever it considers purging, so setting it after start-up is supported.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_index_is_mimallocs_purge_delay() {
        super::keep_freed_memory();
        // SAFETY: reading an option by a valid index.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, -1);
        // Its neighbours keep their defaults (use_numa_nodes = 0), so the index is not off by
        // one into an option that took the value.
        // SAFETY: as above.
        let numa = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY + 1) };
        assert_eq!(numa, 0);
    }
}

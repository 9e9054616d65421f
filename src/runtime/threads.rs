//! The CPU path's threads: rayon's global pool, built so that the thread that runs a
//! model is one of its workers.
//!
//! A decode step on the CPU is a few hundred short parallel steps (one per projection,
//! attention, norm). Run from a thread outside the pool, each step hands its work to
//! the pool and puts the caller to sleep until it is done, two context switches a step:
//! on a 2-core machine that halved the decode speed. [`init_cpu_threads`] makes the
//! calling thread a worker of the global pool instead, so a step splits between it and
//! the other workers without waking anybody who is not already spinning.

use crate::error::{Error, Result};

/// Builds rayon's global pool with `threads` workers (default: `RAYON_NUM_THREADS`, else
/// one per core), the calling thread one of them. Call once, early, from the thread
/// that will run the model (a program's main thread), before any parallel work: the
/// global pool can be built only once, and a second call (or a pool already started by
/// earlier parallel work) is a typed error. Returns the number of workers.
pub fn init_cpu_threads(threads: Option<usize>) -> Result<usize> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .use_current_thread()
        .build_global()
        .map_err(|e| Error::InvalidArgument(format!("the CPU thread pool: {e}")))?;
    Ok(rayon::current_num_threads())
}

/// Hands the allocator's free memory back to the system (glibc's `malloc_trim`; nothing
/// elsewhere): after loading a model, the freed metadata and load-time buffers would
/// otherwise stay resident in the heap.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_pool_is_a_typed_error() {
        // The test harness may already have used the global pool; either way, once one
        // exists, building another is refused with a typed error.
        let _ = rayon::current_num_threads();
        assert!(matches!(
            init_cpu_threads(Some(2)),
            Err(Error::InvalidArgument(_))
        ));
    }
}

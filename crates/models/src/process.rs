//! What a training process sets first thing in `main`: [`init`].
//!
//! - [`crate::alloc::keep_freed_memory`]: freed tensors stay in the process for the next step.
//! - candle's spin limit. candle 0.11 runs its element-wise ops on tensors of ≥ 64 Ki
//!   elements on its own "barrier pool" of `threads − 1` workers (besides rayon's, which runs
//!   this workspace's kernels); after each op a worker spins `CANDLE_BARRIER_POOL_SPIN_LIMIT`
//!   times (default 25 000, ~1 ms of `pause`) before it sleeps. A backward pass alternates
//!   candle's gradient additions with this workspace's kernels, so with as many threads as
//!   cores the spinning worker takes a core from the kernels: on a 2-vCPU VM it held 14% of
//!   all samples of a 2-thread LeNet-5 sparse step under `perf`, and a limit of
//!   [`CANDLE_SPIN_LIMIT`] made that step ~10% faster (docs/benchmarks.md). [`init`] sets the
//!   limit unless the environment already does.
//!
//! ```
//! models::process::init(); // first thing in `main`, before any thread starts
//! ```

/// The spin limit [`init`] gives candle's barrier pool when `CANDLE_BARRIER_POOL_SPIN_LIMIT`
/// is not set: a few microseconds, enough to catch back-to-back ops.
pub const CANDLE_SPIN_LIMIT: u32 = 200;

/// The process settings of the module documentation. Call it at the start of `main`, before
/// any other thread exists (it sets an environment variable) and before the first candle op
/// (candle reads the variable once, when its pool starts).
pub fn init() {
    crate::alloc::keep_freed_memory();
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, CANDLE_SPIN_LIMIT.to_string());
    }
}

//! Data-parallel training across processes: the collective operations the trainer needs, behind
//! one small trait, [`Collective`], so that the transport is a choice — MPI between processes
//! and machines (feature `distributed`, [`MpiCollective`]), in-process threads for tests
//! ([`LocalGroup`]), or a single process ([`SingleProcess`], the default). An NCCL
//! implementation for GPUs would implement the same trait.
//!
//! How a step runs on `size` ranks (docs/ARCHITECTURE.md, "Data-parallel training"): every rank
//! draws the same shuffled global batch and takes its [`shard`] (contiguous, sizes differing by at
//! most one); after the backward pass the gradients of every trained variable — and at
//! mask-update steps the dense gradients — are summed across ranks, each rank's weighted by its
//! share of the global batch, so every rank holds the global batch's mean gradient and applies
//! the same optimizer step. Mask updates are pure functions of (weights, gradient, mask, step,
//! seed), so masks stay identical without being sent; the trainer checks a hash of them across
//! ranks at every update ([`masks_agree`]).
//!
//! Determinism: [`Collective::all_reduce_sum`] adds the ranks' buffers in rank order on every
//! rank (an all-gather, then a local sum), so two runs with the same rank count are bit-equal,
//! and every rank holds bit-identical weights. [`MpiCollective`] does it in the bandwidth of a
//! ring all-reduce: each rank sums one chunk of every rank's buffer (in rank order) and the summed
//! chunks are gathered back (`2(p−1)/p` of the buffer sent per rank, as `MPI_Allreduce`'s ring).
//!
//! Faults: a rank that dies ends an MPI job (the launcher kills the others and names the rank); a
//! rank that hangs would leave the others blocked in a collective, so every collective call of
//! [`MpiCollective`] runs under a [`Watchdog`] that ends this process with a clear error when it
//! waits longer than a timeout (`dst train --collective-timeout`).

use std::cell::Cell;
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use sparse_formats::Mask;

/// A failed collective operation (a peer gone, a size mismatch); the message names it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("distributed training: {0}")]
pub struct CollectiveError(pub String);

/// The collective operations of data-parallel training. Every rank calls the same operations
/// in the same order with buffers of the same length.
pub trait Collective: Send {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf`, added in rank
    /// order (bit-identical on every rank and across runs).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Replaces `buf` on every rank by rank `root`'s.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>, CollectiveError>;
}

/// One process, no communication (what `dst train` does without `--distributed`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>, CollectiveError> {
        Ok(vec![value])
    }
}

/// The part of the global batch `idx` that rank `rank` of `size` trains on: a contiguous slice,
/// the first `len % size` ranks one example longer.
pub fn shard(idx: &[usize], rank: usize, size: usize) -> &[usize] {
    let (base, extra) = (idx.len() / size, idx.len() % size);
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    &idx[start..start + len]
}

/// FNV-1a over every mask bit and name, in order: what ranks compare at every mask update.
pub fn mask_hash(masks: &[(String, Mask)]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (name, m) in masks {
        for b in name
            .bytes()
            .chain(m.as_slice().iter().map(|&b| u8::from(b)))
        {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Checks that every rank holds the same masks (by [`mask_hash`]); the error names the step and
/// the ranks that differ from rank 0.
pub fn masks_agree(
    c: &dyn Collective,
    masks: &[(String, Mask)],
    step: usize,
) -> Result<(), CollectiveError> {
    let hashes = c.all_gather_u64(mask_hash(masks))?;
    let differ: Vec<usize> = (1..hashes.len())
        .filter(|&r| hashes[r] != hashes[0])
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(CollectiveError(format!(
            "the masks of rank(s) {differ:?} differ from rank 0's at step \
             {step}; ranks must run the same config, data and rank count"
        )))
    }
}

/// A collective that counts the time spent in its operations and the bytes handed to them (what
/// the trainer reports as communication; [`crate::Trainer::communication`]).
pub struct Metered {
    inner: Box<dyn Collective>,
    seconds: Cell<f64>,
    bytes: Cell<u64>,
    calls: Cell<u64>,
}

/// Time, volume and count of a run's collective operations so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    /// Wall seconds inside collective operations (waiting for other ranks included).
    pub seconds: f64,
    /// Bytes of the buffers handed to them (this rank's side; not the bytes on the wire).
    pub bytes: u64,
    /// Number of operations.
    pub calls: u64,
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Collective>) -> Metered {
        Metered {
            inner,
            seconds: Cell::new(0.0),
            bytes: Cell::new(0),
            calls: Cell::new(0),
        }
    }

    /// The wrapped collective.
    pub fn into_inner(self) -> Box<dyn Collective> {
        self.inner
    }

    /// What the operations so far cost.
    pub fn stats(&self) -> CommStats {
        CommStats {
            seconds: self.seconds.get(),
            bytes: self.bytes.get(),
            calls: self.calls.get(),
        }
    }

    fn time<T>(&self, bytes: usize, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.seconds
            .set(self.seconds.get() + t.elapsed().as_secs_f64());
        self.bytes.set(self.bytes.get() + bytes as u64);
        self.calls.set(self.calls.get() + 1);
        out
    }
}

impl Collective for Metered {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.time(4 * buf.len(), || self.inner.all_reduce_sum(buf))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.time(4 * buf.len(), || self.inner.broadcast(buf, root))
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>, CollectiveError> {
        self.time(8, || self.inner.all_gather_u64(value))
    }
}

/// Bounds how long one operation may wait: a thread that calls `on_timeout(operation, waited)`
/// once when an operation armed by [`Watchdog::arm`] has not finished within the timeout. A
/// transport's blocking calls cannot be interrupted, so the handler ends the process (what
/// [`MpiCollective`] does: a rank that waits for a hung peer exits with an error instead of
/// hanging the job).
pub struct Watchdog {
    shared: Arc<(Mutex<WatchState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
    timeout: Duration,
}

#[derive(Default)]
struct WatchState {
    /// The armed operation and when it started; `None` between operations.
    armed: Option<(&'static str, Instant, u64)>,
    /// Arming count, so a timeout fires at most once per operation.
    generation: u64,
    stop: bool,
}

/// Disarms its [`Watchdog`] when dropped (the operation finished).
pub struct WatchGuard<'a>(&'a Watchdog);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        let (lock, cv) = &*self.0.shared;
        lock.lock().expect("watchdog").armed = None;
        cv.notify_all();
    }
}

impl Watchdog {
    /// Starts the watching thread.
    pub fn new(
        timeout: Duration,
        on_timeout: impl Fn(&'static str, Duration) + Send + 'static,
    ) -> Watchdog {
        let shared = Arc::new((Mutex::new(WatchState::default()), Condvar::new()));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut st = lock.lock().expect("watchdog");
                let mut fired = None;
                loop {
                    if st.stop {
                        return;
                    }
                    match st.armed {
                        Some((op, start, gen)) if fired != Some(gen) => {
                            let waited = start.elapsed();
                            if waited >= timeout {
                                fired = Some(gen);
                                drop(st);
                                on_timeout(op, waited);
                                st = lock.lock().expect("watchdog");
                            } else {
                                st = cv.wait_timeout(st, timeout - waited).expect("watchdog").0;
                            }
                        }
                        _ => st = cv.wait(st).expect("watchdog"),
                    }
                }
            })
            .expect("spawn the collective watchdog");
        Watchdog {
            shared,
            thread: Some(thread),
            timeout,
        }
    }

    /// The timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts timing `operation` until the guard is dropped.
    pub fn arm(&self, operation: &'static str) -> WatchGuard<'_> {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().expect("watchdog");
        st.generation += 1;
        st.armed = Some((operation, Instant::now(), st.generation));
        cv.notify_all();
        WatchGuard(self)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        lock.lock().expect("watchdog").stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Shared {
    size: usize,
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

/// Ranks as threads of one process (a test double of a real transport, and a way to check that
/// a data-parallel run equals a single-process one): [`LocalGroup::new`] returns one handle per
/// rank; run each rank's trainer on its own thread.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// `size` connected ranks.
    pub fn new(size: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            size,
            slots: Mutex::new(vec![Vec::new(); size]),
            barrier: Barrier::new(size),
        });
        (0..size)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Every rank's `buf`, in rank order.
    fn all_gather(&self, buf: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError> {
        let s = &self.shared;
        s.slots.lock().expect("slots")[self.rank] = buf.to_vec();
        s.barrier.wait();
        let all = s.slots.lock().expect("slots").clone();
        s.barrier.wait(); // nobody overwrites a slot before everyone has read it
        if all.iter().any(|v| v.len() != buf.len()) {
            return Err(CollectiveError(format!(
                "buffer lengths differ across ranks: {:?}",
                all.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        Ok(all)
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let all = self.all_gather(buf)?;
        sum_in_rank_order(buf, all.iter().map(Vec::as_slice));
        Ok(())
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        let all = self.all_gather(buf)?;
        buf.copy_from_slice(&all[root]);
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>, CollectiveError> {
        // Four 16-bit parts carry the value exactly (an f32 holds integers below 2^24).
        let parts = [0, 16, 32, 48].map(|s| ((value >> s) & 0xffff) as f32);
        let all = self.all_gather(&parts)?;
        Ok(all
            .iter()
            .map(|p| {
                p.iter()
                    .enumerate()
                    .fold(0u64, |acc, (i, &x)| acc | (x as u64) << (16 * i))
            })
            .collect())
    }
}

/// `out = Σ_r parts[r]`, added in rank order.
fn sum_in_rank_order<'a>(out: &mut [f32], mut parts: impl Iterator<Item = &'a [f32]>) {
    if let Some(first) = parts.next() {
        out.copy_from_slice(first);
    }
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, &x)| *o += x);
    }
}

#[cfg(feature = "distributed")]
pub use mpi_impl::MpiCollective;

#[cfg(feature = "distributed")]
mod mpi_impl {
    use std::time::Duration;

    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Threading;

    use super::{sum_in_rank_order, Collective, CollectiveError, Watchdog};

    /// Ranks as MPI processes (`mpirun -np N dst train ... --distributed`), over
    /// `MPI_COMM_WORLD`. MPI is initialised with `MPI_THREAD_SERIALIZED`: the trainer calls it
    /// from one thread at a time (possibly a rayon worker, not the main thread). Every operation
    /// runs under a [`Watchdog`]: a rank that waits longer than the timeout in one (a peer hung,
    /// or gone without the launcher noticing) prints which operation and exits with status 1,
    /// and the launcher ends the job.
    pub struct MpiCollective {
        world: SimpleCommunicator,
        watchdog: Watchdog,
        _universe: Universe,
    }

    // SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED, which allows calls from any thread
    // as long as they do not overlap; the trainer owns the collective and calls it from one
    // thread at a time. The watchdog thread makes no MPI call.
    unsafe impl Send for MpiCollective {}

    impl MpiCollective {
        /// Initialises MPI (once per process); fails if it is already initialised or the
        /// library does not offer serialized threading. `timeout` bounds every collective
        /// operation (see the type's documentation).
        pub fn init(timeout: Duration) -> Result<MpiCollective, CollectiveError> {
            let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
                .ok_or_else(|| CollectiveError("MPI is already initialised".into()))?;
            if level < Threading::Serialized {
                return Err(CollectiveError(format!(
                    "the MPI library offers thread level {level:?}, serialized is needed"
                )));
            }
            let world = universe.world();
            let (rank, size) = (world.rank(), world.size());
            let watchdog = Watchdog::new(timeout, move |op, waited| {
                eprintln!(
                    "error: distributed training: rank {rank} of {size} waited {:.0} s in {op} \
                     (--collective-timeout {}): another rank is hung or gone; stopping",
                    waited.as_secs_f64(),
                    timeout.as_secs()
                );
                // The blocked call cannot be interrupted; leaving without MPI_Finalize makes
                // the launcher end every rank.
                std::process::exit(1);
            });
            Ok(MpiCollective {
                world,
                watchdog,
                _universe: universe,
            })
        }
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
            // A deterministic reduce-scatter + all-gather: rank j receives chunk j of every
            // rank's buffer (all-to-all), sums them in rank order, and the summed chunks are
            // gathered back. Bit-identical to summing whole buffers in rank order, with the
            // traffic of a ring all-reduce; MPI_Allreduce would let the library pick the order.
            let _armed = self.watchdog.arm("an all-reduce of gradients");
            let p = self.size();
            let chunk = buf.len() / p;
            let (body, tail) = buf.split_at_mut(chunk * p);
            if chunk > 0 {
                // Chunk j of every rank's buffer goes to rank j, which sums the p chunks in rank
                // order; the sums are gathered back into place.
                let mut recv = vec![0.0f32; body.len()];
                self.world.all_to_all_into(&body[..], &mut recv[..]);
                let mut mine = vec![0.0f32; chunk];
                sum_in_rank_order(&mut mine, recv.chunks(chunk));
                self.world.all_gather_into(&mine[..], body);
            }
            if !tail.is_empty() {
                // The last len % p values: every rank sums all ranks' copies.
                let mut all = vec![0.0f32; tail.len() * p];
                self.world.all_gather_into(&tail[..], &mut all[..]);
                sum_in_rank_order(tail, all.chunks(tail.len()));
            }
            Ok(())
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
            let _armed = self.watchdog.arm("a broadcast of the initial state");
            self.world.process_at_rank(root as i32).broadcast_into(buf);
            Ok(())
        }
        fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>, CollectiveError> {
            let _armed = self
                .watchdog
                .arm("an exchange of mask hashes or stop requests");
            let mut all = vec![0u64; self.size()];
            self.world.all_gather_into(&value, &mut all[..]);
            Ok(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        let idx: Vec<usize> = (0..10).collect();
        let parts: Vec<&[usize]> = (0..3).map(|r| shard(&idx, r, 3)).collect();
        assert_eq!(parts, vec![&[0, 1, 2, 3][..], &[4, 5, 6], &[7, 8, 9]]);
        assert_eq!(shard(&idx, 0, 1), &idx[..]);
    }

    #[test]
    fn local_group_reduces_in_rank_order_and_broadcasts() {
        let ranks = LocalGroup::new(3);
        let out: Vec<(Vec<f32>, Vec<f32>, Vec<u64>)> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut a = vec![r, 10.0 * r];
                        c.all_reduce_sum(&mut a).unwrap();
                        let mut b = vec![r; 2];
                        c.broadcast(&mut b, 2).unwrap();
                        let g = c.all_gather_u64(u64::MAX - c.rank() as u64).unwrap();
                        (a, b, g)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b, g) in out {
            assert_eq!(a, vec![3.0, 30.0]);
            assert_eq!(b, vec![2.0, 2.0]);
            assert_eq!(g, vec![u64::MAX, u64::MAX - 1, u64::MAX - 2]);
        }
    }

    #[test]
    fn watchdog_fires_once_on_a_late_operation_and_never_on_prompt_ones() {
        let fired = Arc::new(Mutex::new(Vec::new()));
        let f = fired.clone();
        let w = Watchdog::new(Duration::from_millis(50), move |op, waited| {
            f.lock().unwrap().push((op, waited));
        });
        for _ in 0..20 {
            let _g = w.arm("prompt");
        }
        {
            let _g = w.arm("late");
            std::thread::sleep(Duration::from_millis(400));
        }
        let _g = w.arm("prompt again");
        drop(_g);
        drop(w); // joins the thread
        let fired = fired.lock().unwrap();
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].0, "late");
        assert!(fired[0].1 >= Duration::from_millis(50));
    }

    #[test]
    fn metered_counts_calls_and_bytes_and_passes_results_through() {
        let m = Metered::new(Box::new(SingleProcess));
        let mut b = vec![1.0f32; 10];
        m.all_reduce_sum(&mut b).unwrap();
        m.broadcast(&mut b[..3], 0).unwrap();
        assert_eq!(m.all_gather_u64(7).unwrap(), vec![7]);
        assert_eq!(b, vec![1.0; 10]);
        let s = m.stats();
        assert_eq!((s.calls, s.bytes), (3, 40 + 12 + 8));
        assert!(s.seconds >= 0.0);
    }
}

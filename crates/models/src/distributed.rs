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
//! and every rank holds bit-identical weights.

use std::sync::{Arc, Barrier, Mutex};

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
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Threading;

    use super::{sum_in_rank_order, Collective, CollectiveError};

    /// Ranks as MPI processes (`mpirun -np N dst train ... --distributed`), over
    /// `MPI_COMM_WORLD`. MPI is initialised with `MPI_THREAD_SERIALIZED`: the trainer calls it
    /// from one thread at a time (possibly a rayon worker, not the main thread).
    pub struct MpiCollective {
        world: SimpleCommunicator,
        _universe: Universe,
    }

    // SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED, which allows calls from any thread
    // as long as they do not overlap; the trainer owns the collective and calls it from one
    // thread at a time.
    unsafe impl Send for MpiCollective {}

    impl MpiCollective {
        /// Initialises MPI (once per process); fails if it is already initialised or the
        /// library does not offer serialized threading.
        pub fn init() -> Result<MpiCollective, CollectiveError> {
            let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
                .ok_or_else(|| CollectiveError("MPI is already initialised".into()))?;
            if level < Threading::Serialized {
                return Err(CollectiveError(format!(
                    "the MPI library offers thread level {level:?}, serialized is needed"
                )));
            }
            Ok(MpiCollective {
                world: universe.world(),
                _universe: universe,
            })
        }

        fn all_gather(&self, buf: &[f32]) -> Vec<f32> {
            let mut all = vec![0.0f32; buf.len() * self.size()];
            self.world.all_gather_into(buf, &mut all[..]);
            all
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
            // All-gather then a local sum in rank order: deterministic, unlike MPI_Allreduce,
            // whose summation order the library chooses.
            let all = self.all_gather(buf);
            sum_in_rank_order(buf, all.chunks(buf.len().max(1)));
            Ok(())
        }
        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
            self.world.process_at_rank(root as i32).broadcast_into(buf);
            Ok(())
        }
        fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>, CollectiveError> {
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
}

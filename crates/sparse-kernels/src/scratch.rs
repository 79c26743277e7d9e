//! Per-thread scratch buffers for kernels whose temporaries are fully overwritten before they
//! are read (im2col columns, GEMM outputs with `accumulate = false`, the sparse convolution's
//! lane layouts; one that is accumulated into is zeroed by its user).
//!
//! `vec![0f32; n]` for such a temporary is an allocation plus a zero-fill pass that nothing
//! reads: the GEMM conv's columns are `K × n·L` floats per chunk (5 MB for LeNet-5's conv1 at
//! 64 samples), and their zeroing was ~5% of a LeNet-5 training step under `perf`. [`with`]
//! lends a buffer kept by the calling thread instead; its contents are whatever the previous
//! user left, so a caller must write every entry it reads.
//!
//! A buffer is taken out of the thread's pool while it is lent, so a nested call on the same
//! thread (rayon runs other tasks while a GEMM waits) gets another buffer, never the same one.

use std::cell::RefCell;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` with a buffer of `n` floats of unspecified contents (see the module
/// documentation), kept by this thread for later calls.
pub(crate) fn with<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    let r = f(&mut buf[..n]);
    POOL.with(|p| p.borrow_mut().push(buf));
    r
}

/// Fills every buffer this thread keeps, at least three of 2¹⁶ floats, with NaN — what a
/// previous user might leave in them: tests run a kernel after this to show that it writes
/// every float of a scratch buffer that it reads.
#[cfg(test)]
pub(crate) fn poison() {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        while p.len() < 3 {
            p.push(Vec::new());
        }
        for b in p.iter_mut() {
            if b.len() < 1 << 16 {
                b.resize(1 << 16, 0.0);
            }
            b.fill(f32::NAN);
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn nested_calls_get_distinct_buffers_and_sizes_are_exact() {
        super::with(10, |a| {
            a.fill(1.0);
            super::with(20, |b| {
                assert_eq!(b.len(), 20);
                b.fill(2.0);
            });
            assert!(
                a.iter().all(|&v| v == 1.0),
                "the nested call used the same buffer"
            );
        });
        super::with(3, |a| assert_eq!(a.len(), 3));
    }
}

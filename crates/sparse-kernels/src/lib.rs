//! Compute kernels on the [`sparse_formats`] layouts (layer L1).
//!
//! For each format — [`Condensed`] (constant fan-in), [`NmSparse`] (any N:M, fast paths for
//! 2:4 and 1:4) and [`Csr`] — three products of a linear layer `y = x · Wᵀ + b`,
//! `x [batch, fan_in]`:
//!
//! - [`forward`]: `y [batch, rows]`;
//! - [`input_grad`]: `∂L/∂x = ∂L/∂y · W`;
//! - [`value_grad`]: `∂L/∂W` at the stored positions only (the dense weight gradient is never
//!   formed).
//!
//! They are plain functions on slices (no autograd needed), and candle custom ops in [`ops`]
//! whose backward passes make them part of candle's autograd. CPU kernels pick AVX-512,
//! AVX2 + FMA or scalar code at run time ([`Isa`]) and split work over rayon threads, as many
//! as candle uses ([`Exec`]); results are bit-identical for any thread count. CUDA kernels come
//! with the `cuda` feature ([`cuda`]).
//!
//! ```
//! use sparse_formats::{Condensed, Mask};
//! use sparse_kernels::{forward, value_grad, Exec};
//! let w = [1.0, 0.0, 2.0,
//!          0.0, 3.0, 4.0];
//! let c = Condensed::from_dense(2, 3, &w, &Mask::from_dense(2, 3, &w)?, None)?;
//! let x = [1.0, 1.0, 1.0,   // batch of 2
//!          1.0, 0.0, 2.0];
//! let y = forward(&c, c.values(), None, &x, 2, Exec::default())?;
//! assert_eq!(y, vec![3.0, 7.0, 5.0, 8.0]);
//! let gv = value_grad(&c, &x, &[1.0, 0.0, 0.0, 1.0], 2, Exec::default())?;
//! assert_eq!(gv, vec![1.0, 1.0, 0.0, 2.0]); // d y[0,0]/dW[0,·] and d y[1,1]/dW[1,·]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod act;
mod blocked;
pub mod conv;
mod conv_lanes;
pub mod cpu;
pub mod cuda;
pub mod dense;
mod gather;
mod isa;
pub mod norm;
pub mod ops;
mod packed;
pub mod pool;
pub mod reference;
mod rows;
mod scratch;
mod simd;
pub mod sparse_conv;
pub mod storage;
mod transpose;
mod vgrad256;
mod vgrad512;

pub use blocked::RowBlocks;
pub use cpu::{forward, forward_into, input_grad, input_grad_with, value_grad};
pub use isa::Isa;
pub use packed::PackedNm;
pub use rows::Transposed;

use sparse_formats::{Condensed, Csr, NmSparse};

/// Errors of the kernels.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A buffer does not have the length the weight's shape and the batch ask for.
    #[error("`{what}` has {found} elements, expected {expected}")]
    Shape {
        /// The argument.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        found: usize,
    },
    /// The layout does not support this operation.
    #[error("{0}")]
    Unsupported(String),
    /// CUDA was asked for but cannot be used (see [`cuda`]).
    #[error("{0}")]
    Cuda(String),
    /// A sparse convolution's shapes do not fit together (see [`sparse_conv`]).
    #[error("sparse conv2d: {0}")]
    Conv(String),
}

/// A borrowed sparse weight of any format the kernels run on.
#[derive(Debug, Clone, Copy)]
pub enum SparseWeight<'a> {
    /// Constant fan-in layout.
    Condensed(&'a Condensed),
    /// N:M layout.
    Nm(&'a NmSparse),
    /// CSR layout.
    Csr(&'a Csr),
}

impl<'a> From<&'a Condensed> for SparseWeight<'a> {
    fn from(w: &'a Condensed) -> Self {
        SparseWeight::Condensed(w)
    }
}
impl<'a> From<&'a NmSparse> for SparseWeight<'a> {
    fn from(w: &'a NmSparse) -> Self {
        SparseWeight::Nm(w)
    }
}
impl<'a> From<&'a Csr> for SparseWeight<'a> {
    fn from(w: &'a Csr) -> Self {
        SparseWeight::Csr(w)
    }
}

impl SparseWeight<'_> {
    /// Output rows (neurons), ablated ones included.
    pub fn rows(&self) -> usize {
        match self {
            SparseWeight::Condensed(w) => w.rows(),
            SparseWeight::Nm(w) => w.rows(),
            SparseWeight::Csr(w) => w.rows(),
        }
    }

    /// Dense fan-in.
    pub fn fan_in(&self) -> usize {
        match self {
            SparseWeight::Condensed(w) => w.fan_in(),
            SparseWeight::Nm(w) => w.fan_in(),
            SparseWeight::Csr(w) => w.fan_in(),
        }
    }

    /// Number of stored values.
    pub fn nnz(&self) -> usize {
        self.values().len()
    }

    /// The stored values of the layout itself.
    pub fn values(&self) -> &[f32] {
        match self {
            SparseWeight::Condensed(w) => w.values(),
            SparseWeight::Nm(w) => w.values(),
            SparseWeight::Csr(w) => w.values(),
        }
    }

    /// The format's name (`condensed`, `nm`, `csr`).
    pub fn format_name(&self) -> &'static str {
        match self {
            SparseWeight::Condensed(_) => "condensed",
            SparseWeight::Nm(_) => "nm",
            SparseWeight::Csr(_) => "csr",
        }
    }

    /// The dense column of every stored value, in slot order (for references and tests).
    pub fn columns(&self) -> Vec<(usize, usize)> {
        use rows::{Rows, RowsVisitor};
        struct Cols;
        impl RowsVisitor for Cols {
            type Out = Vec<(usize, usize)>;
            fn visit<R: Rows>(self, r: &R) -> Self::Out {
                let mut out = Vec::new();
                for a in 0..r.n_stored() {
                    let row = r.out_row(a);
                    out.extend(r.entries(a).map(|(_, col)| (row, col)));
                }
                out
            }
        }
        self.with_rows(Cols)
    }

    pub(crate) fn with_rows<V: rows::RowsVisitor>(&self, v: V) -> V::Out {
        use rows::AsRows;
        match self {
            SparseWeight::Condensed(w) => w.with_rows(v),
            SparseWeight::Nm(w) => w.with_rows(v),
            SparseWeight::Csr(w) => w.with_rows(v),
        }
    }
}

/// How a kernel runs: how many threads and which instruction set.
///
/// The default uses as many threads as candle does (`RAYON_NUM_THREADS`, else the physical
/// cores; read once per process) — fewer for small calls, see [`Exec::threads_for`] — and the
/// best instruction set of the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exec {
    threads: usize,
    isa: Option<Isa>,
}

impl Exec {
    /// Run on exactly `n` threads (`0` = candle's count).
    pub fn with_threads(self, n: usize) -> Self {
        Exec { threads: n, ..self }
    }

    /// Run the given instruction-set variant; one the CPU lacks is replaced by the best it has.
    pub fn with_isa(self, isa: Isa) -> Self {
        Exec {
            isa: Some(if isa.is_supported() {
                isa
            } else {
                Isa::detect()
            }),
            ..self
        }
    }

    /// The thread count this will use.
    pub fn thread_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            candle_threads()
        }
    }

    /// Threads for a kernel call of `work` multiply-adds: an explicit count is used as given;
    /// the automatic count is capped so that each thread gets at least
    /// [`MIN_WORK_PER_THREAD`] products (results do not depend on the count either way).
    pub fn threads_for(&self, work: usize) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            candle_threads().min(work / MIN_WORK_PER_THREAD).max(1)
        }
    }

    /// The instruction set this will use.
    pub fn isa(&self) -> Isa {
        self.isa.unwrap_or_else(Isa::detect)
    }
}

/// Products below which another thread costs more than it saves (measured: a 99%-sparse
/// 3072→768 forward at batch 1, ~24k products, took twice as long on 2 threads as on 1).
pub const MIN_WORK_PER_THREAD: usize = 1 << 16;

/// The `f32` data of a contiguous CPU tensor's storage, for the custom ops; `op` and `what`
/// name the op and the argument in the error otherwise.
pub(crate) fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{op}: `{what}` must be contiguous"),
    }
}

/// candle's CPU thread count (`candle_core::utils::get_num_threads`), read once: candle
/// recomputes it from the environment and `/sys` on every call.
pub fn candle_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

/// A new vector of `n` floats, written by `fill(first index, chunk)` over chunks of `chunk`
/// entries (the last may be shorter), on rayon's pool when `parallel`; each chunk must write
/// every entry. Not zero-filled first: an element-wise op's output is written exactly once, and
/// the zeroing pass cost as much as the op.
pub(crate) fn fill_new(
    chunk: usize,
    parallel: bool,
    n: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let buf = &mut v.spare_capacity_mut()[..n];
    if parallel {
        buf.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| fill(i * chunk, c));
    } else {
        buf.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| fill(i * chunk, c));
    }
    // SAFETY: the chunks cover `0..n`, and `fill` writes every entry of its chunk (the
    // callers' contract).
    unsafe { v.set_len(n) };
    v
}

/// Helpers shared by the dense ops' unit tests (conv, dense, norm).
#[cfg(test)]
pub(crate) mod testutil {
    /// `n` values in [-1, 1] from a xorshift stream.
    pub(crate) fn random(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Element-wise `|a − b| ≤ tol · (1 + |b|)`, naming the first index that is not.
    pub(crate) fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!(
                (p - q).abs() <= tol * (1.0 + q.abs()),
                "{what}[{i}]: {p} vs reference {q}"
            );
        }
    }

    /// [`close`] on two tensors of any shape.
    pub(crate) fn close_t(a: &candle_core::Tensor, b: &candle_core::Tensor, tol: f32, what: &str) {
        let v = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        close(&v(a), &v(b), tol, what);
    }
}

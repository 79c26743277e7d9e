//! Compute kernels on the [`sparse_formats`] layouts (layer L1).
//!
//! Not yet implemented: this crate is filled by the "sparse-kernels on CPU" issue (linear
//! forward, input gradient and value gradient for `Condensed`, `NmSparse` and `Csr`, as plain
//! functions and as candle custom ops) and the CUDA issue (feature `cuda`).

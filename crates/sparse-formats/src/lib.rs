//! Sparse weight layouts for neural networks (layer L0 of the workspace).
//!
//! Every sparsifiable weight is viewed as a matrix `[rows = output neurons, fan_in]` (linear
//! `[out, in]`, conv `[out, in/groups·kh·kw]`). On that view this crate provides:
//!
//! - [`Mask`]: a layer's binary mask, with counts, set operations, 0/1 candle tensors and a
//!   text rendering for snapshot tests;
//! - [`Condensed`]: the constant fan-in layout of SRigL (every active row has exactly `k`
//!   inputs; ablated rows are dropped), indices in the narrowest type ([`IndexVec`]);
//! - [`NmSparse`]: N of every M weights kept ([`NmPattern`] says which weights form a group),
//!   with an exporter to the NVIDIA 2:4 layout ([`Nvidia24`]);
//! - [`Csr`]: compressed sparse rows, the unstructured baseline;
//! - [`io`]: save/load of any of these to safetensors, validating every invariant on load.
//!
//! Every format converts from a dense row-major weight plus a [`Mask`] and back exactly, has a
//! checked `from_parts` constructor that names the broken invariant, and never panics on bad
//! input.
//!
//! ```
//! use sparse_formats::{io, Condensed, Mask, SparseLayer};
//! // A 2×4 weight with fan-in 2 in every row.
//! let w = [0.5, 0.0, -1.0, 0.0,
//!          0.0, 2.0,  0.0, 3.0];
//! let mask = Mask::from_dense(2, 4, &w)?;
//! let c = Condensed::from_dense(2, 4, &w, &mask, None)?;
//! let bytes = io::to_bytes(&[("fc".into(), SparseLayer::Condensed(c.clone()))])?;
//! let back = io::from_bytes(&bytes)?;
//! assert_eq!(back[0].1, SparseLayer::Condensed(c));
//! # Ok::<(), sparse_formats::FormatError>(())
//! ```

#![warn(missing_docs)]

mod condensed;
mod csr;
mod error;
mod indices;
pub mod io;
mod mask;
mod nm;

pub use condensed::Condensed;
pub use csr::Csr;
pub use error::{FormatError, Result};
pub use indices::{IndexType, IndexVec};
pub use io::{DenseTensor, SparseLayer};
pub use mask::{push_active_positions, LayerStats, Mask};
pub use nm::{NmPattern, NmSparse, Nvidia24};

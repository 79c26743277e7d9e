//! N:M sparse training (layer L3): LBC, with SR-STE and one-shot magnitude N:M as baselines.
//!
//! Status: the algorithms as pure functions on `[rows, fan_in]` weights — combinations and
//! their scores ([`lbc`]), the removal schedule ([`schedule`]), SR-STE and magnitude masks
//! ([`baselines`]), export to [`sparse_formats::NmSparse`] ([`export_nm`]), and their use in a
//! candle loop ([`training`]: `NmLinear` layers and the `NmSparsifier`).
//!
//! ```
//! use lbc::lbc::{DirectScores, LbcState, ScoreSgd};
//! use lbc::schedule::RemovalSchedule;
//! use sparse_formats::NmPattern;
//!
//! let mut s = DirectScores::new(2, 8, NmPattern::new(2, 4), 1 << 20)?;
//! assert_eq!(s.mask().nnz(), 16); // dense start
//! let w: Vec<f32> = (0..16).map(|i| i as f32 - 8.0).collect();
//! let g: Vec<f32> = (0..16).map(|i| if i % 3 == 0 { -1.0 } else { 0.5 }).collect();
//! let sgd = ScoreSgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4 };
//! let sched = RemovalSchedule { t_i: 0, t_f: 4, power: 3.0 };
//! for epoch in 0..5 {
//!     s.remove_to(sched.kept(6, epoch));
//!     s.step(&w, &g, sgd)?;
//! }
//! let nm = lbc::export_nm(&w, &s.mask(), 2, 8, NmPattern::new(2, 4))?;
//! assert_eq!(nm.values().len(), 8); // exactly 2 of every 4
//! # Ok::<(), lbc::LbcError>(())
//! ```

#![warn(missing_docs)]

pub mod baselines;
pub mod combinations;
pub mod lbc;
pub mod schedule;
pub mod training;

use sparse_formats::{FormatError, Mask, NmPattern, NmSparse};

/// Errors of the lbc crate.
#[derive(Debug, thiserror::Error)]
pub enum LbcError {
    /// Buffers that do not fit the layer.
    #[error("shape: {0}")]
    Shape(String),
    /// The direct score table would be too large.
    #[error("{scores} LBC scores exceed the limit of {limit}: use the accumulated formulation")]
    TooLarge {
        /// Scores the table would hold.
        scores: u64,
        /// The limit given.
        limit: usize,
    },
    /// From candle.
    #[error(transparent)]
    Candle(candle_core::Error),
    /// From sparse-formats (invalid pattern, not N of every M...).
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Exports a trained layer (dense weights and a final N:M mask) to [`NmSparse`]; fails naming
/// the first group that does not keep exactly N.
pub fn export_nm(
    weights: &[f32],
    mask: &Mask,
    rows: usize,
    fan_in: usize,
    pattern: NmPattern,
) -> Result<NmSparse, LbcError> {
    Ok(NmSparse::from_dense(rows, fan_in, pattern, weights, mask)?)
}

//! N:M sparse training (layer L3): LBC, with SR-STE and one-shot magnitude N:M as baselines.
//!
//! Status: the algorithms as pure functions on `[rows, fan_in]` weights — combinations and
//! their scores ([`lbc`]), the removal schedule ([`schedule`]), SR-STE and magnitude masks
//! ([`baselines`]), export to [`sparse_formats::NmSparse`] ([`export_nm`]), and their use in a
//! candle loop ([`training`]: `NmLinear` layers and the `NmSparsifier`).
//!
//! ```
//! use lbc::lbc::{DirectScores, LbcState, ScoreOpt, ScoreSgd};
//! use lbc::schedule::RemovalSchedule;
//! use sparse_formats::NmPattern;
//!
//! let mut s = DirectScores::new(2, 8, NmPattern::new(2, 4), 1 << 20)?;
//! assert_eq!(s.mask().nnz(), 16); // dense start
//! let w: Vec<f32> = (0..16).map(|i| i as f32 - 8.0).collect();
//! let g: Vec<f32> = (0..16).map(|i| if i % 3 == 0 { -1.0 } else { 0.5 }).collect();
//! let sgd = ScoreOpt::Sgd(ScoreSgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4, nesterov: true });
//! let sched = RemovalSchedule { t_i: 0, t_f: 4, power: 3.0 };
//! for epoch in 0..5 {
//!     s.remove_to(sched.kept(6, epoch));
//!     s.step(&w, &g, sgd, true)?; // freeze once one combination is left
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

/// The most combinations of N in a group of M that LBC enumerates (C(16, 8) = 12870 fits;
/// C(56, 28) ≈ 7.6·10¹⁵ would never finish): checked before anything is enumerated.
pub const MAX_COMBINATIONS: u64 = 1 << 16;

/// The most (group, combination) entries of one layer's LBC state (one alive bit each in the
/// accumulated formulation, 512 MiB at the limit; a score and a momentum each in the direct one,
/// which has its own smaller limit).
pub const MAX_TABLE_ENTRIES: u64 = 1 << 32;

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
    /// LBC enumerates every combination of a group; this pattern has too many.
    #[error(
        "{n}:{m} has {combinations} combinations of N in every group of M; LBC enumerates them \
         and supports at most {limit} (8:16 has 12870)"
    )]
    TooManyCombinations {
        /// N.
        n: usize,
        /// M.
        m: usize,
        /// C(M, N) (saturating).
        combinations: u64,
        /// [`MAX_COMBINATIONS`].
        limit: u64,
    },
    /// The layer's (group, combination) table would be too large.
    #[error(
        "{n}:{m} on a {rows}×{fan_in} layer needs {entries} (group, combination) entries; the \
         limit is {limit} (a smaller M, or keep this layer dense)"
    )]
    TableTooLarge {
        /// N.
        n: usize,
        /// M.
        m: usize,
        /// Rows of the layer.
        rows: usize,
        /// Fan-in of the layer.
        fan_in: usize,
        /// Groups × C(M, N).
        entries: u64,
        /// [`MAX_TABLE_ENTRIES`].
        limit: u64,
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

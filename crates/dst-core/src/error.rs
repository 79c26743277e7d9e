//! The error type of dst-core.

use sparse_formats::FormatError;

/// Errors of dynamic sparse training. Messages name the layer or the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum DstError {
    /// A target sparsity outside `[0, 1)`.
    #[error("sparsity {0} is outside [0, 1)")]
    Sparsity(f64),
    /// A constant fan-in would be 0.
    #[error(
        "layer `{layer}`: fan-in would be 0 (budget {budget} weights over {rows} active rows): \
         reduce the sparsity or widen the layer"
    )]
    ZeroFanIn {
        /// The layer.
        layer: String,
        /// Its non-zero budget.
        budget: usize,
        /// Active rows the budget is spread over.
        rows: usize,
    },
    /// Something about one layer is wrong (shape, missing gradient, unknown name...).
    #[error("layer `{layer}`: {reason}")]
    Layer {
        /// The layer.
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// An invalid setting.
    #[error("invalid setting `{field}`: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// From sparse-formats.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// From a [`Sparsify`](crate::Sparsify) method implemented outside this crate.
    #[error(transparent)]
    Method(Box<dyn std::error::Error + Send + Sync>),
}

impl DstError {
    pub(crate) fn layer(layer: &str, reason: impl Into<String>) -> Self {
        DstError::Layer {
            layer: layer.to_string(),
            reason: reason.into(),
        }
    }
}

/// Result type of dst-core.
pub type Result<T> = std::result::Result<T, DstError>;

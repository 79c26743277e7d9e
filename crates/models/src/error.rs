//! [`TrainError`]: the error type of the models crate; each variant names the setting, file or
//! step at fault.

use std::path::PathBuf;

use crate::data::DataError;

/// Errors of training; each names the setting, file or step at fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is unusable.
    #[error("invalid setting `{field}`: {reason}")]
    Config {
        /// The setting (its path in the config, e.g. `method.sparsity`).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The loss became NaN or infinite.
    #[error(
        "training diverged at step {step} (epoch {epoch}): loss is {loss}; {}",
        match checkpoint {
            Some(p) => format!("the last good checkpoint is kept in {}", p.display()),
            None => "no checkpoint was written".to_string(),
        }
    )]
    Diverged {
        /// Optimizer step (1-based) whose loss was not finite.
        step: usize,
        /// Epoch (1-based).
        epoch: usize,
        /// The loss.
        loss: f32,
        /// The last good checkpoint's folder, if any.
        checkpoint: Option<PathBuf>,
    },
    /// A checkpoint, metrics or output file could not be written or read.
    #[error("{}: {reason}", path.display())]
    Checkpoint {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// From the data readers.
    #[error(transparent)]
    Data(#[from] DataError),
    /// From dst-core (and, through it, from lbc's N:M methods).
    #[error(transparent)]
    Dst(#[from] dst_core::DstError),
    /// From lbc.
    #[error(transparent)]
    Lbc(#[from] lbc::LbcError),
    /// From sparse-formats.
    #[error(transparent)]
    Format(#[from] sparse_formats::FormatError),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A collective operation of data-parallel training failed, or the ranks disagree.
    #[error(transparent)]
    Collective(#[from] crate::distributed::CollectiveError),
}

/// Result type of training.
pub type Result<T> = std::result::Result<T, TrainError>;

/// A [`TrainError::Config`] for `field`.
pub(crate) fn config_err(field: &'static str, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Config {
        field,
        reason: reason.to_string(),
    }
}

/// A [`TrainError::Checkpoint`] for `path`.
pub(crate) fn file_err(path: &std::path::Path, reason: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

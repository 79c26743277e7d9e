//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, converting, saving or loading a sparse layout.
///
/// Validation errors name the tensor (or the part of a structure) and the rule that was broken,
/// so that a message such as ``tensor `fc1.indices`: row 3 is not strictly increasing (7 after
/// 7)`` points at the exact problem in a file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A structural invariant does not hold. `tensor` names the offending part (for a layer in a
    /// file: `<layer>.<part>`), `rule` says what is wrong in words.
    #[error("tensor `{tensor}`: {rule}")]
    Invalid {
        /// The part that breaks the rule, e.g. `indices`, or `fc1.indices` inside a file.
        tensor: String,
        /// The broken rule, in words.
        rule: String,
    },
    /// The active rows of a mask do not all have the same count, so no constant fan-in
    /// (condensed) layout exists for it.
    #[error(
        "row {row} has {found} active entries but row {first_row} has {expected}: the condensed \
         layout needs the same fan-in in every active row"
    )]
    FanInNotConstant {
        /// The first active row, which fixes `k`.
        first_row: usize,
        /// Its count, i.e. the `k` every active row should have.
        expected: usize,
        /// The first row whose count differs.
        row: usize,
        /// That row's count.
        found: usize,
    },
    /// A group of `m` weights does not hold exactly `n` kept entries.
    #[error("row {row}, group {group}: {found} kept entries, but an {n}:{m} layout needs exactly {n} of every {m}")]
    NotNOfM {
        /// Row of the group.
        row: usize,
        /// Group index inside the row, in the layout's group order.
        group: usize,
        /// Kept entries found.
        found: usize,
        /// N.
        n: usize,
        /// M.
        m: usize,
    },
    /// The metadata of a file is missing a field or holds a value that cannot be used.
    #[error("metadata `{field}`: {reason}")]
    Metadata {
        /// The metadata key (for a layer: the layer name).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The bytes are not a valid safetensors container (truncated, bad header, bad offsets...).
    #[error("not a valid safetensors file: {0}")]
    Container(String),
    /// A file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// Any other error, in a named file (what [`crate::io::load`] returns for a bad file).
    #[error("{}: {error}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong in it (shown in this error's message, not as its source).
        error: Box<FormatError>,
    },
    /// An error from candle while converting to or from a tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl FormatError {
    /// Shorthand for [`FormatError::Invalid`].
    pub fn invalid(tensor: impl Into<String>, rule: impl Into<String>) -> Self {
        FormatError::Invalid {
            tensor: tensor.into(),
            rule: rule.into(),
        }
    }

    /// Prefix the tensor name of an [`FormatError::Invalid`] with a layer name (`fc1` +
    /// `indices` → `fc1.indices`); other errors are returned unchanged.
    pub fn in_layer(self, layer: &str) -> Self {
        match self {
            FormatError::Invalid { tensor, rule } => FormatError::Invalid {
                tensor: format!("{layer}.{tensor}"),
                rule,
            },
            FormatError::NotNOfM { .. } | FormatError::FanInNotConstant { .. } => {
                FormatError::Invalid {
                    tensor: layer.to_string(),
                    rule: self.to_string(),
                }
            }
            other => other,
        }
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, FormatError>;

/// Checks that a buffer has the length a shape asks for; `what` names it in the error.
pub(crate) fn check_len(what: &str, found: usize, expected: usize) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(FormatError::invalid(
            what,
            format!("expected {expected} elements, found {found}"),
        ))
    }
}

/// `a * b`, or an error naming `what` when it overflows.
pub(crate) fn checked_area(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| FormatError::invalid(what, format!("shape {a}×{b} overflows")))
}
